"""Fork safety and foreign threads, eighth session: a fork while a request
is being delivered (waiters, done-callbacks, the hand-over to its context),
from the thread delivering it or from another one, on both backends.

Every child runs under a watchdog (:func:`_in_child`): it reports what it
saw through a pipe and exits; a child that does not report in time is
killed and the test fails, so a hang is a failure, not a stuck run."""

from __future__ import annotations

import errno
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from threadlets import AioContext, AioRequest, ThreadletQueue, ThreadletState

from .conftest import HAVE_RING, wait_until

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")

#: Seconds a child may take before the watchdog kills it.
CHILD_TIMEOUT = 20.0


def _collect(pid: int, r: int, timeout: float = CHILD_TIMEOUT) -> Any:
    """What the child ``pid`` reported on ``r``; kill it if it hangs."""
    data = b""
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([r], [], [], left)[0]:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                pytest.fail(f"the child hung; it said {data!r}")
            chunk = os.read(r, 65536)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(r)
    _, status = os.waitpid(pid, 0)
    assert data.startswith(b"{"), data.decode(errors="replace")
    assert os.waitstatus_to_exitcode(status) == 0
    return json.loads(data)["out"]


def _report(w: int, fn: Callable[[], object]) -> None:
    """In the child: run ``fn``, write its answer (or the traceback), exit."""
    try:
        try:
            msg = json.dumps({"out": fn()}).encode()
            code = 0
        except BaseException:
            msg = traceback.format_exc().encode()
            code = 1
        while msg:
            msg = msg[os.write(w, msg) :]
    finally:
        os._exit(code)


def _fork(fn: Callable[[], object]) -> tuple[int, int]:
    """Fork here; the child runs ``fn`` and exits.  The parent gets
    (pid, read end) for :func:`_collect`."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        _report(w, fn)
    os.close(w)
    return pid, r


def _in_child(fn: Callable[[], object]) -> Any:
    return _collect(*_fork(fn))


def _settled(ctx: AioContext, req: AioRequest) -> dict[str, object]:
    """What a child sees of the parent's request and context."""
    out: dict[str, object] = {
        "done": req.done(),
        "req.wait": req.wait(5),
        "ctx.wait": ctx.wait(req, 5),
        "drain": ctx.drain(5),
    }
    s = ctx.stats()
    out["outstanding"] = s.outstanding
    out["balanced"] = s.processed == s.submitted
    out["close"] = ctx.close(5)
    return out


SETTLED = {
    "done": True,
    "req.wait": True,
    "ctx.wait": True,
    "drain": True,
    "outstanding": 0,
    "balanced": True,
    "close": True,
}


# -- 1. a done-callback runs in another thread at the fork ---------------------------------


def test_a_request_whose_done_callback_runs_at_the_fork_is_settled_in_the_child(
    backend: str,
) -> None:
    """A request of the parent finished, and its done-callback was running
    in another thread (a worker; on io_uring, the thread reaping the ring)
    when the main thread forked.  The child's ctx.wait(req) waited for a
    delivery that no thread there would make: it timed out (hung, without
    a timeout).  Now it counts as delivered there."""
    fd, w = os.pipe()
    ctx = AioContext(backend=backend, inline=False)
    inside, release = threading.Event(), threading.Event()
    waited: list[bool] = []
    try:
        req = ctx.read(fd, 0, bytearray(4))  # (on a worker, or on the ring)

        def blocking(_: object) -> None:
            inside.set()
            release.wait()

        req.add_done_callback(blocking)
        os.write(w, b"data")  # (only now: the callback runs in another thread)
        # The thread that processes the context's completions (and, on the
        # ring, reaps it: the done-callback then runs in it).
        t = threading.Thread(target=lambda: waited.append(ctx.wait(req, 30)))
        t.start()
        try:
            assert inside.wait(10)
            assert _in_child(lambda: _settled(ctx, req)) == SETTLED
        finally:
            release.set()
            t.join(30)
        assert waited == [True]
        assert req.result() == 4
        assert ctx.stats().outstanding == 0
    finally:
        release.set()
        assert ctx.close(10)
        os.close(fd)
        os.close(w)


# -- 2. a fork in the quiet hand-over of a worker ------------------------------------------


def test_a_request_handed_to_its_context_at_the_fork_is_settled_in_the_child(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request without waiter or done-callback is handed to its context
    by the worker after that worker took its next work (the pool's quiet
    delivery).  A fork in between left the child's copy DONE and never
    delivered: ctx.wait(req) timed out there.  (The worker is held at the
    start of that hand-over, AioRequest._finish_quiet: DONE, listed as its
    ``finishing``, not yet in the context's ready queue.)"""
    path = tmp_path / "f"
    path.write_bytes(b"data")
    fd = os.open(path, os.O_RDONLY)
    ctx = AioContext(backend="threads", inline=False)
    inside, release = threading.Event(), threading.Event()
    finish_quiet = AioRequest._finish_quiet
    try:

        def held(req: AioRequest) -> None:
            if req._ctx is ctx and threading.current_thread() is not threading.main_thread():
                inside.set()
                release.wait()
            finish_quiet(req)

        monkeypatch.setattr(AioRequest, "_finish_quiet", held)
        req = ctx.read(fd, 0, bytearray(4))
        assert inside.wait(10)
        assert not ctx._cq.ready  # (held where it should be)
        assert req.done()
        assert _in_child(lambda: _settled(ctx, req)) == SETTLED
        release.set()
        assert ctx.wait(req, 10)
        assert req.result() == 4
    finally:
        release.set()
        assert ctx.close(10)
        os.close(fd)


# -- 3. cancelled by cancel() or close(), delivered at the fork ------------------------------


@pytest.mark.parametrize("how", ["cancel", "queue close"])
def test_a_request_cancelled_and_being_delivered_at_the_fork_is_settled_in_the_child(
    backend: str, how: str
) -> None:
    """A queued request is cancelled (by cancel(), or by its queue's
    close()) in another thread, whose delivery of it (a done-callback) is
    under way when the main thread forks: the child waited for it."""
    q = ThreadletQueue(max_threads=1)
    gate = threading.Event()
    blocker = q.submit(gate.wait)
    # Running, so that close() cancels only the request (a blocker still
    # queued would be cancelled with it).
    wait_until(lambda: blocker.state is ThreadletState.RUNNING)
    ctx = AioContext(q, backend=backend, inline=False)
    inside, release = threading.Event(), threading.Event()
    try:
        req = ctx.call(os.getpid)

        def blocking(_: object) -> None:
            inside.set()
            release.wait()

        req.add_done_callback(blocking)
        t = threading.Thread(target=req.cancel if how == "cancel" else q.close)
        t.start()
        try:
            assert inside.wait(10)
            assert _in_child(lambda: _settled(ctx, req)) == SETTLED
        finally:
            release.set()
            gate.set()
            t.join(30)
        assert ctx.wait(req, 10)
        assert req.cancelled()
        assert blocker.wait(10)
    finally:
        release.set()
        gate.set()
        assert ctx.close(10)
        assert q.close(10)


# -- 4. the thread delivering the request forks ----------------------------------------------


def test_a_done_callback_that_forks_leaves_the_child_no_parent_delivery(backend: str) -> None:
    """The main thread cancels a queued request; its done-callback forks.
    The child goes on with the delivery, which handed the parent's request
    to the child's context: its callback= ran in the child, and the child's
    counters read one more processed than submitted (outstanding -1)."""
    q = ThreadletQueue(max_threads=1)
    gate = threading.Event()
    blocker = q.submit(gate.wait)
    ctx = AioContext(q, backend=backend, inline=False)
    ran: list[int] = []
    forked: list[tuple[int, int]] = []
    try:
        req = ctx.call(os.getpid, callback=lambda _: ran.append(os.getpid()))
        r, w = os.pipe()

        def fork(_: object) -> None:
            pid = os.fork()
            if pid:
                forked.append((pid, r))
            else:
                forked.append((0, w))

        req.add_done_callback(fork)
        req.cancel()
        pid, end = forked[0]
        if pid == 0:  # the child, back from cancel()

            def child() -> object:
                n = ctx.process_completions()
                s = ctx.stats()
                return [n, ran, s.outstanding, s.processed == s.submitted, ctx.close(5)]

            os.close(r)
            _report(end, child)
        os.close(w)
        assert _collect(pid, end) == [0, [], 0, True, True]
        assert ctx.wait(req, 10)
        assert ran == [os.getpid()]
    finally:
        gate.set()
        assert blocker.wait(10)
        assert ctx.close(10)
        assert q.close(10)


# -- 5. a signal handler forks inside a wait ------------------------------------------------


@pytest.mark.parametrize("how", ["threadlet wait", "queue drain", "queue close"])
def test_a_wait_that_a_forking_signal_handler_interrupted_returns_in_the_child(
    how: str,
) -> None:
    """The main thread waits (on a threadlet, in drain(), in close()); a
    signal handler runs inside the wait and forks; the child goes on with
    the wait.  It never returned: the reset dropped the threadlet's waiters
    (and made a new condition) without waking the one left, and the old
    lock, held for the fork, was never let go.  Now the wait returns at once
    (the parent's work reads CANCELLED there), and the queue works."""
    q = ThreadletQueue(max_threads=1)
    gate = threading.Event()
    work = q.submit(gate.wait)
    # Running, so that close() waits for it (one still queued is cancelled,
    # and close() returns with no wait for the signal to interrupt).
    wait_until(lambda: work.state is ThreadletState.RUNNING)
    forked: list[tuple[int, int]] = []

    def handler(signum: int, frame: object) -> None:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            forked.append((0, w))
        else:
            os.close(w)
            forked.append((pid, r))
            gate.set()  # the parent's wait returns

    def waiting() -> bool:
        if how == "threadlet wait":
            return bool(work._waiters)
        return bool(q._quiet._waiters)  # type: ignore[attr-defined]

    def interrupt() -> None:
        wait_until(waiting)
        signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGUSR1)

    old = signal.signal(signal.SIGUSR1, handler)
    t = threading.Thread(target=interrupt)
    try:
        t.start()
        if how == "threadlet wait":
            waited = work.wait()
        elif how == "queue drain":
            waited = q.drain()
        else:
            waited = q.close()
        pid, end = forked[0]
        if pid == 0:

            def child() -> object:
                out: list[object] = [waited, work.cancelled()]
                if how != "queue close":
                    out.append(q.submit(os.getpid).result(timeout=5) == os.getpid())
                return out

            _report(end, child)
        t.join(30)
        assert _collect(pid, end) == [True, True] + ([True] if how != "queue close" else [])
        assert waited
    finally:
        signal.signal(signal.SIGUSR1, old)
        gate.set()
        t.join(30)
        assert q.close(10)


# -- 6. the forking thread holds a queue's lock ------------------------------------------------


def test_a_fork_by_the_thread_holding_a_queues_lock_does_not_deadlock() -> None:
    """A signal handler or a finalizer forks inside a locked step of the
    pool (a submit, a cancel): the fork handler waited for the lock its own
    thread held, for ever.  Now it waits a bounded time, and the child's
    queue works all the same.  (Run in a subprocess: before, it hung.)"""
    code = """
import os, threadlets
q = threadlets.ThreadletQueue()
with q._lock:  # what a handler run inside a locked step finds
    pid = os.fork()
if pid == 0:
    ok = q.submit(os.getpid).result(timeout=5) == os.getpid()
    ok = ok and threadlets.submit(os.getpid).result(timeout=5) == os.getpid()
    os._exit(0 if ok and q.close(5) else 1)
_, status = os.waitpid(pid, 0)
assert os.waitstatus_to_exitcode(status) == 0, status
assert q.submit(os.getpid).result(timeout=5) == os.getpid()
assert q.close(5)
"""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent.parent / "src"))
    proc = subprocess.run(
        [sys.executable, "-c", code], check=False, env=env, timeout=60, capture_output=True
    )
    assert proc.returncode == 0, proc.stderr.decode()


@pytest.mark.parametrize("how", ["ctx.wait", "ctx.drain", "ctx.close (deliver=False)"])
def test_a_context_wait_that_a_forking_signal_handler_interrupted_returns_in_the_child(
    backend: str, how: str
) -> None:
    """As above, for a context: the main thread waits for a pipe read (in
    wait(), drain(), or close() of a context that does not deliver); a
    signal handler forks inside that wait.  The child's wait never
    returned: its poll, resumed after the handler, polled nothing for ever
    (the reset had closed and unregistered the eventfd), or its condition
    was a replaced one nobody notified.  Now it returns, and the child's
    copy of the eventfd is closed once the wait is out."""
    deliver = how != "ctx.close (deliver=False)"
    ctx = AioContext(backend=backend, inline=False, deliver=deliver)
    notifier = ctx._cq.notifier
    old_fd = notifier.fileno()
    r, w = os.pipe()
    forked: list[tuple[int, int]] = []
    try:
        req = ctx.read(r, 0, bytearray(1))

        def handler(signum: int, frame: object) -> None:
            rr, ww = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(rr)
                forked.append((0, ww))
            else:
                os.close(ww)
                forked.append((pid, rr))
                os.write(w, b"x")  # the parent's wait returns

        def waiting() -> bool:
            if deliver:
                return notifier.sleepers > 0
            return bool(ctx._cq.quiet._waiters)  # type: ignore[attr-defined]

        def interrupt() -> None:
            wait_until(waiting)
            signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGUSR1)

        old = signal.signal(signal.SIGUSR1, handler)
        t = threading.Thread(target=interrupt)
        try:
            t.start()
            if how == "ctx.wait":
                waited = ctx.wait(req)
            elif how == "ctx.drain":
                waited = ctx.drain()
            else:
                waited = ctx.close()
            pid, end = forked[0]
            if pid == 0:

                def child() -> object:
                    out: list[object] = [waited, req.cancelled(), ctx.close(5)]
                    try:
                        os.fstat(old_fd)
                    except OSError as e:
                        out.append(e.errno)
                    return out

                _report(end, child)
            t.join(30)
        finally:
            signal.signal(signal.SIGUSR1, old)
        assert _collect(pid, end) == [True, True, True, errno.EBADF]
        assert waited
        assert req.wait(10)
        assert req.result() == 1
    finally:
        assert ctx.close(10)
        os.close(r)
        os.close(w)


@pytest.mark.parametrize("how", ["aio_suspend", "lio_listio"])
def test_a_posix_wait_that_a_forking_signal_handler_interrupted_returns_in_the_child(
    backend: str, how: str
) -> None:
    """As above, for threadlets.posix: aio_suspend() or lio_listio(LIO_WAIT)
    on a pipe read; a signal handler forks inside the wait.  The child's
    wait slept on the runtime's old condition, which the reset replaced
    without waking it: it never returned.  Now it returns (the aiocb reads
    ECANCELED there, so lio_listio fails with EIO, as glibc's does).  (The
    aio_suspend form is given a timeout, which before ran out and then saw
    the aiocb finished: it checks the outcome; lio_listio is the one that
    hung.)"""
    import threadlets.posix as px

    ctx = AioContext(backend=backend, deliver=False, inline=False)
    rt = px.PosixAio(ctx)
    r, w = os.pipe()
    forked: list[tuple[int, int]] = []
    try:
        cb = px.aiocb(r, 0, bytearray(1), lio_opcode=px.LIO_READ)

        def handler(signum: int, frame: object) -> None:
            rr, ww = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(rr)
                forked.append((0, ww))
            else:
                os.close(ww)
                forked.append((pid, rr))
                os.write(w, b"x")  # the parent's wait returns

        def interrupt() -> None:
            wait_until(lambda: rt._waiting > 0)
            signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGUSR1)

        old = signal.signal(signal.SIGUSR1, handler)
        t = threading.Thread(target=interrupt)
        try:
            t.start()
            try:
                if how == "aio_suspend":
                    rt.aio_read(cb)
                    rt.aio_suspend([cb], 15)
                else:
                    rt.lio_listio(px.LIO_WAIT, [cb])
                answer: object = "returned"
            except OSError as e:
                answer = e.errno
            pid, end = forked[0]
            if pid == 0:
                _report(end, lambda: [answer, rt.aio_error(cb)])
            t.join(30)
        finally:
            signal.signal(signal.SIGUSR1, old)
        expect = "returned" if how == "aio_suspend" else errno.EIO
        assert _collect(pid, end) == [expect, errno.ECANCELED]
        assert answer == "returned"
        assert rt.aio_error(cb) == 0
        assert rt.aio_return(cb) == 1
    finally:
        assert ctx.close(10)
        os.close(r)
        os.close(w)


# -- 7. the ring's reaper thread forks --------------------------------------------------------


def test_a_child_forked_in_the_reapers_callback_leaves_the_parents_ring_alone() -> None:
    """deliver=False on io_uring: done-callbacks run in the ring's reaper
    thread; one forks, and the child returns from it.  The child's reaper
    (the forking thread) went on waiting in io_uring_enter on the ring's fd,
    which the child had closed (or which was another file's by then):
    "io_uring_enter(wait): Bad file descriptor" logged in every such child.
    Now it stops at once there."""
    if not HAVE_RING:
        pytest.skip("no io_uring here")
    code = """
import os, threadlets
ctx = threadlets.AioContext(backend="io_uring", deliver=False, inline=False)
fd, feed = os.pipe()  # (a pipe read: on the ring, pending until fed)
r, w = os.pipe()
def cb(_):
    if os.fork() == 0:
        os.write(w, b"c")  # then back to the reaper loop, the only thread here
req = ctx.read(fd, 0, bytearray(1))
req.add_done_callback(cb)
os.write(feed, b"x")  # (only now: the callback runs in the reaper)
assert req.wait(10)
os.close(w)
assert os.read(r, 1) == b"c"
assert os.read(r, 1) == b""  # the child has exited (the write end is closed)
assert ctx.close(10)
"""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent.parent / "src"))
    proc = subprocess.run(
        [sys.executable, "-c", code], check=False, env=env, timeout=60, capture_output=True
    )
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stderr == b"", proc.stderr.decode()
