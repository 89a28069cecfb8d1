"""The engine's entry point for callers that checked their arguments
(AioContext._read_checked/_write_checked, used by threadlets.posix) and its
done-callback taken at submission: it answers exactly as read()/write()
do for what it accepts, and the callback runs exactly once -- or never,
when the request reached no backend -- whatever bytecode a Ctrl-C lands
on.  Both backends."""

from __future__ import annotations

import errno
import gc
import os
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

import threadlets.posix as px
from threadlets import AioContext

from .conftest import interrupt_at_c_return

SIZE = 16384
PATTERN = bytes((i * 7 + 3) % 251 + 1 for i in range(SIZE))


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    p = tmp_path / "f"
    p.write_bytes(PATTERN)
    return p


def _outcome(fn: Any) -> tuple[str, object]:
    try:
        return "ok", fn()
    except Exception as e:
        return "raised", (type(e), getattr(e, "errno", None))


def _run(ctx: AioContext, checked: bool, fn: Any, *args: Any) -> tuple[str, object]:
    """``fn(*args)`` (with a done-callback if ``checked``: the entry point
    under test), waited for; its outcome.  The done-callback (taken, or
    added as the contract says where it was not) runs once."""
    calls: list[Any] = []

    ran = threading.Event()

    def on_done(req: Any) -> None:
        calls.append(req)
        ran.set()

    submitted = _outcome(lambda: fn(*args, on_done, []) if checked else fn(*args))
    if submitted[0] != "ok":
        return submitted
    req: Any = submitted[1]
    if req._callbacks is None:  # not taken: read()/write() answered
        req.add_done_callback(on_done)
    result = _outcome(lambda: req.result(timeout=10))
    assert ran.wait(timeout=10)
    assert [r is req for r in calls] == [True]
    return result


CASES = [
    (0, 4096),
    (4096, 8192),
    (12288, 4096),  # up to the end of the file
    (12288, 8192),  # past it: short
    (SIZE, 4096),  # at the end: 0
    (1 << 40, 4096),  # far past it
    (100, 3),  # unaligned (O_DIRECT: refused by the kernel, or the bounce buffer)
    (2**63 - 2, 1),  # past the engine's largest offset
]


@pytest.mark.parametrize("direct", [False, True], ids=["cached", "direct"])
@pytest.mark.parametrize("inline", [False, True], ids=["queued", "inline"])
def test_the_checked_read_answers_as_read(
    backend: str, data_file: Path, direct: bool, inline: bool
) -> None:
    flags = os.O_RDONLY | (os.O_DIRECT if direct else 0)
    try:
        fd = os.open(data_file, flags)
    except OSError:
        pytest.skip("no O_DIRECT here")
    try:
        for offset, length in CASES:
            answers, contents = [], []
            for checked in (False, True):
                ctx = AioContext(backend=backend, inline=inline, deliver=False)
                try:
                    assert ctx.read(fd, 0, bytearray(4096)).result(timeout=10) in (4096, 0)
                    buf = _aligned(length)
                    view = memoryview(buf).cast("B")
                    fn = ctx._read_checked if checked else ctx.read
                    answers.append(_run(ctx, checked, fn, fd, offset, view))
                    contents.append(bytes(view))
                    assert ctx.stats().outstanding == 0
                    assert not ctx.queue._claimed
                finally:
                    ctx.close(timeout=10)
            assert answers[0] == answers[1], (offset, length)
            assert contents[0] == contents[1], (offset, length)
    finally:
        os.close(fd)


def _aligned(n: int) -> Any:
    from threadlets.probe import aligned_buffer

    return aligned_buffer(max(n, 1))[:n] if n % 4096 else aligned_buffer(n)


@pytest.mark.parametrize("append", [False, True], ids=["plain", "append"])
def test_the_checked_write_answers_as_write(backend: str, tmp_path: Path, append: bool) -> None:
    for offset, length in CASES:
        answers, contents = [], []
        for checked in (False, True):
            p = tmp_path / f"w{checked}"
            p.write_bytes(PATTERN)
            fd = os.open(p, os.O_RDWR | (os.O_APPEND if append else 0))
            ctx = AioContext(backend=backend, inline=False, deliver=False)
            try:
                assert ctx.read(fd, 0, bytearray(1)).result(timeout=10) == 1
                view = memoryview(bytes([length % 250 + 1]) * length)
                fn = ctx._write_checked if checked else ctx.write
                answers.append(_run(ctx, checked, fn, fd, offset, view))
                # (The file may be sparse and huge: its size and the
                # regions written.)
                st = os.fstat(fd)
                contents.append(
                    (st.st_size, os.pread(fd, 2 * SIZE, 0), os.pread(fd, length, offset))
                )
            finally:
                ctx.close(timeout=10)
                os.close(fd)
        assert answers[0] == answers[1], (offset, length)
        assert contents[0] == contents[1], (offset, length)


def test_the_checked_entry_refuses_what_read_refuses(backend: str, data_file: Path) -> None:
    """A closed context, an fd the context never met, a closed fd: the
    same answers as read()/write(), and an unused callback."""
    fd = os.open(data_file, os.O_RDWR)
    spare = os.dup(fd)
    os.close(spare)  # a number nothing holds
    try:
        for closed in (False, True):
            for target in (fd, spare):
                answers = []
                for checked in (False, True):
                    ctx = AioContext(backend=backend, deliver=False)
                    if closed:
                        ctx.close()
                    view = memoryview(bytearray(16))
                    read = ctx._read_checked if checked else ctx.read
                    write = ctx._write_checked if checked else ctx.write
                    answers.append(_run(ctx, checked, read, target, 0, view))
                    answers.append(_run(ctx, checked, write, target, 0, view))
                    ctx.close(timeout=10)
                assert answers[:2] == answers[2:], (closed, target)
                if closed:
                    assert answers[0][0] == "raised"
    finally:
        os.close(fd)


def test_ctrl_c_at_every_c_return_of_a_checked_read_delivers_once(
    backend: str, data_file: Path
) -> None:
    """Ctrl-C at the n-th C return of _read_checked, for every n: the
    callback runs once if the request reached a backend (then the buffer
    holds the data), never if it did not (the buffer untouched); nothing
    is left outstanding or claimed."""
    fd = os.open(data_file, os.O_RDONLY)
    try:
        n = 0
        while True:
            n += 1
            assert n < 2000, "never ran to its end"
            ctx = AioContext(backend=backend, inline=False, deliver=False)
            try:
                assert ctx.read(fd, 0, bytearray(1)).result(timeout=10) == 1
                buf = bytearray(4096)
                view = memoryview(buf)
                calls: list[Any] = []
                taken: list[Any] = []
                req = None
                seen = interrupt_at_c_return(n)
                try:
                    req = ctx._read_checked(fd, 4096, view, calls.append, taken)
                except KeyboardInterrupt:
                    pass
                finally:
                    sys.setprofile(None)
                    gc.enable()
                # (A context that delivers nothing: close() waits for the
                # outstanding requests, their callbacks run.)
                assert ctx.close(timeout=10), f"C return {n}"
                assert ctx.stats().outstanding == 0, f"C return {n}"
                assert not ctx.queue._claimed, f"C return {n}"
                if req is not None:
                    assert req._callbacks is not None  # taken (a queued context)
                    assert calls == [req], f"C return {n}"
                assert len(calls) <= 1, f"C return {n}"
                # The request is in `taken` exactly when its callback runs,
                # interrupted or not (how posix knows it must not report it
                # finished by the interrupt).
                assert taken == calls, f"C return {n}"
                if calls:
                    assert calls[0].result() == 4096
                    assert bytes(buf) == PATTERN[4096:8192], f"C return {n}"
                else:
                    assert bytes(buf) == bytes(4096), f"C return {n}"
            finally:
                ctx.close(timeout=10)
            if seen[0] < n:
                break  # the interrupt no longer lands: every point was tried
        assert n > 3, f"only {n} C returns"
    finally:
        os.close(fd)


@pytest.mark.parametrize("direct", [False, True], ids=["cached", "direct"])
def test_ctrl_c_at_every_c_return_of_a_quick_aio_read_finishes_it_once(
    backend: str, data_file: Path, direct: bool
) -> None:
    """posix's quick path hands its callback to the engine with the request
    (known by its view, before cb._req is stored): Ctrl-C at each C return
    of aio_read, then the aiocb resubmitted at once for a different length.
    The aiocb finishes once per submission: the first with its data or
    ECANCELED, the second with its own count -- never the first request's
    late completion."""
    try:
        fd = os.open(data_file, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    except OSError:
        pytest.skip("no O_DIRECT here")
    try:
        n = 0
        while True:
            n += 1
            assert n < 3000, "never ran to its end"
            ctx = AioContext(backend=backend, inline=False, deliver=False)
            rt = px.PosixAio(ctx)
            try:
                warm = px.aiocb(fd, 0, _aligned(4096))
                rt.aio_read(warm)  # notes the fd's identity: the next takes the quick path
                rt.aio_suspend([warm], 10.0)
                assert rt.aio_return(warm) == 4096
                buf = _aligned(4096)
                cb = px.aiocb(fd, 4096, buf)
                seen = interrupt_at_c_return(n)
                try:
                    rt.aio_read(cb)
                except KeyboardInterrupt:
                    pass
                finally:
                    sys.setprofile(None)
                    gc.enable()
                if cb._status is px._IDLE:  # interrupted before it was accepted
                    rt.aio_read(cb)
                err = rt.aio_error(cb)
                if err != errno.EINPROGRESS:
                    # Finished (interrupted, or already done): resubmitted at
                    # once, shorter, in a buffer of its own.
                    first = (rt.aio_error(cb), rt.aio_return(cb))
                    assert first in ((0, 4096), (errno.ECANCELED, -1)), f"C return {n}: {first}"
                    cb.aio_buf = _aligned(4096)
                    cb.aio_nbytes = 512 if not direct else 4096
                    cb.aio_offset = 8192
                    rt.aio_read(cb)
                    want = 512 if not direct else 4096
                    rt.aio_suspend([cb], 10.0)
                    assert rt.aio_error(cb) == 0, f"C return {n}"
                    assert rt.aio_return(cb) == want, f"C return {n}"
                    assert bytes(cb.aio_buf[:want]) == PATTERN[8192 : 8192 + want]
                    if first[0] == errno.ECANCELED:
                        # Cancelled means nothing moved, for good: no request
                        # still running fills the buffer the caller got back.
                        assert ctx.close(timeout=10), f"C return {n}"
                        assert bytes(buf) == bytes(4096), f"C return {n}: filled after ECANCELED"
                else:
                    rt.aio_suspend([cb], 10.0)
                    assert (rt.aio_error(cb), rt.aio_return(cb)) == (0, 4096), f"C return {n}"
                    assert bytes(buf) == PATTERN[4096:8192], f"C return {n}"
                assert ctx.close(timeout=10), f"C return {n}"
                assert not rt._fds, f"C return {n}"
            finally:
                ctx.close(timeout=10)
            if seen[0] < n:
                break
        assert n > 5, f"only {n} C returns"
    finally:
        os.close(fd)
