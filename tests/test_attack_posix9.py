"""threadlets.posix, ninth session: signal handlers that run inside a wait.

1. A signal that lands as aio_suspend() or lio_listio(LIO_WAIT) goes to
   sleep interrupts nothing: CPython runs a handler only between bytecodes
   and after a wait that the signal cut short, so its handler waited for
   the wait to end -- for ever where the handler is what finishes the list
   (test_attack_fork8's fork-in-handler test timed out about once in 30
   runs that way).  The tests make that landing certain: the main thread's
   waits hear no SIGUSR1 while they sleep (it is blocked there), which is
   what a signal landing just before the sleep amounts to.
2. A signal handler forks while the main thread waits for the runtime's
   lock, held by another thread: the child's wait for a lock whose holder
   is not there never ended.

Every child runs under test_attack_fork8's watchdog: a hang is a failure.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import threading
from typing import Any

import pytest

import threadlets.posix as px
from threadlets import AioContext

from .conftest import wait_until
from .test_attack_fork8 import _collect, _report

pytestmark = pytest.mark.skipif(
    not hasattr(signal, "pthread_sigmask") or not hasattr(os, "fork"),
    reason="needs pthread_sigmask and fork()",
)

#: Seconds the safety net waits for the handler before finishing the
#: request itself (so the old code's endless wait ends in a failure).
NET = 10.0


_POSIX_WAIT = px.PosixAio._wait.__code__


class _DeafWaiter:
    """A Condition's waiter lock whose sleep, in the runtime's wait, does not
    hear SIGUSR1 (blocked while it sleeps, delivered as it wakes): a
    signal sent then lands as one sent just before the sleep does."""

    def __init__(self, sleeping: threading.Event) -> None:
        self._lock = threading.Lock()
        self._sleeping = sleeping

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if self._lock.acquire(False):
            return True
        # (Deaf only in the runtime's wait: Condition.wait called by it.)
        if not blocking or sys._getframe(2).f_code is not _POSIX_WAIT:
            return self._lock.acquire(blocking, timeout)
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
        try:
            self._sleeping.set()
            return self._lock.acquire(True, timeout)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)

    def release(self) -> None:
        self._lock.release()

    def locked(self) -> bool:
        return self._lock.locked()


@pytest.fixture
def deaf(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Condition waits sleep deaf to SIGUSR1 in the main thread; the event
    is set once one sleeps."""
    sleeping = threading.Event()
    monkeypatch.setattr(threading, "_allocate_lock", lambda: _DeafWaiter(sleeping))
    return sleeping


@pytest.mark.parametrize("how", ["aio_suspend", "lio_listio"])
def test_a_signal_landing_as_the_wait_sleeps_has_its_handler_run(
    backend: str, how: str, deaf: threading.Event
) -> None:
    """The handler of a signal that came as the wait went to sleep writes
    what the list's read waits for.  It ran only when the wait ended: never
    (aio_suspend without a timeout, lio_listio), but for the safety net.
    Now the main thread's wait wakes in slices and the handler runs."""
    ctx = AioContext(backend=backend, deliver=False, inline=False)
    rt = px.PosixAio(ctx)
    r, w = os.pipe()
    ran = threading.Event()
    net_used: list[bool] = []
    try:
        cb = px.aiocb(r, 0, bytearray(1), lio_opcode=px.LIO_READ)

        def handler(signum: int, frame: object) -> None:
            if not ran.is_set():
                ran.set()
                os.write(w, b"x")

        def interrupt() -> None:
            assert deaf.wait(NET)
            signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGUSR1)
            if not ran.wait(NET):  # the safety net: the old code waits for ever
                net_used.append(True)
                os.write(w, b"x")

        old = signal.signal(signal.SIGUSR1, handler)
        t = threading.Thread(target=interrupt)
        try:
            t.start()
            if how == "aio_suspend":
                rt.aio_read(cb)
                rt.aio_suspend([cb])
            else:
                rt.lio_listio(px.LIO_WAIT, [cb])
            t.join(2 * NET)
        finally:
            signal.signal(signal.SIGUSR1, old)
        assert not net_used, "the handler ran only once the wait ended"
        assert ran.is_set()
        assert rt.aio_error(cb) == 0
        assert rt.aio_return(cb) == 1
        assert bytes(cb.aio_buf) == b"x"
    finally:
        assert ctx.close(10)
        os.close(r)
        os.close(w)


def _main_frame_in(code: Any) -> bool:
    frame = sys._current_frames().get(threading.main_thread().ident or 0)
    return frame is not None and frame.f_code is code


def test_a_child_forked_while_another_thread_held_the_lock_goes_on(backend: str) -> None:
    """Another thread holds the runtime's lock; the main thread's
    aio_suspend waits for it; a signal handler forks there.  In the child
    the lock stayed held by a thread that is not there, and the wait for it
    never ended (the old reset made a new lock for later calls, not for
    the one waiting).  Now the child lets go of a lock whose holder is not
    there: its aio_suspend returns, the parent's aiocb reading ECANCELED."""
    ctx = AioContext(backend=backend, deliver=False, inline=False)
    rt = px.PosixAio(ctx)
    r, w = os.pipe()
    forked: list[tuple[int, int]] = []
    held = threading.Event()
    let_go = threading.Event()
    try:
        cb = px.aiocb(r, 0, bytearray(1))
        rt.aio_read(cb)

        def holder() -> None:
            with rt._lock:
                held.set()
                assert let_go.wait(2 * NET)

        def handler(signum: int, frame: object) -> None:
            rr, ww = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(rr)
                forked.append((0, ww))
            else:
                os.close(ww)
                forked.append((pid, rr))
                let_go.set()
                os.write(w, b"x")  # the parent's wait returns

        def interrupt() -> None:
            code = px.PosixAio.aio_suspend.__code__
            wait_until(lambda: _main_frame_in(code), NET)
            signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGUSR1)

        old = signal.signal(signal.SIGUSR1, handler)
        h = threading.Thread(target=holder)
        t = threading.Thread(target=interrupt)
        try:
            h.start()
            assert held.wait(NET)
            t.start()
            rt.aio_suspend([cb])
            pid, end = forked[0]
            if pid == 0:
                _report(end, lambda: rt.aio_error(cb))
            t.join(NET)
            h.join(NET)
        finally:
            let_go.set()
            signal.signal(signal.SIGUSR1, old)
        assert _collect(pid, end, timeout=NET) == errno.ECANCELED
        assert rt.aio_error(cb) == 0
        assert rt.aio_return(cb) == 1
    finally:
        assert ctx.close(10)
        os.close(r)
        os.close(w)


def test_lio_listio_reads_each_fds_identity_once(
    backend: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A list's entries are accepted at once: one identity (F_GETFL +
    fstat) per fd of the list, not per entry; every entry still runs on
    the file its fd names."""
    seen: list[int] = []
    real = px._identity

    def counting(fd: int) -> Any:
        seen.append(fd)
        return real(fd)

    monkeypatch.setattr(px, "_identity", counting)
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"a" * 64)
    b.write_bytes(b"b" * 64)
    ctx = AioContext(backend=backend, deliver=False)
    rt = px.PosixAio(ctx)
    fa, fb = os.open(a, os.O_RDONLY), os.open(b, os.O_RDONLY)
    try:
        cbs = [
            px.aiocb(fd, 8 * i, bytearray(8), lio_opcode=px.LIO_READ)
            for i in range(4)
            for fd in (fa, fb)
        ]
        rt.lio_listio(px.LIO_WAIT, cbs)
        assert sorted(seen) == sorted([fa, fb])
        for cb in cbs:
            assert rt.aio_return(cb) == 8
            assert bytes(cb.aio_buf) == (b"a" if cb.aio_fildes == fa else b"b") * 8
    finally:
        os.close(fa)
        os.close(fb)
        assert ctx.close(10)
