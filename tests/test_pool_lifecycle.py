"""Threadlet queues: the life cycle under stress -- callbacks that raise
BaseException, waits from callbacks, unbounded timeouts, references a worker
keeps, queues dropped without close(), limits changed under load, spawn
failures, close() from callbacks and fork() from workers."""

from __future__ import annotations

import asyncio
import gc
import logging
import mmap
import os
import signal
import sys
import threading
import time
import traceback
import weakref
from collections.abc import Callable

import pytest

from threadlets import CancelResult, ThreadletQueue, ThreadletState
from threadlets.pool import Threadlet

from .conftest import Gate, wait_until

INTERRUPTS = [KeyboardInterrupt, SystemExit, asyncio.CancelledError]


def _raiser(exc: type[BaseException]) -> Callable[[object], None]:
    def cb(_: object) -> None:
        raise exc("from a callback")

    return cb


def _workers_of(q: ThreadletQueue) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(f"{q.name}-worker-")]


# -- callbacks that raise a BaseException (defect 3) ----------------------------------


@pytest.mark.parametrize("exc", INTERRUPTS)
def test_interrupt_from_callback_in_worker_is_logged_and_the_worker_survives(
    exc: type[BaseException], caplog: pytest.LogCaptureFixture
) -> None:
    with ThreadletQueue(max_threads=1) as q:
        gate = Gate("first")
        t = q.submit(gate)
        calls: list[str] = []
        last = threading.Event()
        t.add_done_callback(lambda _: calls.append("a"))
        t.add_done_callback(_raiser(exc))
        t.add_done_callback(_raiser(ValueError))
        t.add_done_callback(lambda _: (calls.append("b"), last.set()))
        with caplog.at_level(logging.ERROR, logger="threadlets"):
            gate.release.set()
            assert last.wait(10), "the callbacks after the interrupt never ran"
            # The one worker still serves: later work runs, close returns.
            assert q.submit(lambda: "later").result(10) == "later"
        assert calls == ["a", "b"]
        assert exc.__name__ in caplog.text
        assert "ValueError" in caplog.text
        s = q.stats()
        assert (s.spawned, s.threads, s.completed) == (1, 1, 2)
    assert q.close(10)


@pytest.mark.parametrize("exc", INTERRUPTS)
def test_interrupt_from_callback_in_cancel_is_raised_after_the_rest_ran(
    exc: type[BaseException],
) -> None:
    with ThreadletQueue(max_threads=1) as q:
        gate = Gate()
        q.submit(gate)
        assert gate.started.wait(10)
        t = q.submit(lambda: "never")
        calls: list[str] = []
        t.add_done_callback(lambda _: calls.append("a"))
        t.add_done_callback(_raiser(exc))
        t.add_done_callback(_raiser(KeyboardInterrupt))  # the second is logged
        t.add_done_callback(lambda _: calls.append("b"))
        with pytest.raises(exc, match="from a callback"):
            t.cancel()
        assert calls == ["a", "b"]
        assert t.cancelled()
        assert t.wait(0)
        assert t.cancel() is CancelResult.ALLDONE
        # Added to a finished threadlet: runs at once, and raises here.
        with pytest.raises(exc):
            t.add_done_callback(_raiser(exc))
        gate.release.set()


def test_interrupt_from_a_callback_in_close_delivers_every_cancelled_threadlet() -> None:
    q = ThreadletQueue(max_threads=1)
    gate = Gate()
    q.submit(gate)
    assert gate.started.wait(10)
    first, second = q.submit(lambda: 1), q.submit(lambda: 2)
    seen: list[ThreadletState] = []
    first.add_done_callback(_raiser(KeyboardInterrupt))
    second.add_done_callback(lambda t: seen.append(t.state))
    with pytest.raises(KeyboardInterrupt):
        q.close(10)
    assert seen == [ThreadletState.CANCELLED]
    assert second.wait(0)
    gate.release.set()
    assert q.close(10)
    s = q.stats()
    assert (s.threads, s.cancelled, s.completed) == (0, 2, 1)


# -- idle_timeout and timeouts beyond what a lock wait takes (defect 4) --------------------


@pytest.mark.parametrize("idle_timeout", [float("inf"), 1e300, 10**400, threading.TIMEOUT_MAX * 2])
def test_unbounded_idle_timeout_means_never_retire(idle_timeout: float) -> None:
    with ThreadletQueue(max_threads=1, idle_timeout=idle_timeout) as q:
        assert q.submit(lambda: 1).result(10) == 1
        wait_until(lambda: q.stats().idle == 1)
        # The idle worker waits (without a timeout) and still serves.
        assert q.submit(lambda: 2).result(10) == 2
        wait_until(lambda: q.stats().idle == 1)
        assert q.submit(lambda: 3).result(10) == 3
        s = q.stats()
        assert (s.spawned, s.retired) == (1, 0)
    assert q.close(10)


def test_nan_idle_timeout_is_refused() -> None:
    with pytest.raises(ValueError, match="idle_timeout must be > 0"):
        ThreadletQueue(idle_timeout=float("nan"))


def test_unbounded_and_nan_wait_timeouts() -> None:
    with ThreadletQueue(max_threads=2) as q:
        gate = Gate("v")
        t = q.submit(gate)
        assert gate.started.wait(10)
        outcomes: dict[str, object] = {}

        def waiter(name: str, call: Callable[[], object]) -> None:
            try:
                outcomes[name] = call()
            except BaseException as e:
                outcomes[name] = e

        inf = float("inf")
        helpers = [
            threading.Thread(target=waiter, args=("result", lambda: t.result(inf))),
            threading.Thread(target=waiter, args=("wait", lambda: t.wait(1e300))),
            threading.Thread(target=waiter, args=("drain", lambda: q.drain(inf))),
        ]
        for h in helpers:
            h.start()
        # Release only once both threadlet waiters are registered (or failed).
        wait_until(lambda: len(t._waiters or ()) == 2 or len(outcomes) >= 2)
        gate.release.set()
        for h in helpers:
            h.join(10)
        assert outcomes == {"result": "v", "wait": True, "drain": True}
        for call in (t.wait, t.result, q.drain, q.close):
            with pytest.raises(ValueError, match="timeout must be None or >= 0"):
                call(float("nan"))
    assert q.close(inf)


# -- the worker loop: take, run, publish, deliver (defect 5a) ------------------------------


def test_next_threadlet_is_queued_while_the_previous_ones_callbacks_run() -> None:
    with ThreadletQueue(max_threads=1) as q:
        gate = Gate()
        a = q.submit(gate)
        assert gate.started.wait(10)
        b = q.submit(lambda: "b")
        seen: list[object] = []

        def cb(_: Threadlet[object]) -> None:
            seen.append(b.state)
            seen.append(q.stats().running)
            seen.append(b.cancel())

        a.add_done_callback(cb)
        gate.release.set()
        assert a.wait(10)
        assert b.wait(10)
        # b had not started: it was QUEUED, nothing ran, cancel won.
        assert seen == [ThreadletState.QUEUED, 0, CancelResult.CANCELED]
        assert b.cancelled()


def test_callback_can_wait_for_work_queued_behind_it() -> None:
    with ThreadletQueue(max_threads=1) as q:
        gate = Gate()
        a = q.submit(gate)
        assert gate.started.wait(10)
        b = q.submit(lambda: "b")
        got: list[object] = []

        def cb(_: Threadlet[object]) -> None:
            # Another worker may take b (it is still queued): wait for it.
            q.set_limits(max_threads=2)
            got.append(b.result(10))

        a.add_done_callback(cb)
        gate.release.set()
        assert q.drain(10)
        assert got == ["b"]


# -- what a worker keeps (defect 5b) ----------------------------------------------------------


def _buffer_user(buf: memoryview) -> int:
    return len(buf)


def _buffer_breaker(buf: memoryview) -> int:
    raise ValueError(len(buf))


def test_idle_worker_keeps_no_reference_to_its_last_threadlet() -> None:
    with ThreadletQueue(max_threads=1) as q:
        mm = mmap.mmap(-1, mmap.PAGESIZE)
        t = q.submit(_buffer_user, memoryview(mm)[:100])
        assert t.result(10) == 100
        gone = weakref.ref(t)
        del t
        wait_until(lambda: q.stats().idle == 1)
        assert gone() is None
        mm.close()  # BufferError if anything still holds the export


def test_finished_or_cancelled_threadlet_drops_its_arguments() -> None:
    with ThreadletQueue(max_threads=1) as q:
        mm = mmap.mmap(-1, mmap.PAGESIZE)
        ok = q.submit(_buffer_user, memoryview(mm)[:10])
        failed = q.submit(_buffer_breaker, memoryview(mm)[:20])
        assert ok.result(10) == 10
        with pytest.raises(ValueError):
            failed.result(10)
        gate = Gate()
        q.submit(gate)
        assert gate.started.wait(10)
        cancelled = q.submit(_buffer_user, memoryview(mm)[:30])
        assert cancelled.cancel() is CancelResult.CANCELED
        gate.release.set()
        assert q.drain(10)
        # The handles live on; the traceback of ``failed`` holds its frames
        # (and through them its argument) until it is dropped.
        del failed
        gc.collect()
        mm.close()
        assert ok.result() == 10
        assert cancelled.cancelled()


# -- queues dropped without close() (defect 5c) ----------------------------------------------


def _join_all(threads: list[threading.Thread], timeout: float = 30.0) -> list[str]:
    """Join every thread within one deadline (a safety net: 200 threads
    exiting beside two CPU hogs once took over 10 s); return where those
    still alive are (their names and stacks)."""
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    frames = sys._current_frames()
    return [
        f"{t.name}:\n" + "".join(traceback.format_stack(frames[t.ident]))
        if t.ident in frames
        else t.name
        for t in threads
        if t.is_alive()
    ]


def _collected(refs: list[weakref.ref[ThreadletQueue]]) -> bool:
    gc.collect()
    return all(r() is None for r in refs)


def test_dropped_queues_let_their_warm_workers_go() -> None:
    before = set(threading.enumerate())
    queues = [ThreadletQueue(max_threads=2, min_threads=2) for _ in range(100)]
    # Half of them have done some work too.
    for q in queues[::2]:
        assert q.submit(lambda: 1).result(10) == 1
    workers = [t for t in threading.enumerate() if t not in before]
    assert len(workers) == 200
    gone = [weakref.ref(q) for q in queues]
    del queues, q
    # (A worker that just published a result may hold its threadlet, and so
    # the queue, a moment longer on its way back to the idle stack.)
    wait_until(lambda: _collected(gone))
    assert _join_all(workers) == []


def test_a_dropped_queue_with_work_lives_until_the_work_is_done() -> None:
    q = ThreadletQueue(max_threads=2, min_threads=1, name="dropped")
    gate = Gate("done")
    t = q.submit(gate)
    assert gate.started.wait(10)
    queued = [q.submit(lambda: "later") for _ in range(2)]
    workers = _workers_of(q)
    gone = weakref.ref(q)
    del q
    gc.collect()
    assert gone() is not None  # the threadlets hold it
    gate.release.set()
    assert t.result(10) == "done"
    assert [x.result(10) for x in queued] == ["later"] * 2
    del t, queued
    wait_until(lambda: _collected([gone]))
    assert _join_all(workers) == []


# -- limits, spawning and closing under load -------------------------------------------------


def test_lowered_max_threads_holds_while_work_is_queued() -> None:
    with ThreadletQueue(max_threads=2, idle_timeout=60) as q:
        a, b, c, d = Gate(), Gate(), Gate(), Gate()
        items = [q.submit(g) for g in (a, b, c, d)]
        assert a.started.wait(10)
        assert b.started.wait(10)
        q.set_limits(max_threads=1)
        a.release.set()
        b.release.set()
        assert c.started.wait(10)
        # The surplus worker retires before it takes more work.
        wait_until(lambda: q.stats().threads == 1)
        assert not d.started.is_set()
        assert q.stats().running == 1
        c.release.set()
        d.release.set()
        assert all(t.wait(10) for t in items)


def test_submit_when_no_worker_can_start_queues_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    with ThreadletQueue(max_threads=2) as q:
        monkeypatch.setattr(threading.Thread, "start", refuse)
        with pytest.raises(RuntimeError, match="can't start"):
            q.submit(lambda: 1)
        s = q.stats()
        assert (s.submitted, s.queued, s.threads, s.spawned) == (0, 0, 0, 0)
        assert q.drain(0)
        monkeypatch.undo()
        assert q.submit(lambda: 2).result(10) == 2


def test_submit_interrupted_while_a_worker_starts_queues_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real_start = threading.Thread.start
    started: list[threading.Thread] = []

    def interrupted(self: threading.Thread) -> None:
        real_start(self)  # the thread runs; Ctrl-C lands in start()'s wait
        started.append(self)
        raise KeyboardInterrupt

    ran: list[int] = []
    with ThreadletQueue(max_threads=2) as q:
        monkeypatch.setattr(threading.Thread, "start", interrupted)
        with pytest.raises(KeyboardInterrupt):
            q.submit(ran.append, 1)
        monkeypatch.undo()
        assert q.submit(ran.append, 2).result(10) is None
        assert _join_all(started) == []  # the abandoned worker just left
    assert q.close(10)
    assert ran == [2]
    s = q.stats()
    assert (s.submitted, s.completed, s.spawned, s.retired, s.threads) == (1, 1, 1, 1, 0)


def test_close_from_callbacks_in_two_workers() -> None:
    q = ThreadletQueue(max_threads=2)
    both = threading.Barrier(2, timeout=10)
    closed: list[bool] = []

    def cb(_: Threadlet[object]) -> None:
        both.wait()
        closed.append(q.close(timeout=10))

    items = [q.submit(Gate()) for _ in range(2)]
    for t in items:
        t.add_done_callback(cb)
    for t in items:
        assert t._fn is not None
        t._fn.release.set()  # type: ignore[attr-defined]
    workers = _workers_of(q)
    assert _join_all(workers) == []
    assert closed == [True, True]
    assert q.close(0)
    assert q.stats().threads == 0


def test_close_joins_the_workers() -> None:
    q = ThreadletQueue(max_threads=4, min_threads=4)
    assert q.submit(lambda: 1).result(10) == 1
    workers = _workers_of(q)
    assert len(workers) == 4
    assert q.close(10)
    assert not any(t.is_alive() for t in workers)


# -- fork ---------------------------------------------------------------------------------------


def _child_report(q: ThreadletQueue, item: Threadlet[object]) -> bytes:
    """What a forked child checks: the parent's work is settled here, the
    counters add up, and the queue works and closes."""
    s = q.stats()
    ok = [
        item.done(),
        s.submitted == s.completed + s.cancelled + s.queued + s.running,
        (s.running, s.queued) == (0, 0),
        q.drain(10),
        q.submit(os.getpid).result(10) == os.getpid(),
        q.close(10),
    ]
    return ",".join(str(int(x)) for x in ok).encode()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_fork_while_a_worker_runs_a_callback() -> None:
    q = ThreadletQueue(max_threads=2)
    in_cb, go = threading.Event(), threading.Event()
    gate = Gate("v")
    t = q.submit(gate)
    t.add_done_callback(lambda _: (in_cb.set(), go.wait(30)))
    gate.release.set()
    assert in_cb.wait(10)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.write(w, _child_report(q, t))
        finally:
            os._exit(0)
    os.close(w)
    _, status = os.waitpid(pid, 0)
    report = os.read(r, 100)
    os.close(r)
    assert os.waitstatus_to_exitcode(status) == 0
    assert report == b"1,1,1,1,1,1"
    assert not q.drain(0)  # here the callback still runs
    go.set()
    assert q.drain(10)
    assert q.close(10)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
@pytest.mark.parametrize("where", ["function", "callback"])
def test_fork_from_a_worker(where: str) -> None:
    # The forking thread goes on in the child as its only thread; it must
    # not go on as a worker of the reset queue (and touch its counters).
    q = ThreadletQueue(max_threads=1)
    r, w = os.pipe()
    pids: list[int] = []
    gate = Gate("parent")
    items: list[Threadlet[object]] = []

    def fork() -> object:
        assert gate.release.wait(10)
        pid = os.fork()
        if pid:
            pids.append(pid)
            return "parent"
        me = threading.current_thread()

        def report() -> None:
            try:
                me.join(10)  # the old worker's thread leaves at once
                os.write(w, b"%d," % (not me.is_alive()) + _child_report(q, items[0]))
            finally:
                os._exit(0)

        threading.Thread(target=report).start()
        return "child"

    if where == "function":
        items.append(q.submit(fork))
    else:
        items.append(q.submit(gate))
        items[0].add_done_callback(lambda _: fork())
    item = items[0]
    gate.release.set()
    assert item.result(10) == "parent"
    assert q.drain(10)
    os.close(w)
    (pid,) = pids
    _, status = os.waitpid(pid, 0)
    report = os.read(r, 100)
    os.close(r)
    assert os.waitstatus_to_exitcode(status) == 0
    assert report == b"1,1,1,1,1,1,1"
    assert q.close(10)


# -- Ctrl-C in every wait -------------------------------------------------------------------------


def _syscall_of(tid: int) -> str:
    """The number of the system call a thread of this process is in."""
    try:
        with open(f"/proc/self/task/{tid}/syscall") as f:
            return f.read().split(" ", 1)[0]
    except OSError:
        return ""


@pytest.mark.skipif(
    not (sys.platform.startswith("linux") and os.uname().machine == "x86_64"),
    reason="finds the futex wait through /proc (x86-64 syscall numbers)",
)
@pytest.mark.parametrize("call", ["wait", "result", "drain", "close"])
def test_ctrl_c_in_a_wait_leaves_everything_deliverable(call: str) -> None:
    q = ThreadletQueue(max_threads=1)
    gate = Gate("v")
    t = q.submit(gate)
    assert gate.started.wait(10)
    behind = q.submit(lambda: "behind")
    calls: list[ThreadletState] = []
    t.add_done_callback(lambda x: calls.append(x.state))
    blocking: dict[str, Callable[[], object]] = {
        "wait": t.wait,
        "result": t.result,
        "drain": q.drain,
        "close": q.close,
    }
    main_tid = threading.get_native_id()
    calling = threading.Event()

    def interrupt() -> None:
        assert calling.wait(10)
        # Once the main thread sleeps in the wait (futex, 202): Ctrl-C.
        wait_until(lambda: _syscall_of(main_tid) == "202", timeout=30)
        signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)

    helper = threading.Thread(target=interrupt)
    helper.start()
    interrupted = False
    try:  # the signal may come as soon as ``calling`` is set
        calling.set()
        blocking[call]()
    except KeyboardInterrupt:
        interrupted = True
    helper.join(10)
    assert interrupted
    assert not t._waiters  # the interrupted waiter withdrew
    gate.release.set()
    assert t.result(10) == "v"
    assert calls == [ThreadletState.DONE]
    if call == "close":  # it had begun: the queued work was cancelled
        assert behind.cancelled()
    else:
        assert behind.result(10) == "behind"
    assert q.close(10)
    assert q.stats().threads == 0


def test_submit_when_a_worker_cannot_start_but_others_run(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def refuse(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    with ThreadletQueue(max_threads=2) as q:
        gate = Gate()
        busy = q.submit(gate)
        assert gate.started.wait(10)
        monkeypatch.setattr(threading.Thread, "start", refuse)
        with caplog.at_level(logging.WARNING, logger="threadlets"):
            t = q.submit(lambda: "waited")  # queued for the running worker
        monkeypatch.undo()
        assert "could not start a worker" in caplog.text
        assert t.state is ThreadletState.QUEUED
        gate.release.set()
        assert t.result(10) == "waited"
        assert busy.wait(10)
        s = q.stats()
        assert (s.submitted, s.completed, s.spawned) == (2, 2, 1)


def test_callbacks_waiting_for_the_next_threadlet_race() -> None:
    # Two warm workers; A's callback waits for B, submitted just before A is
    # let go.  Whichever worker gets there first, B is taken only by a
    # worker that is free: never by A's, which is busy delivering A.
    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        with ThreadletQueue(max_threads=2, min_threads=2) as q:
            for _ in range(200):
                gate = Gate()
                a = q.submit(gate)
                waited: list[bool] = []
                box: list[Threadlet[int]] = []
                a.add_done_callback(
                    lambda _, box=box, waited=waited: waited.append(box[0].wait(10))
                )
                box.append(q.submit(int))
                gate.release.set()
                assert q.drain(30)
                assert waited == [True]
    finally:
        sys.setswitchinterval(old_interval)
