"""h-brk5's attack on the session's later changes (the waiter's wake and
its Ctrl-C rules, the direct wake's shared Future, the ring's skipped
ready queue, posix's quick completion, the fair yield).  Each test here
failed on the code before its fix."""

from __future__ import annotations

import asyncio
import sys
import types
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import threadlets.awaitable as aw

from .conftest import HAVE_RING, Gate

try:
    import uvloop

    HAVE_UVLOOP = True
except ImportError:  # pragma: no cover
    HAVE_UVLOOP = False


@pytest.fixture(params=["asyncio", "uvloop"])
def new_loop(request: pytest.FixtureRequest) -> Callable[[], asyncio.AbstractEventLoop]:
    if request.param == "uvloop" and not HAVE_UVLOOP:
        pytest.skip("uvloop is not installed")
    factory: Callable[[], asyncio.AbstractEventLoop] = (
        uvloop.new_event_loop if request.param == "uvloop" else asyncio.new_event_loop
    )
    return factory


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


async def _current() -> aw.LoopIO:
    return aw.current()


def _interrupt_in(codes: set[types.CodeType], n: int) -> list[int]:
    """Raise KeyboardInterrupt once, at the n-th entry of a function of
    ``codes`` or C return in its frames (where CPython raises a pending
    SIGINT)."""
    seen = [0]

    def prof(frame: types.FrameType, event: str, arg: object) -> None:
        if event in ("call", "c_return") and frame.f_code in codes:
            seen[0] += 1
            if seen[0] == n:
                sys.setprofile(None)
                raise KeyboardInterrupt

    sys.setprofile(prof)
    return seen


# -- Ctrl-C in a waiter's cancel ----------------------------------------------------------------


def test_ctrl_c_in_the_waiters_cancel_loses_no_wakeup(
    new_loop: Callable[[], asyncio.AbstractEventLoop], backend: str
) -> None:
    """task.cancel() of a task waiting on a running request, with a Ctrl-C
    at each entry and C return of the waiter's cancel (its _schedule's
    included): the waiter is cancelled once its state is stored, and the
    completion then wakes nothing (its wake is the cancel's) -- so the
    cancel's wake must be scheduled even when the Ctrl-C comes before the
    callbacks were taken.  The task ends: cancelled (the request waited
    out), or, with the Ctrl-C before the cancel did anything, with its
    result.  (It slept for ever: a cancel could not end it either.)"""
    codes = {aw._Waiter.cancel.__code__, aw._Waiter._schedule.__code__}
    n = 0
    while True:
        n += 1
        assert n < 30, "never ran to its end"
        loop = new_loop()
        try:
            io = loop.run_until_complete(_current())
            gate = Gate(n)
            req = io.ctx.call(gate)

            async def waits(io: aw.LoopIO = io, req: Any = req) -> int:
                await io.wait(req)
                return int(req.result())

            task = loop.create_task(waits())
            loop.run_until_complete(asyncio.sleep(0))
            assert gate.started.wait(10)
            seen = _interrupt_in(codes, n)
            try:
                task.cancel()
            except KeyboardInterrupt:
                pass
            finally:
                sys.setprofile(None)
            gate.release.set()
            loop.run_until_complete(asyncio.wait([task], timeout=10))
            assert task.done(), f"Ctrl-C {n} in cancel: the task was never woken"
            assert task.cancelled() or task.result() == n, n
            assert req._processed, n
        finally:
            loop.close()
        if seen[0] < n:
            break  # the interrupt no longer lands: every point was tried
    assert n > 2


# -- the fair yield of the stream's calls -------------------------------------------------------


@pytest.fixture(params=["threads", "io_uring"])
def inline_backend(request: pytest.FixtureRequest) -> Iterator[str]:
    """New loops' engine backend, with the inline path (cached reads)."""
    if request.param == "io_uring" and not HAVE_RING:
        pytest.skip("no io_uring here")
    aw.configure(backend=request.param)
    try:
        yield request.param
    finally:
        aw.configure()


LINES = 8 * aw.YIELD_EVERY


@pytest.mark.parametrize("how", ["readline", "read8", "aiter", "text_readline"])
def test_a_task_reading_the_stream_lets_others_run_every_yield_every_calls(
    new_loop: Callable[[], asyncio.AbstractEventLoop],
    inline_backend: str,
    tmp_path: Any,
    how: str,
) -> None:
    """A task reading a cached file line by line (or a few bytes at a
    time) through the stream: most calls are answered from the read-ahead,
    without suspending, and a fill counts on the loop's tick once for a
    whole CHUNK -- so the task answered every line of this file (and 4M
    lines of an 8 MiB one, 12 s) without letting another task run.  Each
    stream call counts on the tick: another task runs at least once every
    YIELD_EVERY calls."""
    import threadlets

    p = tmp_path / "lines"
    p.write_bytes(b"x\n" * LINES)

    async def main() -> int:
        f = await threadlets.open(p, "r" if how == "text_readline" else "rb")
        ran = [0]
        stop = False

        async def other() -> None:
            while not stop:
                ran[0] += 1
                await asyncio.sleep(0)

        t = asyncio.ensure_future(other())
        await asyncio.sleep(0)
        worst = run = calls = 0
        last = ran[0]
        try:
            if how == "aiter":
                async for _ in f:
                    calls += 1
                    run = run + 1 if ran[0] == last else 0
                    last = ran[0]
                    worst = max(worst, run)
            else:
                while True:
                    got = await (f.read(8) if how == "read8" else f.readline())
                    if not got:
                        break
                    calls += 1
                    run = run + 1 if ran[0] == last else 0
                    last = ran[0]
                    worst = max(worst, run)
        finally:
            stop = True
            await t
            await f.close()
        assert calls >= LINES // 4
        return worst

    with asyncio.Runner(loop_factory=new_loop) as runner:
        worst = runner.run(main())
    assert worst <= aw.YIELD_EVERY, f"{worst} calls in a row without another task running"
