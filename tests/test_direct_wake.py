"""The asyncio front end's wake (issue 13): a request's completion processed
by the loop's eventfd reader steps its task right there, with no Future,
Handle or loop pass per request -- and only where asyncio allows it.  Each
test runs on asyncio and uvloop, on both engine backends."""

from __future__ import annotations

import asyncio
import contextvars
import errno
import gc
import inspect
import logging
import os
import sys
import threading
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

import threadlets
import threadlets.awaitable as aw
from threadlets import ThreadletQueue
from threadlets.engine import AioRequest

from .conftest import HAVE_RING, Gate

try:
    import uvloop

    HAVE_UVLOOP = True
except ImportError:  # pragma: no cover
    HAVE_UVLOOP = False

DATA = bytes(range(256)) * 64


@pytest.fixture(params=["asyncio", "uvloop"])
def new_loop(request: pytest.FixtureRequest) -> Callable[[], asyncio.AbstractEventLoop]:
    """The loop kind's factory."""
    if request.param == "uvloop" and not HAVE_UVLOOP:
        pytest.skip("uvloop is not installed")
    factory: Callable[[], asyncio.AbstractEventLoop] = (
        uvloop.new_event_loop if request.param == "uvloop" else asyncio.new_event_loop
    )
    return factory


@pytest.fixture
def run(
    new_loop: Callable[[], asyncio.AbstractEventLoop],
) -> Callable[[Callable[[], Coroutine[Any, Any, Any]]], Any]:
    """Run a coroutine function on a fresh loop of the kind."""

    def go(main: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
        with asyncio.Runner(loop_factory=new_loop) as runner:
            return runner.run(main())

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


@pytest.fixture
def data(tmp_path: Path) -> Path:
    p = tmp_path / "data"
    p.write_bytes(DATA)
    return p


@pytest.fixture
def no_errors(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Nothing logged at ERROR (a completion callback raising, asyncio's
    'exception in callback')."""
    caplog.set_level(logging.ERROR)
    yield
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


def _in_reader() -> bool:
    """Whether this code runs inside the eventfd reader callback."""
    f = sys._getframe(1)
    while f is not None:
        if f.f_code is aw._process.__code__:
            return True
        f = f.f_back  # type: ignore[assignment]
    return False


def test_a_completion_steps_its_task_inside_the_reader(
    run: Any, backend: str, data: Path, no_errors: None
) -> None:
    """Every wait ends with the task stepped by the reader callback itself
    (no Handle of its own), as the task, with the right data, in the
    task's context."""
    var: contextvars.ContextVar[int] = contextvars.ContextVar("var")
    seen: list[bool] = []

    async def main() -> None:
        async with threadlets.open(data, "rb") as f:

            async def reader(i: int) -> None:
                var.set(i)
                me = asyncio.current_task()
                buf = bytearray(256)
                for k in range(20):
                    off = ((i * 20 + k) % 64) * 256
                    assert await f.preadinto(buf, off) == 256
                    seen.append(_in_reader())
                    assert asyncio.current_task() is me
                    assert var.get() == i
                    assert buf == DATA[off : off + 256]

            await asyncio.gather(*(reader(i) for i in range(8)))

    run(main)
    assert len(seen) == 160
    assert all(seen)


def test_a_completion_processed_inside_a_running_task_is_scheduled(
    run: Any, backend: str, no_errors: None
) -> None:
    """Task A, itself stepped by the reader, processes completions
    synchronously (drain) while B waits: B's completion is delivered inside
    A's step, where asyncio forbids stepping B.  B is woken later, by the
    loop, and finishes."""
    gate = Gate(7)
    order: list[str] = []

    async def main() -> None:
        io = aw.current()
        b_req = io.ctx.call(gate)

        async def b() -> None:
            await io.wait(b_req)
            order.append("b")
            assert not _in_reader() or asyncio.current_task() is not None
            assert b_req.result() == 7

        tb = asyncio.ensure_future(b())
        await asyncio.sleep(0)  # B waits
        assert gate.started.wait(10)
        a_req = io.ctx.call(lambda: None)
        await io.wait(a_req)
        assert _in_reader()  # A was stepped by the reader ...
        gate.release.set()
        assert io.ctx.drain(10)  # ... and delivers B's completion in its step
        assert b_req._processed
        order.append("a")
        await asyncio.wait_for(tb, 10)

    run(main)
    assert order == ["a", "b"]


def test_cancelled_between_its_scheduled_wake_and_the_wake(
    run: Any, backend: str, no_errors: None
) -> None:
    """B's completion is delivered inside A's step (its wake scheduled);
    A then cancels B before that wake runs: B sees one CancelledError,
    after its request finished, as with a Future that was done."""
    gate = Gate(8)

    async def main() -> None:
        io = aw.current()
        b_req = io.ctx.call(gate)
        steps: list[str] = []

        async def b() -> None:
            try:
                await io.wait(b_req)
            except asyncio.CancelledError:
                steps.append("cancelled")
                raise
            steps.append("woken")

        tb = asyncio.ensure_future(b())
        await asyncio.sleep(0)
        assert gate.started.wait(10)
        gate.release.set()
        assert io.ctx.drain(10)  # B's completion, inside this task's step
        assert b_req._processed
        assert tb.cancel()
        with pytest.raises(asyncio.CancelledError):
            await tb
        assert steps == ["cancelled"]
        assert b_req.result() == 8

    run(main)


def test_ctrl_c_in_a_step_run_by_the_reader_loses_no_wakeup(
    new_loop: Callable[[], asyncio.AbstractEventLoop], backend: str, no_errors: None
) -> None:
    """Two completions in one batch; the first one's task raises
    KeyboardInterrupt in the step the reader runs: it comes out of
    run_until_complete, and the next run wakes the second task, once, with
    its result."""
    a_gate, gate = Gate("a"), Gate("b")
    loop = new_loop()
    try:
        io = loop.run_until_complete(_current())
        a_req = io.ctx.call(a_gate)
        b_req = io.ctx.call(gate)

        async def a() -> None:
            await io.wait(a_req)
            raise KeyboardInterrupt

        async def b() -> str:
            await io.wait(b_req)
            return str(b_req.result())

        ta = loop.create_task(a())
        tb = loop.create_task(b())
        loop.run_until_complete(asyncio.sleep(0))
        # Both finish before the loop looks again: one batch, a's first.
        a_gate.release.set()
        assert a_req.wait(10)
        gate.release.set()
        assert b_req.wait(10)
        with pytest.raises(KeyboardInterrupt):
            loop.run_until_complete(asyncio.sleep(10))
        assert loop.run_until_complete(asyncio.wait_for(tb, 10)) == "b"
        with pytest.raises(KeyboardInterrupt):
            ta.result()
    finally:
        loop.close()


async def _current() -> aw.LoopIO:
    return aw.current()


# -- cancellation: the guarantee of awaitable's docstring ---------------------------------


@pytest.fixture
def gated() -> Iterator[Gate]:
    """New loops get a one-worker queue held by a gate: what they submit
    stays QUEUED until it opens."""
    q = ThreadletQueue(max_threads=1)
    gate = Gate()
    q.submit(gate)
    assert gate.started.wait(10)
    aw.configure(queue=q, inline=False, backend="threads")
    try:
        yield gate
    finally:
        aw.configure()
        gate.release.set()
        q.close(timeout=10)


def test_cancel_while_queued_is_at_once_and_touches_nothing(
    run: Any, gated: Gate, data: Path, no_errors: None
) -> None:
    async def main() -> None:
        f = threadlets.wrap(os.open(data, os.O_RDONLY))  # (the open would wait for the gate)
        try:
            buf = bytearray(b"-" * 100)
            task = asyncio.ensure_future(f.preadinto(buf, 0))
            await asyncio.sleep(0)
            (req,) = f._outstanding
            assert req.error == errno.EINPROGRESS
            task.cancel("why")
            with pytest.raises(asyncio.CancelledError, match="why"):
                await task
            assert req.error == errno.ECANCELED
            gated.release.set()
            assert await f.pread(3, 0) == DATA[:3]
            assert buf == b"-" * 100
        finally:
            await f.close()

    run(main)


def test_cancel_while_running_waits_the_request_out(run: Any, backend: str) -> None:
    """Cancelled (three times) while its request runs: the task keeps
    waiting until the request finished, then sees one CancelledError; the
    cancellations all count."""
    gate = Gate(1)

    async def main() -> None:
        io = aw.current()
        req = io.ctx.call(gate)
        task = asyncio.ensure_future(io.wait(req))
        await asyncio.sleep(0)
        assert gate.started.wait(10)
        for _ in range(3):
            task.cancel()
            for _ in range(5):
                await asyncio.sleep(0)
            assert not task.done()
            assert not req._processed
        gate.release.set()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(asyncio.shield(task), 10)
        assert task.cancelled()
        assert req._processed
        assert req.result() == 1
        assert task.cancelling() == 3

    run(main)


def test_timeout_wait_for_taskgroup_and_gather(run: Any, gated: Gate, no_errors: None) -> None:
    """asyncio's own cancellers, on a QUEUED request (cancelled, at once)
    and on a RUNNING one (waited out), behave as with a Future."""

    async def main() -> None:
        io = aw.current()
        # QUEUED: the request is taken back.
        req = io.ctx.call(lambda: 1)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0):
                await io.wait(req)
        assert req.error == errno.ECANCELED  # ECANCELED
        reqs: list[AioRequest] = []

        async def call() -> None:
            reqs.append(io.ctx.call(lambda: 1))
            await io.wait(reqs[-1])

        t = asyncio.ensure_future(asyncio.wait_for(call(), 10))
        while not reqs:
            await asyncio.sleep(0)
        t.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t
        assert reqs[-1].error == errno.ECANCELED

        async def boom() -> None:
            await asyncio.sleep(0)
            raise ValueError("boom")

        req = io.ctx.call(lambda: 1)

        async def group() -> None:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(io.wait(req))
                tg.create_task(boom())

        with pytest.raises(ExceptionGroup) as info:
            await group()
        assert info.group_contains(ValueError)  # type: ignore[attr-defined]
        assert req.error == errno.ECANCELED
        reqs = [io.ctx.call(lambda: 1) for _ in range(3)]
        g = asyncio.gather(*(io.wait(r) for r in reqs))
        await asyncio.sleep(0)
        g.cancel()
        with pytest.raises(asyncio.CancelledError):
            await g
        assert all(r.error == errno.ECANCELED for r in reqs)

        # RUNNING: the wait ends when the request did.
        running = Gate(2)
        req = io.ctx.call(running)
        gated.release.set()
        assert running.started.wait(10)

        async def open_gate() -> None:
            for _ in range(5):
                await asyncio.sleep(0)
            assert not req._processed
            running.release.set()

        opener = asyncio.ensure_future(open_gate())
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0):
                await io.wait(req)
        assert req._processed
        assert req.result() == 2
        await opener

        # wait_for's timeout on a RUNNING request: its task waits it out.
        # (From Python 3.12 on, wait_for runs the coroutine in the caller's
        # task, which may already count a cancellation request: 3.11-3.12's
        # TaskGroup leaves one on its parent when a child fails after the
        # body ended.  So wait for one more than the task had.)
        running = Gate(4)
        req = io.ctx.call(running)
        assert running.started.wait(10)
        inner: list[asyncio.Task[Any]] = []
        before: list[int] = []

        async def wait_running() -> None:
            inner.append(asyncio.current_task())  # type: ignore[arg-type]
            before.append(inner[0].cancelling())
            await io.wait(req)

        async def open_when_cancelled() -> None:
            while not inner or inner[0].cancelling() <= before[0]:
                await asyncio.sleep(0)
            for _ in range(5):
                await asyncio.sleep(0)
            assert not req._processed
            assert not inner[0].done()
            running.release.set()

        opener = asyncio.ensure_future(open_when_cancelled())
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(wait_running(), 0.01)
        assert req._processed
        assert req.result() == 4
        await opener

    run(main)


def test_anyio_cancel_scope_waits_a_running_request_out(run: Any, backend: str) -> None:
    gate = Gate(3)

    async def main() -> None:
        io = aw.current()
        req = io.ctx.call(gate)
        assert gate.started.wait(10)  # RUNNING

        async def open_gate() -> None:
            for _ in range(5):
                await asyncio.sleep(0)
            assert not req._processed
            gate.release.set()

        opener = asyncio.ensure_future(open_gate())
        with anyio.move_on_after(0) as scope:
            await io.wait(req)
        assert scope.cancelled_caught
        assert req._processed
        assert req.result() == 3
        await opener

    run(main)


def test_errors_reach_the_task(run: Any, backend: str, data: Path, no_errors: None) -> None:
    async def main() -> None:
        async with threadlets.open(data, "wb") as f:
            with pytest.raises(OSError) as info:
                await f.preadinto(bytearray(10), 0)
            assert info.value.errno == errno.EBADF  # as os.preadv
        io = aw.current()

        def fail() -> None:
            raise LookupError("x")

        req = io.ctx.call(fail)
        await io.wait(req)
        with pytest.raises(LookupError):
            req.result()

    run(main)


@pytest.mark.parametrize("wait", ["wait", "_wait"])
def test_a_wait_begun_after_the_completion_was_processed_returns(
    run: Any, backend: str, wait: str, no_errors: None
) -> None:
    """A request made in one step and waited for in a later one (another
    task's, say), its completion processed in between: the wait returns at
    once.  (It set its callback on a request already processed and slept
    for good -- the hang uvloop showed now and then, as its loop runs the
    eventfd's reader before a new task's first step.)"""

    async def main() -> None:
        io = aw.current()
        for value in range(3):
            req = io.ctx.call(lambda value=value: value)
            while not req._processed:
                await asyncio.sleep(0)
            async with asyncio.timeout(10):
                await getattr(io, wait)(req)
            assert req.result() == value

    run(main)


@pytest.mark.parametrize("backend_kind", ["threads", "io_uring"])
def test_a_trio_wait_begun_after_the_completion_was_processed_returns(backend_kind: str) -> None:
    """The same on trio, whose wait is still a checkpoint."""
    if backend_kind == "io_uring" and not HAVE_RING:
        pytest.skip("no io_uring here")
    trio = pytest.importorskip("trio")
    aw.configure(inline=False, backend=backend_kind)

    async def main() -> None:
        io = aw.current()
        for value in range(3):
            req = io.ctx.call(lambda value=value: value)
            while not req._processed:
                await trio.sleep(0)
            with trio.fail_after(10):
                await io.wait(req)
            assert req.result() == value
            with trio.CancelScope() as scope:
                scope.cancel()
                req = io.ctx.call(lambda: -1)
                while not req._processed:
                    await trio.lowlevel.cancel_shielded_checkpoint()
                await io.wait(req)  # (a checkpoint: the cancellation lands)
                pytest.fail("not a checkpoint")
            assert req.result() == -1

    try:
        trio.run(main)
    finally:
        aw.configure()


def test_the_public_wait_is_a_coroutine(run: Any, backend: str, no_errors: None) -> None:
    """``LoopIO.wait`` (public) returns a coroutine, which create_task() and
    TaskGroup take on every Python (from 3.12 on they refuse the package's
    generator-based ``_wait``, which it uses for its own awaits only); both
    end with the request processed."""

    async def main() -> None:
        io = aw.current()
        req = io.ctx.call(lambda: 7)
        w = io.wait(req)
        assert asyncio.iscoroutine(w)
        assert inspect.iscoroutine(w)
        await asyncio.create_task(w)
        assert req._processed
        assert req.result() == 7
        req = io.ctx.call(lambda: 8)
        async with asyncio.TaskGroup() as tg:
            tg.create_task(io.wait(req))
        assert req._processed
        assert req.result() == 8
        req = io.ctx.call(lambda: 9)
        await io._wait(req)  # (the package's own)
        assert req._processed
        assert req.result() == 9

    run(main)


def test_a_closed_loop_with_a_waiter_outstanding(gated: Gate, data: Path, no_errors: None) -> None:
    """A loop closed while a task waits: its request finishes later, and
    the next loop's sweep delivers it without error; nothing hangs."""
    loop = asyncio.new_event_loop()
    holder: list[AioRequest] = []

    async def waiting() -> None:
        io = aw.current()
        req = io.ctx.call(lambda: 5)
        holder.append(req)
        await io.wait(req)

    task = loop.create_task(waiting())
    loop.run_until_complete(asyncio.sleep(0))
    assert not task.done()
    loop.close()
    gated.release.set()
    assert holder[0].wait(10)

    async def again() -> bytes:
        async with threadlets.open(data, "rb") as f:
            return await f.pread(4, 0)

    assert asyncio.run(again()) == DATA[:4]
    assert holder[0]._processed
    del task
    gc.collect()


# -- the future protocol -------------------------------------------------------------------


def test_the_waiter_follows_the_future_protocol(run: Any) -> None:
    """What asyncio's functions do with a future, done with a waiter."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        w = aw._Waiter(loop)
        assert asyncio.isfuture(w)
        assert not w.done()
        assert not w.cancelled()
        assert w.get_loop() is loop
        with pytest.raises(asyncio.InvalidStateError):
            w.result()
        calls: list[str] = []
        w.add_done_callback(lambda _: calls.append("one"))
        two = lambda _: calls.append("two")  # noqa: E731
        w.add_done_callback(two)
        w.add_done_callback(lambda _: calls.append("three"))
        assert w.remove_done_callback(two) == 1
        w._complete(None)  # type: ignore[arg-type]  (outside the reader: scheduled)
        assert w.done()
        assert calls == []
        w._complete(None)  # type: ignore[arg-type]  (once only)
        await asyncio.sleep(0)
        assert calls == ["one", "three"]
        assert w.result() is None
        assert w.exception() is None
        assert not w.cancel()
        await w
        done, _ = await asyncio.wait([w])  # type: ignore[list-item]
        assert done == {w}
        w.add_done_callback(lambda _: calls.append("late"))
        await asyncio.sleep(0)
        assert calls[-1] == "late"

        c = aw._Waiter(loop)
        fut = asyncio.ensure_future(c)  # type: ignore[arg-type]
        assert fut is c
        g = asyncio.gather(c)  # type: ignore[arg-type]
        assert c.cancel("m")
        assert c.cancelled()
        assert not c.cancel()
        with pytest.raises(asyncio.CancelledError, match="m"):
            c.result()
        with pytest.raises(asyncio.CancelledError):
            await g
        c._complete(None)  # type: ignore[arg-type]  (cancelled first: nothing)
        assert c.cancelled()

    run(main)


def test_no_loop_thread_steps_a_task_of_another_loop(backend: str, no_errors: None) -> None:
    """A loop's reader running in one thread does not make another
    thread's completions step their tasks (the mark is per loop)."""
    results: list[object] = []
    started = threading.Barrier(2)

    def worker() -> None:
        async def main() -> None:
            io = aw.current()
            started.wait(10)
            for _ in range(50):
                req = io.ctx.call(lambda: 1)
                await io.wait(req)
                results.append(req.result())

        asyncio.run(main())

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == [1] * 100
