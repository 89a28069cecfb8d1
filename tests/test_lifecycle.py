"""The core's promises under interrupts, races, closes, forks and odd files,
on both backends: the lifecycle x backend matrix of issue 11.

Each test here failed on the engine before the redesign (checked against
the old code); races are widened with a tiny switch interval and made
deterministic with events and pipes, never with sleeps.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import mmap
import os
import pty
import signal
import socket
import subprocess
import sys
import threading
import traceback
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from threadlets import AioContext, AioRequest, ThreadletQueue, ThreadletState
from threadlets.uring import OP_READ, Ring

from .conftest import (
    HAVE_RING,
    Gate,
    interrupt_at_c_return,
    renew_notifier,
    stray_write,
    wait_until,
)


def _need(backend: str) -> None:
    if backend == "io_uring" and not HAVE_RING:
        pytest.skip("no io_uring here")


@pytest.fixture
def queue() -> Iterator[ThreadletQueue]:
    q = ThreadletQueue(max_threads=16)
    yield q
    assert q.close(timeout=10)


def _pipes(n: int) -> list[tuple[int, int]]:
    return [os.pipe() for _ in range(n)]


def _close_all(pipes: list[tuple[int, int]]) -> None:
    for r, w in pipes:
        os.close(r)
        os.close(w)


def _read_all_pending(
    ctx: AioContext, pipes: list[tuple[int, int]], calls: list[int]
) -> list[AioRequest]:
    """One 2-byte read per pipe, each blocked (no data yet), each callback
    recording its index in ``calls``."""
    reqs = []
    for i, (r, _) in enumerate(pipes):

        def cb(req: AioRequest, i: int = i) -> None:
            calls.append(i)

        reqs.append(ctx.read(r, 0, bytearray(2), callback=cb))
    return reqs


def _finish_all(ctx: AioContext, pipes: list[tuple[int, int]], reqs: list[AioRequest]) -> None:
    """Let every read finish, without delivering their callbacks."""
    for _, w in pipes:
        os.write(w, b"ok")
    for req in reqs:
        assert req.wait(timeout=10)


# -- 1, 2: interrupts lose nothing ---------------------------------------------------------


@pytest.mark.parametrize(
    "exc_type", [KeyboardInterrupt, SystemExit, asyncio.CancelledError, GeneratorExit]
)
def test_a_callback_raising_base_exception_leaves_the_rest_deliverable(
    backend: str, queue: ThreadletQueue, exc_type: type[BaseException]
) -> None:
    pipes = _pipes(6)
    calls: list[int] = []
    raised = []
    try:
        with AioContext(queue, backend=backend, inline=False) as ctx:
            reqs = _read_all_pending(ctx, pipes, calls)

            def boom(req: AioRequest) -> None:
                calls.append(-1)
                if not raised:
                    raised.append(1)
                    raise exc_type()

            reqs[2].callback = boom
            _finish_all(ctx, pipes, reqs)
            with pytest.raises(exc_type):
                ctx.drain(timeout=10)
            # The rest is still there: delivered by the next call, once each.
            assert ctx.drain(timeout=10)
            assert sorted(calls) == [-1, 0, 1, 3, 4, 5]
            assert all(ctx.wait(r, timeout=0) for r in reqs)
            s = ctx.stats()
            assert s.processed == s.submitted == 6
            assert s.outstanding == 0
    finally:
        _close_all(pipes)


def test_ctrl_c_in_a_callback_then_wait_returns(backend: str, queue: ThreadletQueue) -> None:
    """A real SIGINT (Python's own handler raises KeyboardInterrupt at the
    next check) while a batch is being delivered."""
    pipes = _pipes(5)
    calls: list[int] = []
    try:
        with AioContext(queue, backend=backend, inline=False) as ctx:
            reqs = _read_all_pending(ctx, pipes, calls)
            fired = []

            def ctrl_c(req: AioRequest) -> None:
                calls.append(-1)
                if not fired:
                    fired.append(1)
                    signal.raise_signal(signal.SIGINT)

            reqs[0].callback = ctrl_c
            _finish_all(ctx, pipes, reqs)
            with pytest.raises(KeyboardInterrupt):
                ctx.wait(reqs[4], timeout=10)
            assert ctx.wait(reqs[4], timeout=10)
            assert ctx.drain(timeout=10)
            assert sorted(calls) == [-1, 1, 2, 3, 4]
            assert ctx.stats().outstanding == 0
    finally:
        _close_all(pipes)


def test_ctrl_c_while_asleep_in_drain(backend: str, queue: ThreadletQueue) -> None:
    """SIGINT from another thread while the owner sleeps in drain(): the
    wait is interrupted, and everything is delivered later."""
    pipes = _pipes(3)
    calls: list[int] = []
    try:
        with AioContext(queue, backend=backend, inline=False) as ctx:
            reqs = _read_all_pending(ctx, pipes, calls)
            main = threading.main_thread().ident
            assert main == threading.get_ident()

            caught = threading.Event()
            seen: list[str] = []  # where the main thread was, if never in poll

            def interrupt() -> None:
                # Until the main thread says it caught one: a signal is sent
                # only while it sleeps in drain's poll (or is in drain's
                # wait: see _POLL_SLEEPS for why /proc may not say poll).
                while not caught.is_set():
                    try:
                        wait_until(
                            lambda: (
                                _in_poll_or_wait(main) or _in_drains_wait(main) or caught.is_set()
                            ),
                            timeout=30,
                        )
                    except AssertionError:
                        # (Once seen in the soak under load: say where it was.)
                        frame = sys._current_frames().get(main or 0)
                        seen.append("".join(traceback.format_stack(frame)) if frame else "?")
                        return
                    if not caught.is_set():
                        signal.pthread_kill(main, signal.SIGINT)
                    caught.wait(0.5)

            t = threading.Thread(target=interrupt)
            t.start()
            try:
                with pytest.raises(KeyboardInterrupt):
                    ctx.drain(timeout=30)
                _finish_all(ctx, pipes, reqs)
                assert ctx.drain(timeout=10)
                assert sorted(calls) == [0, 1, 2]
            except BaseException:
                for _, w in pipes:  # (a failure must not hang close(): the reads end)
                    os.write(w, b"ok")
                raise
            finally:
                caught.set()
                t.join()
                assert not seen, "the main thread never slept in poll; it was at:\n" + seen[0]
    finally:
        _close_all(pipes)


def _count_waits(ctx: AioContext) -> list[int]:
    """Count the context's waits on its eventfd (from now on)."""
    notifier = ctx._cq.notifier
    plain = notifier.wait
    waits = [0]

    def counted(timeout: float | None) -> bool:
        waits[0] += 1
        return plain(timeout)

    notifier.wait = counted  # type: ignore[method-assign]
    return waits


def _asleep_again_after(waits: list[int], poke: Callable[[], None]) -> bool:
    """From a helper thread: wait until the main thread sleeps in poll, run
    ``poke`` (something that wakes it), then tell whether it goes back to
    sleep in poll after one more wait (not: it spins, poll returning at
    once, for ever)."""
    main_tid = threading.main_thread().ident
    wait_until(lambda: waits[0] > 0 and _in_poll_or_wait(main_tid), timeout=30)
    before = waits[0]
    poke()
    try:
        wait_until(lambda: waits[0] > before and _in_poll_or_wait(main_tid), timeout=10)
    except AssertionError:
        return False
    return waits[0] <= before + 2  # (one wake, one more wait: no loop)


def test_a_submission_refused_during_closes_drain_does_not_make_it_spin(
    backend: str, queue: ThreadletQueue
) -> None:
    """close() sleeps in drain with a read outstanding; another thread's
    submission is refused (the context is closing) and wakes it: the drain
    goes back to sleep.  (The refusal once wrote the eventfd without
    marking it signalled, so nothing ever cleared it: close() spun at full
    CPU until the outstanding read ended.)"""
    pipes = _pipes(1)
    calls: list[int] = []
    try:
        ctx = AioContext(queue, backend=backend, inline=False)
        reqs = _read_all_pending(ctx, pipes, calls)
        waits = _count_waits(ctx)
        outcome: list[object] = []

        def refused() -> None:
            try:
                ctx.read(pipes[0][0], 0, bytearray(1))
            except RuntimeError as e:
                outcome.append(e)

        def helper() -> None:
            try:
                outcome.append(_asleep_again_after(waits, refused))
            finally:
                os.write(pipes[0][1], b"ok")  # the outstanding read ends

        t = threading.Thread(target=helper)
        t.start()
        try:
            assert ctx.close(timeout=60)
        finally:
            t.join()
        assert isinstance(outcome[0], RuntimeError)
        assert outcome[1] is True, "close()'s drain never went back to sleep: it spun"
        assert reqs[0].result() == 2
        assert calls == [0]
    finally:
        _close_all(pipes)


def test_a_stray_write_into_the_eventfd_does_not_make_drain_spin(
    backend: str, queue: ThreadletQueue
) -> None:
    """Code that writes to a file it closed can hit the eventfd's number:
    drain wakes, finds nothing, clears it and sleeps again."""
    pipes = _pipes(1)
    calls: list[int] = []
    try:
        with AioContext(queue, backend=backend, inline=False) as ctx:
            _read_all_pending(ctx, pipes, calls)
            waits = _count_waits(ctx)
            outcome: list[bool] = []

            def helper() -> None:
                try:
                    outcome.append(_asleep_again_after(waits, lambda: stray_write(ctx)))
                finally:
                    os.write(pipes[0][1], b"ok")

            t = threading.Thread(target=helper)
            t.start()
            try:
                assert ctx.drain(timeout=60)
            finally:
                t.join()
            assert outcome == [True], "drain never went back to sleep: it spun"
            assert calls == [0]
    finally:
        _close_all(pipes)


def test_a_stray_write_into_the_eventfd_does_not_make_asyncio_spin(backend: str) -> None:
    """The same on an event loop: its reader clears what nobody signalled,
    so the eventfd does not stay readable (a level-triggered loop would
    call the reader for ever)."""
    import select

    from threadlets import awaitable

    async def main() -> bool:
        io = awaitable._asyncio_current(asyncio.get_running_loop())
        assert io.ctx.backend == backend
        stray_write(io.ctx)
        for _ in range(5):  # a few loop iterations: the reader runs
            await asyncio.sleep(0)
        return not select.select([io.ctx.fileno()], [], [], 0)[0]

    awaitable.configure(backend=backend)
    try:
        assert asyncio.run(main()), "the eventfd stayed readable"
    finally:
        awaitable.configure()


def test_an_eventfd_closed_behind_the_contexts_back_is_an_error_not_a_spin(
    backend: str, queue: ThreadletQueue
) -> None:
    """A double close elsewhere closes the eventfd's number: drain raises
    EBADF instead of returning from poll at once until its timeout."""
    pipes = _pipes(1)
    calls: list[int] = []
    try:
        ctx = AioContext(queue, backend=backend, inline=False)
        _read_all_pending(ctx, pipes, calls)
        fd = ctx.fileno()
        try:
            os.close(fd)  # the "double close" of someone else
            with pytest.raises(OSError) as err:
                ctx.drain(timeout=30)
            assert err.value.errno == errno.EBADF
        finally:
            renew_notifier(ctx)  # the number back, for the context to close
            os.write(pipes[0][1], b"ok")
        assert ctx.close(timeout=10)
        assert calls == [0]
    finally:
        _close_all(pipes)


def _in_drains_wait(tid: int | None) -> bool:
    """Whether the main thread's Python frame is drain's wait on the
    notifier (asleep in poll, or just back from it)."""
    frame = sys._current_frames().get(tid or 0)
    return (
        frame is not None
        and frame.f_code.co_name == "wait"
        and "engine" in (frame.f_code.co_filename)
    )


#: poll, ppoll, and restart_syscall (x86-64).  A sleep in poll that a
#: signal or the kernel's task work interrupted goes on as restart_syscall:
#: io_uring sends its task work to the thread that submitted -- the main
#: thread here -- so a ring of this or of an earlier test, completing or
#: being torn down, leaves a drain() asleep in 219, never in 7 again.
#: (That, not a spin, is why the Ctrl-C-in-drain test once never saw the
#: main thread "in poll" for 30 s.)
_POLL_SLEEPS = {"7", "271", "219"}


def _in_poll_or_wait(tid: int | None) -> bool:
    """Whether the main thread sleeps in poll or ppoll (x86-64), or in the
    restart of one (see _POLL_SLEEPS): where drain() waits.  (A futex could
    be the GIL, before drain was even called; 219 alone could be a timed
    futex restarted, so the callers also know they are inside the wait.)"""
    if tid is None:
        return False
    native = threading.main_thread().native_id
    try:
        with open(f"/proc/self/task/{native}/syscall") as f:
            nr = f.read().split(" ", 1)[0]
    except OSError:
        return False
    if nr == "219":
        return _in_drains_wait(tid)
    return nr in _POLL_SLEEPS


def test_ring_reap_survives_a_raising_completion() -> None:
    """The ring hands completions out one at a time: a BaseException from
    one leaves the rest for the next reap (no KeyError, nothing lost)."""
    if not HAVE_RING:
        pytest.skip("no io_uring here")
    ring = Ring(8, eventfd=os.eventfd(0, os.EFD_CLOEXEC))
    r, w = os.pipe()
    bufs = [bytearray(1) for _ in range(4)]
    got: list[int] = []
    try:
        os.write(w, b"abcd")
        from threadlets.probe import pin_buffer

        pins = [pin_buffer(b) for b in bufs]

        def on_done(i: int) -> Callable[[int], None]:
            def done(res: int) -> None:
                got.append(i)
                if i == 0:
                    raise KeyboardInterrupt

            return done

        for i, p in enumerate(pins):
            assert p is not None
            assert ring.submit(OP_READ, r, 2**64 - 1, p[0], 1, 0, on_done(i))
        wait_until(lambda: ring._cq_tail.value - ring._cq_head.value == 4)
        with pytest.raises(KeyboardInterrupt):
            ring.reap()
        assert ring.reap() == 3
        assert sorted(got) == [0, 1, 2, 3]
        assert ring.reap() == 0
    finally:
        ring.close()
        os.close(r)
        os.close(w)


def test_ring_reap_interrupted_at_every_c_boundary_hands_each_out_once() -> None:
    """Ctrl-C at the n-th C-call return inside Ring.reap (its claim of the
    batch, a callback's return, the give-back): for every n, the next reaps
    hand each completion out exactly once, in order."""
    if not HAVE_RING:
        pytest.skip("no io_uring here")
    from threadlets.probe import pin_buffer

    n = 0
    while True:
        n += 1
        assert n < 300, "reap never ran to its end"
        ring = Ring(8, eventfd=os.eventfd(0, os.EFD_CLOEXEC))
        r, w = os.pipe()
        bufs = [bytearray(1) for _ in range(4)]
        got: list[int] = []
        try:
            os.write(w, b"abcd")
            pins = [pin_buffer(b) for b in bufs]
            for i, p in enumerate(pins):
                assert p is not None
                assert ring.submit(
                    OP_READ, r, 2**64 - 1, p[0], 1, 0, lambda res, i=i, got=got: got.append(i)
                )
            wait_until(lambda ring=ring: ring._cq_tail.value - ring._cq_head.value == 4)
            interrupted = False
            seen = interrupt_at_c_return(n)
            try:
                ring.reap()
            except KeyboardInterrupt:
                interrupted = True
            finally:
                sys.setprofile(None)
            while ring.reap():
                pass
            assert got == [0, 1, 2, 3], f"interrupted at C return {n}: {got}"
        finally:
            ring.close()
            os.close(r)
            os.close(w)
        if not interrupted and seen[0] < n:
            break


def test_close_of_a_reaper_mode_context_has_released_the_ring(path: Path) -> None:
    """deliver=False (what threadlets.posix uses): the ring's reaper thread
    releases the ring's fd as it ends; close() returns after that, so the
    fd is gone when close() returns (it once went a moment later)."""
    _need("io_uring")
    fd = os.open(path, os.O_RDONLY)
    try:
        for _ in range(20):
            ctx = AioContext(backend="io_uring", deliver=False)
            ring = ctx._ring
            assert ring is not None
            assert ring._reaper is not None
            assert ctx.read(fd, 0, bytearray(64)).wait(10)
            assert ctx.close(timeout=10)
            assert not ring._reaper.is_alive()
            assert ring._released
    finally:
        os.close(fd)


# -- 5, 6: close excludes submit ------------------------------------------------------------


def test_close_racing_submissions_from_another_thread(
    backend: str, queue: ThreadletQueue, tmp_path: Path, switchy: None
) -> None:
    """Whatever a racing thread submits is either refused or finished and
    delivered before close() returns; nothing signals the eventfd after it
    closed (its number, reused by the next open, stays untouched)."""
    data = tmp_path / "data"
    data.write_bytes(b"x" * 4096)
    fd = os.open(data, os.O_RDONLY)
    try:
        for round_ in range(20):
            ctx = AioContext(queue, backend=backend, inline=False)
            accepted: list[AioRequest] = []
            refused = threading.Event()
            go = threading.Barrier(2)

            def submitter(
                ctx: AioContext = ctx,
                go: threading.Barrier = go,
                accepted: list[AioRequest] = accepted,
                refused: threading.Event = refused,
            ) -> None:
                go.wait()
                while True:
                    try:
                        accepted.append(ctx.read(fd, 0, bytearray(64)))
                    except RuntimeError:
                        refused.set()
                        return

            t = threading.Thread(target=submitter)
            t.start()
            go.wait()
            assert ctx.close(timeout=10)
            # The eventfd's number goes to the next file opened.
            victim = tmp_path / f"victim{round_}"
            vfd = os.open(victim, os.O_RDWR | os.O_CREAT)
            try:
                t.join(10)
                assert refused.is_set()
                for req in accepted:
                    assert req.state is ThreadletState.DONE
                    assert req._processed
                assert os.fstat(vfd).st_size == 0, "a completion wrote into another file"
                assert ctx.stats().outstanding == 0
            finally:
                os.close(vfd)
    finally:
        os.close(fd)


def test_a_submission_right_after_close_drained_is_refused(
    backend: str, queue: ThreadletQueue, tmp_path: Path
) -> None:
    """The deterministic form of the race above: another thread submits at
    the worst moment, just after close()'s drain finished."""
    data = tmp_path / "data"
    data.write_bytes(b"x" * 4096)
    fd = os.open(data, os.O_RDONLY)
    outcome: list[object] = []

    class Racy(AioContext):
        def drain(self, timeout: float | None = None) -> bool:
            ok = super().drain(timeout)
            if not outcome:

                def submit() -> None:
                    try:
                        outcome.append(self.read(fd, 0, bytearray(64)))
                    except RuntimeError as e:
                        outcome.append(e)

                t = threading.Thread(target=submit)
                t.start()
                t.join()
            return ok

    try:
        ctx = Racy(queue, backend=backend, inline=False)
        assert ctx.wait(ctx.read(fd, 0, bytearray(8)), timeout=10)
        assert ctx.close(timeout=10)
        vfd = os.open(tmp_path / "victim", os.O_RDWR | os.O_CREAT)  # the eventfd's number
        try:
            late = outcome[0]
            if isinstance(late, AioRequest):
                late.wait(timeout=10)
                queue.drain(timeout=10)
            assert isinstance(late, RuntimeError), "accepted after close() drained"
            assert os.fstat(vfd).st_size == 0
        finally:
            os.close(vfd)
    finally:
        os.close(fd)


def test_a_closed_context_refuses_everything(backend: str, fd: int) -> None:
    ctx = AioContext(backend=backend)
    reader = ctx.inline_reader(fd)
    assert ctx.close(timeout=10)
    for call in (
        lambda: ctx.flush(fd),
        lambda: ctx.read(fd, 0, bytearray(8)),
        lambda: ctx.read(fd, 0, bytearray(8)),  # again, after another call for the fd
        lambda: ctx.write(fd, 0, b"x"),
        lambda: ctx.inline_reader(fd),
        lambda: ctx.call(os.getpid),
    ):
        with pytest.raises(RuntimeError, match="closed"):
            call()
    if reader is not None:
        assert reader(bytearray(8), 0) == -1  # handed out before: answers "submit it"
    with pytest.raises(ValueError, match="closed"):
        ctx.fileno()
    assert ctx.closed
    assert ctx.close()  # twice is harmless


def test_close_timeout_leaves_it_open_and_usable(backend: str, queue: ThreadletQueue) -> None:
    r, w = os.pipe()
    try:
        ctx = AioContext(queue, backend=backend, inline=False)
        req = ctx.read(r, 0, bytearray(2))
        assert not ctx.close(timeout=0.05)
        assert not ctx.closed
        os.write(w, b"hi")
        assert ctx.wait(req, timeout=10)
        assert req.result() == 2
        assert ctx.close(timeout=10)
    finally:
        os.close(r)
        os.close(w)


def test_ctrl_c_in_close_leaves_it_open(backend: str, queue: ThreadletQueue) -> None:
    r, w = os.pipe()
    try:
        ctx = AioContext(queue, backend=backend, inline=False)
        req = ctx.read(r, 0, bytearray(2))

        def cb(req: AioRequest) -> None:
            raise KeyboardInterrupt

        req.callback = cb
        os.write(w, b"hi")
        with pytest.raises(KeyboardInterrupt):
            ctx.close(timeout=10)
        assert not ctx.closed
        assert ctx.close(timeout=10)
    finally:
        os.close(r)
        os.close(w)


# -- 7: a short ring request whose queue closes ----------------------------------------


def test_closing_the_queue_under_a_ring_continuation_still_finishes_it(tmp_path: Path) -> None:
    _need("io_uring")
    p = tmp_path / "short"
    p.write_bytes(b"s" * 100)  # a 4 KiB read comes back short: a worker finishes it
    fd = os.open(p, os.O_RDONLY)
    q = ThreadletQueue(max_threads=1)
    gate = Gate()
    try:
        ctx = AioContext(q, backend="io_uring", inline=False)
        blocker = q.submit(gate)
        assert gate.started.wait(10)
        buf = bytearray(4096)
        req = ctx.read(fd, 0, buf)
        assert ctx.stats().ring == 1
        wait_until(lambda: (ctx.process_completions(), not req._on_ring)[1])
        assert req.state is ThreadletState.RUNNING  # its rest waits for the worker
        assert not q.close(timeout=0)  # cancels what is queued: the continuation
        assert req.state is ThreadletState.DONE
        assert req.result() == 100
        assert buf[:100] == b"s" * 100
        gate.release.set()
        assert blocker.wait(10)
        assert ctx.drain(timeout=10)
        assert ctx.close(timeout=10)
    finally:
        gate.release.set()
        q.close(timeout=10)
        os.close(fd)


# -- 8: fork ------------------------------------------------------------------------------


def test_fork_with_requests_in_flight(backend: str) -> None:
    """In the child every request the parent had in flight reads CANCELLED
    and counts as finished: drain, wait and close return at once."""
    code = f"""
import os, sys, threadlets
ctx = threadlets.AioContext(backend={backend!r}, inline=False)
r, w = os.pipe()
buf = bytearray(2)
req = ctx.read(r, 0, buf)            # on a worker, or in the kernel
done_req = ctx.call(os.getpid)       # finished, not yet delivered
assert done_req.wait(10)
pid = os.fork()
if pid == 0:
    ok = ctx.drain(timeout=5)
    ok = ok and req.state is threadlets.ThreadletState.CANCELLED
    ok = ok and req.wait(timeout=5) and ctx.wait(req, timeout=5)
    ok = ok and ctx.stats().outstanding == 0
    # The child's context still works (on threads).
    f = os.open({sys.executable!r}, os.O_RDONLY)
    b = bytearray(4)
    r2 = ctx.read(f, 0, b)
    ok = ok and ctx.wait(r2, timeout=5) and r2.result() == 4
    ok = ok and ctx.close(timeout=5)
    os._exit(0 if ok else 1)
_, status = os.waitpid(pid, 0)
os.write(w, b"ok")
assert ctx.wait(req, timeout=10) and req.result() == 2 and buf == b"ok"
assert ctx.close(timeout=10)
sys.exit(os.waitstatus_to_exitcode(status))
"""
    proc = subprocess.run(
        [sys.executable, "-c", code], check=False, timeout=60, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr


# -- 9, 10: waits from other threads and from callbacks -------------------------------------


def test_foreign_thread_waits_race_the_owners_reaps(queue: ThreadletQueue, switchy: None) -> None:
    """Owner mode: a thread waiting on a ring request while the owner reaps
    it is woken, every time (no lost wakeup between its check and sleep)."""
    _need("io_uring")
    with AioContext(queue, backend="io_uring", inline=False) as ctx:
        for _ in range(150):
            r, w = os.pipe()
            try:
                req = ctx.read(r, 0, bytearray(1))
                result: list[bool] = []
                t = threading.Thread(
                    target=lambda req=req, result=result: result.append(req.wait(timeout=20))
                )
                t.start()
                os.write(w, b"x")
                assert ctx.wait(req, timeout=10)
                t.join(30)
                assert result == [True]
            finally:
                os.close(r)
                os.close(w)


def test_done_callback_waiting_for_another_ring_request_in_reaper_mode() -> None:
    """deliver=False (what threadlets.posix uses): a done-callback runs in
    the reaper thread; waiting there for another ring request must reap."""
    _need("io_uring")
    (r1, w1), (r2, w2) = _pipes(2)
    try:
        with AioContext(backend="io_uring", deliver=False, inline=False) as ctx:
            a = ctx.read(r1, 0, bytearray(1))
            b = ctx.read(r2, 0, bytearray(1))
            inside = threading.Event()
            out: list[bool] = []

            def cb(_: object) -> None:
                inside.set()
                out.append(b.wait(timeout=20))

            a.add_done_callback(cb)
            os.write(w1, b"a")
            assert inside.wait(10)
            os.write(w2, b"b")
            assert b.wait(timeout=20)
            assert a.wait(timeout=20)
            wait_until(lambda: bool(out), timeout=30)
            assert out == [True]
    finally:
        _close_all([(r1, w1), (r2, w2)])


def test_callback_waiting_for_another_request_in_owner_mode(
    backend: str, queue: ThreadletQueue
) -> None:
    (r1, w1), (r2, w2) = _pipes(2)
    try:
        with AioContext(queue, backend=backend, inline=False) as ctx:
            b = ctx.read(r2, 0, bytearray(1))
            out: list[bool] = []

            def cb(_: AioRequest) -> None:
                os.write(w2, b"b")
                out.append(ctx.wait(b, timeout=20))

            ctx.read(r1, 0, bytearray(1), callback=cb)
            os.write(w1, b"a")
            assert ctx.drain(timeout=20)
            assert out == [True]
    finally:
        _close_all([(r1, w1), (r2, w2)])


# -- 11: streams: one transfer is the answer ----------------------------------------------


def _stream_pairs() -> dict[str, Callable[[], tuple[int, int]]]:
    def sockets() -> tuple[int, int]:
        a, b = socket.socketpair()
        return a.detach(), b.detach()

    def ptys() -> tuple[int, int]:
        master, slave = pty.openpty()
        import tty

        tty.setraw(slave)
        return slave, master  # read the slave, write the master

    return {"pipe": os.pipe, "socketpair": sockets, "pty": ptys}


@pytest.mark.parametrize("kind", ["pipe", "socketpair", "pty"])
@pytest.mark.parametrize("nonblocking", [False, True])
def test_stream_read_returns_what_one_readv_would(
    backend: str, queue: ThreadletQueue, kind: str, nonblocking: bool
) -> None:
    rfd, wfd = _stream_pairs()[kind]()
    try:
        if nonblocking:
            os.set_blocking(rfd, False)
        with AioContext(queue, backend=backend) as ctx:
            os.write(wfd, b"0123456789abcdef")
            if kind == "pty":
                wait_until(lambda: _readable(rfd))
            buf = bytearray(65536)
            req = ctx.read(rfd, 0, buf)
            assert ctx.wait(req, timeout=10), "a short stream read waited for more"
            assert req.result() == 16
            assert buf[:16] == b"0123456789abcdef"
            if nonblocking:
                # Nothing there: EAGAIN, as os.readv says, and nothing lost.
                req = ctx.read(rfd, 0, bytearray(8))
                assert ctx.wait(req, timeout=10)
                with pytest.raises(BlockingIOError):
                    req.result()
                with pytest.raises(BlockingIOError):
                    os.readv(rfd, [bytearray(8)])
                os.write(wfd, b"more")
                if kind == "pty":
                    wait_until(lambda: _readable(rfd))
                assert os.read(rfd, 8) == b"more"
    finally:
        os.close(rfd)
        os.close(wfd)


def _readable(fd: int) -> bool:
    import select

    return bool(select.select([fd], [], [], 0)[0])


@pytest.mark.parametrize("kind", ["pipe", "socketpair"])
def test_nonblocking_stream_write_reports_what_moved(
    backend: str, queue: ThreadletQueue, kind: str
) -> None:
    """A write to an O_NONBLOCK stream that fills it reports the count that
    moved (as os.writev does), never EAGAIN after moving data."""
    rfd, wfd = _stream_pairs()[kind]()
    twin_r, twin_w = _stream_pairs()[kind]()
    try:
        os.set_blocking(wfd, False)
        os.set_blocking(twin_w, False)
        payload = bytes(range(256)) * 1024  # 256 KiB: more than the buffer holds
        expected = os.writev(twin_w, [payload])
        with AioContext(queue, backend=backend) as ctx:
            req = ctx.write(wfd, 0, payload)
            assert ctx.wait(req, timeout=10)
            moved = req.result()
            assert 0 < moved < len(payload)
            if kind == "pipe":
                assert moved == expected
            got = bytearray()
            os.set_blocking(rfd, False)
            while True:
                try:
                    chunk = os.read(rfd, 1 << 16)
                except BlockingIOError:
                    break
                got += chunk
            assert bytes(got) == payload[:moved]
    finally:
        for x in (rfd, wfd, twin_r, twin_w):
            os.close(x)


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/null"])
def test_character_devices(backend: str, queue: ThreadletQueue, device: str) -> None:
    fd = os.open(device, os.O_RDWR)
    try:
        with AioContext(queue, backend=backend) as ctx:
            buf = bytearray(b"x" * 8192)
            req = ctx.read(fd, 0, buf)
            assert ctx.wait(req, timeout=10)
            assert req.result() == os.readv(fd, [bytearray(8192)])
            # Never on the ring: its non-blocking first try cut /dev/zero's
            # 8192 to 4096 beside two CPU hogs, where readv gives 8192.
            assert ctx.stats().ring == 0
            if device == "/dev/zero":
                assert buf == bytes(8192)
            req = ctx.write(fd, 0, b"y" * 8192)
            assert ctx.wait(req, timeout=10)
            assert req.result() == 8192
    finally:
        os.close(fd)


# -- 15a, 15b: huge buffers and bad arguments ----------------------------------------------


def test_a_buffer_of_4_gib_or_more(backend: str, queue: ThreadletQueue, path: Path) -> None:
    size = os.path.getsize(path)
    fd = os.open(path, os.O_RDONLY)
    m = mmap.mmap(-1, 2**32 + 4096)  # lazily mapped: only touched pages cost memory
    try:
        with AioContext(queue, backend=backend, inline=False) as ctx:
            view = memoryview(m)
            req = ctx.read(fd, 0, view)
            assert ctx.wait(req, timeout=30)
            assert req.result() == size
            del req
            view.release()
        gc.collect()
        m.close()  # no export of it is left behind
    finally:
        os.close(fd)


@pytest.mark.parametrize("inline", [True, False])
def test_bad_arguments_fail_at_the_call(backend: str, fd: int, inline: bool) -> None:
    with AioContext(backend=backend, inline=inline) as ctx:
        strided = memoryview(bytearray(64))[::2]
        with pytest.raises(BufferError):
            ctx.read(fd, 0, strided)
        with pytest.raises(BufferError):
            ctx.write(fd, 0, strided)
        with pytest.raises(TypeError, match="callable"):
            ctx.read(fd, 0, bytearray(4), callback=5)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="callable"):
            ctx.flush(fd, callback="x")  # type: ignore[arg-type]
        for bad_fd in (2**31, 2**40, 2**70):
            req = ctx.read(bad_fd, 0, bytearray(4))
            assert ctx.wait(req, timeout=10)
            with pytest.raises(OSError) as e:
                req.result()
            assert e.value.errno == errno.EBADF
        assert ctx.stats().outstanding == 0


# -- leaks -----------------------------------------------------------------------------


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _until_fds_back_to(fds: int) -> None:
    """Until no more fds are open than ``fds``, collecting garbage: a worker
    that just handed a dropped context's last request over may hold it for
    a moment on its way out."""

    def back() -> bool:
        gc.collect()
        return _fds() <= fds

    wait_until(back)


def test_a_thousand_context_cycles_leak_nothing(backend: str, path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        with AioContext(backend=backend, inline=False) as warm:
            assert warm.wait(warm.read(fd, 0, bytearray(16)), timeout=10)
        gc.collect()
        fds, threads = _fds(), threading.active_count()
        for i in range(1000):
            ctx = AioContext(backend=backend, inline=False, deliver=i % 2 == 0)
            req = ctx.read(fd, 0, bytearray(16))
            assert req.wait(timeout=10)
            assert ctx.close(timeout=10)
        del ctx, req
        # (A reaper-mode ring's fd is closed by its reaper thread as it ends,
        # just after close() returned: wait for it, as for the threads.)
        _until_fds_back_to(fds)
        wait_until(lambda: threading.active_count() <= threads)
    finally:
        os.close(fd)


def test_contexts_dropped_without_close_leak_nothing(backend: str, path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        gc.collect()
        fds = _fds()
        for _ in range(200):
            ctx = AioContext(backend=backend, inline=False)
            assert ctx.wait(ctx.read(fd, 0, bytearray(16)), timeout=10)
        del ctx
        _until_fds_back_to(fds)
    finally:
        os.close(fd)


@pytest.mark.skipif(bool(os.environ.get("THREADLETS_DEV_MODE_RUN")), reason="already inside it")
def test_the_matrix_under_dev_mode() -> None:
    """This module again under ``python -X dev`` (asyncio debug, resource
    and deprecation warnings as errors), in a child process."""
    env = dict(os.environ, THREADLETS_DEV_MODE_RUN="1")
    proc = subprocess.run(
        [
            sys.executable,
            "-X",
            "dev",
            "-W",
            "error::ResourceWarning",
            "-m",
            "pytest",
            "-q",
            "-x",
            "-p",
            "no:cacheprovider",
            # A test of the child that hangs fails there, with every
            # thread's stack, well before this test's own timeout.
            "-o",
            "faulthandler_timeout=40",
            "-o",
            "timeout=60",
            __file__,
        ],
        check=False,
        timeout=110,
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-6000:]


# -- Ctrl-C at every point where CPython delivers it ---------------------------------------


@pytest.mark.parametrize("where", ["process", "submit"])
def test_ctrl_c_at_every_c_boundary_loses_nothing(backend: str, path: Path, where: str) -> None:
    """Systematically: for n = 1, 2, ..., interrupt at the n-th C-call return
    inside process_completions() (or a submission); every time, what was
    submitted is delivered exactly once afterwards and close() succeeds."""
    fd = os.open(path, os.O_RDONLY)
    try:
        n = 0
        while True:
            n += 1
            assert n < 500, "the operation never ran to its end"
            ran: list[AioRequest] = []
            ctx = AioContext(backend=backend, inline=False)
            reqs = []
            if where == "process":
                reqs = [ctx.read(fd, 0, bytearray(64), callback=ran.append) for _ in range(3)]
                for r in reqs:
                    assert r.wait(timeout=10)
            interrupted = False
            seen = interrupt_at_c_return(n)
            try:
                if where == "process":
                    ctx.process_completions()
                else:
                    reqs.append(ctx.read(fd, 0, bytearray(64), callback=ran.append))
            except KeyboardInterrupt:
                interrupted = True
            finally:
                sys.setprofile(None)
            assert ctx.drain(timeout=10), f"interrupted at C return {n}: {ctx.stats()}"
            if where == "submit" and interrupted:
                # Interrupted inside read(): it happened once or not at all.
                assert len(ran) <= 1
            else:
                assert len(ran) == len(reqs)
                assert all(ran.count(r) == 1 for r in reqs)
            s = ctx.stats()
            assert s.outstanding == 0
            assert s.processed == s.submitted
            assert ctx.close(timeout=10)
            if not interrupted and seen[0] < n:
                break  # it ran to its end before the n-th C return
    finally:
        os.close(fd)


def test_fork_while_another_thread_holds_the_rings_lock() -> None:
    """The child must not take a lock that a thread of the parent held at
    the fork (that thread does not exist there)."""
    _need("io_uring")
    code = """
import os, sys, threading, threadlets
for deliver in (True, False):
    ctx = threadlets.AioContext(backend="io_uring", deliver=deliver)
    ring = ctx._ring
    held, release = threading.Event(), threading.Event()
    def hold():
        with ring._lock:
            held.set()
            release.wait()
    t = threading.Thread(target=hold)
    t.start()
    held.wait()
    pid = os.fork()
    if pid == 0:
        ok = ctx.close(timeout=5) if deliver else True
        os._exit(0 if ok else 1)
    release.set()
    t.join()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    ctx.close()
"""
    proc = subprocess.run(
        [sys.executable, "-c", code], check=False, timeout=60, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr


def _until_handed_over(ctx: AioContext, req: AioRequest) -> None:
    """Until a finished request sits in its context's ready queue (a worker,
    or the ring's reap, hands it over just after it reads DONE)."""

    def there() -> bool:
        if ctx._ring is not None:
            ctx._ring.reap()
        return req in ctx._cq.ready

    wait_until(there)


def test_a_dropped_context_with_an_undelivered_completion_is_collected(
    backend: str, path: Path
) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        gc.collect()
        fds = _fds()
        refs = []
        for _ in range(50):
            ctx = AioContext(backend=backend, inline=False)
            req = ctx.read(fd, 0, bytearray(8), callback=lambda r: None)
            assert req.wait(timeout=10)  # finished, never delivered
            _until_handed_over(ctx, req)
            refs.append(weakref.ref(ctx))
        del ctx, req

        def all_collected() -> bool:
            # (The worker that handed the last one over may still be on its
            # way out of the hand-over, holding it for a moment.)
            gc.collect()
            return all(r() is None for r in refs)

        wait_until(all_collected)
        assert _fds() <= fds
    finally:
        os.close(fd)


def test_a_closed_context_never_touches_its_old_eventfd_number(
    backend: str, tmp_path: Path
) -> None:
    ctx = AioContext(backend=backend)
    old = ctx.fileno()
    with contextlib_suppress_keyboard_interrupt():
        ctx._cq.resignal()  # signalled, as an interrupted process leaves it
    assert ctx.close(timeout=10)
    victim = tmp_path / "victim"
    victim.write_bytes(b"0123456789abcdef")
    vfd = os.open(victim, os.O_RDWR)
    try:
        assert vfd == old  # the number was reused
        assert ctx.process_completions() == 0
        assert ctx.drain(timeout=1)
        with pytest.raises(RuntimeError):
            ctx.poll(0)
        assert os.lseek(vfd, 0, os.SEEK_CUR) == 0  # nothing read from it
        assert os.read(vfd, 16) == b"0123456789abcdef"
    finally:
        os.close(vfd)


def contextlib_suppress_keyboard_interrupt() -> object:
    import contextlib

    return contextlib.suppress(KeyboardInterrupt)


def test_a_failed_close_keeps_what_the_context_knows(backend: str, tmp_path: Path) -> None:
    """close(timeout) that times out changes nothing: the file memory (sticky
    flush errors, inline readers) stays."""
    r, w = os.pipe()
    p = tmp_path / "f"
    p.write_bytes(b"x" * 4096)
    fd = os.open(p, os.O_RDONLY)
    try:
        ctx = AioContext(backend=backend)
        reader = ctx.inline_reader(fd)
        assert reader is not None
        assert reader(bytearray(16), 0) == 16
        pending = ctx.read(r, 0, bytearray(1))
        assert not ctx.close(timeout=0.05)
        assert reader(bytearray(16), 0) == 16  # still working
        os.write(w, b"x")
        assert ctx.wait(pending, timeout=10)
        assert ctx.close(timeout=10)
        assert reader(bytearray(16), 0) == -1  # now closed
    finally:
        for x in (fd, r, w):
            os.close(x)
