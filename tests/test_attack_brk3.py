"""Attacks on the eleventh session's late changes: a wait begun after its
request's completion was processed, the ring paths' claim through pool.py,
forget() turning off the inline readers."""

from __future__ import annotations

import os
import sys
import tempfile
import threading
from collections.abc import Iterator
from typing import Any

import pytest

import threadlets.awaitable as aw
from threadlets.engine import AioContext, CancelResult
from threadlets.uring import RingUnavailable


class _LateRequest:
    """Stands for an AioRequest waited for on trio whose completion another
    thread's process_completions() processes while the task is blocked."""

    def __init__(self) -> None:
        self._processed = False
        self._cb: Any = None
        self.stored = threading.Event()

    @property
    def callback(self) -> Any:
        return self._cb

    @callback.setter
    def callback(self, cb: Any) -> None:
        self._cb = cb
        self.stored.set()

    def cancel(self) -> CancelResult:
        return CancelResult.CANCELED


def test_a_trio_wait_is_woken_by_another_threads_delivery() -> None:
    """Another thread's process_completions() (ctx.wait() in a worker
    thread, say) delivers the completion of a request a trio task waits
    for: the task wakes.  (wake() called trio's reschedule() there, which
    raised RuntimeError -- logged by the engine -- and the task slept on.)"""
    trio = pytest.importorskip("trio")

    async def main() -> None:
        req = _LateRequest()

        def deliver() -> None:
            req.stored.wait()
            req._processed = True
            req.callback(req)

        t = threading.Thread(target=deliver)
        t.start()
        try:
            with trio.fail_after(10):
                await aw._trio_wait(req)  # type: ignore[arg-type]
        finally:
            await trio.to_thread.run_sync(t.join)

    trio.run(main)


class _RacedRequest:
    """Stands for an AioRequest whose completion another thread's
    process_completions() processes exactly between the wait's store of its
    callback and its look at ``_processed``: the processor's test-and-set
    lands, it reads the callback just stored, and runs it later -- after
    the wait returned."""

    def __init__(self) -> None:
        self._processed = False
        self._cb: Any = None
        self.taken = threading.Event()

    @property
    def callback(self) -> Any:
        return self._cb

    @callback.setter
    def callback(self, cb: Any) -> None:
        self._cb = cb
        self._processed = True  # (the other thread's test-and-set, then its read)
        self.taken.set()

    def cancel(self) -> CancelResult:
        return CancelResult.NOTCANCELED


def test_a_trio_wait_raced_by_another_threads_delivery_is_woken_once() -> None:
    """The wait saw ``_processed`` and returned; the other thread then ran
    the callback it had read: the task, blocked in a later wait of its own,
    must not be rescheduled by it (it was: trio's reschedule, from another
    thread, woke whatever the task waited on next with None)."""
    trio = pytest.importorskip("trio")

    async def main() -> None:
        req = _RacedRequest()
        task = trio.lowlevel.current_task()
        token = trio.lowlevel.current_trio_token()
        blocked = threading.Event()

        def deliver() -> None:
            req.taken.wait()
            blocked.wait()
            req._cb(req)  # (the callback the processor read, run late)
            token.run_sync_soon(lambda: trio.lowlevel.reschedule(task, outcome.Value("mine")))

        import outcome

        t = threading.Thread(target=deliver)
        t.start()
        try:
            with trio.fail_after(10):
                await aw._trio_wait(req)  # type: ignore[arg-type]
            token.run_sync_soon(blocked.set)
            got = await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.SUCCEEDED)
            assert got == "mine"
        finally:
            blocked.set()
            await trio.to_thread.run_sync(t.join)

    trio.run(main)


# -- the ring paths' claim and unclaim under Ctrl-C ---------------------------------------


@pytest.fixture
def data_fd() -> Iterator[int]:
    fd, name = tempfile.mkstemp(prefix="threadlets-brk3-", dir="/var/tmp")
    try:
        os.write(fd, bytes(range(256)) * 32)
        yield fd
    finally:
        os.close(fd)
        os.unlink(name)


def _interrupt_at(fn_name: str, event: str) -> list[int]:
    """Raise KeyboardInterrupt once, at ``event`` ('call': as a real Ctrl-C
    lands at a Python function's entry; 'return') of the threadlets
    function named ``fn_name``."""
    hits = [0]

    def prof(frame: Any, ev: str, arg: object) -> None:
        if ev == event and frame.f_code.co_name == fn_name:
            hits[0] += 1
            sys.setprofile(None)
            raise KeyboardInterrupt

    sys.setprofile(prof)
    return hits


@pytest.mark.parametrize("event", ["call", "return"])
@pytest.mark.parametrize("where", ["_claim_held", "_unclaim"])
@pytest.mark.parametrize("bufs", [0, 1, 2], ids=["start_rw", "ring_start", "ring_submit"])
@pytest.mark.parametrize("write", [False, True], ids=["read", "write"])
def test_ctrl_c_at_the_ring_claim_leaves_nothing_running(
    data_fd: int, write: bool, bufs: int, where: str, event: str
) -> None:
    """Ctrl-C at the entry or return of pool.py's claim or unclaim, on the
    ring's paths (the fast path, _RingBackend.start), the ring taking the
    request or refusing it (full): the request is finished or never
    admitted, nothing stays RUNNING, and close() returns."""
    try:
        ctx = AioContext(backend="io_uring", inline=False)
    except RingUnavailable as e:  # pragma: no cover
        pytest.skip(f"io_uring: {e}")
    ring = ctx._ring
    if ring is None:  # pragma: no cover
        ctx.close()
        pytest.skip("no ring")
    closed = threading.Event()
    try:
        ctx.read(data_fd, 0, bytearray(1)).wait(10)
        buffers: Any = [bytearray(512) for _ in range(max(bufs, 1))]
        arg = buffers[0] if bufs == 0 else buffers
        room = ring._room
        if where == "_unclaim":
            ring._room = 0  # (as full: the ring refuses, the pool takes it)
        hits: list[int] = []
        try:
            hits = _interrupt_at(where, event)
            try:
                req = (ctx.write if write else ctx.read)(data_fd, 0, arg)
            except KeyboardInterrupt:
                req = None
        finally:
            sys.setprofile(None)
            ring._room = room
        if not hits[0]:
            pytest.skip(f"{where} not reached on this path")
        if req is not None:
            assert req.wait(10)
    finally:

        def close() -> None:
            ctx.close()
            closed.set()

        t = threading.Thread(target=close, daemon=True)
        t.start()
        assert closed.wait(10), "close() hung: a request stayed admitted"
    cq = ctx._cq
    assert cq.admitted == cq.delivered
