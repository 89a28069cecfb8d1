"""The core against its promises, seventh session: interrupts in hand-overs,
shutdown, fork and abandoned contexts."""

from __future__ import annotations

import contextlib
import errno
import functools
import gc
import os
import select
import sys
import threading
from pathlib import Path

import pytest

from threadlets import AioContext, AioRequest, ThreadletQueue

from .conftest import HAVE_RING, Gate, call_interrupted_at, interrupt_at_c_return, wait_until


def _outcome(req: AioRequest) -> object:
    try:
        return req.result(timeout=0)
    except OSError as e:
        return e.errno


@pytest.mark.parametrize("kind", ["short read", "ring close refused"])
def test_ctrl_c_at_every_c_return_of_a_hand_over_to_a_worker(
    backend: str, tmp_path: Path, kind: str
) -> None:
    """A ring completion that a worker must finish (a read short at end of
    file, a close the ring refused) is handed over inside
    process_completions().  Ctrl-C landing in that hand-over, before the
    continuation was queued, left the request RUNNING for good: drain() and
    close() never returned.  Now the request finishes (EINTR, carrying what
    moved, or its real answer), its callback runs once, and nothing hangs."""
    path = tmp_path / "f"
    path.write_bytes(b"x" * 100)
    fd = os.open(path, os.O_RDONLY)
    spare = 1000  # a number nothing is open on (far above what the test opens)
    with pytest.raises(OSError):
        os.fstat(spare)
    try:
        n = 0
        while True:
            n += 1
            ctx = AioContext(backend=backend, inline=False)
            calls: list[AioRequest] = []
            if kind == "short read":
                req = ctx.read(fd, 50, bytearray(200), callback=calls.append)
                good: tuple[object, ...] = (50, errno.EINTR)
            else:
                req = ctx.close_fd(spare, callback=calls.append)
                good = (errno.EBADF, errno.EINTR)
            select.select([ctx.fileno()], [], [], 10)  # finished, or on the ring
            seen = call_interrupted_at(n, ctx.process_completions)
            assert ctx.drain(timeout=10), f"interrupt at C return {n}: {req!r} never finished"
            assert calls == [req], (n, calls)
            assert _outcome(req) in good, (n, _outcome(req))
            assert ctx.close(timeout=10)
            if seen[0] < n:
                break  # the whole delivery ran without reaching the n-th return
    finally:
        os.close(fd)


@pytest.mark.parametrize("deliver", [False, True])
def test_close_from_a_done_callback_of_its_own_request(
    backend: str, tmp_path: Path, deliver: bool
) -> None:
    """A done-callback (add_done_callback) that closes its request's own
    context: close() waited for that request, which is delivered only once
    its done-callbacks returned -- for ever without a timeout (with one, it
    gave up and left the context open).  The request whose callbacks run in
    the closing thread counts as done, as a pool worker closing its own
    queue does not wait for itself.  In a delivering context, its own
    callback= runs in that thread once its done-callbacks returned."""
    path = tmp_path / "f"
    path.write_bytes(b"x" * 100)
    fd = os.open(path, os.O_RDONLY)
    try:
        ctx = AioContext(backend=backend, inline=False, deliver=deliver)
        closed: list[bool] = []
        done = threading.Event()

        def close_it(r: object) -> None:
            try:
                closed.append(ctx.close(timeout=2))
                closed.append(ctx.drain(timeout=2) if deliver else True)
            finally:
                done.set()

        delivered: list[AioRequest] = []
        req = ctx.read(fd, 0, bytearray(10), callback=delivered.append if deliver else None)
        req.add_done_callback(close_it)
        if deliver:
            other = ctx.read(fd, 0, bytearray(10), callback=delivered.append)
            assert ctx.wait(other, timeout=10) or ctx.closed
        assert done.wait(timeout=10)
        assert closed == [True, True]
        assert ctx.closed
        assert req.result() == 10
        if deliver:  # (its own callback too, by the thread that closed the context)
            wait_until(lambda: len(delivered) >= 2)
            assert sorted(map(id, delivered)) == sorted(map(id, [req, other]))
            assert ctx.stats().outstanding == 0
        assert ctx.close(timeout=10)
    finally:
        os.close(fd)


@pytest.mark.parametrize("how", ["poll", "drain", "wait"])
def test_close_from_another_thread_wakes_the_owner_asleep_on_the_eventfd(
    backend: str, how: str
) -> None:
    """The owner asleep in poll() (nothing outstanding), drain() or wait()
    while another thread closes the context: poll() slept until its timeout
    -- for ever without one: closing an fd does not wake a poll on it --
    and then raised EBADF ("closed by someone else"), having polled a
    number the context no longer owned.  Now the close wakes the sleepers
    and the eventfd is closed by the last one out."""
    ctx = AioContext(backend=backend)
    gate = threading.Event()
    asleep = threading.Event()
    outcome: list[object] = []
    req = None if how == "poll" else ctx.call(gate.wait, 30)

    def owner() -> None:
        try:
            asleep.set()
            if how == "poll":
                outcome.append(ctx.poll(timeout=30))
            elif how == "drain":
                outcome.append(ctx.drain(timeout=30))
            else:
                assert req is not None
                outcome.append(ctx.wait(req, timeout=30))
        except BaseException as e:
            outcome.append(e)

    t = threading.Thread(target=owner)
    t.start()
    assert asleep.wait(timeout=10)
    wait_until(lambda: ctx._cq.notifier.sleepers == 1)
    fd = ctx._cq.notifier.fileno()
    if how == "poll":
        assert ctx.close(timeout=10)
    else:
        closer = threading.Thread(target=ctx.close, args=(10,))
        closer.start()
        wait_until(lambda: ctx._cq.closing)
        gate.set()
        closer.join(timeout=10)
    t.join(timeout=10)
    assert not t.is_alive(), "the owner still sleeps on a closed context"
    assert outcome in ([0], [True])
    assert ctx.closed
    with pytest.raises(OSError):
        os.fstat(fd)  # and the eventfd was closed after all


@pytest.mark.parametrize("timeout", [float("inf"), 1e300, 1e7])
@pytest.mark.parametrize("call", ["drain", "ctx.wait", "poll", "req.wait", "close"])
def test_a_timeout_beyond_what_poll_takes_waits_as_long_as_asked(
    backend: str, timeout: float, call: str
) -> None:
    """drain(), wait(), poll() and close() with a timeout past what poll(2)
    takes in milliseconds (about 24.8 days) -- infinity included, "no
    limit" as the pool's waits take it -- raised OverflowError (close() then
    left the context open); on the ring req.wait(inf) did too."""
    r, w = os.pipe()
    with AioContext(backend=backend) as ctx:
        req = ctx.read(r, 0, bytearray(1))  # (on the ring, where there is one)
        outcome: list[object] = []

        def waiter() -> None:
            try:
                if call == "drain":
                    outcome.append(ctx.drain(timeout))
                elif call == "ctx.wait":
                    outcome.append(ctx.wait(req, timeout))
                elif call == "poll":
                    outcome.append(ctx.poll(timeout))
                elif call == "req.wait":
                    outcome.append(req.wait(timeout))
                else:
                    outcome.append(ctx.close(timeout))
            except BaseException as e:
                outcome.append(e)

        t = threading.Thread(target=waiter)
        t.start()
        ring = ctx._ring

        def asleep() -> bool:
            if call == "close":
                return ctx._cq.closing
            if call == "req.wait":
                return bool(req._waiters) or (ring is not None and ring._sleepers > 0)
            return ctx._cq.notifier.sleepers > 0

        wait_until(lambda: asleep() or bool(outcome))
        os.write(w, b"x")
        t.join(timeout=10)
        assert outcome in ([True], [1])
        assert ctx.drain(timeout=10)
    os.close(r)
    os.close(w)


def test_a_nan_timeout_is_refused_before_anything_happens(backend: str) -> None:
    """NaN is refused by every engine wait as the pool refuses it (before,
    some answered with int()'s ValueError from half-way: close(nan) had
    begun closing and then reopened)."""
    nan = float("nan")
    for deliver in (True, False):
        with AioContext(backend=backend, deliver=deliver) as ctx:
            req = ctx.call(int)
            calls = [req.wait, req.result, ctx.close]
            if deliver:
                calls += [ctx.drain, ctx.poll, functools.partial(ctx.wait, req)]
            for c in calls:
                with pytest.raises(ValueError, match="timeout must be None or >= 0"):
                    c(nan)
            assert req.wait(10)
            assert not ctx.closed


def test_close_with_a_reaper_busy_after_the_batch_keeps_to_its_timeout(tmp_path: Path) -> None:
    """A reaper-mode context (deliver=False, io_uring) whose reaper is still
    busy once every request was delivered (an after-batch call of a front
    end that blocks): close(timeout) joined the reaper with no timeout, so
    it hung for as long as that took.  Now it returns False in time."""
    if not HAVE_RING:
        pytest.skip("no io_uring here")
    fd, w = os.pipe()
    release = threading.Event()
    busy = threading.Event()
    ctx = AioContext(backend="io_uring", inline=False, deliver=False)

    def blocker() -> None:
        busy.set()
        release.wait(30)

    try:
        req = ctx.read(fd, 0, bytearray(10))
        req.add_done_callback(lambda r: ctx.call_after_batch(blocker))
        os.write(w, b"x")  # (it completes in the reaper, after the callback is in place)
        assert busy.wait(10)
        answer: list[bool] = []
        closer = threading.Thread(target=lambda: answer.append(ctx.close(timeout=0.2)))
        closer.start()
        closer.join(timeout=10)
        hung = closer.is_alive()
        release.set()
        closer.join(timeout=10)
        assert not hung, "close(timeout=0.2) waited for the reaper beyond its timeout"
        assert answer == [False]
        assert ctx.closed
        assert ctx.close(timeout=10)  # (and once the reaper ended: True)
    finally:
        release.set()
        os.close(fd)
        os.close(w)


@pytest.mark.parametrize("deliver", [True, False])
def test_ctrl_c_at_every_c_return_of_a_cancel_delivers_it_once(backend: str, deliver: bool) -> None:
    """cancel() of a queued request: Ctrl-C landing as the queue's lock was
    let go -- the request already CANCELLED -- skipped its delivery: no
    done-callback, no completion, and drain() and close() waited for it for
    ever.  Now it is delivered (once) before the interrupt propagates."""
    n = 0
    while True:
        n += 1
        queue = ThreadletQueue(max_threads=1)
        gate = Gate()
        ctx = AioContext(queue, backend=backend, inline=False, deliver=deliver)
        try:
            blocker = ctx.call(gate)
            assert gate.started.wait(10)
            calls: list[AioRequest] = []
            done: list[object] = []
            req = ctx.call(int, callback=calls.append if deliver else None)
            req.add_done_callback(done.append)
            seen = call_interrupted_at(n, req.cancel)
            gate.release.set()
            assert blocker.wait(10)
            if deliver:
                assert ctx.drain(timeout=10), f"interrupt at C return {n}: never delivered"
            assert ctx.close(timeout=10), f"interrupt at C return {n}: never delivered"
            assert done == [req], n
            assert calls == ([req] if deliver else []), n
        finally:
            gate.release.set()
            ctx.close(timeout=1)
            queue.close(timeout=10)
        if seen[0] < n:
            break


def test_ctrl_c_at_every_c_return_of_a_queue_close_strands_nothing() -> None:
    """ThreadletQueue.close(): Ctrl-C landing as it took a queued threadlet
    off the queue (popleft) stranded it -- QUEUED, in no queue, never run
    nor cancelled: drain() and close() waited for it for ever -- and one
    landing after a threadlet was cancelled, before its delivery, lost its
    callbacks.  Now every queued threadlet is either cancelled and
    delivered, once, or still queued for the next close()."""
    for idle_timeout in (10.0, float("inf")):
        n = 0
        while True:
            n += 1
            q = ThreadletQueue(max_threads=2, min_threads=1, idle_timeout=idle_timeout)
            gate = Gate(1)
            q.submit(gate)
            assert gate.started.wait(10)
            calls: list[object] = []
            queued = [q.submit(int) for _ in range(3)]
            for t in queued:
                t.add_done_callback(calls.append)
            seen = call_interrupted_at(n, q.close, timeout=0)
            gate.release.set()
            assert q.close(timeout=10), n
            assert sorted(map(id, calls)) == sorted(map(id, queued)), n
            s = q.stats()
            assert s.threads == 0
            assert s.submitted == s.completed + s.cancelled, s
            if seen[0] < n:
                break


def _fds() -> dict[str, str]:
    """The open descriptors and what they are (the listing's own is closed
    by the time it is looked at)."""
    out = {}
    for f in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            out[f] = os.readlink(f"/proc/self/fd/{f}")
    return out


@pytest.mark.parametrize("deliver", [True, False])
def test_ctrl_c_at_every_c_return_of_a_close_then_close_again_releases_all(
    backend: str, deliver: bool
) -> None:
    """Ctrl-C inside close() once everything was delivered -- inside the
    context's one-shot finalizer, as the ring pushed its STOP -- left the
    ring closing with no STOP sent and the finalizer spent: the reaper
    thread never ended, the eventfd stayed open, and every later close()
    returned False.  Now the next close() finishes the job."""
    n = 0
    while True:
        n += 1
        r, w = os.pipe()
        before = _fds()
        ctx = AioContext(backend=backend, inline=False, deliver=deliver)
        done: list[object] = []
        reqs = [ctx.read(r, 0, bytearray(4)) for _ in range(2)]
        for req in reqs:
            req.add_done_callback(done.append)
        os.write(w, b"abcdefgh")
        seen = call_interrupted_at(n, ctx.close, timeout=10)
        try:
            assert ctx.close(timeout=10), f"interrupt at C return {n}"
            assert ctx.closed
            assert sorted(map(id, done)) == sorted(map(id, reqs))
            left = {f: what for f, what in _fds().items() if before.get(f) != what}
            nt = ctx._cq.notifier
            assert not left, (n, left, nt._rfd, nt.closed, nt._deferred, nt.sleepers)
        finally:
            os.close(r)
            os.close(w)
        if seen[0] < n:
            break


@pytest.mark.parametrize("idle_timeout", [10.0, float("inf")])
def test_ctrl_c_at_every_c_return_of_set_limits_strands_no_worker(idle_timeout: float) -> None:
    """set_limits() lowering max_threads took each surplus idle worker off
    the idle stack and woke it in two steps: Ctrl-C between them left a
    worker that nobody would ever wake (one that timed out found itself
    popped and waited for its wakeup), so close() waited for it for ever."""
    n = 0
    while True:
        n += 1
        q = ThreadletQueue(max_threads=4, idle_timeout=idle_timeout)
        gates = [Gate() for _ in range(4)]
        for g in gates:
            q.submit(g)
        for g in gates:
            assert g.started.wait(10)
        for g in gates:
            g.release.set()
        assert q.drain(timeout=10)
        wait_until(lambda q=q: q.stats().idle == 4)
        seen = call_interrupted_at(n, q.set_limits, max_threads=1)
        assert q.close(timeout=10), f"interrupt at C return {n}: a worker was never woken"
        assert q.stats().threads == 0
        if seen[0] < n:
            break


def test_ctrl_c_at_every_c_return_of_a_wait_that_reaps_leaves_no_sleeper_counted(
    backend: str,
) -> None:
    """req.wait() of a request on an owner-mode ring reaps and sleeps in
    Ring.wait: Ctrl-C as the ring's lock was let go left the thread counted
    as a sleeper for good, and every later reap posted a NOP for nobody --
    one more system call and eventfd wakeup per batch, for the ring's life."""
    n = 0
    while True:
        n += 1
        r, w = os.pipe()
        ctx = AioContext(backend=backend, inline=False)
        try:
            req = ctx.read(r, 0, bytearray(4))
            seen = interrupt_at_c_return(n)
            try:
                assert not req.wait(0.02)  # (nothing to read: it sleeps in the ring's wait)
            except KeyboardInterrupt:
                pass
            finally:
                sys.setprofile(None)
                gc.enable()
            os.write(w, b"abcd")
            assert req.wait(10)
            ring = ctx._ring
            if ring is not None:
                assert ring._sleepers == 0, f"interrupt at C return {n}"
            assert ctx.close(timeout=10)
        finally:
            ctx.close(timeout=1)
            os.close(r)
            os.close(w)
        if seen[0] < n:
            break


#: Where a descriptor is made and not yet stored: Ctrl-C as that call
#: returns loses it in any Python code (the residual window).
_MAKING_AN_FD = ("os.eventfd(", "os.pipe()", "setup(_NR_SETUP")


@pytest.mark.usefixtures("young_gc")
@pytest.mark.parametrize("deliver", [True, False])
def test_ctrl_c_at_every_c_return_of_a_context_construction_leaks_nothing(
    backend: str, deliver: bool
) -> None:
    """Ctrl-C while an AioContext was being made left what was made so far
    open for good: the eventfd (no finalizer yet), the ring's fd, and in
    reaper mode the reaper thread.  Now whatever was made is released --
    but for the one instant a descriptor is made and not yet stored."""
    AioContext(backend=backend, deliver=deliver).close()  # (imports, probes)
    n = 0
    while True:
        n += 1
        gc.collect()
        before = _fds()
        threads = threading.active_count()
        seen = interrupt_at_c_return(n)
        where = ""
        try:
            AioContext(backend=backend, deliver=deliver).close()
        except KeyboardInterrupt as e:
            tb = e.__traceback__
            while (
                tb is not None
                and tb.tb_next is not None
                and "conftest" not in str(tb.tb_next.tb_frame.f_code.co_filename)
            ):
                tb = tb.tb_next
            if tb is not None:
                import linecache

                where = linecache.getline(tb.tb_frame.f_code.co_filename, tb.tb_lineno)
            tb = None  # (the frames hold what was made half-way)
        finally:
            sys.setprofile(None)
            gc.enable()
        if not any(m in where for m in _MAKING_AN_FD):

            def released(before: dict[str, str] = before, threads: int = threads) -> bool:
                gc.collect()
                now = _fds()
                return threading.active_count() <= threads and all(
                    before.get(f) == what for f, what in now.items()
                )

            try:
                wait_until(released, timeout=5)
            except AssertionError:
                left = {f: w for f, w in _fds().items() if before.get(f) != w}
                raise AssertionError((n, where, left, threading.active_count() - threads)) from None
        if seen[0] < n:
            break
