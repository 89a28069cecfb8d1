"""h-break13: the threads backend's cheaper pool, ops.transfer and the
POSIX AIO cut, attacked from outside.

Found here: a Ctrl-C as a C call returned inside ``ThreadletQueue._spawn``
before its ``try`` (the peak's ``max()``, the listing's ``add()``) left a
worker counted that never ran -- submit() then spawned no other, the work
waited for good, and close() waited for it."""

from __future__ import annotations

import errno
import gc
import mmap
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from threadlets import AioContext, ThreadletQueue
from threadlets.ops import IOV_MAX
from threadlets.pool import CancelResult, ThreadletState

from .conftest import Gate, interrupt_at_c_return

SIZE = 3 * 4096 + 300  # not a whole number of blocks: O_DIRECT's end of file


def _consistent(q: ThreadletQueue) -> None:
    with q._lock:
        queued = sum(1 for t in q._items if t._state is ThreadletState.QUEUED)
        assert q._queued == queued, (q._queued, queued, q._stale)
        assert q._threads == len(q._workers), (q._threads, q._workers)
    s = q.stats()
    assert s.submitted == s.completed + s.cancelled + s.queued + s.running, s
    assert min(s.completed, s.queued, s.running, s.cancelled) >= 0, s


# -- pool: Ctrl-C inside a worker's start ---------------------------------------------------


@pytest.mark.parametrize("step", ["submit", "set_limits"])
def test_ctrl_c_at_every_c_return_of_a_spawn_leaves_no_phantom_worker(step: str) -> None:
    """submit() starting a worker, set_limits() raising max_threads for
    queued work: a KeyboardInterrupt at each C return leaves the thread
    count equal to the workers that exist, all work runs, close() ends."""
    n = 0
    while True:
        n += 1
        assert n < 200, "never ran to its end"
        q = ThreadletQueue(max_threads=1 if step == "set_limits" else 2, idle_timeout=60)
        gate = Gate()
        items = []
        try:
            if step == "set_limits":
                q.submit(gate)
                assert gate.started.wait(10)
                items = [q.submit(int, i) for i in range(3)]
            seen = interrupt_at_c_return(n)
            try:
                if step == "submit":
                    items.append(q.submit(int, 7))
                else:
                    q.set_limits(max_threads=3)
            except KeyboardInterrupt:
                pass
            finally:
                sys.setprofile(None)
                gc.enable()
            _consistent(q)
            gate.release.set()
            if step == "submit" and not items:
                items.append(q.submit(int, 8))  # the queue is still usable
            assert q.drain(timeout=10), n
            for t in items:
                assert t.result(timeout=10) in (7, 8, 0, 1, 2), n
            _consistent(q)
            assert q.close(timeout=10), n
        finally:
            gate.release.set()
            q.close(timeout=10)
        if seen[0] < n:
            break
