"""A burst held back for the ring's reaper while the kernel has nothing of
the ring's in hand: the KICK_AT-th submission sends what is held, as under
a plug.  Before, everything waited for the reaper's short sleep or the
submitter's next block: threadlets.posix's aio_suspend loop at depth 32 then
ran in lockstep batches of the whole depth (one doorbell, one reaper wake,
one aio_suspend wake per 32: the device idle while Python handled them)."""

from __future__ import annotations

import os

import pytest

from threadlets.probe import buffer_address, probe_io_uring
from threadlets.uring import KICK_AT, OP_READ, Ring

from .conftest import PATTERN

pytestmark = pytest.mark.skipif(not probe_io_uring(), reason="io_uring unavailable")


@pytest.mark.parametrize("in_kernel", [False, True])
def test_a_burst_held_for_the_reaper_starts_the_idle_device_early(fd: int, in_kernel: bool) -> None:
    """The reaper holds submissions (it just handed out a whole depth and
    sleeps short): with nothing in the kernel the KICK_AT-th goes at once;
    with something in the kernel the burst waits for the reaper (whose
    wake that completion is) or the submitter's flush."""
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    # Owner mode: no reaper thread clears the hold behind the test; the
    # state a reaper in its short sleep leaves is set by hand.
    ring = Ring(128, eventfd=efd)
    results: list[int] = []
    count = 2 * KICK_AT + 3
    bufs = [bytearray(64) for _ in range(count)]
    try:
        if in_kernel:  # one operation the kernel holds (not reaped here until the end)
            first = bytearray(64)
            assert ring.submit(OP_READ, fd, 0, buffer_address(memoryview(first)) or 0, 64, 0,
                               results.append)  # fmt: skip
            assert ring._unsubmitted == 0
        with ring._lock:
            ring._reaper_holds = True
        for i, b in enumerate(bufs):
            assert ring.submit(OP_READ, fd, 64 * i, buffer_address(memoryview(b)) or 0, 64, 0,
                               results.append)  # fmt: skip
            # Idle kernel: the first KICK_AT went at once; the rest wait
            # (the kernel has those).
            idle_held = i + 1 if i + 1 < KICK_AT else i + 1 - KICK_AT
            assert ring._unsubmitted == (i + 1 if in_kernel else idle_held), i
        ring.flush()  # (what the reaper or a blocking submitter does)
        total = count + in_kernel
        while len(results) < total:
            ring.wait(10)
            ring.reap()
        assert results == [64] * total
        assert [bytes(b) for b in bufs] == [PATTERN[64 * i : 64 * (i + 1)] for i in range(count)]
    finally:
        ring.close()
        assert ring.join(10)
        os.close(efd)
