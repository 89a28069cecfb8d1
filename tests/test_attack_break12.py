"""h-break12: close() racing the inline attempt, and the ring's one-buffer
fast path (_start_rw) attacked from outside."""

from __future__ import annotations

import errno
import functools
import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import threadlets.posix as px
from threadlets import AioContext
from threadlets.engine import RWF_NOWAIT
from threadlets.uring import RingUnavailable

from .conftest import wait_until

BACKENDS = ["threads", "io_uring"]
DATA = bytes(range(256)) * 16  # 4 KiB


def _context(backend: str, **kwargs: Any) -> AioContext:
    try:
        return AioContext(backend=backend, **kwargs)
    except RingUnavailable as e:  # pragma: no cover - no io_uring here
        pytest.skip(f"io_uring: {e}")


@pytest.fixture
def fd() -> Iterator[int]:
    """A file of DATA where RWF_NOWAIT writes work (ext4's /var/tmp; tmpfs
    refuses them)."""
    fd, name = tempfile.mkstemp(prefix="threadlets-break12-", dir="/var/tmp")
    try:
        os.unlink(name)
        os.write(fd, DATA)
        yield fd
    finally:
        os.close(fd)


# -- Task 1: close() begins while the inline attempt moves bytes --------------------------


def _close_during_inline(ctx: AioContext, write: bool, short: bool) -> list[threading.Thread]:
    """Patch ``ctx``'s inline syscall (RWF_NOWAIT calls only): the first one
    moves its bytes (half of them if ``short``), then another thread's
    close() begins -- `closing` set -- before it returns.  Returns the
    closing thread (in a list, once started)."""
    closer: list[threading.Thread] = []
    if write:
        real: Callable[..., int] = ctx._sc.pwritev
    else:
        real = ctx._preadv

    def patched(fd: int, views: Any, offset: int, flags: int = 0) -> int:
        if not flags & RWF_NOWAIT or closer:
            return real(fd, views, offset, flags)
        if short:
            v = memoryview(views[0])
            views = [v[: len(v) // 2]]
        # (Without the flag: a file system that takes it.  Few do for
        # writes -- not this machine's tmpfs or /var/tmp.)
        n = real(fd, views, offset, flags & ~RWF_NOWAIT)
        t = threading.Thread(target=ctx.close)
        closer.append(t)
        t.start()
        wait_until(lambda: ctx._cq.closing)
        return n

    if write:
        ctx._sc.pwritev = patched  # type: ignore[method-assign]
    else:
        ctx._preadv = patched
    return closer


def _finish_close(ctx: AioContext, closer: list[threading.Thread]) -> None:
    assert closer, "the inline attempt was not made"
    closer[0].join(10)
    assert not closer[0].is_alive()
    assert ctx._cq.notifier.closed


@pytest.mark.parametrize("short", [False, True], ids=["whole", "short"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.linux_only("rwf_nowait")
def test_write_inline_then_close_reports_the_bytes(backend: str, fd: int, short: bool) -> None:
    """The inline write moved its bytes, then close() began before write()
    admitted the request: write() raised RuntimeError (nothing written,
    said it) with the bytes in the file -- a retry wrote them twice."""
    ctx = _context(backend)
    closer = _close_during_inline(ctx, True, short)
    os.pread(fd, 1, 0)  # (known to the context: the fast path)
    ctx.read(fd, 0, bytearray(1)).wait(10)
    new = bytes(reversed(DATA))
    req = ctx.write(fd, 0, new)
    _finish_close(ctx, closer)
    assert req.done()
    assert req.result() == len(new)
    assert os.pread(fd, len(new), 0) == new


@pytest.mark.parametrize("short", [False, True], ids=["whole", "short"])
@pytest.mark.parametrize("callback", [False, True], ids=["plain", "callback"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.linux_only("rwf_nowait")
def test_read_inline_then_close_reports_the_bytes(
    backend: str, fd: int, short: bool, callback: bool
) -> None:
    ctx = _context(backend)
    ctx.read(fd, 0, bytearray(1)).wait(10)
    closer = _close_during_inline(ctx, False, short)
    seen: list[Any] = []
    buf = bytearray(len(DATA))
    if short and not callback:
        # A read nobody is called back for takes no admission for its
        # inline attempt (the cached-read hot path): the rest of a short
        # one is refused as close() began.  The bytes moved are in the
        # caller's buffer only; nothing is counted, nothing waits.
        with pytest.raises(RuntimeError):
            ctx.read(fd, 0, buf)
        _finish_close(ctx, closer)
        assert ctx._cq.admitted == ctx._cq.delivered
        return
    req = ctx.read(fd, 0, buf, callback=seen.append if callback else None)
    _finish_close(ctx, closer)
    assert req.done()
    assert req.result() == len(DATA)
    assert bytes(buf) == DATA
    assert seen == ([req] if callback else [])


@pytest.mark.parametrize("write", [False, True], ids=["read", "write"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_closing_refuses_before_the_inline_attempt(backend: str, fd: int, write: bool) -> None:
    """A context whose close() began refuses before anything moves, even
    to a caller that found the file in its table before."""
    ctx = _context(backend)
    ctx.read(fd, 0, bytearray(1)).wait(10)
    calls: list[int] = []
    real = ctx._sc.pwritev if write else ctx._preadv

    def counted(fd: int, views: Any, offset: int, flags: int = 0) -> int:
        calls.append(flags)
        return real(fd, views, offset, flags)

    if write:
        ctx._sc.pwritev = counted  # type: ignore[method-assign]
    else:
        ctx._preadv = counted
    ctx._cq.closing = True  # (close()'s first step, its lock aside)
    try:
        submit = functools.partial(ctx.write, fd, 0, b"x" * 10) if write else None
        if submit is None:
            submit = functools.partial(ctx.read, fd, 0, bytearray(10))
        with pytest.raises(RuntimeError, match="closed"):
            submit()
        assert calls == []
        assert os.pread(fd, len(DATA), 0) == DATA
    finally:
        ctx._cq.closing = False
        ctx.close()


@pytest.mark.parametrize("short", [False, True], ids=["whole", "short"])
@pytest.mark.parametrize("op", ["read", "write"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.linux_only("rwf_nowait")
def test_posix_inline_then_close_reports_the_bytes(
    backend: str, fd: int, op: str, short: bool
) -> None:
    """The same through threadlets.posix (_read_checked/_write_checked)."""
    ctx = _context(backend, deliver=False)
    rt = px.PosixAio(ctx)
    warm = px.aiocb(fd, 0, bytearray(1))
    rt.aio_read(warm)
    rt.aio_suspend([warm], 10)
    assert rt.aio_return(warm) == 1
    closer = _close_during_inline(ctx, op == "write", short)
    new = bytes(reversed(DATA))
    buf = bytearray(new) if op == "write" else bytearray(len(DATA))
    cb = px.aiocb(fd, 0, buf)
    (rt.aio_write if op == "write" else rt.aio_read)(cb)
    _finish_close(ctx, closer)
    rt.aio_suspend([cb], 10)
    assert (rt.aio_error(cb), rt.aio_return(cb)) == (0, len(DATA))
    assert os.pread(fd, len(DATA), 0) == (new if op == "write" else DATA)
    if op == "read":
        assert bytes(buf) == DATA


# -- Task 2: the ring's one-buffer fast path (_start_rw) ----------------------------------


def _ring_context(**kwargs: Any) -> AioContext:
    ctx = _context("io_uring", **kwargs)
    if ctx._ring is None:  # pragma: no cover
        ctx.close()
        pytest.skip("no ring")
    return ctx


@pytest.mark.parametrize("write", [False, True], ids=["read", "write"])
def test_ring_refused_fast_path_lets_the_buffer_go(fd: int, write: bool) -> None:
    """A request _start_rw made, which the ring refused (full, closing), went
    to the pool with the caller's buffer still in its ``_args``: finished,
    it kept a memoryview of an mmap alive, and mmap.close() raised
    BufferError ("exported pointers exist") while the request lived."""
    import mmap

    ctx = _ring_context()
    try:
        ctx.read(fd, 0, bytearray(1)).wait(10)
        ring = ctx._ring
        assert ring is not None
        mm = mmap.mmap(-1, 4096)
        if write:
            mm[:] = bytes(reversed(DATA))
        room = ring._room
        ring._room = 0  # (as full: the ring refuses, the pool takes it)
        try:
            req = (ctx.write if write else ctx.read)(fd, 0, memoryview(mm))
        finally:
            ring._room = room
        assert req.wait(10)
        assert req.result() == 4096
        if not write:
            assert mm[:] == DATA
        mm.close()  # (the request still referenced: it must not hold the memory)
        assert req.done()
    finally:
        ctx.close()


def _buffer(kind: str, n: int, fill: bytes) -> Any:
    """A buffer of ``n`` bytes holding ``fill`` (cycled), of one kind."""
    import array
    import mmap

    data = (fill * (n // max(len(fill), 1) + 1))[:n] if fill else bytes(n)
    if kind == "bytes":
        return data
    if kind == "bytearray":
        return bytearray(data)
    if kind == "slice":  # a memoryview of a bytearray, not at its start
        b = bytearray(b"\xee" * 7 + data + b"\xee" * 5)
        return memoryview(b)[7 : 7 + n]
    if kind == "roslice":  # read-only, not at the start of its bytes
        return memoryview(b"\xee" * 7 + data + b"\xee" * 5)[7 : 7 + n]
    if kind == "mmap":
        mm = mmap.mmap(-1, max(n, 1))
        mm[:n] = data
        return memoryview(mm)[:n]
    if kind == "array":
        return array.array("B", data)
    assert kind == "strided"  # non-contiguous
    b = bytearray(2 * n)
    b[::2] = data
    return memoryview(b)[::2]


KINDS = ["bytes", "roslice", "bytearray", "slice", "mmap", "array", "strided"]


def _try(fn: Callable[[], Any]) -> tuple[str, Any]:
    try:
        return ("ok", fn())
    except Exception as e:
        return (type(e).__name__, getattr(e, "errno", None))


@pytest.mark.parametrize("inline", [False, True], ids=["ring", "inline"])
def test_ring_fast_path_answers_as_preadv_pwritev(inline: bool) -> None:
    """Differential: one-buffer reads and writes of a regular file, every
    buffer kind, offsets and lengths across EOF, against os.preadv/pwritev
    on a twin file."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    ctx = _ring_context(inline=inline)
    a, na = tempfile.mkstemp(prefix="threadlets-break12-", dir="/var/tmp")
    b, nb = tempfile.mkstemp(prefix="threadlets-break12-", dir="/var/tmp")
    try:
        os.unlink(na)
        os.unlink(nb)
        for x in (a, b):
            os.write(x, DATA)

        @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
        @given(
            write=st.booleans(),
            kind=st.sampled_from(KINDS),
            offset=st.integers(0, 3 * 4096),
            n=st.integers(0, 9000),
        )
        def one(write: bool, kind: str, offset: int, n: int) -> None:
            if write:
                mine = _buffer(kind, n, bytes([offset % 251, 7]))
                theirs = _buffer(kind, n, bytes([offset % 251, 7]))
                got = _try(lambda: ctx.write(a, offset, mine).wait(10) and None)
                req_result = _try(lambda: ctx.write(a, offset, mine)) if got[0] == "ok" else got
                want = _try(lambda: os.pwritev(b, [theirs], offset))
                if req_result[0] == "ok":
                    assert req_result[1].wait(10)
                    assert ("ok", req_result[1].result()) == want
                else:
                    assert req_result[0] == want[0]
            else:
                mine = _buffer(kind, n, b"\x55")
                theirs = _buffer(kind, n, b"\x55")
                r = _try(lambda: ctx.read(a, offset, mine))
                want = _try(lambda: os.preadv(b, [theirs], offset))
                if r[0] == "ok":
                    assert r[1].wait(10)
                    assert ("ok", r[1].result()) == want
                    assert bytes(mine) == bytes(theirs)
                elif kind in ("bytes", "roslice"):
                    # (The engine's choice, older than the fast path: a
                    # read-only buffer to read into is a TypeError, where
                    # os.preadv raises BufferError -- see _views.)
                    assert (r[0], want[0]) == ("TypeError", "BufferError")
                else:
                    assert r[0] == want[0]
            size = os.fstat(b).st_size
            assert os.fstat(a).st_size == size
            assert os.pread(a, size, 0) == os.pread(b, size, 0)

        one()
    finally:
        os.close(a)
        os.close(b)
        ctx.close()


def test_ring_fast_path_o_direct_answers_as_a_buffered_twin() -> None:
    """Differential: O_DIRECT reads and writes through the ring's fast path
    (aligned: the ring itself; unaligned offset, length or address: the
    bounce buffer) against os.preadv/pwritev on a buffered twin."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from threadlets.probe import aligned_buffer

    ctx = _ring_context()
    name = tempfile.mktemp(prefix="threadlets-break12-", dir="/var/tmp")
    try:
        a = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_DIRECT, 0o600)
    except OSError as e:  # pragma: no cover
        ctx.close()
        pytest.skip(f"O_DIRECT: {e}")
    b = os.open(name + ".twin", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.unlink(name)
        os.unlink(name + ".twin")
        base = bytes(range(256)) * 64  # 16 KiB
        os.pwrite(b, base, 0)
        buf = aligned_buffer(len(base))
        buf[:] = base
        assert ctx.write(a, 0, buf).wait(10)

        @settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
        @given(
            write=st.booleans(),
            offset=st.sampled_from([0, 512, 4096, 8192, 12288, 16384, 20480, 100, 4095]),
            n=st.sampled_from([512, 4096, 8192, 12288, 1, 700, 4097]),
            shift=st.sampled_from([0, 0, 512, 1]),
            kind=st.sampled_from(["memoryview", "bytearray", "bytes"]),
        )
        def one(write: bool, offset: int, n: int, shift: int, kind: str) -> None:
            area = aligned_buffer(n + shift)
            view = area[shift : shift + n]
            if write:
                payload = bytes([(offset + n) % 256]) * n
                view[:] = payload
                arg: Any = (
                    view
                    if kind == "memoryview"
                    else (bytearray(payload) if kind == "bytearray" else payload)
                )
                req = ctx.write(a, offset, arg)
                assert req.wait(10)
                assert req.result() == os.pwrite(b, payload, offset)
            else:
                if kind == "bytes":
                    return
                target: Any = view if kind == "memoryview" else bytearray(n)
                req = ctx.read(a, offset, target)
                assert req.wait(10)
                want = os.pread(b, n, offset)
                assert req.result() == len(want)
                assert bytes(target[: len(want)]) == want
            assert os.fstat(a).st_size == os.fstat(b).st_size

        one()
        size = os.fstat(b).st_size
        whole = aligned_buffer(size + 4096)
        r = ctx.read(a, 0, whole)
        assert r.wait(10)
        assert bytes(whole[: r.result()]) == os.pread(b, size, 0)
    finally:
        os.close(a)
        os.close(b)
        ctx.close()


def _inline_syscalls(ctx: AioContext, short: bool) -> None:
    """Inline attempts that move bytes (writes too, as a file system that
    takes RWF_NOWAIT for them would), half of them if ``short``."""
    real_w, real_r = ctx._sc.pwritev, ctx._preadv

    def wrap(real: Callable[..., int]) -> Callable[..., int]:
        def call(fd: int, views: Any, offset: int, flags: int = 0) -> int:
            if flags & RWF_NOWAIT:
                if short:
                    v = memoryview(views[0])
                    views = [v[: len(v) // 2]]
                return real(fd, views, offset, flags & ~RWF_NOWAIT)
            return real(fd, views, offset, flags)

        return call

    ctx._sc.pwritev = wrap(real_w)  # type: ignore[method-assign]
    ctx._preadv = wrap(real_r)


@pytest.mark.parametrize("callback", [False, True], ids=["plain", "callback"])
@pytest.mark.parametrize("short", [False, True], ids=["whole", "short"])
@pytest.mark.parametrize("op", ["read", "write"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_ctrl_c_at_every_c_return_of_the_admitted_inline_attempt(
    backend: str, fd: int, op: str, short: bool, callback: bool
) -> None:
    """The admission taken before the inline attempt is given back or
    handed to the request whatever C return Ctrl-C lands at: nothing stays
    counted (close() would wait for it for good)."""
    from .conftest import call_interrupted_at

    ctx = _context(backend)
    try:
        ctx.read(fd, 0, bytearray(1)).wait(10)
        _inline_syscalls(ctx, short)
        seen: list[Any] = []
        cb = seen.append if callback else None
        for n in range(1, 200):
            buf = bytearray(len(DATA)) if op == "read" else bytearray(DATA)
            fn = ctx.read if op == "read" else ctx.write
            count = call_interrupted_at(n, fn, fd, 0, buf, callback=cb)
            assert ctx.drain(10)
            assert ctx.stats().outstanding == 0, n
            assert ctx._cq.admitted == ctx._cq.delivered
            if count[0] < n:
                break  # (ran to the end: no C return left to land on)
        else:  # pragma: no cover
            raise AssertionError("the interrupt never ran out of C returns")
        assert len(set(map(id, seen))) == len(seen)  # exactly once each
    finally:
        assert ctx.close(timeout=10)


@pytest.mark.linux_only("rwf_nowait")  # (no inline attempt without it)
@pytest.mark.parametrize("where", ["_start", "_start_taken"])
@pytest.mark.parametrize("short", [False, True], ids=["whole", "short"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_ctrl_c_at_the_entry_of_start_after_the_inline_attempt(
    backend: str, fd: int, short: bool, where: str
) -> None:
    """An interrupt at _start's (or _start_taken's) entry, with the request
    holding the admission taken before the inline attempt: it is not left
    admitted and nowhere (close() would hang), and posix's aiocb ends."""
    import sys

    ctx = _context(backend, deliver=where == "_start")
    rt = px.PosixAio(ctx) if where == "_start_taken" else None
    try:
        ctx.read(fd, 0, bytearray(1)).wait(10) if rt is None else None
        if rt is not None:
            warm = px.aiocb(fd, 0, bytearray(1))
            rt.aio_read(warm)
            rt.aio_suspend([warm], 10)
        _inline_syscalls(ctx, short)
        # (A whole read through posix is answered inline: no _start_taken.)
        for op in ("write",) if rt is not None and not short else ("read", "write"):

            def prof(frame: Any, event: str, arg: object) -> None:
                if event == "call" and frame.f_code.co_name == where:
                    sys.setprofile(None)
                    raise KeyboardInterrupt

            buf = bytearray(len(DATA)) if op == "read" else bytearray(DATA)
            sys.setprofile(prof)
            try:
                if rt is None:
                    fn = ctx.read if op == "read" else ctx.write
                    with pytest.raises(KeyboardInterrupt):
                        fn(fd, 0, buf, callback=lambda r: None)
                else:
                    cb = px.aiocb(fd, 0, buf)
                    with pytest.raises(KeyboardInterrupt):
                        (rt.aio_read if op == "read" else rt.aio_write)(cb)
            finally:
                sys.setprofile(None)
            if rt is None:
                assert ctx.drain(10)
            else:
                rt.aio_suspend([cb], 10)
                assert rt.aio_error(cb) != errno.EINPROGRESS
                wait_until(lambda: ctx.stats().outstanding == 0)
            assert ctx._cq.admitted == ctx._cq.delivered
    finally:
        assert ctx.close(timeout=10)


@pytest.mark.parametrize("op", ["read", "write"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_callback_refused_before_the_inline_attempt(backend: str, fd: int, op: str) -> None:
    """callback= on a context that delivers nothing is a ValueError -- which
    came after the inline write had written its bytes (a short read's
    too): refused, yet the file changed."""
    ctx = _context(backend, deliver=False)
    try:
        ctx.read(fd, 0, bytearray(1)).wait(10)
        _inline_syscalls(ctx, short=op == "read")
        buf = bytearray(len(DATA)) if op == "read" else bytearray(reversed(DATA))
        submit = functools.partial(ctx.read if op == "read" else ctx.write, fd, 0, buf)
        with pytest.raises(ValueError, match="deliver"):
            submit(callback=lambda r: None)
        assert os.pread(fd, len(DATA), 0) == DATA
        if op == "read":
            assert buf == bytearray(len(DATA))
        assert ctx._cq.admitted == ctx._cq.delivered
    finally:
        assert ctx.close(timeout=10)


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_task_cancelled_at_every_step_of_a_fast_path_request(
    loop_kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    """pread/preadinto/pwrite on the ring's fast path, the task cancelled
    after k passes of the loop for every k until it finishes first: each
    answers its result or CancelledError, a cancelled write's bytes are
    its own or the old ones (never torn by another), nothing is logged
    (awaitable._wake's refusals), and the loop's context ends quiet."""
    import asyncio
    import logging

    import threadlets
    import threadlets.awaitable as aw

    if loop_kind == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        new_loop: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    else:
        new_loop = asyncio.new_event_loop
    ctx = _ring_context()
    ctx.close()
    name = tempfile.mktemp(prefix="threadlets-break12-", dir="/var/tmp")
    with open(name, "wb") as w:
        w.write(DATA)
    aw.configure(backend="io_uring", inline=False)
    caplog.set_level(logging.ERROR)

    async def main() -> None:
        async with threadlets.open(name, "r+b", buffering=0) as f:
            for op in ("pread", "preadinto", "pwrite"):
                for k in range(50):
                    buf = bytearray(1000)
                    new = bytes([k]) * 1000
                    if op == "pread":
                        coro: Any = f.pread(1000, 100)
                    elif op == "preadinto":
                        coro = f.preadinto(buf, 100)
                    else:
                        coro = f.pwrite(new, 100)
                    task = asyncio.ensure_future(coro)
                    for _ in range(k):
                        await asyncio.sleep(0)
                    finished = task.done()
                    task.cancel()
                    try:
                        got = await task
                    except asyncio.CancelledError:
                        assert not finished
                        got = None
                    if got is not None:
                        assert (len(got) if op == "pread" else got) == 1000
                    with open(name, "rb") as r:
                        r.seek(100)
                        now = r.read(1000)
                    # (Whole writes, each of one byte value: never torn.)
                    assert now == DATA[100:1100] or now == bytes([now[0]]) * 1000
                    if finished:
                        break
                io = aw.current()
                assert io.ctx.drain(10)
                assert io.ctx.stats().outstanding == 0

    loop = new_loop()
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
        aw.configure()
        os.unlink(name)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def _close_all(close: Callable[[Any], object], *ends: Any) -> None:
    for end in ends:
        close(end)


def _streams() -> Iterator[tuple[str, int, int, Callable[[], None]]]:
    """(kind, read end, write end, close) of each stream kind."""
    import pty
    import socket

    r, w = os.pipe()
    yield "pipe", r, w, functools.partial(_close_all, os.close, r, w)
    r, w = os.pipe()
    os.set_blocking(r, False)
    yield "pipe-nonblock", r, w, functools.partial(_close_all, os.close, r, w)
    a, b = socket.socketpair()
    yield "socket", a.fileno(), b.fileno(), functools.partial(_close_all, socket.socket.close, a, b)
    m, s = pty.openpty()
    import termios
    import tty

    tty.setraw(s)
    termios.tcflush(s, termios.TCIOFLUSH)
    yield "pty", s, m, functools.partial(_close_all, os.close, m, s)


@pytest.mark.parametrize("backend", BACKENDS)
def test_streams_and_char_devices_answer_as_readv_writev(backend: str) -> None:
    """Streams and character devices never reach the ring's positional fast
    path: one transfer is the answer (as os.readv/os.writev), whatever the
    offset; EAGAIN only when nothing moved."""
    ctx = _context(backend, inline=True)
    try:
        for kind, r, w, close in _streams():
            try:
                data = bytes(range(200))
                req = ctx.write(w, 12345, data)
                assert req.wait(10)
                assert req.result() == len(data), kind
                buf = bytearray(1000)
                req = ctx.read(r, 777, buf)
                assert req.wait(10)
                assert req.result() == len(data), kind
                assert bytes(buf[: len(data)]) == data, kind
                if kind == "pipe-nonblock":
                    req = ctx.read(r, 0, bytearray(10))
                    assert req.wait(10)
                    assert req.error == errno.EAGAIN
            finally:
                ctx.forget(r)
                ctx.forget(w)
                close()
        for dev, write, want in [("/dev/zero", False, 5000), ("/dev/null", False, 0),
                                 ("/dev/null", True, 5000), ("/dev/zero", True, 5000)]:  # fmt: skip
            fd = os.open(dev, os.O_RDWR)
            try:
                buf = bytearray(b"\x01" * 5000)
                req = ctx.write(fd, 4096, buf) if write else ctx.read(fd, 4096, buf)
                assert req.wait(10)
                assert req.result() == want, dev
                if not write and want:
                    assert buf == bytes(5000)
            finally:
                ctx.forget(fd)
                os.close(fd)
    finally:
        ctx.close()


@pytest.mark.parametrize("how", ["forget", "close_fd"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_an_fd_number_reused_for_another_kind_after_forget(backend: str, fd: int, how: str) -> None:
    """A regular file's number, forgotten (or closed by close_fd), reused
    for a pipe: the pipe is read as a pipe (one transfer), not sent to the
    ring at an offset; and back: a pipe's number reused for a regular file
    reads it at its offset."""
    ctx = _context(backend)
    try:
        n = os.dup(fd)
        assert ctx.read(n, 0, bytearray(10)).wait(10)
        assert ctx._files[n] in ctx._ring_plain
        if how == "forget":
            ctx.forget(n)
            os.close(n)
        else:
            assert ctx.close_fd(n).wait(10)
        assert not ctx._ring_plain or all(f.fd != n for f in ctx._ring_plain)
        r, w = os.pipe()
        try:
            if r != n:
                os.dup2(r, n)
                os.close(r)
            os.write(w, b"abc")
            buf = bytearray(10)
            req = ctx.read(n, 4096, buf)
            assert req.wait(10)
            assert (req.result(), bytes(buf[:3])) == (3, b"abc")
            ctx.forget(n)
            os.dup2(fd, n)
            buf = bytearray(10)
            req = ctx.read(n, 256, buf)
            assert req.wait(10)
            assert (req.result(), bytes(buf)) == (10, DATA[256:266])
        finally:
            ctx.forget(n)
            os.close(n)
            os.close(w)
    finally:
        ctx.close()


@pytest.mark.parametrize("inline", [False, True], ids=["ring", "inline"])
def test_close_racing_fast_path_submitters(inline: bool) -> None:
    """Threads submitting one-buffer reads and writes (the ring's fast path)
    while another closes the context, thread switches forced: each
    submission is refused (RuntimeError) or finishes with preadv's answer,
    exactly once, and close() returns."""
    import sys

    ctx = _ring_context(inline=inline)
    fd, name = tempfile.mkstemp(prefix="threadlets-break12-", dir="/var/tmp")
    os.unlink(name)
    os.write(fd, DATA)
    ctx.read(fd, 0, bytearray(1)).wait(10)
    start = threading.Barrier(3)
    going = threading.Event()
    errors: list[BaseException] = []
    seen: list[Any] = []
    lock = threading.Lock()

    def on_done(req: Any) -> None:
        with lock:
            seen.append(req)

    def submitter(write: bool) -> None:
        mine: list[Any] = []
        try:
            start.wait()
            for k in range(400):
                buf = bytearray(DATA[:512]) if write else bytearray(512)
                try:
                    req = (ctx.write if write else ctx.read)(
                        fd, 512 * (k % 8), buf, callback=on_done
                    )
                except RuntimeError:
                    break
                mine.append((req, buf, k))
                if k == 50:
                    going.set()
            for req, buf, k in mine:
                assert req.wait(10)
                assert req.result() == 512
                if not write:
                    assert bytes(buf) == DATA[512 * (k % 8) : 512 * (k % 8) + 512]
        except BaseException as e:
            errors.append(e)
        finally:
            going.set()

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    threads = [threading.Thread(target=submitter, args=(w,)) for w in (False, True)]
    try:
        for t in threads:
            t.start()
        start.wait()
        going.wait(30)  # (closed while both go on)
        assert ctx.close(timeout=30)
    finally:
        sys.setswitchinterval(interval)
        for t in threads:
            t.join(30)
        os.close(fd)
    assert not errors, errors
    assert len(set(map(id, seen))) == len(seen)
    assert seen
    assert ctx._cq.admitted == ctx._cq.delivered


def test_sq_tail_past_32_bits() -> None:
    """The ring's Python-side SQ tail is not wrapped at 32 bits (its
    c_uint32 keeps the low ones): with 2**32 added, as after 4 Gi
    submissions, submissions, kicks and the count of what the kernel has
    not consumed still agree."""
    ctx = _ring_context(inline=False)
    fd, name = tempfile.mkstemp(prefix="threadlets-break12-", dir="/var/tmp")
    try:
        os.unlink(name)
        os.write(fd, DATA)
        ring = ctx._ring
        assert ring is not None
        with ring._lock:
            ring._tail += 3 << 32
            assert ring._take() == 0
        bufs = [bytearray(512) for _ in range(300)]  # (more than a kick's batch)
        reqs = [ctx.read(fd, 512 * (k % 8), b) for k, b in enumerate(bufs)]
        for k, (req, b) in enumerate(zip(reqs, bufs, strict=True)):
            assert req.wait(10)
            assert req.result() == 512
            assert bytes(b) == DATA[512 * (k % 8) : 512 * (k % 8) + 512]
        assert ring._sq_tail.value == ring._tail & 0xFFFFFFFF
        with ring._lock:
            assert ring._take() == 0
    finally:
        os.close(fd)
        assert ctx.close(timeout=10)


def test_fork_with_fast_path_requests_held_on_the_ring(fd: int) -> None:
    """Fast-path reads published on the ring but not yet submitted (the
    thread's plug) when the process forks: in the child they read
    CANCELLED, drain returns at once and a new read works (on the
    threads); in the parent they complete with their data, once each."""
    ctx = _ring_context(inline=False)
    try:
        ctx.read(fd, 0, bytearray(1)).wait(10)
        ring = ctx._ring
        assert ring is not None
        seen: list[Any] = []
        bufs = [bytearray(512) for _ in range(4)]
        assert ring.plug()
        try:
            reqs = [ctx.read(fd, 512 * k, b, callback=seen.append) for k, b in enumerate(bufs)]
            assert all(r._on_ring for r in reqs)
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child
                code = 1
                try:
                    ok = all(r.state.name == "CANCELLED" for r in reqs)
                    ok = ok and ctx.drain(5)
                    b = bytearray(512)
                    r = ctx.read(fd, 1024, b)
                    ok = ok and r.wait(5) and r.result() == 512 and b == DATA[1024:1536]
                    code = 0 if ok else 2
                finally:
                    os._exit(code)
        finally:
            ring.unplug()
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert ctx.drain(10)
        assert [r.result() for r in reqs] == [512] * 4
        assert [bytes(b) for b in bufs] == [DATA[512 * k : 512 * k + 512] for k in range(4)]
        assert sorted(map(id, seen)) == sorted(map(id, reqs))
    finally:
        assert ctx.close(timeout=10)


@pytest.mark.linux_only("io_uring")
def test_rlimit_fsize_answers_alike_on_both_backends() -> None:
    """A write across RLIMIT_FSIZE (SIGXFSZ ignored): the part below the
    limit lands, the request fails with EFBIG carrying the count moved, the
    same on both backends with and without the inline path."""
    import subprocess
    import sys

    script = r"""
import os, resource, signal, tempfile
from threadlets import AioContext
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))
for backend in ("threads", "io_uring"):
    for inline in (False, True):
        fd, name = tempfile.mkstemp(dir="/var/tmp")
        os.unlink(name)
        ctx = AioContext(backend=backend, inline=inline)
        res = []
        for off, n in ((6144, 4096), (8192, 10), (0, 8192)):
            req = ctx.write(fd, off, b"z" * n)
            req.wait(10)
            try:
                res.append(req.result())
            except OSError as ex:
                res.append((ex.errno, getattr(ex, "transferred", 0)))
        res.append(os.fstat(fd).st_size)
        ctx.close()
        os.close(fd)
        print(res)
"""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    want = str([(errno.EFBIG, 2048), (errno.EFBIG, 0), 8192, 8192])
    assert out.stdout.split("\n")[:4] == [want] * 4
