"""Issue 13, the layers under threadlets.posix: a quick submission's
done-callback is a ``_ContainedCallback`` (pool.py), which the engine's
``AioRequest._finished`` runs without the ``_finishing`` bookkeeping and
without ``_run_callbacks`` (posix's ``_quick_finished``), and the pool's
``_finish`` drops its claim through the bound ``_unclaimed``.  The
promises: every callback of a request runs once (a contained one beside
others takes the long way), the request is delivered once with Ctrl-C at
every C return of the new branch, a completion that runs foreign code (an
fsync's notification) still counts as the thread's own, and the bytecodes
per completion went down (a deterministic count)."""

from __future__ import annotations

import collections
import errno
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

import threadlets.posix as px
from threadlets import AioContext, ThreadletQueue
from threadlets.engine import AioRequest, _finishing
from threadlets.pool import _ContainedCallback

from .conftest import interrupt_at_c_return, wait_until

DATA = bytes((i * 11 + 5) % 251 + 1 for i in range(8192))


@pytest.fixture
def fd(tmp_path: Path) -> Iterator[int]:
    p = tmp_path / "data"
    p.write_bytes(DATA)
    fd = os.open(p, os.O_RDWR)
    yield fd
    os.close(fd)


def _quiet(ctx: AioContext) -> bool:
    return ctx.stats().outstanding == 0


def _done(rt: px.PosixAio, cb: px.aiocb) -> tuple[int, int]:
    rt.aio_suspend([cb], 10)
    return rt.aio_error(cb), rt.aio_return(cb)


def test_a_contained_callback_beside_another_runs_with_it(fd: int) -> None:
    """A request whose contained callback is not its only one (posix's
    _rewatch adds a second after an interrupt) takes the long way: both
    run once, and while they run the request counts as this thread's."""
    queue = ThreadletQueue(max_threads=1)
    gate = threading.Event()
    ctx = AioContext(queue, deliver=False, inline=False)
    try:
        assert ctx.read(fd, 0, bytearray(8)).wait(10)  # (the fd looked up)
        queue.submit(gate.wait, 10)  # holds the only worker: cancel finishes here
        ran: list[tuple[str, bool]] = []

        def record(tag: str, req: AioRequest) -> None:
            ran.append((tag, req in _finishing.requests))

        taken: list[AioRequest] = []
        view = memoryview(bytearray(16))
        req = ctx._read_checked(fd, 0, view, _ContainedCallback(record, "contained"), taken)
        assert req._callbacks is not None  # (taken)
        req.add_done_callback(lambda r: record("other", r))
        req.cancel()
        assert ran == [("contained", True), ("other", True)]
        assert _quiet(ctx)
    finally:
        gate.set()
        ctx.close(timeout=10)
        queue.close(timeout=10)


def test_ctrl_c_at_every_c_return_of_a_contained_completion_delivers_once(fd: int) -> None:
    """The engine's branch for a lone contained callback, run in the
    caller's thread (a queued request cancelled): Ctrl-C at each C return
    of threadlets in cancel().  The callback runs once, without the
    request among this thread's (nothing of the user's runs there), and
    the request is delivered once: the context is quiet and closes."""
    n = 0
    while True:
        n += 1
        assert n < 200, "cancel() never ran to its end"
        queue = ThreadletQueue(max_threads=1)
        gate = threading.Event()
        ctx = AioContext(queue, deliver=False, inline=False)
        try:
            assert ctx.read(fd, 0, bytearray(8)).wait(10)  # (the fd looked up)
            queue.submit(gate.wait, 10)
            ran: list[bool] = []

            def record(tag: str, req: AioRequest, ran: list[bool] = ran) -> None:
                ran.append(req in _finishing.requests)

            taken: list[AioRequest] = []
            req = ctx._read_checked(
                fd, 0, memoryview(bytearray(16)), _ContainedCallback(record, "x"), taken
            )
            assert req._callbacks is not None  # (taken)
            interrupted = False
            seen = interrupt_at_c_return(n)
            try:
                req.cancel()
            except KeyboardInterrupt:
                interrupted = True
            finally:
                sys.setprofile(None)
            gate.set()
            assert req.wait(10), f"C return {n}"
            wait_until(lambda ctx=ctx: _quiet(ctx))  # type: ignore[misc]
            assert ran == [False], f"C return {n}: {ran}"
            stats = ctx.stats()
            assert stats.outstanding == 0, f"C return {n}"
            assert ctx.close(timeout=10), f"C return {n}"
        finally:
            gate.set()
            ctx.close(timeout=10)
            queue.close(timeout=10)
        if not interrupted and seen[0] < n:
            break


@pytest.mark.linux_only("rwf_nowait")  # (portable mode: posix's general path)
def test_a_quick_completion_that_releases_an_fsync_counts_as_the_threads_own(
    fd: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """_quick_finished's long way runs what finishing the read released
    (an fsync's launch, notifications: a signal's handler is the user's
    code, and may close the context): the read's request is then among
    this thread's, as the engine's long way has it, and only then."""
    queue = ThreadletQueue(max_threads=1)
    gate = threading.Event()
    ctx = AioContext(queue, deliver=False, inline=False)
    seen: list[bool] = []
    real = px.PosixAio._run

    def run(self: px.PosixAio, after: Any, raising: bool) -> None:
        seen.append(any(r._ctx is ctx for r in _finishing.requests))
        real(self, after, raising)

    try:
        rt = px.PosixAio(ctx)
        warm = px.aiocb(fd, 0, bytearray(8))
        rt.aio_read(warm)
        assert _done(rt, warm) == (0, 8)
        queue.submit(gate.wait, 10)
        read = px.aiocb(fd, 64, bytearray(32))
        rt.aio_read(read)  # (quick, queued behind the gate)
        req = read._req
        assert req is not None
        assert [type(c) for c in req._callbacks or ()] == [_ContainedCallback]
        sync = px.aiocb(fd)
        rt.aio_fsync(os.O_SYNC, sync)  # waits for the read
        monkeypatch.setattr(px.PosixAio, "_run", run)
        assert rt.aio_cancel(fd, read) == px.AIO_CANCELED
        assert seen[:1] == [True]  # (the completion's; aio_cancel runs its own after)
        assert _done(rt, read) == (errno.ECANCELED, -1)
        gate.set()
        assert _done(rt, sync) == (0, 0)
        assert not rt._fds
    finally:
        gate.set()
        ctx.close(timeout=10)
        queue.close(timeout=10)


@pytest.mark.parametrize("backend", ["threads", "io_uring"])
@pytest.mark.linux_only("rwf_nowait")  # (portable mode: posix's general path)
def test_a_quick_completion_costs_few_bytecodes_under_posix(backend: str, fd: int) -> None:
    """Bytecodes per quick read's completion, in the thread that completes
    it (a worker, the ring's reaper), of posix.py's functions and of the
    engine's and the pool's finishing (AioRequest._finished,
    _run_callbacks, Threadlet._finish).  Nobody waits (the status is
    polled untraced): the count does not depend on timing.  Here (each
    read alone: every completion wakes close()'s condition) 167 on the
    threads backend, 221 on io_uring; before, 197 and 252 (posix 92,
    _finished 86, _run_callbacks 19, io_uring's Threadlet._finish 55)."""
    if backend == "io_uring":
        probe = AioContext(deliver=False, backend="auto")
        try:
            if probe.backend != "io_uring":
                pytest.skip("no io_uring here")
        finally:
            probe.close()
    names = {"_finished", "_run_callbacks", "_finish"}
    counts: collections.Counter[str] = collections.Counter()
    main = threading.get_ident()

    def tracer(frame: FrameType, event: str, arg: Any) -> Any:
        code = frame.f_code
        posix = code.co_filename == px.__file__
        if not posix and code.co_name not in names:
            return None
        frame.f_trace_opcodes = True
        if event == "opcode" and threading.get_ident() != main:
            counts["posix" if posix else code.co_qualname] += 1
        return tracer

    threading.settrace(tracer)
    queue = ThreadletQueue(max_threads=2)
    try:
        ctx = AioContext(queue, deliver=False, backend=backend, inline=False)
        try:
            rt = px.PosixAio(ctx)
            cb = px.aiocb(fd, 0, bytearray(512))
            rt.aio_read(cb)
            assert _done(rt, cb) == (0, 512)
            counts.clear()
            n = 32
            for k in range(n):
                cb.aio_offset = 512 * (k % 8)
                rt.aio_read(cb)
                wait_until(lambda: cb._status is px._DONE)
                assert (rt.aio_error(cb), rt.aio_return(cb)) == (0, 512)
        finally:
            threading.settrace(None)  # type: ignore[arg-type]
            ctx.close()
    finally:
        threading.settrace(None)  # type: ignore[arg-type]
        queue.close(timeout=10)
    per = {k: v / n for k, v in counts.items()}
    assert "_run_callbacks" not in per, per
    total = sum(per.values())
    bound = 180 if backend == "threads" else 235
    assert total < bound, f"{total:.0f} bytecodes per completion: {per}"


class _Int(int):
    """An int subclass: the general path takes it."""


class _Sub(px.aiocb):
    """An aiocb that always takes the general path (not the exact class)."""

    __slots__ = ()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("aio_reqprio", 0),
        ("aio_reqprio", False),
        ("aio_reqprio", 0.0),
        ("aio_reqprio", _Int(0)),
        ("aio_reqprio", 20),
        ("aio_reqprio", 21),
        ("aio_reqprio", -(2**70)),
        ("aio_fildes", -1),
        ("aio_fildes", -(2**31)),
        ("aio_fildes", -(2**70)),
        ("aio_fildes", 2**31 - 1),
        ("aio_fildes", 2**31),
        ("aio_fildes", 2**70),
        ("aio_fildes", _Int(3)),
    ],
)
def test_the_quick_tests_of_reqprio_and_fildes_answer_as_the_general_path(
    field: str, value: object, tmp_path: Path
) -> None:
    """The quick path's `prio is _PRIO_0` and `not fd >> 31`: a plain
    aiocb (the quick path, its fd known) and a subclass (the general one)
    get the same answer for each value.  (An fd past a C int would name
    another file if it were truncated: 2**32 + fd is test_posix_cost's.)"""
    ctx = AioContext(deliver=False)
    try:
        rt = px.PosixAio(ctx)
        answers = []
        for cls in (px.aiocb, _Sub):
            p = tmp_path / cls.__name__
            p.write_bytes(DATA)
            fd = os.open(p, os.O_RDWR)
            try:
                warm = px.aiocb(fd, 0, bytearray(8))
                rt.aio_read(warm)
                assert _done(rt, warm) == (0, 8)
                buf = bytearray(16)
                cb = cls(fd, 32, buf)
                setattr(cb, field, value)
                try:
                    rt.aio_read(cb)
                except Exception as e:
                    answers.append((type(e).__name__, getattr(e, "errno", None)))
                    continue
                answers.append((_done(rt, cb), bytes(buf)))
            finally:
                os.close(fd)
        assert answers[0] == answers[1]
        wait_until(lambda: _quiet(ctx))
        assert not rt._fds
    finally:
        ctx.close()
