"""Threadlet queues: elastic worker pools that run any callable.

This module owns :class:`ThreadletQueue`, the work item :class:`Threadlet`,
the global default queue, and what happens to all of them at ``fork()``.
Everything above it (the paio engine, the front ends, the tools) submits work
here and nowhere else.

The protocol
============

A threadlet has one explicit state::

    QUEUED --> RUNNING --> DONE
       \\
        +----> CANCELLED

* Leaving QUEUED happens only under the queue's lock, either in a worker
  (which takes it to RUNNING) or in :meth:`Threadlet.cancel` (CANCELLED).  So
  of "a worker took it" and "cancel took it" exactly one wins, and cancel
  knows which: the seed patch read a flag written outside the lock and was
  rejected for it.
* Once RUNNING, only the worker that runs it writes it.  It stores the result
  *before* it sets DONE, both under the lock; readers take the lock too, so
  nobody relies on the GIL making a store "atomic".
* After a threadlet reaches DONE or CANCELLED, and with the lock released,
  its waiters are woken and its done-callbacks run, exactly once, in the
  thread that finished it (the worker, or the thread that cancelled it).

Who touches what: every field of the queue and every ``_state``/``_result``
/``_exception``/``_waiters``/``_callbacks`` of a threadlet is protected by the
queue's ``_lock``.  ``_fn``/``_args``/``_kwargs`` are written once before
submission and read only by the worker that took the threadlet.

Workers
=======

A worker is spawned by :meth:`ThreadletQueue.submit` only when no worker is
idle and fewer than ``max_threads`` exist.  A worker counts as idle only while
it waits for work: it is on the ``_idle`` stack exactly from the moment it
finds the queue empty (under the lock) until a submitter pops it to hand it a
wakeup.  Idle workers are woken LIFO, so under light load the same few do the
work and the surplus reaches ``idle_timeout`` and retires (trio's thread cache
does the same, for the same reason).  Workers above ``min_threads`` retire
after ``idle_timeout`` seconds without work.

Each worker waits on its own ``threading.Lock`` used as a mailbox: held means
"no news"; a submitter releases it to wake exactly that worker.  A lock
acquire with a timeout is a single C call that blocks in the kernel, so no
wait anywhere in this module spins, and waits in the main thread stay
interruptible by Ctrl-C.

Workers are daemon threads: they never keep the interpreter alive, and a
worker blocked in a system call cannot hang the exit.  After ``fork()`` the
child's queues start empty with no workers (see :func:`_after_fork_in_child`).
"""

from __future__ import annotations

import enum
import itertools
import logging
import os
import threading
import weakref
from collections import deque
from collections.abc import Callable
from concurrent.futures import CancelledError
from dataclasses import dataclass
from typing import Any, Generic, ParamSpec, TypeVar

__all__ = [
    "CancelResult",
    "CancelledError",
    "QueueStats",
    "Threadlet",
    "ThreadletQueue",
    "ThreadletState",
    "default_queue",
    "submit",
]

log = logging.getLogger("threadlets")

T = TypeVar("T")
P = ParamSpec("P")

#: QEMU's thread pool uses the same ceiling; it is also the engine's default.
DEFAULT_MAX_THREADS = 64
#: Seconds an idle worker above ``min_threads`` waits before it retires
#: (QEMU and trio both use 10 s: long enough to ride out a burst's gaps).
DEFAULT_IDLE_TIMEOUT = 10.0


class ThreadletState(enum.Enum):
    """Where a threadlet is in its life."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    CANCELLED = "cancelled"


class CancelResult(enum.IntEnum):
    """The outcome of a cancel, with POSIX ``aio_cancel`` names and values."""

    #: It was still queued: it will never run, and completes as cancelled.
    CANCELED = 0
    #: It is running: it is not interrupted and completes with its result.
    NOTCANCELED = 1
    #: It had already finished (or been cancelled before).
    ALLDONE = 2


_QUEUED = ThreadletState.QUEUED
_RUNNING = ThreadletState.RUNNING
_DONE = ThreadletState.DONE
_CANCELLED = ThreadletState.CANCELLED


def _check_timeout(timeout: float | None) -> None:
    if timeout is not None and timeout < 0:
        raise ValueError(f"timeout must be None or >= 0, not {timeout!r}")


class Threadlet(Generic[T]):
    """A unit of work submitted to a :class:`ThreadletQueue`.

    The handle a caller keeps: it tells the state, cancels with a definite
    :class:`CancelResult`, waits, and hands out the result or exception.
    Subclasses (the engine's requests) override :meth:`_run` to do their work
    and :meth:`_finished` to deliver completion elsewhere.
    """

    __slots__ = (
        "__weakref__",
        "_args",
        "_callbacks",
        "_exception",
        "_fn",
        "_kwargs",
        "_queue",
        "_result",
        "_state",
        "_waiters",
    )

    def __init__(
        self,
        queue: ThreadletQueue,
        fn: Callable[..., T] | None,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> None:
        self._queue = queue
        self._fn = fn
        self._args = args
        self._kwargs = kwargs
        self._state = _QUEUED
        self._result: T | None = None
        self._exception: BaseException | None = None
        # Both lists are created on first use: most threadlets never get a
        # waiter or a callback, and the hot path should not pay for them.
        self._waiters: list[threading.Lock] | None = None
        self._callbacks: list[Callable[[Threadlet[T]], object]] | None = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._state.value} {self._fn!r}>"

    # -- what a worker calls (no lock held) -------------------------------

    def _run(self) -> T:
        """Do the work. Runs in a worker thread, without the lock."""
        fn = self._fn
        assert fn is not None
        if self._kwargs:
            return fn(*self._args, **self._kwargs)
        return fn(*self._args)

    def _finished(self) -> None:
        """Deliver completion. Called once, without the lock, after the
        state became DONE or CANCELLED."""
        waiters = self._waiters
        if waiters:
            for w in waiters:
                w.release()
        callbacks = self._callbacks
        if callbacks:
            for cb in callbacks:
                _invoke_callback(cb, self)

    # -- the life-cycle protocol ----------------------------------------------
    #
    # With the queue's worker loop and cancel(), these are the only code that
    # changes ``_state``, ``_result`` or ``_exception``.  The engine (inline
    # completions, the io_uring backend) and the front ends call them and
    # assign none of the three themselves.

    def _born_finished(self, result: T | None, exc: BaseException | None) -> None:
        """Make a threadlet DONE before anyone else has seen it (an I/O
        request that completed in the submitting thread).  No lock: it is
        not published yet."""
        self._result = result
        self._exception = exc
        self._state = _DONE

    def _claim(self) -> bool:
        """QUEUED -> RUNNING for work that runs outside the queue's workers
        (the kernel's ring).  False if it is not QUEUED.  A claimed
        threadlet is remembered by its queue until :meth:`_finish`, so that
        a forked child can cancel it (see ``_reset_after_fork``)."""
        queue = self._queue
        with queue._lock:
            if self._state is not _QUEUED:
                return False
            self._state = _RUNNING
            queue._claimed.add(self)
            return True

    def _unclaim(self) -> None:
        """RUNNING -> QUEUED: the claimant could not start it after all
        (it had not been handed to anyone)."""
        queue = self._queue
        with queue._lock:
            if self._state is _RUNNING:
                self._state = _QUEUED
                queue._claimed.discard(self)

    def _finish(self, result: T | None, exc: BaseException | None) -> bool:
        """RUNNING -> DONE for claimed work: the outcome before the state,
        under the lock; then waiters and callbacks, without it.  False, and
        nothing changes, if it is not RUNNING (cancelled in a forked child)."""
        queue = self._queue
        with queue._lock:
            if self._state is not _RUNNING:
                return False
            self._result = result  # the outcome before the state
            self._exception = exc
            self._state = _DONE
            queue._claimed.discard(self)
        self._finished()
        return True

    def _finish_cancelled(self) -> bool:
        """RUNNING -> CANCELLED for claimed work that its runner took back
        before it touched anything (the kernel's ring cancelled it): it
        completes as cancelled, waiters and callbacks as for any cancel.
        False, and nothing changes, if it is not RUNNING."""
        queue = self._queue
        with queue._lock:
            if self._state is not _RUNNING:
                return False
            self._state = _CANCELLED
            queue._claimed.discard(self)
        self._finished()
        return True

    def _forked(self) -> None:
        """Called in a forked child (no other thread runs there) for each of the
        parent's threadlets that just became CANCELLED there.  Subclasses
        mark their own bookkeeping finished (no callback runs)."""

    # -- public API ---------------------------------------------------------

    @property
    def state(self) -> ThreadletState:
        with self._queue._lock:
            return self._state

    def done(self) -> bool:
        """True once the threadlet finished or was cancelled."""
        with self._queue._lock:
            return self._state is _DONE or self._state is _CANCELLED

    def cancelled(self) -> bool:
        with self._queue._lock:
            return self._state is _CANCELLED

    def cancel(self) -> CancelResult:
        """Cancel the threadlet if it has not started.

        Returns CANCELED if it was still queued (it will never run; waiters
        wake and callbacks run in this thread before cancel returns),
        NOTCANCELED if it is running (it completes normally), ALLDONE if it
        had already finished.
        """
        queue = self._queue
        with queue._lock:
            state = self._state
            if state is _QUEUED:
                self._state = _CANCELLED
                # The item stays in the deque; workers skip cancelled items.
                queue._queued -= 1
                queue._cancelled += 1
                queue._notify_if_quiet()
            elif state is _RUNNING:
                return CancelResult.NOTCANCELED
            else:
                return CancelResult.ALLDONE
        self._finished()
        return CancelResult.CANCELED

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the threadlet finished or was cancelled.

        Returns True if it did, False if ``timeout`` seconds passed first.
        """
        _check_timeout(timeout)
        lock = self._queue._lock
        with lock:
            if self._state is _DONE or self._state is _CANCELLED:
                return True
            waiter = threading.Lock()
            waiter.acquire()
            if self._waiters is None:
                self._waiters = [waiter]
            else:
                self._waiters.append(waiter)
        try:
            woken = waiter.acquire() if timeout is None else waiter.acquire(timeout=timeout)
        finally:
            # Timed out or interrupted (Ctrl-C): withdraw the waiter, unless
            # the finisher already took the list to release it.
            with lock:
                if not (self._state is _DONE or self._state is _CANCELLED):
                    waiters = self._waiters
                    if waiters is not None and waiter in waiters:
                        waiters.remove(waiter)
                else:
                    woken = True
        return woken

    def result(self, timeout: float | None = None) -> T:
        """The return value of the work; re-raises what it raised.

        Raises ``CancelledError`` if it was cancelled and ``TimeoutError`` if
        it did not finish within ``timeout`` seconds.
        """
        if not self.wait(timeout):
            raise TimeoutError(f"{self!r} did not finish within {timeout} s")
        with self._queue._lock:
            if self._state is _CANCELLED:
                raise CancelledError()
            exc = self._exception
            result = self._result
        if exc is not None:
            raise exc
        return result  # type: ignore[return-value]

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """What the work raised, or None; ``CancelledError`` if cancelled."""
        if not self.wait(timeout):
            raise TimeoutError(f"{self!r} did not finish within {timeout} s")
        with self._queue._lock:
            if self._state is _CANCELLED:
                raise CancelledError()
            return self._exception

    def add_done_callback(self, fn: Callable[[Threadlet[T]], object]) -> None:
        """Call ``fn(threadlet)`` exactly once when it finishes or is
        cancelled; at once, in this thread, if that already happened.

        Otherwise it runs in the thread that finishes the threadlet (a
        worker, or the thread that cancels it).  An exception from ``fn`` is
        logged, never propagated.
        """
        if not callable(fn):
            raise TypeError(f"callback must be callable, not {type(fn).__name__}")
        with self._queue._lock:
            if not (self._state is _DONE or self._state is _CANCELLED):
                if self._callbacks is None:
                    self._callbacks = [fn]
                else:
                    self._callbacks.append(fn)
                return
        _invoke_callback(fn, self)


def _invoke_callback(cb: Callable[[Any], object], item: Any) -> None:
    try:
        cb(item)
    except Exception:
        log.exception("exception in done-callback %r of %r", cb, item)


@dataclass(frozen=True, slots=True)
class QueueStats:
    """A consistent snapshot of a queue, taken under its lock.

    ``submitted == completed + cancelled + queued + running`` always holds.
    """

    threads: int
    idle: int
    queued: int
    running: int
    submitted: int
    completed: int
    cancelled: int
    spawned: int
    retired: int
    peak_threads: int
    min_threads: int
    max_threads: int


class _Worker:
    """One worker thread's mailbox.

    ``mailbox`` is a lock used as a binary semaphore: the worker holds it
    while it has no news and blocks acquiring it again; whoever pops the
    worker off the idle stack releases it, which wakes exactly this worker.
    """

    __slots__ = ("current", "mailbox")

    def __init__(self) -> None:
        self.mailbox = threading.Lock()
        self.mailbox.acquire()
        #: The threadlet this worker runs (protected by the queue's lock).
        self.current: Threadlet[Any] | None = None


_queue_ids = itertools.count(1)
#: ``_current.queue`` is the queue whose worker this thread is, if any.
_current = threading.local()
_live_queues: weakref.WeakSet[ThreadletQueue] = weakref.WeakSet()


class ThreadletQueue:
    """An elastic pool of worker threads with a FIFO queue of work.

    ``max_threads`` bounds the workers; ``min_threads`` are spawned at once
    and kept warm; workers above that retire after ``idle_timeout`` seconds
    without work.  Use it as a context manager to close it on exit.
    """

    def __init__(
        self,
        max_threads: int = DEFAULT_MAX_THREADS,
        min_threads: int = 0,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        name: str | None = None,
    ) -> None:
        _check_limits(min_threads, max_threads)
        if isinstance(idle_timeout, bool) or not isinstance(idle_timeout, (int, float)):
            raise TypeError(f"idle_timeout must be a number, not {type(idle_timeout).__name__}")
        if not idle_timeout > 0:
            raise ValueError(f"idle_timeout must be > 0, not {idle_timeout!r}")
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a str or None, not {type(name).__name__}")
        self.name = name or f"threadlets-{next(_queue_ids)}"
        self._idle_timeout = float(idle_timeout)
        self._init_state(min_threads, max_threads)
        _live_queues.add(self)
        with self._lock:
            self._spawn_warm()

    def _init_state(self, min_threads: int, max_threads: int) -> None:
        # Everything below is protected by _lock.
        self._lock = threading.Lock()
        #: Waited on by drain() and close(); notified when nothing is queued
        #: or running, and when a worker exits.
        self._quiet = threading.Condition(self._lock)
        self._items: deque[Threadlet[Any]] = deque()  # may hold cancelled items
        self._idle: list[_Worker] = []  # LIFO: the most recently idle wakes first
        self._workers: set[_Worker] = set()
        #: Claimed threadlets (RUNNING outside the workers; see _claim).
        self._claimed: set[Threadlet[Any]] = set()
        self._min = min_threads
        self._max = max_threads
        self._closed = False
        self._threads = 0
        self._queued = 0
        self._running = 0
        self._submitted = 0
        self._completed = 0
        self._cancelled = 0
        self._spawned = 0
        self._retired = 0
        self._peak = 0
        self._thread_seq = 0

    def __repr__(self) -> str:
        return f"<ThreadletQueue {self.name!r} threads={self._threads} max={self._max}>"

    def __enter__(self) -> ThreadletQueue:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- submission (the hot path) -------------------------------------------

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Threadlet[T]:
        """Queue ``fn(*args, **kwargs)`` to run on a worker; FIFO."""
        if not callable(fn):
            raise TypeError(f"submit() needs a callable, not {type(fn).__name__}")
        item: Threadlet[T] = Threadlet(self, fn, args, kwargs)
        self._submit(item)
        return item

    def _submit(self, item: Threadlet[Any]) -> None:
        """Queue a prepared threadlet (the engine's requests come this way)."""
        with self._lock:
            if self._closed:
                raise RuntimeError(f"cannot submit to {self.name}: the queue is closed")
            self._items.append(item)
            self._queued += 1
            self._submitted += 1
            idle = self._idle.pop() if self._idle else None
            if idle is None and self._threads < self._max:
                self._spawn()
        if idle is not None:
            # Popped under the lock, so the wakeup is ours alone to send; a
            # release can enter the kernel, so it is sent outside the lock.
            idle.mailbox.release()

    # -- workers --------------------------------------------------------------

    def _spawn(self) -> None:
        # Called with the lock held.  The new worker is not idle: it goes
        # straight to the queue.
        self._threads += 1
        self._spawned += 1
        self._thread_seq += 1
        self._peak = max(self._peak, self._threads)
        worker = _Worker()
        self._workers.add(worker)
        t = threading.Thread(
            target=self._worker_main,
            args=(worker,),
            name=f"{self.name}-worker-{self._thread_seq}",
            daemon=True,
        )
        try:
            t.start()
        except BaseException:
            self._workers.discard(worker)
            self._threads -= 1
            self._spawned -= 1
            raise

    def _spawn_warm(self) -> None:
        # Called with the lock held: top up to min_threads, and start workers
        # for queued work nobody will wake (after max_threads was raised).
        want = max(self._min, min(self._max, self._threads + self._queued - len(self._idle)))
        while self._threads < want:
            self._spawn()

    def _worker_main(self, me: _Worker) -> None:
        _current.queue = self
        lock = self._lock
        items = self._items
        done: Threadlet[Any] | None = None  # ran; its outcome not yet published
        result: Any = None
        error: BaseException | None = None
        while True:
            item: Threadlet[Any] | None = None
            went_idle = False
            # One critical section publishes the last outcome and takes the
            # next threadlet: one lock round trip per threadlet.
            with lock:
                if done is not None:
                    done._result = result  # the outcome before the state
                    done._exception = error
                    done._state = _DONE
                    self._running -= 1
                    self._completed += 1
                while items:
                    candidate = items.popleft()
                    if candidate._state is _QUEUED:
                        candidate._state = _RUNNING
                        self._queued -= 1
                        self._running += 1
                        item = me.current = candidate
                        break
                else:
                    me.current = None
                    if not self._running and not self._queued:
                        self._quiet.notify_all()
                    if done is None:
                        # Nothing published and nothing to run: idle, or
                        # retire.  (With an outcome just published, loop
                        # once more first, so that its callbacks have run
                        # before this worker can count as gone.)
                        if self._closed or self._threads > self._max:
                            self._retire(me)
                            return
                        self._idle.append(me)
                        went_idle = True
            if done is not None:
                # Waiters and callbacks run without the lock.
                done._finished()
                done = result = error = None
            if item is not None:
                try:
                    result = item._run()
                except BaseException as exc:
                    error = exc
                done = item
                continue
            if not went_idle:
                continue
            # Idle: wait until a submitter pops us off the stack and wakes us.
            while not me.mailbox.acquire(timeout=self._idle_timeout):
                with lock:
                    if me not in self._idle:
                        # Popped just as we timed out: its wakeup is ours.
                        me.mailbox.acquire()
                        break
                    if self._threads > self._min or self._closed:
                        self._idle.remove(me)
                        self._retire(me)
                        return
                # A warm worker (at or below min_threads): keep waiting.

    def _notify_if_quiet(self) -> None:
        if self._running == 0 and self._queued == 0:
            self._quiet.notify_all()

    def _retire(self, me: _Worker) -> None:
        # Called with the lock held by a worker that is about to return.
        self._workers.discard(me)
        self._threads -= 1
        self._retired += 1
        self._quiet.notify_all()

    # -- control --------------------------------------------------------------

    def set_limits(self, min_threads: int | None = None, max_threads: int | None = None) -> None:
        """Change the thread limits while the queue runs.

        A lower ``max_threads`` retires the surplus as workers go idle (a
        running worker finishes its work first); a higher one spawns workers
        for work already queued; a higher ``min_threads`` spawns at once.
        """
        with self._lock:
            new_min = self._min if min_threads is None else min_threads
            new_max = self._max if max_threads is None else max_threads
            _check_limits(new_min, new_max)
            self._min, self._max = new_min, new_max
            # Wake as many idle workers as there are surplus threads: each
            # finds the queue empty and above max_threads, and retires.
            for _ in range(min(len(self._idle), self._threads - new_max)):
                self._idle.pop().mailbox.release()
            if not self._closed:
                self._spawn_warm()

    @property
    def max_threads(self) -> int:
        with self._lock:
            return self._max

    @property
    def min_threads(self) -> int:
        with self._lock:
            return self._min

    @property
    def closed(self) -> bool:
        with self._lock:
            return self._closed

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until nothing is queued or running.

        Returns False if ``timeout`` seconds passed first.  Work submitted
        while draining is waited for too.
        """
        _check_timeout(timeout)
        if getattr(_current, "queue", None) is self:
            raise RuntimeError(f"drain() called from a worker of {self.name} would wait for itself")
        with self._lock:
            return self._quiet.wait_for(lambda: self._queued == 0 and self._running == 0, timeout)

    def close(self, timeout: float | None = None) -> bool:
        """Refuse new work, cancel what is queued, and wait for what runs.

        Waits at most ``timeout`` seconds for running work and for the
        workers to exit; returns True if all did.  Cancelled threadlets get
        their callbacks in this thread.  Closing twice is harmless.
        """
        _check_timeout(timeout)
        cancelled: list[Threadlet[Any]] = []
        with self._lock:
            self._closed = True
            while self._items:
                item = self._items.popleft()
                if item._state is _QUEUED:
                    item._state = _CANCELLED
                    self._queued -= 1
                    self._cancelled += 1
                    cancelled.append(item)
            while self._idle:
                self._idle.pop().mailbox.release()
            self._notify_if_quiet()
        for item in cancelled:
            item._finished()
        # Called from one of our own workers (a callback), wait for the others.
        me = 1 if getattr(_current, "queue", None) is self else 0
        with self._lock:
            return self._quiet.wait_for(lambda: self._threads <= me, timeout)

    def stats(self) -> QueueStats:
        """A snapshot of the counters, consistent with each other."""
        with self._lock:
            return QueueStats(
                threads=self._threads,
                idle=len(self._idle),
                queued=self._queued,
                running=self._running,
                submitted=self._submitted,
                completed=self._completed,
                cancelled=self._cancelled,
                spawned=self._spawned,
                retired=self._retired,
                peak_threads=self._peak,
                min_threads=self._min,
                max_threads=self._max,
            )

    # -- fork -----------------------------------------------------------------

    def _reset_after_fork(self) -> None:
        """In the child: no worker survived the fork, so start afresh.

        Work that was queued or running belongs to the parent, which still
        runs it; the child's copies become CANCELLED so that nothing runs
        twice and nobody in the child waits forever.  Their callbacks do not
        run in the child.
        """
        old_items = (
            list(self._items)
            + [w.current for w in self._workers if w.current]
            + list(self._claimed)
        )
        min_threads, max_threads, closed = self._min, self._max, self._closed
        submitted, completed, cancelled = self._submitted, self._completed, self._cancelled
        self._init_state(min_threads, max_threads)
        self._closed = closed
        self._submitted, self._completed = submitted, completed
        self._cancelled = cancelled
        for item in old_items:
            if item._state is _QUEUED or item._state is _RUNNING:
                item._state = _CANCELLED
                item._waiters = None
                item._callbacks = None
                self._cancelled += 1
                item._forked()
        self._submitted = self._completed + self._cancelled
        if not closed:
            self._spawn_warm()


def _check_limits(min_threads: int, max_threads: int) -> None:
    for name, value in (("min_threads", min_threads), ("max_threads", max_threads)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if max_threads < 1:
        raise ValueError(f"max_threads must be >= 1, not {max_threads}")
    if min_threads < 0:
        raise ValueError(f"min_threads must be >= 0, not {min_threads}")
    if min_threads > max_threads:
        raise ValueError(f"min_threads ({min_threads}) must not exceed max_threads ({max_threads})")


# -- the global default queue ---------------------------------------------------

_default_lock = threading.Lock()
_default: ThreadletQueue | None = None


def default_queue() -> ThreadletQueue:
    """The process-wide default queue, created on first use.

    If it was closed, the next call creates a new one.
    """
    global _default
    with _default_lock:
        if _default is None or _default.closed:
            _default = ThreadletQueue(name="threadlets-default")
        return _default


def submit(fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Threadlet[T]:
    """Submit ``fn(*args, **kwargs)`` to the default queue."""
    return default_queue().submit(fn, *args, **kwargs)


# -- fork safety ------------------------------------------------------------------
#
# Before fork() we take every queue's lock (and the default queue's), so the
# child copies each queue in a consistent state; the parent releases them
# after.  The child replaces the locks (their owners do not exist there) and
# resets each queue.


_forking: list[ThreadletQueue] = []


def _before_fork() -> None:
    _default_lock.acquire()
    _forking[:] = list(_live_queues)
    for q in _forking:
        q._lock.acquire()


def _after_fork_in_parent() -> None:
    for q in _forking:
        q._lock.release()
    _forking.clear()
    _default_lock.release()


def _after_fork_in_child() -> None:
    global _default_lock
    _default_lock = threading.Lock()
    for q in _forking:
        q._reset_after_fork()
    _forking.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_before_fork,
        after_in_parent=_after_fork_in_parent,
        after_in_child=_after_fork_in_child,
    )
