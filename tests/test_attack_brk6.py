"""Attacks on opt-in IORING_SETUP_SQPOLL (issue 13): what a plain ring
promises holds on an SQPOLL ring too.  Each test is parametrised plain
ring / SQPOLL ring where the defect concerns both."""

from __future__ import annotations

import ctypes
import gc
import os
from collections.abc import Iterator

import pytest

from threadlets import uring

from .conftest import HAVE_RING, wait_until

pytestmark = pytest.mark.linux_only("io_uring")


def _ring(entries: int, sqpoll: bool, eventfd: int | None = None) -> uring.Ring:
    if not HAVE_RING:
        pytest.skip("no io_uring here")
    ring = uring.Ring(entries, eventfd=eventfd, sqpoll=sqpoll)
    if sqpoll and not ring.sqpoll:
        ring.close()
        pytest.skip("the kernel refused IORING_SETUP_SQPOLL here")
    return ring


def _asleep(ring: uring.Ring) -> bool:
    return bool(ring._sq_flags.value & uring._SQ_NEED_WAKEUP)


def _all_released() -> bool:
    uring._sweep_abandoned()
    return not uring._abandoned


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    r, w = os.pipe()
    try:
        yield r, w
    finally:
        os.close(r)
        os.close(w)


# -- an owner-mode ring given up on with its SQ full of SQEs not consumed --------------------


@pytest.mark.parametrize("how", ["close", "collected"])
@pytest.mark.parametrize("sqpoll", [False, True], ids=["plain", "sqpoll"])
def test_given_up_with_the_sq_full_of_unconsumed_reads_cancels_them_all(
    sqpoll: bool, how: str, pipe: tuple[int, int]
) -> None:
    """An owner-mode ring closed (or collected) with reads of an empty pipe
    in flight gives them up: a cancel each, released once they came back.
    Its SQ full of SQEs the kernel had not consumed yet -- held by a plug,
    or (SQPOLL, the usual case: a kick only wakes the SQ thread) published
    while the SQ thread slept -- there was no room for any cancel: those
    reads waited for good, and the ring (fd, SQ thread, buffers) was never
    released."""
    efd = os.eventfd(0)
    try:
        ring = _ring(8, sqpoll, efd)
        r, _ = pipe
        if sqpoll:
            wait_until(lambda: _asleep(ring))
        bufs = [(ctypes.c_char * 1)() for _ in range(ring.entries)]
        got: list[int] = []
        assert ring.plug()
        for buf in bufs:
            assert ring.submit(uring.OP_READ, r, 0, ctypes.addressof(buf), 1, 0, got.append)
        assert (ring._tail - ring._sq_head.value) & 0xFFFFFFFF == ring.entries  # none consumed
        if how == "close":
            ring.close()
            ring.unplug()
        else:
            del ring
            gc.collect()
        # (Released by _abandon, or by a later sweep -- the next Ring made --
        # should the cancels come back after ABANDON_WAIT: a sleepy SQ thread.)
        wait_until(_all_released)
        assert got == []  # (given up on: never called)
    finally:
        os.close(efd)
