"""threadlets.posix's quick submission, second round (issue 13): a
memoryview buffer is cast by itself (one C call less), the door into the
engine (_read_checked/_write_checked) no longer puts a request it returns
into ``taken``.  What each answers must not move: every form of buffer
gets the general path's answer, and Ctrl-C at any C return of a quick
submission of a memoryview still finishes the aiocb exactly once."""

from __future__ import annotations

import array
import errno
import functools
import gc
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import threadlets.posix as px
from threadlets import AioContext, RingUnavailable

from .conftest import interrupt_at_c_return

DATA = bytes(range(256)) * 16  # 4 KiB
BACKENDS = ["threads", "io_uring"]


def _context(backend: str) -> AioContext:
    try:
        return AioContext(deliver=False, backend=backend, inline=False)
    except RingUnavailable as e:
        pytest.skip(f"io_uring: {e}")


@pytest.fixture
def path(tmp_path: Path) -> Path:
    p = tmp_path / "data"
    p.write_bytes(DATA)
    return p


def _done(rt: px.PosixAio, cb: px.aiocb) -> tuple[int, int]:
    rt.aio_suspend([cb], 10)
    return rt.aio_error(cb), rt.aio_return(cb)


def _released() -> memoryview:
    m = memoryview(bytearray(64))
    m.release()
    return m


#: name -> (a fresh buffer, whether the quick path takes it for a read, for a write)
BUFFERS: dict[str, tuple[Callable[[], Any], bool, bool]] = {
    "bytearray": (lambda: bytearray(64), True, True),
    "bytes": (lambda: bytes(64), False, True),
    "memoryview": (lambda: memoryview(bytearray(64)), True, True),
    "readonly memoryview": (lambda: memoryview(bytes(64)), False, True),
    "memoryview of ints": (lambda: memoryview(bytearray(64)).cast("i"), True, True),
    "2-D memoryview": (lambda: memoryview(bytearray(64)).cast("B", (8, 8)), True, True),
    "strided memoryview": (lambda: memoryview(bytearray(128))[::2], False, False),
    "released memoryview": (_released, False, False),
    "empty memoryview": (lambda: memoryview(bytearray(0)), False, False),
    "array": (lambda: array.array("h", bytes(64)), True, True),
    "not a buffer": (lambda: 64, False, False),
}


def _outcome(
    submit: Callable[[px.aiocb], None], rt: px.PosixAio, cb: px.aiocb, fd: int
) -> tuple[Any, ...]:
    """What a submission answers: the exception (type, errno), or the
    aiocb's (error, return value), the buffer's bytes and the file's."""
    try:
        submit(cb)
    except Exception as e:
        return ("raised", type(e), getattr(e, "errno", None))
    got = _done(rt, cb)
    try:
        buf = bytes(memoryview(cb.aio_buf).cast("B"))
    except (TypeError, ValueError):
        buf = None
    return ("done", got, buf, os.pread(fd, len(DATA), 0))


@pytest.mark.skipif(px._quick_syscall is None, reason="no quick path here (portable mode)")
@pytest.mark.parametrize("nbytes", [None, 16, 65])
@pytest.mark.parametrize("op", ["read", "write"])
@pytest.mark.parametrize("kind", sorted(BUFFERS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_buffer_gets_the_general_paths_answer(
    backend: str, kind: str, op: str, nbytes: int | None, tmp_path: Path
) -> None:
    """Differential: aio_read/aio_write of each form of buffer on an fd the
    runtime knows (the quick path, where it takes it) against the general
    path's own submission (_submit_checked, every check spelled out), on a
    fresh copy of the file each.  And the quick path does take what it
    should (a memoryview, cast by itself) -- so the comparison covers it."""
    make, quick_read, quick_write = BUFFERS[kind]
    answers = []
    for general in (False, True):
        p = tmp_path / f"data{general}"
        p.write_bytes(DATA)
        fd = os.open(p, os.O_RDWR)
        ctx = _context(backend)
        try:
            rt = px.PosixAio(ctx)
            warm = px.aiocb(fd, 0, bytearray(1))
            rt.aio_read(warm)  # notes the fd: the next submission may be quick
            assert _done(rt, warm) == (0, 1)
            long_way: list[px.aiocb] = []
            checked = rt._submit_checked

            def spy(
                cb: px.aiocb, op: str, checked: Any = checked, long_way: Any = long_way
            ) -> None:
                long_way.append(cb)
                checked(cb, op)

            rt._submit_checked = spy  # type: ignore[method-assign]
            cb = px.aiocb(fd, 128, make(), nbytes=nbytes)
            if general:
                answers.append(_outcome(functools.partial(checked, op=op), rt, cb, fd))
            else:
                submit = rt.aio_read if op == "read" else rt.aio_write
                answers.append(_outcome(submit, rt, cb, fd))
                quick = (quick_read if op == "read" else quick_write) and nbytes != 65
                assert (not long_way) == quick, (kind, op, nbytes)
        finally:
            ctx.close(timeout=10)
            os.close(fd)
    assert answers[0] == answers[1], (kind, op, nbytes)


@pytest.mark.parametrize("kind", ["memoryview", "readonly memoryview", "memoryview of ints"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_ctrl_c_at_every_c_return_of_a_quick_write_of_a_memoryview(
    backend: str, kind: str, path: Path
) -> None:
    """For n = 1, 2, ...: Ctrl-C as the n-th C call of threadlets returns
    in a quick aio_write of a memoryview (cast by itself).  The aiocb ends
    finished exactly once -- written (then the file holds the bytes) or
    ECANCELED (then nothing was written) -- nothing is left on the fd's
    tables or outstanding, and it can be submitted again."""
    fd = os.open(path, os.O_RDWR)
    try:
        n = 0
        while True:
            n += 1
            assert n < 2000, "never ran to its end"
            os.pwrite(fd, DATA, 0)
            ctx = _context(backend)
            try:
                rt = px.PosixAio(ctx)
                warm = px.aiocb(fd, 0, bytearray(1))
                rt.aio_read(warm)
                assert _done(rt, warm) == (0, 1)
                new = bytes(range(7, 71))
                buf: Any = memoryview(new) if kind == "readonly memoryview" else None
                if buf is None:
                    buf = memoryview(bytearray(new))
                    if kind == "memoryview of ints":
                        buf = buf.cast("i")
                cb = px.aiocb(fd, 256, buf)
                interrupted = False
                seen = interrupt_at_c_return(n)
                try:
                    rt.aio_write(cb)
                except KeyboardInterrupt:
                    interrupted = True
                finally:
                    sys.setprofile(None)
                    gc.enable()
                if cb._status is px._IDLE:  # interrupted before it was claimed
                    assert interrupted
                    rt.aio_write(cb)
                got = _done(rt, cb)
                assert ctx.close(timeout=10), f"C return {n}"
                assert ctx.stats().outstanding == 0, f"C return {n}"
                assert not rt._fds, f"C return {n}"
                now = os.pread(fd, 64, 256)
                if got == (errno.ECANCELED, -1):
                    assert interrupted, f"C return {n}"
                    assert now == DATA[256:320], f"C return {n}: written after ECANCELED"
                else:
                    assert got == (0, 64), f"C return {n}: {got}"
                    assert now == new, f"C return {n}"
            finally:
                ctx.close(timeout=10)
            if seen[0] < n:
                break  # the interrupt no longer lands: every point was tried
        assert n > 5, f"only {n} C returns"
    finally:
        os.close(fd)


@pytest.mark.parametrize("op", ["read", "write"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_the_door_answers_a_returned_request_once(backend: str, op: str, path: Path) -> None:
    """_read_checked/_write_checked on a file the context knows: a request
    returned runs its done-callback exactly once (whether or not ``taken``
    holds it), with the data moved."""
    fd = os.open(path, os.O_RDWR)
    ctx = _context(backend)
    try:
        assert ctx.read(fd, 0, bytearray(1)).result(timeout=10) == 1  # learns the file
        sent = []
        for k in range(8):
            calls: list[Any] = []
            taken: list[Any] = []
            part = DATA[k * 64 : k * 64 + 64]
            view = memoryview(bytearray(part) if op == "write" else bytearray(64))
            fn = ctx._write_checked if op == "write" else ctx._read_checked
            req = fn(fd, k * 64, view, calls.append, taken)
            assert taken == [req]
            sent.append((req, calls, view, part))
        assert ctx.close(timeout=10)  # (its requests' callbacks have run)
        for req, calls, view, part in sent:
            assert req.result(timeout=10) == 64
            assert req._callbacks is not None  # taken: not read()'s answer
            assert calls == [req]
            if op == "read":
                assert bytes(view) == part
    finally:
        ctx.close(timeout=10)
        os.close(fd)
