"""Attacks on cancel past the ring's cap, _abandon's pushed cancels and
SQPOLL (session 13): every request completes once, a cancel the kernel
would take back is not answered "running"."""

from __future__ import annotations

import ctypes
import errno
import os
import threading

import pytest

from threadlets import uring

from .conftest import ring_or_skip, wait_until

pytestmark = pytest.mark.linux_only("io_uring")


# -- more cancels past the cap than its limit ------------------------------------------------


@pytest.mark.parametrize("sqpoll", [False, True], ids=["plain", "sqpoll"])
def test_more_cancels_past_the_cap_than_its_limit_wait_not_refused(
    sqpoll: bool, pipe_fds: tuple[int, int]
) -> None:
    """An owner-mode ring at its cap (every slot a read of an empty pipe),
    a cancel of each before the owner reaps: past entries//2 cancels (the
    limit of those past the cap) cancel() answered False -- the engine's
    NOTCANCELED -- and the read, which the kernel would have taken back,
    waited for good.  It waits for the cancels' CQEs instead (reaping them
    here: nobody else does)."""
    efd = os.eventfd(0)
    try:
        ring = ring_or_skip(8, sqpoll, efd)
        r, _ = pipe_fds
        bufs = [(ctypes.c_char * 1)() for _ in range(ring.entries)]
        got: list[int] = []
        idents = [
            ring.submit(uring.OP_READ, r, 0, ctypes.addressof(b), 1, 0, got.append) for b in bufs
        ]
        assert all(idents)
        answers: list[int] = []
        assert [ring.cancel(ident, answers.append) for ident in idents] == [True] * ring.entries

        def done() -> bool:
            ring.reap()
            return len(got) == ring.entries and len(answers) == ring.entries

        wait_until(done)
        assert answers == [0] * ring.entries
        assert got == [-errno.ECANCELED] * ring.entries
        assert ring._free == ring.entries  # (every slot back)
        ring.close()
        assert not ring._pending
    finally:
        os.close(efd)


@pytest.mark.parametrize("sqpoll", [False, True], ids=["plain", "sqpoll"])
def test_cancel_at_the_limit_waits_for_a_busy_reaper(
    sqpoll: bool, pipe_fds: tuple[int, int]
) -> None:
    """Reaper mode, the reaper busy in a slow completion callback, the ring
    at its cap with reads of an empty pipe: the cancels past the cap fill
    their limit (their CQEs wait for the reaper), and the next cancel was
    refused (False: NOTCANCELED, the read waiting for good).  It waits for
    the reaper instead, and the read comes back -ECANCELED."""
    ring = ring_or_skip(8, sqpoll)
    r, _ = pipe_fds
    r2, w2 = os.pipe()
    try:
        inside, release = threading.Event(), threading.Event()

        def slow(res: int) -> None:
            inside.set()
            release.wait(10)

        one = (ctypes.c_char * 1)()
        assert ring.submit(uring.OP_READ, r2, 0, ctypes.addressof(one), 1, 0, slow)
        bufs = [(ctypes.c_char * 1)() for _ in range(ring.entries)]
        got: list[int] = []
        idents = [
            ring.submit(uring.OP_READ, r, 0, ctypes.addressof(b), 1, 0, got.append)
            for b in bufs[:-1]
        ]
        os.write(w2, b"x")
        assert inside.wait(10)  # (the reaper is in slow(): nothing is reaped)
        wait_until(lambda: ring._free == 1)
        idents.append(
            ring.submit(uring.OP_READ, r, 0, ctypes.addressof(bufs[-1]), 1, 0, got.append)
        )
        assert all(idents)
        answers: list[int] = []
        limit = ring.entries // 2
        for ident in idents[:limit]:
            assert ring.cancel(ident, answers.append)
        out: list[bool] = []
        waiting = threading.Event()
        await_cancels = getattr(ring, "_await_cancels", None)
        if await_cancels is not None:  # (the fix's wait: seen entered)

            def entered() -> None:
                waiting.set()
                await_cancels()

            ring._await_cancels = entered  # type: ignore[method-assign]
        t = threading.Thread(
            target=lambda: out.extend(ring.cancel(i, answers.append) for i in idents[limit:])
        )
        t.start()
        try:
            wait_until(lambda: bool(out) or waiting.is_set())  # (refused, or waiting)
        finally:
            release.set()
        t.join(10)
        assert not t.is_alive()
        assert out == [True] * (ring.entries - limit)
        wait_until(lambda: len(got) == ring.entries and len(answers) == ring.entries)
        assert answers == [0] * ring.entries
        assert got == [-errno.ECANCELED] * ring.entries
        ring.close()
        assert ring.join(10)
    finally:
        os.close(r2)
        os.close(w2)


# -- close() cut short by Ctrl-C while giving up -----------------------------------------------


def test_close_cut_short_while_giving_up_is_finished_by_the_next_close(
    pipe_fds: tuple[int, int],
) -> None:
    """An owner-mode ring with its SQ full of held reads of an empty pipe,
    close() interrupted (Ctrl-C) at every C return: a second close()
    finishes giving up -- every read cancelled, the ring released.  Cut
    short after it was marked given up, the cancels not pushed yet were
    lost, and the second close() returned at once: the reads waited for
    good and the ring (fd, pinned buffers) was never released."""
    from .conftest import call_interrupted_at

    r, _ = pipe_fds
    n = 1
    while True:
        efd = os.eventfd(0)
        try:
            ring = ring_or_skip(8, False, efd)
            bufs = [(ctypes.c_char * 1)() for _ in range(ring.entries)]
            assert ring.plug()
            for b in bufs:
                assert ring.submit(uring.OP_READ, r, 0, ctypes.addressof(b), 1, 0, lambda res: None)
            seen = call_interrupted_at(n, ring.close)
            ring.close()
            ring.unplug()

            def released(ring: uring.Ring = ring) -> bool:
                uring._sweep_abandoned()
                return ring._fd_closed

            wait_until(released, 5)
        finally:
            os.close(efd)
        if seen[0] < n:
            break
        n += 1
