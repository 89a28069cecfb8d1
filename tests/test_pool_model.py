"""Threadlet queues against a model: a hypothesis state machine over random
submit / release / cancel / wait / set_limits / close sequences, with
done-callbacks that raise an Exception or a BaseException or wait for other
work, and a race test of cancel against dequeue."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    precondition,
    rule,
)

from threadlets import CancelledError, CancelResult, QueueStats, ThreadletQueue, ThreadletState
from threadlets.pool import Threadlet

T = TypeVar("T")


class Interrupt(BaseException):
    """What a Ctrl-C looks like to the queue: a BaseException, not an Exception."""


#: What an added done-callback does besides counting its runs.
CALLBACK_KINDS = ("record", "raise_exception", "raise_base", "wait_other")


@dataclass
class Callback:
    kind: str
    runs: int = 0
    #: For "wait_other": what each wait returned (must be True).
    waits: list[bool] = field(default_factory=list)


@dataclass
class Job:
    """One submitted item and everything the model knows about it."""

    index: int
    gate: threading.Event = field(default_factory=threading.Event)
    started: threading.Event = field(default_factory=threading.Event)
    runs: int = 0
    #: The final state as the submit-time callback saw it (None: not watched).
    callbacks: list[ThreadletState] | None = None
    added: list[Callback] = field(default_factory=list)
    cancel_results: list[CancelResult] = field(default_factory=list)
    handle: Threadlet[int] | None = None

    def __call__(self) -> int:
        self.runs += 1
        self.started.set()
        assert self.gate.wait(30), "gate never released"
        return self.index


class QueueMachine(RuleBasedStateMachine):
    jobs = Bundle("jobs")

    def __init__(self) -> None:
        super().__init__()
        self.queue = ThreadletQueue(max_threads=3, idle_timeout=0.02)
        self.max_threads = 3
        self.all: list[Job] = []
        self.closed = False
        #: Interrupt callbacks that ran in this (the main) thread: there the
        #: call that ran them (cancel, close, add_done_callback) must raise.
        self.main_interrupts = 0

    def live_gated(self) -> int:
        """Jobs that may still occupy a worker forever."""
        return sum(
            1
            for j in self.all
            if not j.gate.is_set()
            and j.handle is not None
            and CancelResult.CANCELED not in j.cancel_results
            and not (self.closed and j.runs == 0)
        )

    def interrupts_here(self, call: Callable[[], T]) -> T | None:
        """Run ``call``; it raises Interrupt exactly when an Interrupt
        callback ran in this thread during it (after all the others ran)."""
        before = self.main_interrupts
        try:
            value = call()
        except Interrupt:
            assert self.main_interrupts > before, "an Interrupt raised in no callback here"
            return None
        assert self.main_interrupts == before, "an Interrupt from a callback here was lost"
        return value

    def make_callback(self, kind: str, other: Job) -> tuple[Callback, Callable[[object], None]]:
        record = Callback(kind)
        main = threading.main_thread()

        def cb(_: object) -> None:
            record.runs += 1
            if kind == "raise_exception":
                raise ValueError("callback failed")
            if kind == "raise_base":
                if threading.current_thread() is main:
                    self.main_interrupts += 1
                raise Interrupt
            if kind == "wait_other" and other.started.is_set() and other.gate.is_set():
                # It runs (or ran) and is released: it finishes without
                # needing a worker, whichever thread waits here.
                assert other.handle is not None
                record.waits.append(other.handle.wait(timeout=30))

        return record, cb

    @precondition(lambda self: not self.closed)
    @rule(target=jobs, release_now=st.booleans(), watch=st.booleans())
    def submit(self, release_now: bool, watch: bool) -> Job:
        job = Job(len(self.all))
        if release_now:
            job.gate.set()
        handle = self.queue.submit(job)
        job.handle = handle
        if watch:  # unwatched jobs take the worker's path without delivery
            seen: list[ThreadletState] = []
            job.callbacks = seen
            self.interrupts_here(lambda: handle.add_done_callback(lambda t: seen.append(t.state)))
        self.all.append(job)
        return job

    @rule(job=jobs, other=jobs, kind=st.sampled_from(CALLBACK_KINDS))
    def add_callback(self, job: Job, other: Job, kind: str) -> None:
        assert job.handle is not None
        record, cb = self.make_callback(kind, other)
        job.added.append(record)
        handle = job.handle
        self.interrupts_here(lambda: handle.add_done_callback(cb))

    @rule(job=jobs)
    def release(self, job: Job) -> None:
        job.gate.set()

    @rule(job=jobs)
    def cancel(self, job: Job) -> None:
        assert job.handle is not None
        handle = job.handle
        result = self.interrupts_here(handle.cancel)
        if result is None:  # an Interrupt callback ran: it was cancelled here
            result = CancelResult.CANCELED
        if result is CancelResult.CANCELED:
            assert job.runs == 0
            assert not job.started.is_set()
            assert CancelResult.CANCELED not in job.cancel_results
            assert handle.state is ThreadletState.CANCELLED
            # Delivered before cancel returned, in this thread.
            assert all(r.runs == 1 for r in job.added)
        elif result is CancelResult.NOTCANCELED:
            # Running: it was taken off the queue, so it will run to the end.
            # RUNNING means its function runs: it has started.
            assert job.started.is_set()
        else:
            assert handle.done()
        job.cancel_results.append(result)

    @rule(job=consumes(jobs))
    def wait(self, job: Job) -> None:
        # Only wait where the model says it must finish: the job is released
        # and fewer jobs than workers can block forever.
        assert job.handle is not None
        if not job.gate.is_set() and not job.handle.done():
            return
        if self.live_gated() >= self.max_threads:
            return
        assert job.handle.wait(timeout=30)
        if job.handle.cancelled():
            assert job.runs == 0
        else:
            assert job.handle.result() == job.index
            assert job.runs == 1

    @rule()
    def drain(self) -> None:
        # Drain must finish when nothing can block forever, and time out
        # (not hang) when something can.  After it, every finished job was
        # delivered: each of its callbacks ran once.
        if self.live_gated() == 0:
            assert self.queue.drain(timeout=30)
            s = self.queue.stats()
            assert (s.queued, s.running) == (0, 0)
            for job in self.all:
                assert job.handle is not None
                assert job.handle.done()
                assert all(r.runs == 1 for r in job.added)
                if job.callbacks is not None:
                    assert job.callbacks == [job.handle.state]
        else:
            assert not self.queue.drain(timeout=0.001)

    @precondition(lambda self: not self.closed)
    @rule(lo=st.integers(0, 3), hi=st.integers(1, 4))
    def set_limits(self, lo: int, hi: int) -> None:
        if lo > hi:
            lo, hi = hi, lo
        self.queue.set_limits(min_threads=lo, max_threads=hi)
        self.max_threads = hi

    @precondition(lambda self: not self.closed)
    @rule()
    def close_with_timeout(self) -> None:
        self.closed = True
        self.interrupts_here(lambda: self.queue.close(timeout=0))
        for job in self.all:
            assert job.handle is not None
            if job.runs == 0 and job.handle.state is ThreadletState.CANCELLED:
                assert job.callbacks in (None, [ThreadletState.CANCELLED])
                assert all(r.runs == 1 for r in job.added)
        try:
            self.queue.submit(lambda: None)
        except RuntimeError:
            pass
        else:
            raise AssertionError("submit after close was accepted")

    @invariant()
    def stats_add_up(self) -> None:
        s = self.queue.stats()
        assert s.submitted == s.completed + s.cancelled + s.queued + s.running
        assert s.submitted == len(self.all)
        assert s.idle <= s.threads
        assert s.spawned - s.retired == s.threads
        for job in self.all:
            assert job.runs <= 1
            assert all(r.runs <= 1 for r in job.added)
            if job.callbacks is not None:
                assert len(job.callbacks) <= 1

    def teardown(self) -> None:
        for job in self.all:
            job.gate.set()
        # Closing cancels what is queued, here: an Interrupt callback among
        # them is raised after all were delivered; close again to wait.
        self.interrupts_here(lambda: self.queue.close(timeout=30))
        assert self.queue.close(timeout=30)
        s = self.queue.stats()
        assert s.threads == 0
        assert s.submitted == s.completed + s.cancelled
        # close() joined them: no worker of this queue is alive.
        prefix = f"{self.queue.name}-worker-"
        assert not [t for t in threading.enumerate() if t.name.startswith(prefix)]
        for job in self.all:
            h = job.handle
            assert h is not None
            assert h.done()
            # Finished exactly once: every callback ran once, with the final state.
            if job.callbacks is not None:
                assert job.callbacks == [h.state]
            for r in job.added:
                assert r.runs == 1, f"a {r.kind} callback ran {r.runs} times"
                assert all(r.waits)
            if h.state is ThreadletState.CANCELLED:
                assert job.runs == 0
                assert CancelResult.NOTCANCELED not in job.cancel_results
                try:
                    h.result()
                except CancelledError:
                    pass
                else:
                    raise AssertionError("a cancelled job has a result")
            else:
                assert job.runs == 1
                assert CancelResult.CANCELED not in job.cancel_results
                assert h.result() == job.index
        assert s.completed == sum(1 for j in self.all if j.runs == 1)


QueueMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
TestQueueMachine = QueueMachine.TestCase


def test_cancel_races_dequeue() -> None:
    """Tens of thousands of cancel-versus-dequeue races: for every item
    exactly one of "it ran" and "cancel said CANCELED" holds."""
    total = 40_000
    ran = bytearray(total)
    # Switch threads as often as CPython allows, so the workers really run
    # while this thread cancels (the default 5 ms would let it win all).
    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        outcomes, s = _race(total, ran)
    finally:
        sys.setswitchinterval(old_interval)
    counts = {r: outcomes.count(r) for r in CancelResult}
    for i, outcome in enumerate(outcomes):
        if outcome is CancelResult.CANCELED:
            assert ran[i] == 0, f"item {i} was cancelled and ran"
        else:
            assert ran[i] == 1, f"item {i} ({outcome.name}) ran {ran[i]} times"
    assert s.cancelled == counts[CancelResult.CANCELED]
    holders = 2 * (total // 400)
    assert s.completed == total - counts[CancelResult.CANCELED] + holders
    # The race really happened: both outcomes occurred many times.
    assert counts[CancelResult.CANCELED] > 100
    assert counts[CancelResult.ALLDONE] + counts[CancelResult.NOTCANCELED] > 100


def _race(total: int, ran: bytearray) -> tuple[list[CancelResult], QueueStats]:
    with ThreadletQueue(max_threads=2) as q:

        def mark(i: int) -> None:
            ran[i] += 1

        outcomes: list[CancelResult] = []
        batch = 400
        for start in range(0, total, batch):
            # Hold both workers, queue a batch behind them, then let the
            # workers go and cancel from the far end at the same moment:
            # dequeue and cancel meet somewhere in the middle.
            gate = threading.Event()
            holders = [q.submit(gate.wait, 30) for _ in range(2)]
            items = [q.submit(mark, i) for i in range(start, start + batch)]
            gate.set()
            outcomes.extend(reversed([t.cancel() for t in reversed(items)]))
            for h in holders:
                assert h.result(30) is True
        assert q.drain(timeout=60)
        return outcomes, q.stats()
