"""The completion side of an asyncio wait (issue 13), from the request's
delivery to its task's resumption:

* a wait that begins in a task stepped by the loop's eventfd reader takes
  its loop from the reader's mark, without asyncio's look at the running
  loop (a getpid() system call each time on Python 3.11) -- and is exact
  elsewhere: the first step of a task, another thread's loop, a forked
  child (where nothing is marked, for good);
* the direct wake hands the task's wakeup a finished asyncio.Future, which
  the task reads without calling into the waiter, on a C task or a Python
  one;
* the waiter's first done-callback is stored without a look at its state:
  a done waiter's ``_cb`` is never None, so a callback added late is
  scheduled, never kept for a wake that already happened.

Each test runs on asyncio and uvloop, on both engine backends, where it
concerns them."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import types
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

import threadlets
import threadlets.awaitable as aw

from .conftest import HAVE_RING

try:
    import uvloop

    HAVE_UVLOOP = True
except ImportError:  # pragma: no cover
    HAVE_UVLOOP = False

DATA = bytes(range(256)) * 64


@pytest.fixture(params=["asyncio", "uvloop"])
def new_loop(request: pytest.FixtureRequest) -> Callable[[], asyncio.AbstractEventLoop]:
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


def _in_reader() -> bool:
    f: types.FrameType | None = sys._getframe(1)
    while f is not None:
        if f.f_code is aw._process.__code__:
            return True
        f = f.f_back
    return False


@pytest.fixture
def looks(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Every call of asyncio's look at the running loop by a wait: whether
    it was made inside the reader."""
    calls: list[bool] = []
    real = aw._running_loop

    def counted() -> asyncio.AbstractEventLoop:
        calls.append(_in_reader())
        return real()

    monkeypatch.setattr(aw, "_running_loop", counted)
    return calls


@pytest.fixture
def waiters(monkeypatch: pytest.MonkeyPatch) -> list[tuple[aw._Waiter, bool]]:
    """Every waiter a wait made, and whether it was made inside the reader."""
    made: list[tuple[aw._Waiter, bool]] = []
    real = aw._new_waiter

    def new() -> aw._Waiter:
        w: aw._Waiter = real()
        made.append((w, _in_reader()))
        return w

    monkeypatch.setattr(aw, "_new_waiter", new)
    return made


# -- the waiter's loop --------------------------------------------------------------------------


def test_a_wait_begun_in_the_reader_does_not_ask_asyncio_for_the_loop(
    run: Any, backend: str, data: Path, looks: list[bool], waiters: list[tuple[aw._Waiter, bool]]
) -> None:
    """8 tasks x 20 reads: every wait but a task's first begins in a step the
    reader ran, and takes the reader's loop -- the running one -- without
    asyncio's look (old code: one look, and one getpid(), per wait)."""
    loops: list[asyncio.AbstractEventLoop] = []

    async def main() -> None:
        loops.append(asyncio.get_running_loop())
        async with threadlets.open(data, "rb") as f:

            async def reader(i: int) -> None:
                buf = bytearray(256)
                for k in range(20):
                    off = ((i * 20 + k) % 64) * 256
                    assert await f.preadinto(buf, off) == 256
                    assert buf == DATA[off : off + 256]

            await asyncio.gather(*(reader(i) for i in range(8)))

    run(main)
    in_reader = [w for w, inside in waiters if inside]
    assert len(in_reader) >= 150, len(in_reader)
    assert all(w._loop is loops[0] for w, _ in waiters)
    assert True not in looks  # none inside the reader ...
    assert len(looks) == len(waiters) - len(in_reader)  # ... and every one outside


def test_each_threads_loop_is_its_waits_loop(
    backend: str, looks: list[bool], waiters: list[tuple[aw._Waiter, bool]]
) -> None:
    """Two loops in two threads, each stepping its tasks in its own reader
    at the same time: every waiter has its own thread's loop (the mark is
    per thread)."""
    started = threading.Barrier(2)
    mine: dict[int, asyncio.AbstractEventLoop] = {}
    seen: list[tuple[int, aw._Waiter]] = []

    def worker() -> None:
        async def main() -> None:
            mine[threading.get_ident()] = asyncio.get_running_loop()
            io = aw.current()
            started.wait(10)

            async def one() -> None:
                for _ in range(30):
                    req = io.ctx.call(lambda: 1)
                    await io.wait(req)
                    assert req.result() == 1
                    seen.append((threading.get_ident(), asyncio.current_task()._fut_waiter))  # type: ignore[union-attr]

            await asyncio.gather(one(), one(), one())

        asyncio.run(main())

    spy_real = aw._new_waiter
    made_in: list[tuple[int, aw._Waiter]] = []

    def spy() -> aw._Waiter:
        w = spy_real()
        made_in.append((threading.get_ident(), w))
        return w

    aw._new_waiter = spy
    try:
        threads = [threading.Thread(target=worker) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    finally:
        aw._new_waiter = spy_real
    assert len(mine) == 2
    assert len(made_in) >= 180
    assert all(w._loop is mine[ident] for ident, w in made_in)
    assert sum(inside for _, inside in waiters) >= 150  # (most were made in a reader)


def _marks(io: Any) -> list[object]:
    """What _process marks for ``io`` (a stand-in: its loop and forks)."""
    seen: list[object] = []
    stand_in = types.SimpleNamespace(
        _loop=io._loop,
        _forks=io._forks,
        ctx=types.SimpleNamespace(on_readable=lambda: seen.append(aw._reading.loop)),
    )
    aw._process(stand_in)  # type: ignore[arg-type]
    return seen


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_a_child_forked_in_a_step_the_reader_ran_marks_nothing_of_the_parent(
    backend: str, data: Path
) -> None:
    """A fork inside a task step the reader ran (the mark set): in the child
    nothing is marked, and the parent's loop never is (asyncio does not see
    it running there), so a wait there asks asyncio, which refuses
    (RuntimeError), as before the mark gave the loop.  A loop the child
    runs itself is marked, and its waits are stepped in its reader."""

    async def child_reads() -> list[bool]:
        woken: list[bool] = []
        async with threadlets.open(data, "rb") as f:

            async def reader(i: int) -> None:
                buf = bytearray(256)
                for k in range(5):
                    assert await f.preadinto(buf, (i + k) * 256) == 256
                    woken.append(_in_reader())

            await asyncio.gather(*(reader(i) for i in range(4)))
        assert _marks(aw.current()) == [asyncio.get_running_loop()]
        return woken

    async def main() -> int:
        async with threadlets.open(data, "rb") as f:
            buf = bytearray(256)
            assert await f.preadinto(buf, 0) == 256
            assert await f.preadinto(buf, 256) == 256
            assert _in_reader()
            io = aw.current()
            assert _marks(io) == [asyncio.get_running_loop()]
            pid = os.fork()
            if pid == 0:  # pragma: no cover (the child)
                code = 9
                try:
                    req = types.SimpleNamespace(_processed=False, callback=None)
                    marked = aw._reading.loop
                    try:
                        aw._asyncio_wait(req).send(None)  # type: ignore[arg-type]
                    except RuntimeError:
                        refused = True
                    else:
                        refused = False
                    parents = _marks(io)
                    woken = asyncio.run(child_reads())
                    code = 0
                    code |= 1 if marked is not None else 0
                    code |= 2 if not refused else 0
                    code |= 4 if parents != [None] else 0
                    code |= 8 if len(woken) != 20 or not all(woken) else 0
                finally:
                    os._exit(code)
            return pid

    pid = asyncio.run(main())
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


# -- the wake -----------------------------------------------------------------------------------


class _PyTaskLoop(asyncio.SelectorEventLoop):
    """A loop whose tasks are asyncio's pure-Python Task."""

    def __init__(self) -> None:
        super().__init__()
        self.set_task_factory(
            lambda loop, coro, **kw: asyncio.tasks._PyTask(coro, loop=loop, **kw)  # type: ignore[attr-defined]
        )


@pytest.mark.parametrize("task_kind", ["c", "python"])
def test_the_direct_wake_does_not_call_the_waiter(
    backend: str, data: Path, monkeypatch: pytest.MonkeyPatch, task_kind: str
) -> None:
    """Stepped in the reader, a task is woken without a call to the waiter's
    result() (old code: one per wait), on asyncio's C task and its Python
    one, with the right data and the right context."""
    results: list[bool] = []
    real = aw._Waiter.result

    def result(self: aw._Waiter) -> None:
        results.append(_in_reader())
        real(self)

    monkeypatch.setattr(aw._Waiter, "result", result)
    woken: list[bool] = []

    async def main() -> None:
        if task_kind == "python":
            assert type(asyncio.current_task()) is asyncio.tasks._PyTask  # type: ignore[attr-defined]
        async with threadlets.open(data, "rb") as f:

            async def reader(i: int) -> None:
                buf = bytearray(256)
                for k in range(20):
                    off = ((i * 20 + k) % 64) * 256
                    assert await f.preadinto(buf, off) == 256
                    woken.append(_in_reader())
                    assert buf == DATA[off : off + 256]

            await asyncio.gather(*(reader(i) for i in range(4)))

    factory = _PyTaskLoop if task_kind == "python" else asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        if task_kind == "python":
            # (The runner's main task is made before the factory is seen.)
            runner.get_loop()
        runner.run(main())
    assert len(woken) == 80
    assert all(woken)
    assert True not in results


def test_the_finished_future_stays_finished() -> None:
    """The shared future every direct wake hands out: done, result None, no
    callbacks, no exception -- for every loop and thread."""
    fut = aw._FINISHED_FUTURE
    assert type(fut) is asyncio.Future
    assert fut.done()
    assert not fut.cancelled()
    assert fut.result() is None
    assert fut.exception() is None
    assert not fut.cancel()


# -- the done-callbacks -------------------------------------------------------------------------


def test_a_callback_added_once_done_is_scheduled(run: Any) -> None:
    """Done -- with no callback, by the direct wake, or cancelled -- a waiter
    schedules a callback added then, and remove_done_callback finds none
    (as a Future's, whose callbacks go once scheduled); ``_cb`` is never
    None once done.  (A ``_cb`` put back to None would take the late
    callback as the first of a pending waiter: never called.)"""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        calls: list[str] = []

        # Done with none: _schedule marks the slot taken.
        a = aw._Waiter(loop)
        a._complete(None)  # type: ignore[arg-type]
        assert a.done()
        assert a._cb is not None
        assert a.remove_done_callback(calls.append) == 0
        a.add_done_callback(lambda _: calls.append("a"))
        await asyncio.sleep(0)
        assert calls == ["a"]

        # Done by the direct wake (in the reader, no task running): _cb left.
        b = aw._Waiter(loop)
        first: list[object] = []
        b.add_done_callback(first.append)
        outer = aw._reading.loop
        aw._reading.loop = loop
        try:
            loop.call_soon(b._complete, None)  # (no task runs in a Handle)
            await asyncio.sleep(0)
        finally:
            aw._reading.loop = outer
        assert first == [aw._FINISHED_FUTURE]
        assert b.done()
        assert b._cb is not None
        assert b.remove_done_callback(first.append) == 0
        b.add_done_callback(lambda _: calls.append("b"))
        await asyncio.sleep(0)
        assert calls == ["a", "b"]
        assert first == [aw._FINISHED_FUTURE]  # (run once)

        # Cancelled with one: scheduled once, then a late one.
        c = aw._Waiter(loop)
        c.add_done_callback(lambda _: calls.append("c1"))
        assert c.cancel()
        assert c._cb is not None
        c.add_done_callback(lambda _: calls.append("c2"))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert calls == ["a", "b", "c1", "c2"]

        # Pending: the first stored with its context (or a copy), then more.
        d = aw._Waiter(loop)
        d.add_done_callback(lambda _: calls.append("d1"))
        assert d._cbctx is not None
        d.add_done_callback(lambda _: calls.append("d2"))
        d._complete(None)  # type: ignore[arg-type]  (outside the reader: scheduled)
        await asyncio.sleep(0)
        assert calls[-2:] == ["d1", "d2"]

    run(main)


# -- process_completions with nothing ready -----------------------------------------------------


def _ring_ctx() -> threadlets.AioContext:
    ctx = threadlets.AioContext(backend="io_uring", inline=False)
    assert ctx._ring is not None
    assert ctx._ring.owner_mode
    return ctx


@pytest.mark.skipif(not HAVE_RING, reason="no io_uring here")
def test_nothing_ready_and_nothing_signalled_skips_the_queue(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A ring context's process_completions() with only ring completions
    (delivered by the reap) does not go through the ready queue's
    process(), which would find nothing and take the lock twice; with a
    worker's completion ready, it does."""
    p = tmp_path / "f"
    p.write_bytes(DATA)
    fd = os.open(p, os.O_RDONLY)
    ctx = _ring_ctx()
    try:
        for k in range(4):  # (until the file is the ring's own)
            assert ctx.read(fd, k * 256, bytearray(256)).result(timeout=10) == 256
        assert ctx.drain(timeout=10)  # (delivered: the ready queue empty)
        assert ctx._files[fd] in ctx._ring_plain
        calls: list[int] = []
        real = type(ctx._cq).process

        def process(self: Any, clear: bool = True) -> int:
            n = real(self, clear)
            calls.append(n)
            return n

        monkeypatch.setattr(type(ctx._cq), "process", process)
        got: list[object] = []
        req = ctx.read(fd, 0, bytearray(256), callback=got.append)
        while not got:
            ctx.poll(10)
        assert got == [req]
        assert calls == []
        call = ctx.call(lambda: 5, callback=got.append)
        while len(got) < 2:
            ctx.poll(10)
        assert got[1] is call
        assert 1 in calls
    finally:
        ctx.close(timeout=10)
        os.close(fd)


@pytest.mark.skipif(not HAVE_RING, reason="no io_uring here")
def test_a_signal_left_with_nothing_ready_is_reset(tmp_path: Path) -> None:
    """Signalled with nothing ready (a resignal for sleepers, say), then
    processed: ``signalled`` is reset, so the next worker completion writes
    the eventfd again -- a loop sleeping on fileno() is woken.  (Kept set,
    the worker would take the signal as sent, and the loop slept on.)"""
    import select

    ctx = _ring_ctx()
    try:
        ctx._cq.resignal()
        assert ctx.process_completions() == 0
        assert not ctx._cq.signalled
        req = ctx.call(lambda: 7)
        r, _, _ = select.select([ctx.fileno()], [], [], 5)
        assert r == [ctx.fileno()], "the worker's completion did not wake the loop"
        assert ctx.on_readable() == 1
        assert req.result() == 7
    finally:
        ctx.close(timeout=10)


# -- Ctrl-C in the wake -------------------------------------------------------------------------


def _interrupt_in(code: types.CodeType, n: int) -> list[int]:
    """Raise KeyboardInterrupt once, as the n-th C call made by ``code``'s
    frames returns (where CPython 3.11 raises a pending SIGINT)."""
    seen = [0]

    def prof(frame: types.FrameType, event: str, arg: object) -> None:
        if event == "c_return" and frame.f_code is code:
            seen[0] += 1
            if seen[0] == n:
                sys.setprofile(None)
                raise KeyboardInterrupt

    sys.setprofile(prof)
    return seen


def test_ctrl_c_in_the_wake_loses_no_wakeup(
    new_loop: Callable[[], asyncio.AbstractEventLoop], backend: str
) -> None:
    """A Ctrl-C at each C return of the waiter's wake, run by the reader
    (the request is delivered then, never again): it comes out of the
    loop's run, and the task is still woken, once, with its result -- by
    the step the wake ran, or one it scheduled."""
    from .conftest import Gate

    n = 0
    while True:
        n += 1
        assert n < 20, "never ran to its end"
        loop = new_loop()
        try:
            io = loop.run_until_complete(_current())
            gate = Gate(n)
            req = io.ctx.call(gate)
            woken: list[int] = []

            async def waits(io: aw.LoopIO = io, req: Any = req, woken: list[int] = woken) -> int:
                await io.wait(req)
                woken.append(1)
                return int(req.result())

            task = loop.create_task(waits())
            loop.run_until_complete(asyncio.sleep(0))
            gate.release.set()
            assert req.wait(10)
            seen = _interrupt_in(aw._Waiter._complete.__code__, n)
            try:
                loop.run_until_complete(asyncio.sleep(0.5))
            except KeyboardInterrupt:
                pass
            finally:
                sys.setprofile(None)
            assert req._processed, n
            loop.run_until_complete(asyncio.wait([task], timeout=5))
            assert task.done(), f"C return {n}: the task was never woken"
            assert task.result() == n, n
            assert woken == [1], n
        finally:
            loop.close()
        if seen[0] < n:
            break  # the interrupt no longer lands: every point was tried
    assert n > 1, "no C call in the wake"


async def _current() -> aw.LoopIO:
    return aw.current()
