"""Attacks on the eleventh session's late changes: a wait begun after its
request's completion was processed, the ring paths' claim through pool.py,
forget() turning off the inline readers."""

from __future__ import annotations

import threading
from typing import Any

import pytest

import threadlets.awaitable as aw
from threadlets.engine import CancelResult


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
