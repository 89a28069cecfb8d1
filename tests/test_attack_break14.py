"""h-break14: the engine's admission and inline paths (read()/write(),
_read_checked/_write_checked) attacked from outside: Ctrl-C at every C
return while close() waits, and a short inline transfer cut short before a
backend took the rest."""

from __future__ import annotations

import errno
import gc
import os
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import threadlets.posix as px
from threadlets import AioContext
from threadlets.engine import RWF_NOWAIT
from threadlets.uring import RingUnavailable

from .conftest import interrupt_at_c_return, wait_until

BACKENDS = ["threads", "io_uring"]
DATA = bytes(range(256)) * 16  # 4 KiB


def _context(backend: str, **kwargs: Any) -> AioContext:
    try:
        return AioContext(backend=backend, **kwargs)
    except RingUnavailable as e:  # pragma: no cover - no io_uring here
        pytest.skip(f"io_uring: {e}")


@pytest.fixture
def fd() -> Iterator[int]:
    """A file of DATA on ext4 (/var/tmp)."""
    fd, name = tempfile.mkstemp(prefix="threadlets-break14-", dir="/var/tmp")
    try:
        os.unlink(name)
        os.write(fd, DATA)
        yield fd
    finally:
        os.close(fd)


def _inline_syscalls(ctx: AioContext, short: bool) -> list[int]:
    """Inline attempts that move bytes (writes too, as a file system that
    takes RWF_NOWAIT for them would), half of them if ``short``.  Returns
    [calls begun, calls returned] (an interrupt at the syscall's own return
    is os.pwritev's: nobody can know what moved)."""
    real_w, real_r = ctx._sc.pwritev, ctx._preadv
    counts = [0, 0]

    def wrap(real: Callable[..., int]) -> Callable[..., int]:
        def call(fd: int, views: Any, offset: int, flags: int = 0) -> int:
            if flags & RWF_NOWAIT:
                if short:
                    v = memoryview(views[0])
                    views = [v[: len(v) // 2]]
                counts[0] += 1
                n = real(fd, views, offset, flags & ~RWF_NOWAIT)
                counts[1] += 1
                return n
            return real(fd, views, offset, flags)

        return call

    ctx._sc.pwritev = wrap(real_w)  # type: ignore[method-assign]
    ctx._preadv = wrap(real_r)
    return counts


# -- the admission given back while close() waits -------------------------------------


@pytest.mark.parametrize("checked", [False, True], ids=["public", "checked"])
@pytest.mark.parametrize("op", ["read", "write"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.linux_only("rwf_nowait")  # (the inline attempt's admission)
def test_ctrl_c_as_the_admission_is_given_back_to_a_closing_context(
    backend: str, fd: int, op: str, checked: bool
) -> None:
    """close() waits for a request in another thread; read()/write() (and
    posix's entries) refuse, giving back the admission taken before the
    inline attempt -- through a stand-in request made by a call: Ctrl-C as
    that call returned left the admission counted, and close() waited for
    it for good (returned False at its timeout)."""
    ctx = _context(backend, deliver=not checked)
    release = threading.Event()
    started = threading.Event()

    def block() -> None:
        started.set()
        release.wait(10)

    try:
        ctx.read(fd, 0, bytearray(1)).wait(10)
        blocker = ctx.call(block)
        assert started.wait(10)
        result: list[bool] = []
        closer = threading.Thread(target=lambda: result.append(ctx.close(timeout=10)))
        closer.start()
        wait_until(lambda: ctx._cq.closing)
        view = memoryview(bytearray(DATA))
        taken: list[Any] = []
        if checked:
            fn: Callable[[], object] = (
                (lambda: ctx._read_checked(fd, 0, view, lambda r: None, taken))
                if op == "read"
                else (lambda: ctx._write_checked(fd, 0, view, lambda r: None, taken))
            )
        else:
            fn = (lambda: ctx.read(fd, 0, view)) if op == "read" else lambda: ctx.write(fd, 0, view)
        for n in range(1, 100):
            count = interrupt_at_c_return(n)
            try:
                fn()
            except (KeyboardInterrupt, RuntimeError):
                pass
            finally:
                sys.setprofile(None)
                gc.enable()
            assert ctx._cq.admitted - ctx._cq.delivered == 1, n  # (the blocker's)
            if count[0] < n:
                break
        else:  # pragma: no cover
            raise AssertionError("the interrupt never ran out of C returns")
        assert not taken
        release.set()
        closer.join(10)
        assert result == [True]
        assert blocker.done()
    finally:
        release.set()
        ctx.close(timeout=10)


# -- a short inline transfer, then Ctrl-C before a backend took the rest ------------


@pytest.mark.parametrize("op", ["read", "write"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_posix_ctrl_c_after_a_short_inline_transfer_never_reports_ecanceled(
    backend: str, fd: int, op: str
) -> None:
    """aio_read/aio_write whose inline attempt moved half the bytes, Ctrl-C
    at every C return after: the aiocb is never ECANCELED once bytes moved
    (glibc: aio_error 0, aio_return the count), and what it reports is what
    the file (or the buffer) holds."""
    ctx = _context(backend, deliver=False)
    rt = px.PosixAio(ctx)
    new = bytes(reversed(DATA))
    try:
        warm = px.aiocb(fd, 0, bytearray(1))
        rt.aio_read(warm)
        rt.aio_suspend([warm], 10)
        calls = _inline_syscalls(ctx, short=True)
        for n in range(1, 300):
            os.pwrite(fd, DATA, 0)
            buf = bytearray(len(DATA)) if op == "read" else bytearray(new)
            cb = px.aiocb(fd, 0, buf)
            count = interrupt_at_c_return(n)
            try:
                (rt.aio_read if op == "read" else rt.aio_write)(cb)
            except KeyboardInterrupt:
                pass
            finally:
                sys.setprofile(None)
                gc.enable()
            if cb._outcome is None:  # (interrupted before it was submitted)
                continue
            if calls[0] != calls[1]:  # (at the syscall's own return: see above)
                calls[1] = calls[0]
                rt.aio_suspend([cb], 10)
                continue
            rt.aio_suspend([cb], 10)
            err = rt.aio_error(cb)
            now = os.pread(fd, len(DATA), 0)
            if op == "write":
                landed = now != DATA
                if err == errno.ECANCELED:
                    assert not landed, n
                else:
                    assert err in (0, errno.EINTR), (n, err)
                    got = rt.aio_return(cb)
                    if err == 0:
                        assert now[:got] == new[:got], n
                        assert now[got:] == DATA[got:], n
            else:
                landed = any(buf)
                if err == errno.ECANCELED:
                    assert not landed, n
                elif err == 0:
                    got = rt.aio_return(cb)
                    assert bytes(buf[:got]) == DATA[:got], n
            wait_until(lambda: ctx.stats().outstanding == 0)
            if count[0] < n:
                break
        else:  # pragma: no cover
            raise AssertionError("the interrupt never ran out of C returns")
    finally:
        assert ctx.close(timeout=10)


@pytest.mark.parametrize("short", [False, True], ids=["whole", "short"])
@pytest.mark.parametrize("op", ["read", "write"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_ctrl_c_sweep_of_an_inline_transfer_the_callback_tells_what_moved(
    backend: str, fd: int, op: str, short: bool
) -> None:
    """read()/write() with callback=, the inline attempt moving bytes (half
    if ``short``), Ctrl-C at every C return after the syscall returned: a
    request delivered tells what moved -- its count, or its error's
    ``transferred`` -- as the file (or the buffer) shows it (differential
    against the file's bytes); nothing counted stays outstanding."""
    ctx = _context(backend)
    new = bytes(reversed(DATA))
    try:
        ctx.read(fd, 0, bytearray(1)).wait(10)
        calls = _inline_syscalls(ctx, short)
        for n in range(1, 300):
            os.pwrite(fd, DATA, 0)
            buf = bytearray(new)  # (a read overwrites it with DATA)
            seen: list[Any] = []
            fn = ctx.read if op == "read" else ctx.write
            count = interrupt_at_c_return(n)
            try:
                fn(fd, 0, buf, callback=seen.append)
            except KeyboardInterrupt:
                pass
            finally:
                sys.setprofile(None)
                gc.enable()
            assert ctx.drain(10), n
            assert ctx._cq.admitted == ctx._cq.delivered, n
            assert len(seen) <= 1, n
            synced = calls[0] == calls[1]
            calls[1] = calls[0]
            now = os.pread(fd, len(DATA), 0)
            moved = (
                next((i for i in range(len(DATA)) if now[i] == DATA[i]), len(DATA))
                if op == "write"
                else next((i for i in range(len(DATA)) if buf[i] == new[i]), len(DATA))
            )
            if seen:
                req = seen[0]
                exc = req.exception()
                told = req.result() if exc is None else getattr(exc, "transferred", 0)
                assert told == moved, (n, told, moved, exc)
            elif synced and calls[0]:
                # The syscall returned, and nobody was told: nothing moved.
                assert moved == 0, (n, moved)
            if count[0] < n:
                break
        else:  # pragma: no cover
            raise AssertionError("the interrupt never ran out of C returns")
    finally:
        assert ctx.close(timeout=10)


# -- close() from a signal handler that runs inside the inline attempt --------------


@pytest.mark.parametrize("short", [False, True], ids=["whole", "short"])
@pytest.mark.parametrize("op", ["read", "write"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.linux_only("rwf_nowait")  # (the inline attempt's admission)
def test_close_from_a_signal_handler_inside_the_inline_attempt(
    backend: str, fd: int, op: str, short: bool
) -> None:
    """A signal handler runs in the submitting thread, on top of the frame
    making the inline attempt (here: the patched syscall calls close() as
    a handler run at its C return would).  close() waited for what is
    outstanding -- including the admission read()/write() took before the
    attempt, which the frame below holds until the handler returns: it
    returned False at its timeout (with none, never).  Now it closes, and
    the attempt, resumed, reports what moved (differential: the file, the
    buffer)."""
    ctx = _context(backend)
    new = bytes(reversed(DATA))
    try:
        ctx.read(fd, 0, bytearray(1)).wait(10)
        result: list[bool] = []
        real = ctx._sc.pwritev if op == "write" else ctx._preadv

        def handler_closes(fd: int, views: Any, offset: int, flags: int = 0) -> int:
            if flags & RWF_NOWAIT and short:
                v = memoryview(views[0])
                views = [v[: len(v) // 2]]
            n = real(fd, views, offset, flags & ~RWF_NOWAIT)
            if flags & RWF_NOWAIT and not result:
                result.append(ctx.close(timeout=5))
            return n

        if op == "write":
            ctx._sc.pwritev = handler_closes  # type: ignore[method-assign]
        else:
            ctx._preadv = handler_closes
        seen: list[Any] = []
        buf = bytearray(new)
        req = (ctx.read if op == "read" else ctx.write)(fd, 0, buf, callback=seen.append)
        assert result == [True]
        assert ctx._cq.admitted == ctx._cq.delivered
        assert seen == [req]
        half = len(DATA) // 2 if short else len(DATA)
        exc = req.exception()
        told = req.result() if exc is None else getattr(exc, "transferred", 0)
        assert told == half
        if op == "write":
            assert os.pread(fd, len(DATA), 0) == new[:half] + DATA[half:]
        else:
            assert bytes(buf) == DATA[:half] + new[half:]
    finally:
        ctx.close(timeout=10)
