"""posix's door into the engine (AioContext._read_checked/_write_checked) on
the io_uring backend takes the ring's fast path, read()'s and write()'s
(_start_rw: no _Transfer, no _start, _ring_rw_done the completion), with
its done-callback taken at submission and `taken`'s contract: the callback
runs exactly once -- in the thread that reaps the ring -- if and only if
the request is in `taken`, whatever C return a Ctrl-C lands on, on the
ring's way, the pool's (the ring refusing) and _start_taken's (what the
fast path does not take: O_DIRECT misaligned, streams)."""

from __future__ import annotations

import gc
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import threadlets.posix as px
from threadlets import AioContext
from threadlets.engine import AioRequest, _RingBackend
from threadlets.probe import aligned_buffer

from .conftest import HAVE_RING, interrupt_at_c_return, wait_until

SIZE = 16384
PATTERN = bytes((i * 7 + 3) % 251 + 1 for i in range(SIZE))
OTHER = bytes(reversed(PATTERN))

ring_only = pytest.mark.skipif(not HAVE_RING, reason="no io_uring here")


@pytest.fixture(params=[False, True], ids=["cached", "direct"])
def file_fd(request: pytest.FixtureRequest) -> Iterator[tuple[int, int]]:
    """A file of PATTERN on ext4 (/var/tmp: O_DIRECT works there), opened
    read-write with O_DIRECT or not, and without (for os.pread's unaligned
    buffers)."""
    direct = bool(request.param)
    fd0, name = _mkstemp()
    try:
        os.write(fd0, PATTERN)
        try:
            fd = os.open(name, os.O_RDWR | (os.O_DIRECT if direct else 0))
        except OSError:  # pragma: no cover - no O_DIRECT here
            pytest.skip("no O_DIRECT here")
        try:
            yield fd, fd0
        finally:
            os.close(fd)
    finally:
        os.close(fd0)
        os.unlink(name)


def _mkstemp() -> tuple[int, str]:
    import tempfile

    return tempfile.mkstemp(prefix="threadlets-pxring-", dir="/var/tmp")


def _context(**kwargs: Any) -> AioContext:
    return AioContext(backend="io_uring", inline=False, deliver=False, **kwargs)


def _buffer(n: int, data: bytes | None = None) -> memoryview:
    view = aligned_buffer(n)
    if data is not None:
        view[:] = data
    return view


@ring_only
@pytest.mark.parametrize("op", ["read", "write"])
def test_posix_requests_take_the_rings_fast_path(file_fd: tuple[int, int], op: str) -> None:
    """aio_read/aio_write of a file the ring knows: the request is sent by
    _start_rw (its completion _ring_rw_done), not by _RingBackend.start;
    the aiocb's answer is the kernel's, and the callback that finishes it
    runs once, in the reaper thread."""
    fd, plain = file_fd
    ctx = _context()
    rt = px.PosixAio(ctx)
    ring = ctx._ring
    assert ring is not None
    sent: list[Any] = []
    started: list[Any] = []
    real_submit, real_start = ring.submit, _RingBackend.start

    def submit(*args: Any) -> int:
        sent.append(args[6])
        return real_submit(*args)

    def start(self: _RingBackend, req: AioRequest) -> bool:
        started.append(req)
        return real_start(self, req)

    try:
        warm = px.aiocb(fd, 0, _buffer(4096))
        rt.aio_read(warm)  # (learns the file: the ring's fast path knows it from here)
        rt.aio_suspend([warm], 10)
        assert rt.aio_return(warm) == 4096
        ring.submit = submit  # type: ignore[method-assign]
        _RingBackend.start = start  # type: ignore[method-assign]
        for offset in (4096, 8192, 0):
            buf = _buffer(4096, OTHER[offset : offset + 4096] if op == "write" else None)
            cb = px.aiocb(fd, offset, buf)
            (rt.aio_read if op == "read" else rt.aio_write)(cb)
            rt.aio_suspend([cb], 10)
            assert rt.aio_error(cb) == 0
            assert rt.aio_return(cb) == 4096
            want = PATTERN if op == "read" else OTHER
            if op == "read":
                assert bytes(buf) == want[offset : offset + 4096]
            else:
                assert os.pread(plain, 4096, offset) == bytes(buf)
        assert not started
        assert len(sent) == 3
        assert all(getattr(s, "__func__", None) is AioRequest._ring_rw_done for s in sent)
    finally:
        _RingBackend.start = real_start  # type: ignore[method-assign]
        del ring.submit
        ctx.close(timeout=10)


@ring_only
@pytest.mark.parametrize("contained", [True, False], ids=["contained", "plain"])
def test_the_taken_callback_runs_once_in_the_reaper(
    file_fd: tuple[int, int], contained: bool
) -> None:
    """_read_checked on the ring: on_done, taken at submission, runs exactly
    once, in the thread that reaped the completion (not the submitter's),
    as _finished runs it for a context that delivers nothing -- posix's
    contained callback (its quick branch) and any other (the long one)."""
    from threadlets.pool import _ContainedCallback

    fd, _ = file_fd
    ctx = _context()
    try:
        assert ctx.read(fd, 0, _buffer(4096)).result(timeout=10) == 4096
        for offset in (0, 4096, 12288):
            threads: list[int] = []
            got = threading.Event()

            def record(req: Any, threads: list[int] = threads, got: Any = got) -> None:
                threads.append(threading.get_ident())
                got.set()

            on_done: Any = _ContainedCallback(record) if contained else record
            taken: list[AioRequest] = []
            buf = _buffer(4096)
            req = ctx._read_checked(fd, offset, buf, on_done, taken)
            assert taken == [req]
            assert req._callbacks == [on_done]
            assert got.wait(10)
            assert req.result(timeout=10) == 4096
            assert bytes(buf) == PATTERN[offset : offset + 4096]
            wait_until(lambda: ctx.stats().outstanding == 0)
            assert len(threads) == 1
            assert threads[0] != threading.get_ident()
    finally:
        ctx.close(timeout=10)


@ring_only
def test_a_short_ring_read_through_posix_finishes_as_preadv(file_fd: tuple[int, int]) -> None:
    """A read across end of file: the kernel's count is short, so the
    fused completion is not the answer (_ring_rw_done makes its _Transfer
    and goes on as _ring_done); the aiocb gets what os.preadv gives, once."""
    fd, plain = file_fd
    ctx = _context()
    rt = px.PosixAio(ctx)
    try:
        for offset in (SIZE - 4096, SIZE, SIZE + 4096):
            buf = _buffer(8192)
            cb = px.aiocb(fd, offset, buf)
            rt.aio_read(cb)
            rt.aio_suspend([cb], 10)
            want = bytearray(8192)
            n = os.preadv(plain, [want], offset)
            assert (rt.aio_error(cb), rt.aio_return(cb)) == (0, n)
            assert bytes(buf[:n]) == bytes(want[:n])
        wait_until(lambda: ctx.stats().outstanding == 0)
    finally:
        ctx.close(timeout=10)


@pytest.mark.parametrize("backend", ["threads", "io_uring"])
def test_posix_on_a_pipe_is_one_transfer(backend: str) -> None:
    """A stream is not the ring's fast path (_start_taken's way): aio_read
    of a pipe gets one transfer's count, as glibc's read(2)."""
    if backend == "io_uring" and not HAVE_RING:
        pytest.skip("no io_uring here")
    ctx = AioContext(backend=backend, deliver=False)
    rt = px.PosixAio(ctx)
    r, w = os.pipe()
    try:
        os.write(w, b"abc")
        buf = bytearray(10)
        cb = px.aiocb(r, 0, buf)
        rt.aio_read(cb)
        rt.aio_suspend([cb], 10)
        assert (rt.aio_error(cb), rt.aio_return(cb)) == (0, 3)
        assert bytes(buf[:3]) == b"abc"
        out = px.aiocb(w, 0, b"xyz")
        rt.aio_write(out)
        rt.aio_suspend([out], 10)
        assert (rt.aio_error(out), rt.aio_return(out)) == (0, 3)
        assert os.read(r, 10) == b"xyz"
    finally:
        ctx.close(timeout=10)
        os.close(r)
        os.close(w)


@ring_only
def test_posix_requests_set_what_aiorequest_init_sets(tmp_path: Path) -> None:
    """The request _read_checked/_write_checked make through _start_rw is
    its spelled-out AioRequest.__init__ (see
    test_ring_cost.test_start_rw_sets_what_aiorequest_init_sets), with the
    done-callback stored: the same slots at the moment the ring is asked,
    and, the ring refusing it, as __init__ made it for the pool."""
    p = tmp_path / "f"
    p.write_bytes(PATTERN)
    fd = os.open(p, os.O_RDWR)
    ctx = _context()
    ring = ctx._ring
    assert ring is not None

    def slots_set(req: object) -> set[str]:
        names: set[str] = set()
        for cls in type(req).__mro__:
            for name in getattr(cls, "__slots__", ()):
                if name != "__weakref__" and hasattr(req, name):
                    names.add(name)
        return names

    seen: list[tuple[set[str], Any]] = []

    def refuse(*args: Any) -> int:
        req = args[6].__self__
        seen.append((slots_set(req), req._callbacks))
        return 0  # refused: the request goes to the pool

    try:
        assert ctx.read(fd, 0, bytearray(1)).result(timeout=10) == 1  # learns the file
        ring.submit = refuse  # type: ignore[method-assign]
        made = slots_set(AioRequest(ctx, "read", None, (), None))
        for write in (False, True):
            calls: list[Any] = []
            taken: list[AioRequest] = []
            view = memoryview(bytearray(PATTERN[:512]))
            fn = ctx._write_checked if write else ctx._read_checked
            req = fn(fd, 0, view, calls.append, taken)
            assert taken == [req]
            assert slots_set(req) == made  # (the pool's)
            assert req.result(timeout=10) == 512
            wait_until(lambda: ctx.stats().outstanding == 0)
            assert calls == [req]
        assert len(seen) == 2
        for names, callbacks in seen:
            assert names == made - {"_fn", "_kwargs"}  # (see _start_rw)
            assert callbacks is not None
            assert len(callbacks) == 1
    finally:
        del ring.submit
        ctx.close(timeout=10)
        os.close(fd)


# -- Ctrl-C at every C return ------------------------------------------------------------


@ring_only
@pytest.mark.parametrize("way", ["ring", "refused", "misaligned"])
@pytest.mark.parametrize("op", ["read", "write"])
def test_ctrl_c_at_every_c_return_of_the_checked_ring_path_delivers_once(op: str, way: str) -> None:
    """Ctrl-C at the n-th C return of _read_checked/_write_checked, for
    every n, on each of the fast path's ways: the ring's (a file it knows),
    the pool's (the ring refusing: full or closing), and _start_taken's
    (O_DIRECT misaligned: what the fast path does not take).  The request
    is in `taken` exactly when its callback runs, and that is once; then
    the data moved (the buffer, or the file), else nothing did; nothing is
    left outstanding or claimed."""
    fd0, name = _mkstemp()
    direct = way == "misaligned"
    try:
        try:
            fd = os.open(name, os.O_RDWR | (os.O_DIRECT if direct else 0))
        except OSError:  # pragma: no cover - no O_DIRECT here
            pytest.skip("no O_DIRECT here")
        ctx = _context()
        ring = ctx._ring
        assert ring is not None
        try:
            os.pwrite(fd0, PATTERN, 0)
            assert ctx.read(fd, 0, _buffer(4096)).result(timeout=10) == 4096  # learns it
            if way == "refused":
                ring.submit = lambda *args: 0  # type: ignore[method-assign]
            n = 0
            while True:
                n += 1
                assert n < 2000, "never ran to its end"
                os.pwrite(fd0, PATTERN, 0)
                # (Misaligned: 4096 bytes at an address one past an aligned one.)
                buf = _buffer(8192)[1:4097] if direct else _buffer(4096)
                if op == "write":
                    buf[:] = OTHER[4096:8192]
                calls: list[Any] = []
                taken: list[AioRequest] = []
                fn = ctx._read_checked if op == "read" else ctx._write_checked
                seen = interrupt_at_c_return(n)
                try:
                    fn(fd, 4096, buf, calls.append, taken)
                except KeyboardInterrupt:
                    pass
                finally:
                    sys.setprofile(None)
                    gc.enable()
                wait_until(lambda: ctx.stats().outstanding == 0)
                assert not ctx.queue._claimed, n
                assert taken == calls, n
                assert len(calls) <= 1, n
                now = os.pread(fd0, 4096, 4096)
                if calls:
                    assert calls[0].result() == 4096, n
                    if op == "read":
                        assert bytes(buf) == PATTERN[4096:8192], n
                    else:
                        assert now == OTHER[4096:8192], n
                elif op == "read":
                    assert bytes(buf) == bytes(4096), n
                else:
                    assert now == PATTERN[4096:8192], n
                if seen[0] < n:
                    break  # the interrupt no longer lands: every point was tried
            assert n > 3, f"only {n} C returns"
        finally:
            if way == "refused":
                del ring.submit
            assert ctx.close(timeout=10)
            os.close(fd)
    finally:
        os.close(fd0)
        os.unlink(name)
