"""Awaiting engine requests from asyncio (and uvloop), trio, and anyio.

This module owns the glue between an event loop and the paio engine: one
:class:`~threadlets.engine.AioContext` per event loop (asyncio) or per
``trio.run`` (trio), whose eventfd the loop watches, and
:meth:`LoopIO.wait`, which suspends a task until its request finished.
anyio needs nothing of its own: on either backend its tasks are asyncio or
trio tasks, and its cancel scopes cancel them the same way.  Also here, for
the file objects: :class:`StreamLock` (one file's stream calls, in turn),
:meth:`LoopIO.wait_fd` (readiness of a pipe or terminal, ended early by
its file's :class:`FdWaits` when the file closes) and
:meth:`LoopIO.shielded` (finish something despite a cancellation).

Lifetime: nothing of ours holds an asyncio loop strongly.  When the loop
closes (or, for uvloop, is collected) its context is closed, releasing the
eventfd and the ring; a context with requests still outstanding is kept
until a later loop finds them finished (the kernel may still write into a
ring request's buffer).

Cancellation (the guarantee)
============================

* A task cancelled while its request is QUEUED cancels the request: it
  never touches the file or the buffer, and the task sees the cancellation
  at once.
* A task cancelled while its request is RUNNING keeps waiting, with further
  cancellations held back, until the request finished; only then does it
  see ``CancelledError`` (``trio.Cancelled``).  So no buffer is written
  after the task saw the cancellation.  For a write this means the write
  happened (wholly, or as far as an error let it) even though the task was
  cancelled: after a cancelled write, the file's contents there are unknown
  to the caller and must be read back if they matter.

The wake (asyncio): a waiting task yields a future of ours (``_Waiter``),
not an ``asyncio.Future``; a completion processed by the loop's eventfd
reader steps its task there and then, with no Handle or loop pass per
request.  Anywhere else (inside a running task, another thread, a closed
loop) and on cancellation, the wakeup is scheduled as a Future's is.

Fairness: a request that finishes inline (cached data) returns without
suspending.  Every :data:`YIELD_EVERY` such completions on a loop (counted
on :attr:`LoopIO.tick`, whichever call made them; a file's stream calls
count too, most being answered from its read-ahead), the task that makes
the next one yields to the loop once, so a task doing only cached I/O
cannot starve the others.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import fcntl
import itertools
import os
import sys
import threading
import types
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Generator, Iterator
from functools import partial as _partial
from typing import Any, TypeVar, cast

from threadlets.engine import BACKENDS, AioContext, AioRequest
from threadlets.pool import CancelResult, ThreadletQueue

__all__ = ["YIELD_EVERY", "FdWaits", "LoopIO", "StreamLock", "configure", "current"]

T = TypeVar("T")

#: Inline completions on one loop between two forced yields: often enough
#: that other tasks run every few hundred microseconds, rarely enough that
#: the yield (a trip through the loop) costs little per read.
YIELD_EVERY = 256


_settings: dict[str, Any] = {"queue": None, "inline": True, "backend": "auto", "sqpoll": False}


def configure(
    *,
    queue: ThreadletQueue | None = None,
    inline: bool = True,
    backend: str = "auto",
    sqpoll: bool = False,
) -> None:
    """Choose the threadlet queue (default: the global default queue),
    whether the inline fast path is used, the engine backend ("auto":
    io_uring where it can be set up, else threads; see
    :class:`~threadlets.AioContext`) and whether its ring asks for a
    kernel thread polling submissions (``sqpoll``: a CPU busy while I/O
    flows; off by default), for the event loops that start doing I/O from
    now on.  Loops already doing I/O keep theirs."""
    if queue is not None and not isinstance(queue, ThreadletQueue):
        raise TypeError(f"queue must be a ThreadletQueue or None, not {type(queue).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    _settings["queue"] = queue
    _settings["inline"] = bool(inline)
    _settings["backend"] = backend
    _settings["sqpoll"] = bool(sqpoll)


def _new_context() -> AioContext:
    return AioContext(
        _settings["queue"],
        inline=_settings["inline"],
        backend=_settings["backend"],
        sqpoll=_settings["sqpoll"],
    )


class LoopIO:
    """The engine as one event loop sees it.  Made by :func:`current`.

    It holds its asyncio loop only weakly: the loop's own structures hold
    the context, and nothing of ours may keep a finished loop alive."""

    __slots__ = ("__weakref__", "_forks", "_loop", "_wait", "ctx", "kind", "tick", "wait")

    #: ``await io.wait(req, detach=False)``: suspend until ``req`` finished
    #: (its completion processed), with the cancellation rules of the
    #: module docstring.  ``detach=True`` lets a cancellation through at
    #: once even while ``req`` runs (for a request that may never end, whose
    #: caller cleans up after it).  RuntimeError for a request whose
    #: completion already goes to a callback: another wait's (await a
    #: request once) or the ``callback=`` it was made with.  The loop
    #: kind's own coroutine function, bound once.
    wait: Callable[..., Coroutine[Any, Any, None]]
    #: The same, for the package's own awaits (``await io._wait(req)``):
    #: on asyncio, a generator-based coroutine, one frame less per request --
    #: an awaitable, but not a coroutine from Python 3.12 on (create_task()
    #: refuses it there), so not the public one.
    _wait: Callable[..., Awaitable[None]]

    def __init__(
        self, ctx: AioContext, kind: str, loop: weakref.ref[asyncio.AbstractEventLoop] | None = None
    ) -> None:
        self.ctx = ctx
        self.kind = kind  # "asyncio" or "trio"
        self._loop = loop
        #: The process's forks when it was made: in a forked child, the
        #: parent's loops are not running (see _process).
        self._forks = _forks
        if kind == "asyncio":
            self.wait = _asyncio_wait_coro
            self._wait = cast("Callable[..., Awaitable[None]]", _asyncio_wait)
        else:
            self.wait = _trio_wait_public
            self._wait = _trio_wait
        #: The fair yield's tick: ``next(io.tick)`` per inline answer of
        #: any of the loop's calls, true once every YIELD_EVERY (then the
        #: caller awaits :meth:`fair_yield`).  One tick for every path: a
        #: count of each kept apart let a task mixing them answer up to
        #: twice YIELD_EVERY in a row.  (A C call per answer.)
        self.tick: Iterator[bool] = itertools.cycle([False] * (YIELD_EVERY - 1) + [True])

    def is_current(self) -> bool:
        """True if the running event loop is this one."""
        if self.kind == "asyncio":
            loop = self._loop
            return loop is not None and asyncio.events._get_running_loop() is loop()
        try:
            return _trio_runvar is not None and _trio_runvar.get(None) is self
        except RuntimeError:  # not inside trio.run
            return False

    def check_current(self) -> None:
        """Raise RuntimeError unless called from this loop (before anything
        is submitted: a request's completion is delivered to its loop)."""
        if not self.is_current():
            raise RuntimeError(
                "this file belongs to another event loop (use it only in the one that opened it)"
            )

    async def wait_fd(self, fd: int, write: bool, waits: FdWaits | None = None) -> None:
        """Suspend until ``fd`` is readable (writable); cancellable at any
        time, with nothing consumed.  With ``waits``, ``waits.close()``
        ends the wait with ValueError and takes ``fd`` off the loop, so the
        descriptor can be closed under it."""
        if waits is not None and waits.closed:
            raise _closed_file()
        if self.kind == "asyncio":
            loop = asyncio.get_running_loop()
            fut: asyncio.Future[None] = loop.create_future()
            # uvloop (libuv's uv_poll) leaves a watched fd O_NONBLOCK: put
            # back the flags, which other users of the file may rely on.
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
            if write:
                loop.add_writer(fd, _set_done, fut)
            else:
                loop.add_reader(fd, _set_done, fut)
            watched = True

            def unwatch() -> None:
                # Once only: after waits.close() the number may be another
                # file's, with its own registration on this loop.
                nonlocal watched
                if watched:
                    watched = False
                    if write:
                        loop.remove_writer(fd)
                    else:
                        loop.remove_reader(fd)
                    if fcntl.fcntl(fd, fcntl.F_GETFL) != flags:
                        fcntl.fcntl(fd, fcntl.F_SETFL, flags)

            def abort() -> None:
                unwatch()
                if not fut.done():
                    fut.set_exception(_closed_file())

            if waits is not None:
                waits._aborts.add(abort)
            try:
                await fut
            finally:
                if waits is not None:
                    waits._aborts.discard(abort)
                unwatch()
        else:
            import trio

            scope = trio.CancelScope()
            if waits is not None:
                waits._aborts.add(scope.cancel)
            try:
                with scope:
                    if write:
                        await trio.lowlevel.wait_writable(fd)
                    else:
                        await trio.lowlevel.wait_readable(fd)
            except trio.ClosedResourceError:
                if waits is not None and waits.closed:
                    raise _closed_file() from None
                raise
            finally:
                if waits is not None:
                    waits._aborts.discard(scope.cancel)
            if scope.cancelled_caught:
                raise _closed_file()

    async def shielded(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Run ``fn()`` to its end even if the caller is cancelled meanwhile;
        then let the cancellation through."""
        if self.kind == "trio":
            import trio

            with trio.CancelScope(shield=True):
                result = await fn()
            await trio.lowlevel.checkpoint_if_cancelled()
            return result
        task = asyncio.ensure_future(fn())
        cancelled: BaseException | None = None
        anyio = sys.modules.get("anyio")
        with anyio.CancelScope(shield=True) if anyio is not None else _no_scope():
            while not task.done():
                try:
                    await asyncio.wait((task,))
                except asyncio.CancelledError as e:
                    cancelled = e  # a plain Task.cancel() arrives once: hold it
        result = task.result()
        if cancelled is not None:
            raise cancelled
        if anyio is not None:
            # An anyio scope's cancellation held back by the shield comes
            # through at the next checkpoint: here, not in the caller's code.
            await asyncio.sleep(0)
        return result

    async def fair_yield(self) -> None:
        """Called when :attr:`tick` says so: yields to the loop once."""
        if self.kind == "asyncio":
            await asyncio.sleep(0)
        else:
            import trio

            await trio.lowlevel.cancel_shielded_checkpoint()

    async def checkpoint(self) -> None:
        """trio's rule, that every async call can be cancelled: raise if the
        task is already cancelled.  (asyncio has no such rule.)"""
        if self.kind == "trio":
            import trio

            await trio.lowlevel.checkpoint_if_cancelled()


class StreamLock:
    """Makes one file's stream calls atomic with respect to each other.

    Uncontended, taking it is a flag test; contended, waiters queue FIFO and
    :meth:`release` hands the lock straight to the first (``busy`` stays
    set), so no task can overtake them.  A waiter cancelled after the
    hand-over passes the lock on.  Works on asyncio (and uvloop) and trio,
    and so under anyio on either."""

    __slots__ = ("_waiters", "busy", "trio")

    def __init__(self, kind: str) -> None:
        self.busy = False
        self.trio = kind == "trio"
        #: asyncio futures (a cancelled one is skipped) or trio tasks.
        self._waiters: collections.deque[Any] = collections.deque()

    async def acquire(self) -> None:
        if not self.busy:
            self.busy = True
        elif self.trio:
            await self._trio_wait()
        else:
            await self._asyncio_wait()

    async def _asyncio_wait(self) -> None:
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # it was handed to us: pass it on
            raise

    async def _trio_wait(self) -> None:
        import trio

        task = trio.lowlevel.current_task()
        self._waiters.append(task)

        def abort(raise_cancel: Callable[[], object]) -> trio.lowlevel.Abort:
            self._waiters.remove(task)  # still queued: reschedule() not yet called
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    def release(self) -> None:
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if self.trio:
                import trio

                trio.lowlevel.reschedule(waiter)
                return
            if not waiter.done():
                waiter.set_result(None)
                return
        self.busy = False


class FdWaits:
    """The readiness waits (:meth:`LoopIO.wait_fd`) of one file, so that
    closing the file ends them before the descriptor goes: each waiter gets
    ValueError, and on asyncio the loop no longer watches the number (which
    the next file opened may get).  (trio: the closer still calls
    ``notify_closing`` before it closes the descriptor.)"""

    __slots__ = ("_aborts", "closed")

    def __init__(self) -> None:
        self._aborts: set[Callable[[], None]] = set()
        #: Set by close(): later waits raise at once.
        self.closed = False

    def close(self) -> None:
        """End every wait now; call before the descriptor is closed."""
        self.closed = True
        for abort in list(self._aborts):
            abort()
        self._aborts.clear()


def _closed_file() -> ValueError:
    return ValueError("I/O operation on closed file.")


class _no_scope:
    def __enter__(self) -> None:
        pass

    def __exit__(self, *exc_info: object) -> None:
        pass


def _set_done(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


# -- asyncio ------------------------------------------------------------------------------

#: Each loop's LoopIO, held weakly: the loop holds it (its eventfd
#: reader's handle does), and it refers back to the loop (through a
#: completion's waiter), so a strong value here would keep the loop for ever.
_asyncio_io: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, weakref.ref[LoopIO]] = (
    weakref.WeakKeyDictionary()
)


def _process(io: LoopIO) -> None:
    # The eventfd reader callback: completions may step their tasks here
    # (see _Waiter).  (Marked inside the try: an interrupt as it is marked
    # must not leave it so.  The mark is this thread's, put back as it was
    # -- a nested call's must not unmark the outer one.  A forked child's
    # copy of the parent's loop is not marked: asyncio does not see it
    # running there, and a wait that begins in a step it runs takes the
    # mark for its loop -- see _asyncio_wait.)
    ref = io._loop
    reading = _reading
    outer = reading.loop  # (None, or this loop again in a nested call)
    try:
        reading.loop = ref() if ref is not None and io._forks == _forks else None
        io.ctx.on_readable()
    finally:
        reading.loop = outer


def _asyncio_current(loop: asyncio.AbstractEventLoop) -> LoopIO:
    held = _asyncio_io.get(loop)
    io = held() if held is not None else None
    if io is None:
        if _orphans:
            _sweep_orphans()
        ctx = _new_context()
        ref = weakref.ref(loop)
        io = LoopIO(ctx, "asyncio", ref)
        loop.add_reader(ctx.fileno(), _process, io)
        # One io_uring_enter per loop iteration for what its tasks submit.
        # The ring holds this scheduler for good: it must not hold the loop.
        ctx.hold_submissions(lambda flush: _call_soon(ref, flush))
        _asyncio_io[loop] = weakref.ref(io)
        # When the loop closes or goes, so do the eventfd and the ring.  (The
        # finalizer holds the context weakly: an unprocessed completion
        # refers back to the loop through its waiter's future.  A context
        # collected with its loop is released by its own finalizer.)
        weakref.finalize(loop, _release_ref, weakref.ref(ctx))
        _watch_close(loop, ctx)
    return io


def _call_soon(ref: weakref.ref[asyncio.AbstractEventLoop], fn: Callable[[], None]) -> None:
    loop = ref()
    if loop is not None and not loop.is_closed():
        loop.call_soon(fn)
    else:
        fn()  # no loop iteration to come: submit now


#: Contexts of closed loops that still had requests outstanding: kept (the
#: kernel may still write into a ring request's buffer) until a later loop
#: finds them finished.
_orphans: set[AioContext] = set()


def _release(ctx: AioContext) -> None:
    """The loop of ``ctx`` closed or was collected: close ``ctx`` now if
    nothing is outstanding, else keep it for a later sweep.  Any thread
    (a finalizer): it runs no completion callback."""
    if ctx.closed or ctx.stats().outstanding <= 0:
        _orphans.discard(ctx)
        ctx.close(timeout=0)
    else:
        _orphans.add(ctx)


def _release_ref(ref: weakref.ref[AioContext]) -> None:
    ctx = ref()
    if ctx is not None:
        _release(ctx)


def _sweep_orphans() -> None:
    for ctx in list(_orphans):
        ctx.process_completions()  # their waiters' loops are closed: see _waker
        _release(ctx)


def _watch_close(loop: asyncio.AbstractEventLoop, ctx: AioContext) -> None:
    """Release ``ctx`` as soon as ``loop`` closes (as asyncio.run does),
    where the loop lets us see that (uvloop's does not: there the loop's
    collection releases it)."""
    close = loop.close

    def close_and_release() -> None:
        # (The loop holds this, and so the context: no cycle through a root.)
        close()
        _release(ctx)

    with contextlib.suppress(AttributeError):
        loop.close = close_and_release  # type: ignore[method-assign]


def _wake(fut: asyncio.Future[None], loop: asyncio.AbstractEventLoop, req: AioRequest) -> None:
    # (Not `if not fut.done() and not loop.is_closed()`: two calls, where
    # set_result's own refusals say the same -- a future already done or
    # cancelled (InvalidStateError), or a closed loop (``loop``: the
    # future's), which refuses to schedule its callbacks (RuntimeError).)
    try:
        if asyncio.events._get_running_loop() is not loop:
            # Delivered by another thread's process_completions(): the
            # future is the loop's to complete.
            loop.call_soon_threadsafe(_wake, fut, loop, req)
            return
        fut.set_result(None)
    except asyncio.InvalidStateError:
        pass
    except RuntimeError:
        if not loop.is_closed():
            raise


def _waker(fut: asyncio.Future[None]) -> Callable[[AioRequest], None]:
    """A request's callback that wakes ``fut`` (a partial: no frame made)."""
    return _partial(_wake, fut, fut.get_loop())


def _task_lookup() -> Callable[[asyncio.AbstractEventLoop], object]:
    """``asyncio.current_task(loop)``, as cheap as it comes: the C tasks'
    own dict's ``get`` where this Python's tasks use that dict (3.11-3.13),
    else the function."""
    try:
        import _asyncio

        tasks: Any = getattr(_asyncio, "_current_tasks")  # noqa: B009 (not in typeshed)
    except (ImportError, AttributeError):
        return asyncio.current_task
    get: Callable[[asyncio.AbstractEventLoop], object] = tasks.get
    return get if getattr(asyncio.tasks, "_current_tasks", None) is tasks else asyncio.current_task


_current_task = _task_lookup()


class _Reading(threading.local):
    #: The asyncio loop whose eventfd reader callback (:func:`_process`)
    #: runs in this thread: where a completion may step its task at once
    #: (see _Waiter._complete), and so the running loop of a wait that
    #: begins there (see _asyncio_wait).  Per thread: the engine lets any
    #: thread's process_completions() deliver a completion, and only the
    #: loop's own thread may step its tasks.  (A forked child's is a new
    #: one: see _after_fork_in_child.)
    loop: asyncio.AbstractEventLoop | None = None


_reading = _Reading()

#: How many forks made this process (0 in the first): a LoopIO made before
#: the last one belongs to a loop asyncio does not see running here.
_forks = 0


def _after_fork_in_child() -> None:
    # A fork inside a step the reader ran leaves the forking thread's mark
    # set in the child, and its _process frame puts back the mark of the
    # object it read: a new object, with nothing marked, for the child's
    # waits and completions from now on.
    global _forks, _reading
    _forks += 1
    _reading = _Reading()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)

_PENDING = "PENDING"
_FINISHED = "FINISHED"
_CANCELLED = "CANCELLED"


class _Waiter:
    """What a task waiting for a request yields to asyncio (see
    :func:`_asyncio_wait`): a future of ours, done once the request's
    completion is processed, that follows asyncio's future protocol (what
    ``asyncio.Task`` and the asyncio functions look at; ``isfuture()`` is
    true of it).  Its result is None; the request holds the outcome.

    Why not an ``asyncio.Future``: its ``set_result`` schedules the task's
    wakeup through ``call_soon`` -- a Handle, and a pass of the loop, per
    request.  A completion processed by the loop's eventfd reader callback
    (:func:`_process`), with no task running, runs its task's step right
    there instead, in the task's context: asyncio's rule (one task steps at
    a time, never inside another) holds, and the step's submissions go to
    the kernel with the rest of the batch's.  Anywhere else -- a completion
    processed inside a running task (a close() or drain that processes
    synchronously), by another thread, with a second done-callback, or a
    cancellation -- the wakeups are scheduled, as a Future's are (from
    another thread, with ``call_soon_threadsafe``, which wakes the loop).

    A BaseException from a step run here (KeyboardInterrupt, SystemExit)
    propagates out of the engine's delivery, which leaves the rest of the
    batch deliverable and the eventfd readable (see the engine's module
    docstring): their wakeups come with the loop's next pass."""

    # (No __slots__: the class's defaults are a new waiter's state, so
    # that making one stores only its loop.)

    #: asyncio's future protocol: true while it is yielded to a task,
    #: cleared by the Task that takes it.  (True from the start: a waiter
    #: is made to be yielded at once.)
    _asyncio_future_blocking = True
    _loop: asyncio.AbstractEventLoop
    _state = _PENDING
    #: The first done-callback and its context (a task's wakeup: the only
    #: one, almost always); any more, in order, in ``_more``.  While it is
    #: pending, ``_cb`` is None only if there are none at all.
    _cb: Callable[[Any], object] | None = None
    _cbctx: contextvars.Context
    _more: list[tuple[Callable[[Any], object], contextvars.Context]] | None = None
    _cancel_message: Any = None

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def __repr__(self) -> str:
        return f"<threadlets request waiter {self._state.lower()}>"

    def _complete(self, req: AioRequest) -> None:
        """The request's callback: its completion was processed."""
        if self._state is not _PENDING:
            return  # cancelled before: its wakeup is scheduled
        self._state = _FINISHED
        # Delivered once: the wake is owed from here on.  A Ctrl-C before
        # the callbacks are taken (``_cb`` marked: see _schedule) schedules
        # them on its way out; once taken, they ran or are scheduled.
        try:
            cb = self._cb
            loop = self._loop
            if (
                cb is not None
                and _reading.loop is loop
                and self._more is None
                and _current_task(loop) is None
            ):
                # The task's wakeup is given a finished asyncio.Future, not
                # this waiter: the same answer (its result None), which
                # asyncio's C task reads without a call into Python (ours: a
                # frame).  A task does not look at which future woke it.
                self._cb = _taken
                self._cbctx.run(cb, _FINISHED_FUTURE)
            else:
                self._schedule()
        except BaseException:
            if self._cb is not _taken:
                self._schedule()
            raise

    def _schedule(self) -> None:
        """Schedule the done-callbacks, as a Future does (a closed loop
        refuses them: nothing is left to wake then).  (``_cb`` is never
        None again: see add_done_callback.  Taken after the look at the
        running loop, a C call: a Ctrl-C as it returns leaves them to take
        -- see _complete.)"""
        loop = self._loop
        try:
            # (Another thread's process_completions() may deliver it: then
            # the loop is woken, as call_soon would not.)
            call_soon = (
                loop.call_soon
                if asyncio.events._get_running_loop() is loop
                else loop.call_soon_threadsafe
            )
            cb, self._cb = self._cb, _taken
            more, self._more = self._more, None
            if cb is not None and cb is not _taken:
                call_soon(cb, self, context=self._cbctx)
            if more is not None:
                for fn, ctx in more:
                    call_soon(fn, self, context=ctx)
        except RuntimeError:
            if not loop.is_closed():
                raise

    # -- asyncio's future protocol ---------------------------------------------------

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def done(self) -> bool:
        return self._state is not _PENDING

    def cancelled(self) -> bool:
        return self._state is _CANCELLED

    def result(self) -> None:
        if self._state is _FINISHED:
            return
        if self._state is _CANCELLED:
            raise self._make_cancelled_error()
        raise asyncio.InvalidStateError("Result is not ready.")

    def exception(self) -> BaseException | None:
        state = self._state
        if state is _FINISHED:
            return None
        if state is _CANCELLED:
            raise self._make_cancelled_error()
        raise asyncio.InvalidStateError("Exception is not set.")

    def _make_cancelled_error(self) -> asyncio.CancelledError:
        msg = self._cancel_message
        return asyncio.CancelledError() if msg is None else asyncio.CancelledError(msg)

    def cancel(self, msg: Any = None) -> bool:
        """As a Future's: done now, its callbacks scheduled.  (The task
        that waits then decides, as it did with a Future: see
        _asyncio_wait.)"""
        if self._state is not _PENDING:
            return False
        self._state = _CANCELLED
        self._cancel_message = msg
        # Done from here on, its wake owed (the completion will not give it:
        # see _complete): a Ctrl-C before the callbacks are taken (at
        # _schedule's entry, or its look at the running loop) schedules
        # them on its way out, as in _complete.
        try:
            self._schedule()
        except BaseException:
            if self._cb is not _taken:
                self._schedule()
            raise
        return True

    def add_done_callback(
        self, fn: Callable[[Any], object], *, context: contextvars.Context | None = None
    ) -> None:
        if self._cb is None:
            # Pending, with no callback yet (a done waiter's ``_cb`` is never
            # None: _complete and _schedule mark it taken): the
            # task's wakeup, almost always, with its context.  (The context
            # first: a Ctrl-C as copy_context() returns leaves no callback
            # without one.)
            self._cbctx = context if context is not None else contextvars.copy_context()
            self._cb = fn
            return
        if context is None:
            context = contextvars.copy_context()
        if self._state is not _PENDING:
            try:
                self._loop.call_soon(fn, self, context=context)
            except RuntimeError:
                if not self._loop.is_closed():
                    raise
        elif self._more is None:
            self._more = [(fn, context)]
        else:
            self._more.append((fn, context))

    def remove_done_callback(self, fn: Callable[[Any], object]) -> int:
        if self._cb is None or self._state is not _PENDING:
            return 0  # (none, or done: a Future's are gone once scheduled)
        callbacks = [(self._cb, self._cbctx), *(self._more or ())]
        kept = [(f, c) for f, c in callbacks if f != fn]
        self._cb = self._more = None
        if kept:
            (self._cb, self._cbctx), *more = kept
            self._more = more or None
        return len(callbacks) - len(kept)

    def __await__(self) -> Generator[Any, None, None]:
        if self._state is _PENDING:
            self._asyncio_future_blocking = True
            yield self
        if self._state is _PENDING:
            raise RuntimeError("await wasn't used with future")
        self.result()

    __iter__ = __await__


def _taken(_: object) -> None:
    """A done waiter's ``_cb`` once its callbacks were scheduled (not None:
    see _Waiter.add_done_callback)."""


class _NoLoop:
    """The loop of :data:`_FINISHED_FUTURE`, which never schedules anything
    (it has no callbacks): a Future made with it holds no loop."""

    def get_debug(self) -> bool:
        return False


#: What a waiter's direct wake hands the task's wakeup (see
#: _Waiter._complete): finished, its result None.  One for all loops and
#: threads: nothing changes it (a Future's result() only reads it).
_FINISHED_FUTURE: asyncio.Future[None] = asyncio.Future(loop=cast(Any, _NoLoop()))
_FINISHED_FUTURE.set_result(None)

#: A new waiter, without its __init__ call (see _asyncio_wait).
_new_waiter = _partial(object.__new__, _Waiter)
_get_ident = threading.get_ident
_running_loop = asyncio.get_running_loop


@types.coroutine
def _asyncio_wait(req: AioRequest, detach: bool = False) -> Generator[Any, None, None]:
    # A generator-based coroutine: it yields the waiter to the task itself,
    # with no __await__ call or iterator between.  (_Waiter(loop), without
    # the __init__ call: keep the two in step.)  The waiter's loop is the
    # running loop: the one whose eventfd reader runs in this thread, if
    # any (a task stepped there by a completion, see _Waiter._complete:
    # asyncio runs no other loop inside it), else asyncio's own look --
    # which makes a getpid() system call each time.
    w: _Waiter = _new_waiter()
    w._loop = _reading.loop or _running_loop()
    req.callback = w._complete
    if req._processed:
        # Its completion was processed before this wait began (a request
        # made in an earlier step, or in another task: uvloop, say, runs
        # the eventfd's reader before a new task's first step), without
        # this callback: nothing would wake the task.  (Looked at after the
        # callback is stored: a completion processed in between runs it,
        # and that only finishes the waiter nobody waits on.)
        return
    try:
        yield w
    except asyncio.CancelledError:
        if req.cancel() is not CancelResult.CANCELED and not detach:
            # Running, or finished with its completion not yet processed:
            # wait it out, holding back further cancellations, then let the
            # caller see the one it got.
            yield from _asyncio_wait_out(w._loop, req).__await__()
        raise


def _check_unclaimed(req: AioRequest) -> None:
    """A public wait's refusal of a request whose completion already goes
    to a callback -- another wait's (a request has one callback: a second
    wait would take it, and the first would sleep for ever) or the one it
    was made with (never called then)."""
    if req.callback is not None and not req._processed:
        raise RuntimeError(
            "this request's completion already goes to a callback (another wait, or"
            " the callback= it was made with): await a request once, and only one"
            " made without callback="
        )


async def _asyncio_wait_coro(req: AioRequest, detach: bool = False) -> None:
    """LoopIO.wait on asyncio: _asyncio_wait, as a coroutine (for
    create_task() and TaskGroup, which take nothing else from Python 3.12
    on), for a request nothing else waits for (see _check_unclaimed; the
    package's own awaits, of requests they made, skip the look)."""
    _check_unclaimed(req)
    await _asyncio_wait(req, detach)


async def _asyncio_wait_out(loop: asyncio.AbstractEventLoop, req: AioRequest) -> None:
    anyio = sys.modules.get("anyio")
    if anyio is not None:
        # An anyio cancel scope re-delivers its cancellation on every loop
        # iteration until the task leaves it; a shielded scope holds it back.
        with anyio.CancelScope(shield=True):
            await _asyncio_wait_processed(loop, req)
    else:
        await _asyncio_wait_processed(loop, req)


async def _asyncio_wait_processed(loop: asyncio.AbstractEventLoop, req: AioRequest) -> None:
    while not req._processed:
        fut = loop.create_future()
        req.callback = _waker(fut)
        try:
            await fut
        except asyncio.CancelledError:
            continue  # a plain Task.cancel() arrives once per call: hold it


# -- trio ---------------------------------------------------------------------------------

_trio_runvar: Any = None


def _trio_current() -> LoopIO:
    import trio

    global _trio_runvar
    if _trio_runvar is None:
        _trio_runvar = trio.lowlevel.RunVar("threadlets_io")
    try:
        io: LoopIO = _trio_runvar.get()
        return io
    except LookupError:
        pass
    if _orphans:
        _sweep_orphans()
    ctx = _new_context()
    io = LoopIO(ctx, "trio")
    _trio_runvar.set(io)
    trio.lowlevel.spawn_system_task(_trio_pump, ctx, name="threadlets completions")
    return io


async def _trio_pump(ctx: AioContext) -> None:
    import trio

    try:
        while True:
            await trio.lowlevel.wait_readable(ctx.fileno())
            ctx.on_readable()
    finally:
        # The run is ending (its tasks are done: this system task is
        # cancelled last).  What finished is delivered; then the context
        # is released as a closed asyncio loop's is: closed now if nothing
        # is outstanding, else kept for a later run's sweep -- a request
        # a Ctrl-C cut off from its caller as it was submitted (an open,
        # whose callback closes what it opened) still finishes.
        try:
            ctx.process_completions()
        finally:
            _release(ctx)


async def _trio_wait(req: AioRequest, detach: bool = False) -> None:
    import trio

    task = trio.lowlevel.current_task()
    aborted = False
    here = _get_ident()

    def wake(r: AioRequest) -> None:
        if _get_ident() != here:
            # Delivered by another thread's process_completions(): the task
            # is the run's to reschedule, in its own thread.
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(wake, r)
            return
        if not aborted:
            trio.lowlevel.reschedule(task)

    def abort(raise_cancel: Callable[[], object]) -> trio.lowlevel.Abort:
        nonlocal aborted
        if req.cancel() is CancelResult.CANCELED or detach:
            aborted = True
            return trio.lowlevel.Abort.SUCCEEDED
        # Running (or finished, completion not yet processed): we will be
        # rescheduled by wake(); the cancellation comes after, below.
        return trio.lowlevel.Abort.FAILED

    token = trio.lowlevel.current_trio_token()
    req.callback = wake
    if req._processed:
        # Processed before this wait began, without ``wake`` (see
        # _asyncio_wait): nothing would reschedule the task.  Still a
        # checkpoint, as every wait is.  (Processed by another thread in
        # between, ``wake`` may yet come, sent here: it finds the wait over.)
        aborted = True
        await trio.lowlevel.checkpoint()
        return
    await trio.lowlevel.wait_task_rescheduled(abort)
    await trio.lowlevel.checkpoint_if_cancelled()


async def _trio_wait_public(req: AioRequest, detach: bool = False) -> None:
    """LoopIO.wait on trio: _trio_wait, for a request nothing else waits
    for (see _check_unclaimed; the package's own awaits, of requests they
    made -- some with a callback of their own -- skip the look)."""
    _check_unclaimed(req)
    await _trio_wait(req, detach)


# -- which loop is this ---------------------------------------------------------------------


def current() -> LoopIO:
    """The engine of the running event loop (asyncio, uvloop, trio, or anyio
    on either).  Raises RuntimeError outside one."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        return _asyncio_current(loop)
    trio = sys.modules.get("trio")
    if trio is not None:
        try:
            trio.lowlevel.current_task()
        except RuntimeError:
            pass
        else:
            return _trio_current()
    raise RuntimeError("threadlets async I/O needs a running asyncio or trio event loop")
