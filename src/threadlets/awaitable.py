"""Awaiting engine requests from asyncio (and uvloop), trio, and anyio.

This module owns the glue between an event loop and the paio engine: one
:class:`~threadlets.engine.AioContext` per event loop (asyncio) or per
``trio.run`` (trio), whose eventfd the loop watches, and
:meth:`LoopIO.wait`, which suspends a task until its request finished.
anyio needs nothing of its own: on either backend its tasks are asyncio or
trio tasks, and its cancel scopes cancel them the same way.

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

Fairness: a request that finishes inline (cached data) returns without
suspending.  Every :data:`YIELD_EVERY` such completions on a loop, the task
that makes the next one yields to the loop once, so a task doing only
cached I/O cannot starve the others.
"""

from __future__ import annotations

import asyncio
import sys
import weakref
from collections.abc import Callable
from typing import Any

from threadlets.engine import BACKENDS, AioContext, AioRequest
from threadlets.pool import CancelResult, ThreadletQueue

__all__ = ["YIELD_EVERY", "LoopIO", "configure", "current"]

#: Inline completions on one loop between two forced yields: often enough
#: that other tasks run every few hundred microseconds, rarely enough that
#: the yield (a trip through the loop) costs little per read.
YIELD_EVERY = 256


_settings: dict[str, Any] = {"queue": None, "inline": True, "backend": "auto"}


def configure(
    *, queue: ThreadletQueue | None = None, inline: bool = True, backend: str = "auto"
) -> None:
    """Choose the threadlet queue (default: the global default queue),
    whether the inline fast path is used, and the engine backend ("auto":
    io_uring where it can be set up, else threads; see
    :class:`~threadlets.AioContext`), for the event loops that start doing
    I/O from now on.  Loops already doing I/O keep theirs."""
    if queue is not None and not isinstance(queue, ThreadletQueue):
        raise TypeError(f"queue must be a ThreadletQueue or None, not {type(queue).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    _settings["queue"] = queue
    _settings["inline"] = bool(inline)
    _settings["backend"] = backend


def _new_context() -> AioContext:
    return AioContext(_settings["queue"], inline=_settings["inline"], backend=_settings["backend"])


class LoopIO:
    """The engine as one event loop sees it.  Made by :func:`current`."""

    __slots__ = ("__weakref__", "ctx", "inline_run", "kind")

    def __init__(self, ctx: AioContext, kind: str) -> None:
        self.ctx = ctx
        self.kind = kind  # "asyncio" or "trio"
        #: Inline completions since this loop last yielded for fairness.
        self.inline_run = 0

    async def wait(self, req: AioRequest) -> None:
        """Suspend until ``req`` finished (its completion processed), with
        the cancellation rules of the module docstring."""
        if self.kind == "asyncio":
            await _asyncio_wait(req)
        else:
            await _trio_wait(req)

    async def fair_yield(self) -> None:
        """Called after an inline completion: yields once in a while."""
        self.inline_run = 0
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


# -- asyncio ------------------------------------------------------------------------------

_asyncio_io: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopIO] = (
    weakref.WeakKeyDictionary()
)


def _asyncio_current(loop: asyncio.AbstractEventLoop) -> LoopIO:
    io = _asyncio_io.get(loop)
    if io is None:
        ctx = _new_context()
        loop.add_reader(ctx.fileno(), ctx.process_completions)
        # One io_uring_enter per loop iteration for what its tasks submit.
        ctx.hold_submissions(loop.call_soon)
        io = _asyncio_io[loop] = LoopIO(ctx, "asyncio")
    return io


def _waker(fut: asyncio.Future[None]) -> Callable[[AioRequest], None]:
    def wake(req: AioRequest) -> None:
        if not fut.done():
            fut.set_result(None)

    return wake


async def _asyncio_wait(req: AioRequest) -> None:
    loop = asyncio.get_running_loop()
    fut = loop.create_future()
    req.callback = _waker(fut)
    try:
        await fut
    except asyncio.CancelledError:
        if req.cancel() is not CancelResult.CANCELED:
            # Running, or finished with its completion not yet processed:
            # wait it out, holding back further cancellations, then let the
            # caller see the one it got.
            await _asyncio_wait_out(loop, req)
        raise


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
            ctx.process_completions()
    finally:
        # The run is ending.  Requests still running finish in their
        # workers; the eventfd goes when the context is collected.
        ctx.process_completions()


async def _trio_wait(req: AioRequest) -> None:
    import trio

    task = trio.lowlevel.current_task()
    aborted = False

    def wake(r: AioRequest) -> None:
        if not aborted:
            trio.lowlevel.reschedule(task)

    def abort(raise_cancel: Callable[[], object]) -> trio.lowlevel.Abort:
        nonlocal aborted
        if req.cancel() is CancelResult.CANCELED:
            aborted = True
            return trio.lowlevel.Abort.SUCCEEDED
        # Running (or finished, completion not yet processed): we will be
        # rescheduled by wake(); the cancellation comes after, below.
        return trio.lowlevel.Abort.FAILED

    req.callback = wake
    await trio.lowlevel.wait_task_rescheduled(abort)
    await trio.lowlevel.checkpoint_if_cancelled()


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
