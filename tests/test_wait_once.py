"""LoopIO.wait refuses a request whose completion already goes to a
callback (twelfth session, found by h-brk5): a second task's wait took the
request's one callback and the first task slept for ever; a request made
with callback= lost it to the wait.  Both backends, asyncio, uvloop, trio."""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Callable
from typing import Any

import pytest

from threadlets import AioContext
from threadlets import awaitable as aw


def _gated(ctx: AioContext, callback: Any = None, value: int = 7) -> tuple[Any, threading.Event]:
    """A request that runs until ``gate`` is set -- or 5 s have passed: a
    safety net only, so that the code this guards against fails these
    tests instead of hanging them (a wait that takes another's callback
    would otherwise wait for a gate set after it)."""
    gate = threading.Event()
    timer = threading.Timer(5, gate.set)
    timer.daemon = True
    timer.start()
    return ctx.call(lambda: gate.wait(10) and value, callback=callback), gate


def _runners() -> list[str]:
    out = ["asyncio"]
    try:
        import uvloop  # noqa: F401

        out.append("uvloop")
    except ImportError:
        pass
    return out


def _run(kind: str, main: Callable[[], Any]) -> Any:
    if kind == "uvloop":
        import uvloop

        return uvloop.run(main())
    return asyncio.run(main())


@pytest.mark.parametrize("kind", _runners())
def test_a_second_wait_on_a_request_is_refused_and_the_first_is_woken(
    kind: str, backend: str
) -> None:
    async def main() -> int:
        io = aw.current()
        req, gate = _gated(io.ctx)
        first = asyncio.ensure_future(io.wait(req))
        await asyncio.sleep(0)  # (the first wait holds the callback)
        with pytest.raises(RuntimeError, match="already goes to a callback"):
            await io.wait(req)
        gate.set()
        await asyncio.wait_for(first, 10)
        await io.wait(req)  # (processed: at once)
        return int(req.result())

    aw.configure(backend=backend)
    try:
        assert _run(kind, main) == 7
    finally:
        aw.configure()


@pytest.mark.parametrize("kind", _runners())
def test_a_request_made_with_a_callback_is_not_taken_by_a_wait(kind: str, backend: str) -> None:
    async def main() -> list[Any]:
        io = aw.current()
        called: list[Any] = []
        done = asyncio.Event()

        def cb(r: Any) -> None:
            called.append(r.result())
            done.set()

        req, gate = _gated(io.ctx, cb, 5)
        with pytest.raises(RuntimeError, match="already goes to a callback"):
            await io.wait(req)
        gate.set()
        await asyncio.wait_for(done.wait(), 10)
        return called

    aw.configure(backend=backend)
    try:
        assert _run(kind, main) == [5]
    finally:
        aw.configure()


def test_trio_refuses_a_second_wait_too(backend: str) -> None:
    pytest.importorskip("trio")
    import trio
    import trio.testing

    async def main() -> int:
        io = aw.current()
        req, gate = _gated(io.ctx)
        async with trio.open_nursery() as nursery:
            # (detach: on the code this guards against, the failure below
            # cancels this wait, which must not wait out the request then.)
            nursery.start_soon(functools.partial(io.wait, req, detach=True))
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(RuntimeError, match="already goes to a callback"):
                await io.wait(req)
            gate.set()
        return int(req.result())

    aw.configure(backend=backend)
    try:
        assert trio.run(main) == 7
    finally:
        aw.configure()
