"""Attacks on the completion side's quick paths (AioRequest._finished's
quiet step, Ring.reap's one-lock end): several completions in one reap,
callbacks that close, raise or submit; waiters added as a request
finishes."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest

from threadlets import AioContext

from .conftest import HAVE_RING, wait_until


def _file(tmp_path: Path) -> int:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 4096)
    return os.open(path, os.O_RDONLY)


@pytest.mark.parametrize("deliver", [True, False], ids=["deliver", "quiet"])
def test_close_from_a_callback_in_a_batch_waits_for_the_others(
    tmp_path: Path, deliver: bool
) -> None:
    """Several ring completions handed out in one reap; the first one's
    done-callback closes the context: close() does not wait for its own
    request, waits for the rest of the batch (which the same reap hands
    out), and returns True with nothing outstanding; each callback once."""
    if not HAVE_RING:
        pytest.skip("no io_uring here")
    fd = _file(tmp_path)
    ctx = AioContext(backend="io_uring", inline=False, deliver=deliver)
    ring = ctx._ring
    assert ring is not None
    try:
        ran: list[Any] = []
        closed: list[bool] = []
        gate, entered = threading.Event(), threading.Event()
        if not deliver:
            # Hold the reaper thread back (in a done-callback) until all
            # four completed: one reap hands them out.
            main = threading.current_thread()

            def block(r: Any) -> None:
                if threading.current_thread() is not main:  # (not inline)
                    entered.set()
                    gate.wait(10)

            for _ in range(100):
                blocker = ctx.read(fd, 0, bytearray(8))
                blocker.add_done_callback(block)
                blocker.wait(10)
                if entered.wait(0.5):
                    break
            assert entered.is_set()
        reqs = [ctx.read(fd, 0, bytearray(8)) for _ in range(4)]
        ring.flush()  # (what the busy reaper holds back)

        def closing(r: Any) -> None:
            ran.append(r)
            closed.append(ctx.close(timeout=5))

        reqs[0].add_done_callback(closing)
        for r in reqs[1:]:
            r.add_done_callback(ran.append)
        wait_until(lambda: ring._cq_tail.value - ring._cq_head.value >= 4)
        gate.set()
        for r in reqs:
            assert r.wait(10)
        wait_until(lambda: len(ran) == 4)
        wait_until(lambda: bool(closed))
        assert closed == [True]
        assert sorted(map(id, ran)) == sorted(map(id, reqs))
        assert ctx.stats().outstanding == 0
    finally:
        gate.set()
        ctx.close(timeout=10)
        os.close(fd)
