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
* A threadlet is RUNNING only while its function runs.  Only the worker that
  runs it writes it then.  It stores the result *before* it sets DONE, the
  state under the lock; readers look at the state first, under the lock
  too (or, once DONE, which is final, without it), so the outcome is
  published by the lock with the state, and nobody relies on the GIL
  making a store "atomic".
* After a threadlet reaches DONE or CANCELLED, and with the lock released,
  its waiters are woken and its done-callbacks run, each exactly once, in the
  thread that finished it (the worker, or the thread that cancelled it).  A
  callback that raises never stops the others; see :meth:`Threadlet._finished`
  for where a KeyboardInterrupt or SystemExit from one goes.

Who touches what: every field of the queue and every ``_state``/``_result``
/``_exception``/``_waiters``/``_callbacks`` of a threadlet is protected by the
queue's ``_lock``.  ``_fn``/``_args``/``_kwargs`` are written once before
submission and read only by the worker that took the threadlet, which drops
them when the function returned (as does cancel): a finished threadlet does
not keep the caller's buffers exported.

Workers
=======

A worker is spawned by :meth:`ThreadletQueue.submit` only when no worker is
idle and fewer than ``max_threads`` exist.  A worker counts as idle only while
it waits for work: it is on the ``_idle`` stack exactly from the moment it
finds the queue empty (under the lock) until someone pops it to hand it a
wakeup.  Idle workers are woken LIFO, so under light load the same few do the
work and the surplus reaches ``idle_timeout`` and retires (trio's thread cache
does the same, for the same reason).  Workers above ``min_threads`` retire
after ``idle_timeout`` seconds without work, and any worker above
``max_threads`` (lowered by :meth:`~ThreadletQueue.set_limits`) retires before
it takes more work.

The worker loop is QEMU's: take the head (under the lock), run it (its
outcome stored on it as it returns), publish it DONE (under the lock),
deliver it (waiters, callbacks), and only then take the next.  A callback
may so wait for work queued behind it: that work is still QUEUED, and any
other worker may take it.

Each worker waits on its own ``threading.Lock`` used as a mailbox: held means
"no news"; whoever pops the worker off the idle stack releases it to wake
exactly that worker.  A lock acquire with a timeout is a single C call that
blocks in the kernel, so no wait anywhere in this module spins, and waits in
the main thread stay interruptible by Ctrl-C.

A worker holds its queue only through a weak reference, and strongly only
while it takes, runs or delivers a threadlet (as CPython's
``concurrent.futures.thread`` does): a queue dropped without ``close()`` is
collected, and a finalizer wakes its idle workers, which find it gone and
exit.  A threadlet holds its queue strongly, so a queue with work stays alive
until the work is done.  Workers are daemon threads: they never keep the
interpreter alive, and a worker blocked in a system call cannot hang the
exit.  After ``fork()`` the child's queues start empty with no workers (see
:func:`_after_fork_in_child`).
"""

from __future__ import annotations

import contextlib
import enum
import functools
import itertools
import logging
import os
import signal
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import CancelledError
from dataclasses import dataclass
from typing import Any, Generic, ParamSpec, TypeVar
from weakref import ref as _weakref

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

# Threadlet._finish_kind: how a worker delivers a threadlet (see there).
_PLAIN, _QUIET, _DELIVER = 0, 1, 2


def _check_timeout(timeout: float | None) -> float | None:
    """Refuse a negative or NaN timeout; return what a lock wait takes:
    None (no limit) for None or for anything above ``threading.TIMEOUT_MAX``
    (about 292 years), infinity included."""
    if timeout is None:
        return None
    if not timeout >= 0:  # NaN too
        raise ValueError(f"timeout must be None or >= 0, not {timeout!r}")
    return None if timeout > threading.TIMEOUT_MAX else timeout


class Threadlet(Generic[T]):
    """A unit of work submitted to a :class:`ThreadletQueue`.

    The handle a caller keeps: it tells the state, cancels with a definite
    :class:`CancelResult`, waits, and hands out the result or exception.
    Subclasses (the engine's requests) override :meth:`_run` to do their work
    and :meth:`_finished` to deliver completion elsewhere (a worker then
    always delivers before it takes more), and may override :meth:`wait`
    (``result()`` and ``exception()`` wait through it).
    """

    __slots__ = (
        "__weakref__",
        "_args",
        "_callbacks",
        "_claim_ref",
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
        #: While claimed (see _claim): its entry in the queue's ``_claimed``.
        self._claim_ref: weakref.ref[Threadlet[T]] | None = None

    def __repr__(self) -> str:
        fn = "" if self._fn is None else f" {self._fn!r}"
        return f"<{type(self).__name__} {self._state.value}{fn}>"

    # -- what a worker calls (no lock held) -------------------------------

    def _run(self) -> T:
        """Do the work. Runs in a worker thread, without the lock."""
        fn = self._fn
        assert fn is not None
        if self._kwargs:
            return fn(*self._args, **self._kwargs)
        return fn(*self._args)

    def _finished(self) -> None:
        """Deliver completion: wake the waiters, then run the done-callbacks
        in the order they were added, each exactly once.  Called once,
        without the lock, after the state became DONE or CANCELLED.

        A callback that raises does not stop the rest.  An ``Exception`` is
        logged.  Any other ``BaseException`` (KeyboardInterrupt, SystemExit,
        asyncio.CancelledError) is logged too in a worker thread, which must
        survive to serve the queue; in any other thread (``cancel()`` or
        ``close()`` called by user code, ``add_done_callback`` on a finished
        threadlet, the engine's completing thread) the first one is re-raised
        once every callback ran: a Ctrl-C reaches the code that was
        interrupted, and costs no other callback its run.
        """
        waiters = self._waiters
        if waiters:
            for w in waiters:
                w.release()
        callbacks = self._callbacks
        if callbacks:
            _run_callbacks(callbacks, self)

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
            self._claim_ref = ref = _weakref(self, queue._unclaimed)
            queue._claimed.add(ref)
            self._state = _RUNNING  # (after its reference: see _finish)
            return True

    def _claim_unpublished(self) -> None:
        """QUEUED -> RUNNING, as :meth:`_claim`, for a threadlet nobody else
        can see yet (an I/O request on its way to the kernel's ring, before
        its submitter returned it): no other thread can race the change, so
        no lock.  Remembered as claimed first, so that a fork between the
        two steps cancels it in the child all the same.  (Its entry is a
        weak reference made once, kept on the threadlet: taken out by
        identity, no second one made to look it up.)"""
        queue = self._queue
        self._claim_ref = ref = _weakref(self, queue._unclaimed)
        queue._claimed_add(ref)
        self._state = _RUNNING

    def _claim_held(self) -> None:
        """QUEUED -> RUNNING, as :meth:`_claim_unpublished`, for a threadlet
        that one of its queue's claim holders (see ``_claim_holders``)
        remembers from now until it is finished or handed on with
        :meth:`_claim_remember`: a forked child's reset finds it there.  One
        store; the claim reference is left unset (see :meth:`_finish`): who
        finishes it sets it to None first.  (The engine's ring paths call
        it, and :meth:`_unclaim` if the ring refuses the request.)"""
        self._state = _RUNNING

    def _claim_remember(self) -> None:
        """Remember a claimed threadlet in the queue (as :meth:`_claim`
        does) from now until :meth:`_finish`: one that leaves its claim
        holder still RUNNING (handed on to a worker)."""
        queue = self._queue
        self._claim_ref = ref = _weakref(self, queue._unclaimed)
        queue._claimed_add(ref)

    def _unclaim(self) -> None:
        """RUNNING -> QUEUED: the claimant could not start it after all
        (it had not been handed to anyone)."""
        queue = self._queue
        with queue._lock:
            if self._state is _RUNNING:
                self._state = _QUEUED
            # (Whatever the state: a Ctrl-C inside _claim_unpublished can
            # leave it remembered as claimed and still QUEUED -- or not
            # even its reference stored, in a threadlet whose __init__
            # leaves the slot unset: see _finish.)
            queue._claimed.discard(getattr(self, "_claim_ref", None))

    def _finish(self, result: T | None, exc: BaseException | None) -> bool:
        """RUNNING -> DONE for claimed work: the outcome before the state,
        under the lock; then waiters and callbacks, without it.  (Claimed:
        its ``_claim_ref`` is set, before the state turned RUNNING -- a
        subclass's own __init__ may leave the slot unset, as the engine's
        requests do, most of which are never claimed.)  False, and
        nothing changes, if it is not RUNNING (cancelled in a forked child).
        Outside a worker, a KeyboardInterrupt (or other non-Exception) from
        a callback is re-raised here after all ran (see :meth:`_finished`)."""
        queue = self._queue
        changed = False
        try:
            with queue._lock:
                if self._state is not _RUNNING:
                    return False
                self._result = result  # the outcome before the state
                self._exception = exc
                self._state = _DONE
                if self._fn is not None:  # what it ran is not kept alive
                    self._fn = self._kwargs = None
                    self._args = ()
                changed = True
        finally:
            if changed:  # (delivered even if Ctrl-C lands as the lock is let go)
                try:
                    self._finished()
                finally:
                    # Remembered until delivered: a fork meanwhile finds it
                    # (see _reset_after_fork).  (One set operation: atomic.)
                    queue._unclaimed(self._claim_ref)  # (_claimed.discard, bound)
        return True

    def _finish_cancelled(self) -> bool:
        """RUNNING -> CANCELLED for claimed work that its runner took back
        before it touched anything (the kernel's ring cancelled it): it
        completes as cancelled, waiters and callbacks as for any cancel.
        False, and nothing changes, if it is not RUNNING."""
        queue = self._queue
        changed = False
        try:
            with queue._lock:
                if self._state is not _RUNNING:
                    return False
                self._state = _CANCELLED
                self._fn = self._kwargs = None
                self._args = ()
                changed = True
        finally:
            if changed:
                try:
                    self._finished()
                finally:
                    queue._claimed.discard(self._claim_ref)  # (as in _finish)
        return True

    #: True for a subclass whose ``_finished``, when the threadlet has no
    #: waiter and no callback, runs no user code and waits for nothing (the
    #: engine's requests: it queues them for their context).  A worker then
    #: takes the next threadlet in the same locked step that publishes this
    #: one, and runs ``_finish_quiet`` after.
    _quiet_finish = False
    #: What a worker must do to deliver a threadlet of this class that has
    #: no waiter and no callback, worked out once per class from the two
    #: above (one look per threadlet on the hot path): nothing (_PLAIN),
    #: ``_finish_quiet`` after taking the next (_QUIET), or ``_finished``
    #: before taking more (_DELIVER).
    _finish_kind = _PLAIN
    #: The two kinds the worker loop looks at, as flags (one look each):
    #: _DELIVER and _QUIET.
    _deliver_first = False
    _quiet_after = False

    def _finish_quiet(self) -> None:
        """What a worker runs, after taking the next threadlet, to deliver a
        quiet one (see ``_quiet_finish``) that had no waiter and no callback
        when it was published DONE (none can be added after: both look at
        the state under the lock first).  ``_finished`` unless a subclass
        gives a shorter way that does the same for that case (the
        engine's requests do)."""
        self._finished()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls._finished is Threadlet._finished:
            cls._finish_kind = _PLAIN
        else:
            cls._finish_kind = _QUIET if cls._quiet_finish else _DELIVER
        cls._deliver_first = cls._finish_kind == _DELIVER
        cls._quiet_after = cls._finish_kind == _QUIET
        if "_finished" in cls.__dict__ and "_finish_quiet" not in cls.__dict__:
            # Its own _finished, and no shorter way of its own: a shorter
            # way inherited would skip what this _finished adds.
            cls._finish_quiet = cls._finished  # type: ignore[method-assign]

    def _forked(self) -> None:
        """Called in a forked child (no other thread runs there) for each of the
        parent's threadlets that just became CANCELLED there, and for each
        that had finished but was being delivered at the fork (its waiters
        and callbacks not all run yet).  Subclasses mark their own
        bookkeeping finished (no callback runs)."""

    # -- public API ---------------------------------------------------------

    @property
    def state(self) -> ThreadletState:
        with self._queue._lock:
            return self._state

    def done(self) -> bool:
        """True once the threadlet finished or was cancelled."""
        # One look at the state, without the lock: both answers that say
        # yes are final, and one that says no was true as it was read (the
        # lock would order it with nothing else read here).
        state = self._state
        return state is _DONE or state is _CANCELLED

    def cancelled(self) -> bool:
        with self._queue._lock:
            return self._state is _CANCELLED

    def cancel(self) -> CancelResult:
        """Cancel the threadlet if it has not started.

        Returns CANCELED if it was still queued (it will never run; waiters
        wake and callbacks run in this thread before cancel returns),
        NOTCANCELED if it is running (it completes normally), ALLDONE if it
        had already finished.  If a callback raises a BaseException that is
        not an Exception (Ctrl-C), cancel raises it once all callbacks ran;
        the threadlet is cancelled all the same (in a worker it is logged).
        """
        queue = self._queue
        changed = False
        try:
            with queue._lock:
                state = self._state
                if state is _QUEUED:
                    self._state = _CANCELLED
                    # The item stays in the deque (workers skip cancelled
                    # items), but what it would have run is dropped now.
                    self._fn = self._kwargs = None
                    self._args = ()
                    queue._stale += 1
                    queue._cancelled += 1
                    changed = True  # (before any call: Ctrl-C can land as one returns)
                    queue._finishing.add(self)  # (see _reset_after_fork)
                    queue._notify_if_quiet()
                elif state is _RUNNING:
                    return CancelResult.NOTCANCELED
                else:
                    return CancelResult.ALLDONE
        finally:
            if changed:  # (delivered even if Ctrl-C lands as the lock is let go)
                try:
                    self._finished()
                finally:
                    queue._finishing.discard(self)
        return CancelResult.CANCELED

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the threadlet finished or was cancelled.

        Returns True if it did, False if ``timeout`` seconds passed first
        (None, or more than ``threading.TIMEOUT_MAX``: no limit).
        """
        state = self._settle(timeout)[0]
        return state is _DONE or state is _CANCELLED

    def _settle(self, timeout: float | None) -> tuple[ThreadletState, Any, BaseException | None]:
        """Wait as :meth:`wait` does; return the state (QUEUED or RUNNING:
        timed out) with the outcome, read in the same locked look."""
        timeout = _check_timeout(timeout)
        lock = self._queue._lock
        waiter: threading.Lock | None = None
        try:  # (from before the waiter is added: a Ctrl-C may come at any point)
            with lock:
                state = self._state
                if state is _DONE or state is _CANCELLED:
                    return state, self._result, self._exception
                waiter = threading.Lock()
                waiter.acquire()
                if self._waiters is None:
                    self._waiters = [waiter]
                else:
                    self._waiters.append(waiter)
            if timeout is None:
                waiter.acquire()
            else:
                waiter.acquire(timeout=timeout)
        finally:
            if waiter is not None:
                with lock:
                    state = self._state
                    if not (state is _DONE or state is _CANCELLED):
                        # Timed out or interrupted: withdraw the waiter.
                        waiters = self._waiters
                        if waiters is not None and waiter in waiters:
                            waiters.remove(waiter)
                    result, exc = self._result, self._exception
        return state, result, exc

    def _outcome(self, timeout: float | None) -> tuple[Any, BaseException | None]:
        if type(self).wait is not _plain_wait:
            # A subclass's wait() must do the waiting (the engine's reaps
            # its ring meanwhile); then one look reads the outcome.
            if not self.wait(timeout):
                raise TimeoutError(f"{self!r} did not finish within {timeout} s")
            timeout = 0
        state, result, exc = self._settle(timeout)
        if state is _CANCELLED:
            raise CancelledError()
        if state is not _DONE:
            raise TimeoutError(f"{self!r} did not finish within {timeout} s")
        return result, exc

    def result(self, timeout: float | None = None) -> T:
        """The return value of the work; re-raises what it raised.

        Raises ``CancelledError`` if it was cancelled and ``TimeoutError`` if
        it did not finish within ``timeout`` seconds.
        """
        if self._state is _DONE and timeout is None:
            # DONE is final, and the outcome was stored before it (see
            # _finish): read without the lock -- the hot path of a front
            # end, which asks once the request finished.  (A timeout
            # given is checked as ever: a bad one is refused even here.)
            exc = self._exception
            if exc is not None:
                raise exc
            return self._result  # type: ignore[return-value]
        result, exc = self._outcome(timeout)
        if exc is not None:
            raise exc
        return result  # type: ignore[no-any-return]

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """What the work raised, or None; ``CancelledError`` if cancelled."""
        return self._outcome(timeout)[1]

    def add_done_callback(self, fn: Callable[[Threadlet[T]], object]) -> None:
        """Call ``fn(threadlet)`` exactly once when it finishes or is
        cancelled; at once, in this thread, if that already happened.

        Otherwise it runs in the thread that finishes the threadlet (a
        worker, or the thread that cancels it).  An Exception from ``fn`` is
        logged, never propagated.  Any other BaseException (Ctrl-C) is
        logged in a worker and propagates elsewhere: from this call, or from
        the ``cancel()``/``close()`` that ran it (see :meth:`_finished`).
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


_plain_wait = Threadlet.wait


class _ContainedCallback(functools.partial[None]):
    """A done-callback (a partial, its arguments positional) that its maker
    vouches for: it runs no code of the user's in the thread that finishes
    the request, never waits, and never drains or closes a context -- so
    whoever runs it needs none of the bookkeeping that guards against such
    re-entry (see the engine's AioRequest._finished).  It may still raise
    (Ctrl-C landing in it), as any callback: handled as _run_callbacks
    does.  Add one to one request only, once, when it is made: the engine
    tells that it is the only callback by looking at the list's ends."""

    __slots__ = ()


def _run_callbacks(callbacks: Iterable[Callable[[Any], object]], item: object) -> None:
    """Run each callback once, whatever the others raise: see
    :meth:`Threadlet._finished` for what is logged and what re-raised."""
    interrupt: BaseException | None = None
    for cb in callbacks:
        try:
            cb(item)
        except Exception:
            log.exception("exception in done-callback %r of %r", cb, item)
        except BaseException as exc:  # KeyboardInterrupt, SystemExit, ...
            if interrupt is None and not _in_worker():
                interrupt = exc
            else:
                log.exception("%s in done-callback %r of %r", type(exc).__name__, cb, item)
    if interrupt is not None:
        try:
            raise interrupt
        finally:
            interrupt = None  # no cycle through this frame


def _invoke_callback(cb: Callable[[Any], object], item: Any) -> None:
    _run_callbacks((cb,), item)


def _release_all(workers: list[_Worker]) -> None:
    """Wake each of ``workers`` (taken off an idle stack) although Ctrl-C
    lands as one release returns (it was released); then re-raise it."""
    first: BaseException | None = None
    for w in workers:
        try:
            w.mailbox.release()
        except BaseException as exc:
            if first is None:
                first = exc
    if first is not None:
        try:
            raise first
        finally:
            first = None


def _wake_waiters(waiters: list[threading.Lock] | None) -> None:
    """In a forked child: wake whoever waits on a threadlet of the parent.
    Its threads are gone, but the thread that forked may be one of them (a
    signal handler, run inside its wait, forked): it goes on waiting in the
    child, where nobody else would ever wake it.  The list is emptied, so
    that a delivery that thread goes on with releases none twice."""
    if waiters:
        for w in waiters:
            with contextlib.suppress(RuntimeError):  # (released already)
                w.release()
        waiters.clear()


def _finish_all(items: Iterable[Threadlet[Any]]) -> None:
    """Deliver each of ``items`` although one raises; then re-raise the
    first exception (the others are logged)."""
    first: BaseException | None = None
    for item in items:
        try:
            item._finished()
        except BaseException as exc:
            if first is None:
                first = exc
            else:
                log.exception("%s while delivering %r", type(exc).__name__, item)
    if first is not None:
        try:
            raise first
        finally:
            first = None


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


class _Alert:
    """A queue's ``_alert`` (see ThreadletQueue._init_state)."""

    __slots__ = ("on",)

    def __init__(self) -> None:
        self.on = False


class _Worker:
    """One worker thread's mailbox and membership.

    ``mailbox`` is a lock used as a binary semaphore: the worker holds it
    while it has no news and blocks acquiring it again; whoever pops the
    worker off the idle stack releases it, which wakes exactly this worker.
    """

    __slots__ = ("current", "finishing", "live", "mailbox", "thread")

    def __init__(self) -> None:
        self.mailbox = threading.Lock()
        self.mailbox.acquire()
        # Protected by the queue's lock:
        #: The threadlet this worker runs, or delivers (its waiters and
        #: callbacks).
        self.current: Threadlet[Any] | None = None
        #: A quiet threadlet (see Threadlet._quiet_finish) whose _finished
        #: this worker runs after taking the next: set under the lock,
        #: cleared by this worker alone once it ran.
        self.finishing: Threadlet[Any] | None = None
        #: False once the worker does not belong to the queue: its start()
        #: failed, or this is a forked child.  It then exits at its next
        #: look at the queue, touching nothing.
        self.live = True
        #: Written once by the spawner, before the thread starts.
        self.thread: threading.Thread | None = None


_queue_ids = itertools.count(1)
#: ``_current.queue`` is a weak reference to the queue whose worker this
#: thread is, if any (a worker must not hold its queue strongly).
_current = threading.local()
_live_queues: weakref.WeakSet[ThreadletQueue] = weakref.WeakSet()


def _in_worker() -> bool:
    return getattr(_current, "queue", None) is not None


def _is_own_worker(queue: ThreadletQueue) -> bool:
    ref = getattr(_current, "queue", None)
    return ref is not None and ref() is queue


class ThreadletQueue:
    """An elastic pool of worker threads with a FIFO queue of work.

    ``max_threads`` bounds the workers; ``min_threads`` are spawned at once
    and kept warm; workers above that retire after ``idle_timeout`` seconds
    without work (``float("inf")``, or anything above
    ``threading.TIMEOUT_MAX``: never).  Use it as a context manager to close
    it on exit; a queue dropped without closing lets its workers go too.
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
        if not idle_timeout > 0:  # NaN too
            raise ValueError(f"idle_timeout must be > 0 (inf: never retire), not {idle_timeout!r}")
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a str or None, not {type(name).__name__}")
        self.name = name or f"threadlets-{next(_queue_ids)}"
        #: None: idle workers never retire (a lock wait takes no longer).
        self._idle_timeout: float | None = (
            None if idle_timeout > threading.TIMEOUT_MAX else float(idle_timeout)
        )
        self._init_state(min_threads, max_threads)
        _live_queues.add(self)
        with self._lock:
            self._spawn_warm()

    def _init_state(self, min_threads: int, max_threads: int) -> None:
        # Everything below is protected by _lock.
        self._lock = threading.Lock()
        #: Waited on by drain() and close(); notified when nothing is queued,
        #: running or being delivered by a worker, and when a worker exits
        #: or a worker starts closing.
        self._quiet = threading.Condition(self._lock)
        self._items: deque[Threadlet[Any]] = deque()  # may hold cancelled items
        self._idle: list[_Worker] = []  # LIFO: the most recently idle wakes first
        self._workers: set[_Worker] = set()
        #: Claimed threadlets (RUNNING outside the workers; see _claim),
        #: until their waiters and callbacks ran.  Held weakly: one is
        #: claimed to be cancelled in a forked child, which nobody can do to
        #: one that nobody holds any more -- and a strong hold kept an I/O
        #: request (with its context, its io_uring ring and their
        #: descriptors) alive for good when its context was dropped while
        #: the kernel had it (see threadlets.uring._abandoned).
        #: (A set of weak references, each kept on its threadlet as
        #: ``_claim_ref``: a WeakSet made two per request, one to look the
        #: other up.  One that dies claimed takes itself out.)
        self._claimed: set[weakref.ref[Threadlet[Any]]] = set()
        self._unclaimed = self._claimed.discard  # the references' callback
        self._claimed_add = self._claimed.add  # (one lookup fewer per claim)
        #: What else holds claimed threadlets of this queue, held weakly:
        #: objects with a ``claimed_in_child()`` method that a forked child's
        #: reset asks for them (the engine's io_uring backends, whose rings
        #: remember the requests they hold; see Threadlet._claim_held).
        self._claim_holders: weakref.WeakSet[Any] = weakref.WeakSet()
        #: Threadlets that cancel() or close() cancelled, until their
        #: waiters and callbacks ran.  With ``_claimed`` and the workers'
        #: ``current`` and ``finishing``, what a fork can find whose delivery
        #: is under way (see _reset_after_fork).
        self._finishing: set[Threadlet[Any]] = set()
        self._min = min_threads
        self._max = max_threads
        self._closed = False
        #: ``max_threads``, or -1 once closed: a worker above it retires
        #: before it takes more work.
        self._cap = max_threads
        #: On while a worker may have to retire (set_limits, close) or not
        #: belong to the queue any more (a forked child's reset, a failed
        #: start): the workers look at ``_cap`` and their ``live`` only
        #: then -- one look per hold on the hot path.  Turned off (under
        #: the lock) by a live worker that finds nobody above ``_cap``
        #: (never once closed: the cap is -1); the old one stays on in a
        #: forked child (the reset makes a new one).  A worker whose start
        #: failed looks at ``live`` once before its loop, as another may
        #: have turned the alert off first.
        self._alert = _Alert()
        self._threads = 0
        #: Cancelled threadlets left in ``_items`` (cancel() does not take
        #: one out; a worker drops it as it meets it): the queued are
        #: ``len(_items) - _stale`` (see _queued), none counted one by one
        #: on the hot path.
        self._stale = 0
        self._running = 0
        #: Published by a worker, whose waiters/callbacks have not all run.
        self._delivering = 0
        #: Workers of this queue inside close() (from a callback).
        self._closers = 0
        #: (No count of the completed: ``submitted - cancelled - queued -
        #: running``, as stats() gives it, one step less per threadlet.)
        self._submitted = 0
        self._cancelled = 0
        self._spawned = 0
        self._retired = 0
        self._peak = 0
        self._thread_seq = 0
        #: What workers hold instead of the queue; when the queue is
        #: collected, _wake_idle wakes its idle workers so that they exit.
        self._ref = weakref.ref(self, functools.partial(_wake_idle, self._lock, self._idle))

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
        """Queue a prepared threadlet (the engine's requests come this way).

        Either it is queued and will run, or this raises and nothing was
        queued (a worker could not be started and none exists, or Ctrl-C).
        """
        idle: _Worker | None = None
        try:
            with self._lock:
                if self._closed:
                    raise RuntimeError(f"cannot submit to {self.name}: the queue is closed")
                # `+=` rather than append(): CPython raises a pending Ctrl-C
                # after C *calls*, never after an operator, so nothing can
                # interrupt between queueing the item and counting it.
                self._items += (item,)
                self._submitted += 1
                idles = self._idle
                if idles:
                    # Subscript and del, not pop(): no call between taking
                    # the worker and holding it here, so an interrupt cannot
                    # strand it off the idle stack (see the finally).
                    idle = idles[-1]
                    del idles[-1]
                elif self._threads < self._max:
                    try:
                        self._spawn()
                    except Exception:
                        if self._threads == 0:  # nobody would ever run it
                            self._unsubmit()
                            raise
                        log.warning("%s: could not start a worker", self.name, exc_info=True)
                    except BaseException:
                        self._unsubmit()
                        raise
        finally:
            if idle is not None:
                # Popped under the lock, so the wakeup is ours alone to send;
                # a release can enter the kernel, so it is sent outside the
                # lock -- and sent even if Ctrl-C lands as the lock is let go.
                idle.mailbox.release()

    def _unsubmit(self) -> None:
        # Called with the lock held, in the same hold as the append.
        self._items.pop()
        self._submitted -= 1

    def _holds(self, item: Threadlet[Any]) -> bool:
        """Whether this queue took ``item``: it waits in the queue, or it left
        it -- a worker took it, or it was cancelled.  For a submitter that
        was interrupted and must know whether its submission happened.  One
        look under the lock, as a worker takes an item (off the queue and
        QUEUED -> RUNNING in one hold): a caller that read QUEUED, then
        asked whether the queue still held it, missed one taken between the
        two looks, and took back the admission of a request that ran."""
        with self._lock:
            return item._state is not _QUEUED or item in self._items

    # -- workers --------------------------------------------------------------

    def _spawn(self) -> None:
        # Called with the lock held.  The new worker is not idle: it goes
        # straight to the queue.
        worker = _Worker()
        self._thread_seq += 1
        t = worker.thread = threading.Thread(
            target=_worker_main,
            args=(self._ref, worker, self._idle_timeout),
            name=f"{self.name}-worker-{self._thread_seq}",
            daemon=True,
        )
        # Counted with operators only (a pending Ctrl-C lands as a C call
        # returns, never after an operator): from the first call on -- the
        # listing, the start -- an interrupt is undone below.  (A max()
        # or add() before the try left a worker counted that never ran:
        # submit() then spawned no other, and close() waited for it.)
        peak = self._peak
        self._threads += 1
        self._spawned += 1
        if self._threads > peak:
            self._peak = self._threads
        try:
            self._workers.add(worker)
            t.start()
        except BaseException:
            # A Ctrl-C can arrive while start() waits for a thread that did
            # start: it finds itself not live (we hold the lock until then)
            # and exits without touching the queue.
            worker.live = False
            self._alert.on = True
            self._threads -= 1
            self._spawned -= 1
            self._peak = peak
            self._workers.discard(worker)
            raise

    def _spawn_warm(self) -> None:
        # Called with the lock held: top up to min_threads, and start workers
        # for queued work nobody will wake (after max_threads was raised).
        want = max(self._min, min(self._max, self._threads + self._queued - len(self._idle)))
        while self._threads < want:
            self._spawn()

    @property
    def _queued(self) -> int:
        """How many threadlets are QUEUED (under the lock)."""
        return len(self._items) - self._stale

    def _is_quiet(self) -> bool:
        return not (self._queued or self._running or self._delivering)

    def _notify_if_quiet(self) -> None:
        if not (self._queued or self._running or self._delivering):
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

        A lower ``max_threads`` retires the surplus: idle workers at once,
        running ones when their work is done, before they take more; a
        higher one spawns workers for work already queued; a higher
        ``min_threads`` spawns at once.
        """
        idle: list[_Worker] = []
        try:
            with self._lock:
                new_min = self._min if min_threads is None else min_threads
                new_max = self._max if max_threads is None else max_threads
                _check_limits(new_min, new_max)
                self._min, self._max = new_min, new_max
                if not self._closed:
                    self._cap = new_max
                    self._alert.on = True
                # Wake as many idle workers as there are surplus threads:
                # each finds itself above max_threads, and retires.  Taken
                # off the idle stack in one step (no call: see close), woken
                # below even if Ctrl-C lands on the way -- one taken off and
                # not woken would sleep for good, and close() wait for it.
                surplus = min(len(self._idle), self._threads - new_max)
                if surplus > 0:
                    idle += self._idle[-surplus:]
                    del self._idle[-surplus:]
                if not self._closed:
                    self._spawn_warm()
        finally:
            _release_all(idle)

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
        """Wait until nothing is queued or running, and the waiters and
        done-callbacks of what the workers finished have run.

        Returns False if ``timeout`` seconds passed first.  Work submitted
        while draining is waited for too.  (Callbacks that cancel() runs in
        its caller's thread are that caller's: drain does not wait for them.)
        """
        timeout = _check_timeout(timeout)
        if _is_own_worker(self):
            raise RuntimeError(f"drain() called from a worker of {self.name} would wait for itself")
        with self._lock:
            return self._quiet.wait_for(self._is_quiet, timeout)

    def close(self, timeout: float | None = None) -> bool:
        """Refuse new work, cancel what is queued, and wait for what runs.

        Waits at most ``timeout`` seconds for running work and for the
        worker threads to end; returns True if all did.  Cancelled
        threadlets get their callbacks in this thread: if one raises a
        BaseException that is not an Exception (Ctrl-C), close() raises it
        once every cancelled threadlet was delivered, without waiting.
        Called from a done-callback in one of this queue's workers, it waits
        for the other workers (those not closing too) to retire.  Closing
        twice is harmless.
        """
        timeout = _check_timeout(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        own = _is_own_worker(self)
        cancelled: list[Threadlet[Any]] = []
        idle: list[_Worker] = []
        try:
            with self._lock:
                self._closed = True
                self._cap = -1
                self._alert.on = True
                # Plain bytecodes from each item's change to its listing (the
                # list grows by `+=`, not a call): a Ctrl-C landing as a call
                # returns finds every cancelled item listed for delivery, and
                # the rest still queued, for the next close().  The queue is
                # emptied only once all are cancelled.
                for item in self._items:
                    if item._state is _QUEUED:
                        item._state = _CANCELLED
                        item._fn = item._kwargs = None
                        item._args = ()
                        self._stale += 1
                        self._cancelled += 1
                        cancelled += (item,)
                # Taken off the idle stack in one step, woken below: each
                # is woken even if Ctrl-C lands on the way.
                idle += self._idle
                del self._idle[:]
                self._finishing.update(cancelled)  # (see _reset_after_fork)
                self._stale = 0  # (no call before the clear: see _stale)
                self._items.clear()
                # A worker cannot join itself, nor another closing worker.
                threads = [] if own else [w.thread for w in self._workers if w.thread]
                self._notify_if_quiet()
        finally:
            try:
                _release_all(idle)
            finally:
                try:
                    _finish_all(cancelled)
                finally:
                    self._finishing.difference_update(cancelled)
                    del cancelled
        with self._lock:
            if own:
                self._closers += 1
                self._quiet.notify_all()
            try:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                if not self._quiet.wait_for(lambda: self._threads <= self._closers, left):
                    return False
            finally:
                if own:
                    self._closers -= 1
        # Each has retired; join so that none is left alive when we return.
        for t in threads:
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                return False
        return True

    def stats(self) -> QueueStats:
        """A snapshot of the counters, consistent with each other."""
        with self._lock:
            return QueueStats(
                threads=self._threads,
                idle=len(self._idle),
                queued=self._queued,
                running=self._running,
                submitted=self._submitted,
                completed=self._submitted - self._cancelled - self._queued - self._running,
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
        run in the child.  If the fork came from a worker (its function or a
        callback), that thread goes on in the child but is no worker of the
        reset queue: it exits at its next look at the queue.
        """
        old_items = (
            list(self._items)
            + [w.current for w in self._workers if w.current]
            + [w.finishing for w in self._workers if w.finishing]
            + [t for t in [r() for r in list(self._claimed)] if t is not None]
            + [t for h in list(self._claim_holders) for t in h.claimed_in_child()]
            + list(self._finishing)
        )
        for w in self._workers:
            w.live = False
        self._alert.on = True  # (the old one: what a worker that forked holds)
        min_threads, max_threads, closed = self._min, self._max, self._closed
        completed = self._submitted - self._cancelled - self._queued - self._running
        cancelled = self._cancelled
        self._init_state(min_threads, max_threads)
        self._closed = closed
        if closed:
            self._cap = -1
        self._cancelled = cancelled
        for item in dict.fromkeys(old_items):  # (once each: a cancelled one can be listed twice)
            _wake_waiters(item._waiters)
            if item._state is _QUEUED or item._state is _RUNNING:
                item._state = _CANCELLED
                item._waiters = None
                item._callbacks = None
                self._cancelled += 1
                item._forked()
            else:
                # Finished, its delivery (waiters, callbacks, the engine's
                # hand-over to its context) under way at the fork: by a
                # thread that does not exist here, or by this one, which
                # goes on with it.  It counts as delivered here all the same.
                item._forked()
        self._submitted = completed + self._cancelled
        if not closed:
            self._spawn_warm()


def _worker_main(ref: weakref.ref[ThreadletQueue], me: _Worker, idle_timeout: float | None) -> None:
    """A worker thread: take the head of the queue, run it, publish its
    outcome, deliver it (waiters, callbacks), and only then take the next.

    A threadlet with nothing to deliver (no waiter, no callback, the plain
    ``_finished``) is published in the same locked section that takes the
    next: one lock round trip per threadlet on the hot path, and nothing
    runs in between.  So is a quiet one (see Threadlet._quiet_finish), whose
    ``_finish_quiet`` runs after that section.  From the publication of a
    threadlet to the taking of the next, the worker goes on counting in the
    queue's ``_running`` (no decrement and increment in the same hold);
    every hold ends with the count exact.  The queue is reached through
    ``ref`` anew after each idle wait and held by nothing during it (while
    the worker is busy, the threadlet it holds keeps the queue alive
    anyway); nothing of a threadlet (the item, its outcome, a traceback)
    outlives its turn in this frame.
    """
    _current.queue = ref
    block_async_signals()
    mailbox = me.mailbox
    wait = -1 if idle_timeout is None else idle_timeout
    done: Threadlet[Any] | None = None  # ran (its outcome stored); not yet DONE
    quiet: Threadlet[Any] | None = None  # published; its _finish_quiet still to run
    delivering = False  # this worker counts in queue._delivering
    item: Threadlet[Any] | None = None  # taken; not yet run
    queue = ref()
    if queue is None:
        return
    # The deque and the alert are replaced only by a forked child's reset,
    # which makes this worker not live (and turns the old alert on): they
    # are used only after that look.
    items = queue._items
    alert = queue._alert
    with queue._lock:
        if not me.live:  # start() failed (before any alert could be turned off)
            return
    while True:
        with queue._lock:
            if alert.on:
                if not me.live:  # a forked child, or start() failed: not ours
                    return
                if queue._threads <= queue._cap:
                    alert.on = False  # nobody above the cap (see _alert)
            if done is not None:
                done._state = _DONE  # (its outcome stored before: see the run)
                if done._fn is not None:  # what it ran is not kept alive
                    done._fn = done._kwargs = None
                    done._args = ()
                # (``_completed`` is not counted: stats() derives it.)  A
                # quiet one is told before a _DELIVER one (one look less for
                # the engine's requests, one more for the rarer kind).
                if done._waiters or done._callbacks:
                    queue._running -= 1
                    queue._delivering += 1
                    delivering = True
                elif done._quiet_after:  # run after taking the next (see below)
                    quiet = me.finishing = done
                elif done._deliver_first:  # (as with a waiter or a callback)
                    queue._running -= 1
                    queue._delivering += 1
                    delivering = True
            elif delivering:
                queue._delivering -= 1
                delivering = False
            if not delivering:
                # (Still counted in ``_running`` if ``done`` is set.)
                if alert.on and queue._threads > queue._cap:  # (closed, or above max)
                    if done is not None:
                        queue._running -= 1
                    if quiet is None:
                        queue._retire(me)
                        return
                    # Deliver it first (once gone, nobody would), as one
                    # with a waiter (``current`` lists it); retire on the
                    # next round.
                    quiet = me.finishing = None
                    queue._delivering += 1
                    delivering = True
                else:
                    while items:
                        item = items.popleft()
                        if item._state is _QUEUED:
                            item._state = _RUNNING
                            if done is None:
                                queue._running += 1
                            me.current = item
                            break
                        queue._stale -= 1  # cancelled, left in the deque
                    else:
                        item = me.current = None
                        if done is not None:
                            queue._running -= 1
                        # (Nothing queued: the deque is empty.)
                        if not (queue._running or queue._delivering):
                            queue._quiet.notify_all()
                        queue._idle.append(me)
        if quiet is not None:
            # A subclass's delivery that runs no user code (the engine's: it
            # hands the request to its context): nothing can wait on the
            # next threadlet meanwhile, so it runs after that one was taken.
            try:
                quiet._finish_quiet()
            except BaseException:
                log.exception("delivering %r failed", quiet)
            quiet = me.finishing = None
        if delivering:
            assert done is not None
            try:
                done._finished()  # Threadlet's never raises in a worker
            except BaseException:
                log.exception("delivering %r failed", done)
            done = None
            continue
        done = None
        if item is None:
            queue = None  # (not held while idle)
            # The first wait spelled out (_idle_wait's frame only once it
            # timed out): -1, no limit.
            if not mailbox.acquire(True, wait) and not _idle_wait(ref, me, idle_timeout):
                return
            queue = ref()
            if queue is None:  # collected: nobody can submit to it any more
                return
            continue
        # The outcome is stored on the threadlet as it runs, by this worker
        # alone, and read by nobody before the state is DONE (readers look
        # at the state first, under the lock); DONE is set under the lock
        # in the next hold, which so publishes the outcome with it.
        try:
            item._result = item._run()
        except BaseException as exc:
            item._exception = exc
        # (``item`` is taken anew, or the worker delivers ``done`` and
        # retires, before the next run: it holds nothing longer.)
        done = item


#: Signals a process receives from outside (Ctrl-C, kill, timers, a child's
#: exit): the kernel gives a process-directed one to any thread that does
#: not block it, and CPython runs its handler only in the main thread -- a
#: main thread asleep in a wait is then never woken (the "Ctrl-C does not
#: interrupt the wait" hang).  Our threads block them, as QEMU's do.
_ASYNC_SIGNALS = frozenset(
    getattr(signal, name)
    for name in (
        "SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGALRM", "SIGVTALRM", "SIGPROF",
        "SIGUSR1", "SIGUSR2", "SIGCHLD", "SIGWINCH", "SIGIO", "SIGURG",
    )
    if hasattr(signal, name)
)  # fmt: skip


def block_async_signals() -> None:
    """In a thread of ours: leave externally sent signals to the main thread."""
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_BLOCK, _ASYNC_SIGNALS)


def _idle_wait(ref: weakref.ref[ThreadletQueue], me: _Worker, idle_timeout: float | None) -> bool:
    """Wait, holding no reference to the queue, until popped off the idle
    stack and woken (by a submitter, set_limits, close or the queue's
    finalizer): True.  False if the worker retired instead: ``idle_timeout``
    passed with more than ``min_threads`` alive, or the queue is gone.
    (The worker loop makes the first wait itself, and calls this only once
    that one timed out: the loop below starts with the look it calls for.)"""
    if idle_timeout is None:  # (the worker's wait has no limit: not reached)
        me.mailbox.acquire()
        return True
    while True:
        queue = ref()
        if queue is None:
            return False
        with queue._lock:
            if me not in queue._idle:
                # Popped just as we timed out: its wakeup is ours.
                me.mailbox.acquire()
                return True
            if queue._threads > queue._min or queue._closed:
                queue._idle.remove(me)
                queue._retire(me)
                return False
        # A warm worker (at or below min_threads): keep waiting.
        del queue
        if me.mailbox.acquire(timeout=idle_timeout):
            return True


def _wake_idle(lock: threading.Lock, idle: list[_Worker], _ref: object) -> None:
    """A queue was collected without close(): wake its idle workers, which
    find it gone and exit.  (Nobody holds the lock of a dead queue.)"""
    with lock:
        woken = idle[:]
        idle.clear()
    for w in woken:
        w.mailbox.release()


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
#
# The thread that forks may hold one of those locks itself, or wait on a
# queue: a signal handler (or a finalizer) that forks runs inside whatever
# that thread was doing, a locked step of submit() or a wait() included.  A
# lock it holds is never let go while it waits for it: so each is waited for
# at most _FORK_LOCK_WAIT seconds (no locked step here lasts anywhere near
# that), and a queue whose lock did not come is reset in the child all the
# same (under the GIL no container is ever half-changed; only the counters
# may be a step apart, and the reset recounts them).  In the child, a wait
# the forking thread goes on with returns: its threadlet's waiters are
# woken, the old ``_quiet`` condition is notified, and the old lock (held
# for the fork) is let go, so that the waiting code, which still holds
# references to them, finds the reset queue.

#: Seconds _before_fork waits for each lock (see above).
_FORK_LOCK_WAIT = 1.0

#: The queues being forked, each with its lock if _before_fork got it.
_forking: list[tuple[ThreadletQueue, threading.Lock | None]] = []
_default_held = False


def _before_fork() -> None:
    global _default_held
    _default_held = _default_lock.acquire(timeout=_FORK_LOCK_WAIT)
    for q in list(_live_queues):
        lock = q._lock
        _forking.append((q, lock if lock.acquire(timeout=_FORK_LOCK_WAIT) else None))


def _after_fork_in_parent() -> None:
    global _default_held
    for _, lock in _forking:
        if lock is not None:
            lock.release()
    _forking.clear()
    if _default_held:
        _default_held = False
        _default_lock.release()


def _after_fork_in_child() -> None:
    global _default_lock, _default_held
    _default_lock = threading.Lock()
    _default_held = False
    # If a worker forked, its thread is no worker in the child.
    _current.queue = None
    for q, held in _forking:
        quiet = q._quiet
        q._reset_after_fork()
        if held is not None:
            quiet.notify_all()  # (a drain() or close() this thread goes on with)
            held.release()
    _forking.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_before_fork,
        after_in_parent=_after_fork_in_parent,
        after_in_child=_after_fork_in_child,
    )
