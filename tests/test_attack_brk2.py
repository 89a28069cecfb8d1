"""Attacks on the front ends' speed changes (the direct wake, pread's cached
path, posix's ring path): each test pins a defect found, or a promise no
other test pinned."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

import threadlets
import threadlets.awaitable as aw
from threadlets.engine import AioRequest

from .conftest import HAVE_RING

try:
    import uvloop

    HAVE_UVLOOP = True
except ImportError:  # pragma: no cover
    HAVE_UVLOOP = False


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Callable[[Callable[[], Coroutine[Any, Any, Any]]], Any]:
    """Run a coroutine function on a fresh loop of the kind."""
    if request.param == "uvloop" and not HAVE_UVLOOP:
        pytest.skip("uvloop is not installed")
    factory: Callable[[], asyncio.AbstractEventLoop] = (
        uvloop.new_event_loop if request.param == "uvloop" else asyncio.new_event_loop
    )

    def go(main: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
        # (Not asyncio.Runner, whose close waits for every task: a task
        # never woken would hang the test instead of failing it.)
        loop = factory()
        try:
            return loop.run_until_complete(main())
        finally:
            loop.close()

    return go


@pytest.fixture(params=["threads", "io_uring"])
def backend(request: pytest.FixtureRequest) -> Iterator[str]:
    """New loops' engine backend, with no inline path: every request waits."""
    if request.param == "io_uring" and not HAVE_RING:
        pytest.skip("no io_uring here")
    aw.configure(inline=False, backend=request.param)
    try:
        yield request.param
    finally:
        aw.configure()


@pytest.mark.parametrize("cancelled", [False, True])
def test_a_completion_delivered_by_another_thread_never_steps_the_task_there(
    run: Any, backend: str, cancelled: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """The engine lets any thread's process_completions() deliver a
    request (whichever call gets to it first).  While the loop's own
    thread is inside its eventfd reader (between two steps, no task
    running), another thread delivers the completion a task waits for:
    the task must still run in its loop's thread, woken through the loop
    (it was stepped right there, in the other thread, alongside the
    loop's).  Also in debug mode (asyncio's thread checks), and for a
    task cancelled while the request ran (waiting it out)."""
    caplog.set_level(logging.ERROR)

    async def main() -> None:
        asyncio.get_running_loop().set_debug(True)
        io = aw.current()
        loop_thread = threading.get_ident()
        in_reader = threading.Event()
        other_done = threading.Event()

        def hold(r: AioRequest) -> None:
            # In the loop thread's reader, no task running: let the other
            # thread deliver the waiter's completion now.
            in_reader.set()
            assert other_done.wait(5)

        release = threading.Event()
        req = io.ctx.call(lambda: release.wait(10))
        seen: list[int] = []

        async def waiter() -> None:
            try:
                await io.wait(req)
            finally:
                seen.append(threading.get_ident())

        t = asyncio.ensure_future(waiter())
        await asyncio.sleep(0)  # it waits
        if cancelled:
            t.cancel()
            await asyncio.sleep(0)  # it waits the request out
        io.ctx.call(lambda: None, callback=hold)

        def other() -> None:
            try:
                assert in_reader.wait(10)
                release.set()
                while not req._processed:
                    io.ctx.process_completions()
            finally:
                other_done.set()

        th = threading.Thread(target=other)
        th.start()
        try:
            await asyncio.wait([t], timeout=5)
        finally:
            other_done.set()
            th.join()
        assert t.done()
        assert t.cancelled() is cancelled
        assert req._processed
        assert seen == [loop_thread]

    run(main)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


class _Ambiguous:
    def __bool__(self) -> bool:
        raise ValueError("the truth value is ambiguous")


class _ArrayLike:
    """Compares as numpy's arrays do: with an answer that refuses bool()."""

    def __eq__(self, other: object) -> Any:
        return _Ambiguous()

    def __ne__(self, other: object) -> Any:
        return _Ambiguous()

    __hash__ = object.__hash__


def test_a_count_that_compares_oddly_is_refused_as_with_inline_off(
    tmp_path: Path, backend: str
) -> None:
    """pread's inline reader compared the count with its buffer's length
    before looking at the count's type: a numpy array (whose == answers
    with an array, refused by bool()) raised ValueError instead of the
    request's (and os.pread's) TypeError."""
    path = tmp_path / "f"
    path.write_bytes(bytes(range(256)) * 64)

    def answers(inline: bool) -> list[object]:
        aw.configure(inline=inline, backend=backend)
        out: list[object] = []

        async def main() -> None:
            async with threadlets.open(path, "rb") as f:
                for _ in range(2):  # (the first: no scratch buffer yet)
                    for n in (_ArrayLike(), 4):
                        try:
                            out.append(await f.pread(n, 0))  # type: ignore[arg-type]
                        except Exception as e:
                            out.append(type(e))

        try:
            asyncio.run(main())
        finally:
            aw.configure()
        return out

    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(TypeError):
            os.pread(fd, _ArrayLike(), 0)  # type: ignore[arg-type]
    finally:
        os.close(fd)
    assert answers(True) == answers(False) == [TypeError, bytes(range(4))] * 2
