"""The ground of :mod:`threadlets.aiofiles`: running a blocking call as one
request on threadlets' engine, and the base classes of its file objects.

Every blocking call here is ``ctx.call(fn)`` on the running loop's
:class:`~threadlets.AioContext` (asyncio or trio alike), awaited with
:meth:`~threadlets.awaitable.LoopIO.wait`'s cancellation rule: a call
cancelled while queued never runs; one cancelled while running is waited
out, then the cancellation is seen.  Passing ``executor=`` (as aiofiles
allows) runs the call on that executor instead, on asyncio.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Coroutine, Generator
from types import TracebackType
from typing import Any, Generic, ParamSpec, TypeVar

from threadlets.awaitable import current

__all__ = [
    "AiofilesContextManager",
    "AsyncBase",
    "AsyncIndirectBase",
    "close_it",
    "run_blocking",
    "wrap",
]

T = TypeVar("T")
P = ParamSpec("P")


async def run_blocking(
    fn: Callable[[], T],
    executor: Any = None,
    undo: Callable[[T], object] | None = None,
    *,
    shield: bool = False,
) -> T:
    """Run ``fn()`` on a worker as one engine request and return its result
    (or raise what it raised).  ``undo``: what releases a result nobody will
    get -- a call cancelled while it ran, that succeeded (an open's file is
    closed, as a cancelled ``threadlets.open`` closes its descriptor).
    ``shield``: ``fn`` runs to its end even if the caller is cancelled
    (before or meanwhile), then the cancellation comes through -- a close,
    as ``threadlets.open``'s files close: a file left open by a cancelled
    close would be closed (its buffer written) only when collected."""
    if shield:
        return await current().shielded(lambda: run_blocking(fn, executor, undo))
    if executor is not None:
        return await _run_in(executor, fn, undo)
    io_ = current()
    await io_.checkpoint()
    req = io_.ctx.call(fn)
    try:
        await io_.wait(req)
    except BaseException:
        if undo is not None and req.outcome()[0] == 0:
            made: Any = req.result()
            undo(made)
        raise
    result: Any = req.result()
    return result  # type: ignore[no-any-return]


async def _run_in(executor: Any, fn: Callable[[], T], undo: Callable[[T], object] | None) -> T:
    """``loop.run_in_executor(executor, fn)`` (which is ``wrap_future(
    executor.submit(fn))``), keeping hold of the executor's future: a call
    cancelled before it started never runs; one cancelled while it ran (or
    whose result had not reached the loop yet) gets ``undo`` on its result
    when it finishes, in the executor's thread -- nobody else will ever see
    that result (an opened file would otherwise be left to the garbage
    collector: a ResourceWarning, and an fd open until then)."""
    loop = asyncio.get_running_loop()
    cf = executor.submit(fn)
    try:
        return await asyncio.wrap_future(cf, loop=loop)
    except BaseException:
        if undo is not None and not cf.cancel():
            release = undo

            def done(f: Any) -> None:
                if not f.cancelled() and f.exception() is None:
                    release(f.result())

            cf.add_done_callback(done)
        raise


def close_it(f: Any) -> None:
    """``undo`` for an opener: close what it made."""
    f.close()


def wrap(
    func: Callable[P, T], undo: Callable[[T], object] | None = None
) -> Callable[P, Coroutine[Any, Any, T]]:
    """``func`` as a coroutine function that runs it on a worker; it also
    takes aiofiles' ``loop=`` (ignored) and ``executor=`` keywords (not in
    its type: ``func``'s own parameters are).  ``undo``: see
    :func:`run_blocking` (what releases a result a cancelled call made)."""

    @functools.wraps(func)
    async def run(*args: Any, loop: Any = None, executor: Any = None, **kwargs: Any) -> T:
        return await run_blocking(functools.partial(func, *args, **kwargs), executor, undo)

    return run


class AsyncBase:
    """An async face over a Python file object ``_file``: each blocking
    method is one request that calls the file object's method on a worker."""

    def __init__(self, file: Any, loop: Any = None, executor: Any = None) -> None:
        self._file = file
        self._executor = executor
        self._ref_loop = loop

    @property
    def _loop(self) -> Any:
        return self._ref_loop or asyncio.get_running_loop()

    async def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        method = getattr(self._file, name)
        return await run_blocking(functools.partial(method, *args, **kwargs), self._executor)

    async def _close(self, name: str = "close") -> None:
        """The file object's ``close`` (or ``name``), run to its end even if
        the caller is cancelled (see :func:`run_blocking`)."""
        await run_blocking(getattr(self._file, name), self._executor, shield=True)

    def __aiter__(self) -> Any:
        """We are our own iterator."""
        return self

    async def __anext__(self) -> Any:
        """Lines, as iterating over the file object gives them."""
        line = await self._call("readline")
        if line:
            return line
        raise StopAsyncIteration

    def __repr__(self) -> str:
        return super().__repr__() + " wrapping " + repr(self._file)


class AsyncIndirectBase(AsyncBase):
    """An AsyncBase whose file object is looked up anew on every call
    (``sys.stdout`` may be replaced, by pytest's capture for one)."""

    def __init__(self, name: str, loop: Any, executor: Any, indirect: Callable[[], Any]) -> None:
        self._indirect = indirect
        self._name = name
        super().__init__(None, loop, executor)

    @property
    def _file(self) -> Any:
        return self._indirect()

    @_file.setter
    def _file(self, v: Any) -> None:
        pass  # discard writes


_T_co = TypeVar("_T_co", covariant=True)


class AiofilesContextManager(Awaitable[_T_co], Generic[_T_co]):
    """What ``open`` returns: await it for the file, or ``async with`` it
    (the file is closed -- its ``__exit__`` runs on a worker -- on the way
    out)."""

    __slots__ = ("_coro", "_obj")

    def __init__(self, coro: Coroutine[Any, Any, _T_co]) -> None:
        self._coro = coro
        self._obj: Any = None

    def __await__(self) -> Generator[Any, None, _T_co]:
        if self._obj is None:
            self._obj = yield from self._coro.__await__()
        return self._obj  # type: ignore[no-any-return]

    async def __aenter__(self) -> _T_co:
        return await self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        obj = self._obj
        # (Shielded: leaving a cancelled scope still closes the file, as
        # ``threadlets.open``'s do; on trio the call was refused at once.)
        await run_blocking(
            functools.partial(obj._file.__exit__, exc_type, exc_val, exc_tb),
            getattr(obj, "_executor", None),
            shield=True,
        )
        self._obj = None
