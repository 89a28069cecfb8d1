"""The ring's submission in fewer steps (issue 13, twelfth session, second
pass): AioContext._start_rw finds the file's ring mask with a
subscript (no dict.get call); Ring.submit looks at the cheaper and usually
deciding half of its hold tests first.  What they decide must not change."""

from __future__ import annotations

import itertools
import os
import sys
import tempfile
from collections.abc import Iterator
from types import FrameType
from typing import Any

import pytest

from threadlets import AioContext, aligned_buffer
from threadlets.uring import KICK_AT, OP_NOP, Ring, RingUnavailable

from .conftest import HAVE_RING

SIZE = 64 * 1024
DATA = bytes(range(251)) * (SIZE // 251) + bytes(SIZE % 251)


@pytest.fixture
def scratch() -> Iterator[str]:
    where = "/var/tmp" if os.path.isdir("/var/tmp") else None
    fd, path = tempfile.mkstemp(prefix="threadlets-sub2-", dir=where)
    try:
        os.write(fd, DATA)
        os.close(fd)
        yield path
    finally:
        os.unlink(path)


@pytest.mark.parametrize("write", [False, True], ids=["read", "write"])
def test_the_rings_fast_path_calls_no_python_but_the_rings(scratch: str, write: bool) -> None:
    """A read or write through the door to the ring runs no Python function
    but pool.py's claim and Ring.submit's (and its kick's), and no
    dict.get: the mask is a subscript."""
    if not HAVE_RING:
        pytest.skip("no io_uring here")
    if not hasattr(os, "O_DIRECT"):
        pytest.skip("no O_DIRECT")
    try:
        fd = os.open(scratch, os.O_RDWR | os.O_DIRECT)
    except OSError:
        pytest.skip("O_DIRECT refused here")
    ctx = AioContext(backend="io_uring", inline=False)
    try:
        assert ctx.read(fd, 0, aligned_buffer(4096)).result(timeout=10) == 4096
        buf = aligned_buffer(4096)
        buf[:] = DATA[:4096]
        calls: list[str] = []

        def prof(frame: FrameType, event: str, arg: Any) -> None:
            if event == "call":
                calls.append(frame.f_code.co_qualname)
            elif event == "c_call":
                calls.append(f"c:{getattr(arg, '__qualname__', arg)}")

        sys.setprofile(prof)
        try:
            req = ctx._start_rw(None, buf, 4096, 0, write, fd=fd)
        finally:
            sys.setprofile(None)
        assert req.result(timeout=10) == 4096
        python = [c for c in calls if not c.startswith("c:")]
        assert python[0] == "AioContext._start_rw"
        assert set(python[1:]) <= {
            "Threadlet._claim_held",  # (pool.py's transition: called, not copied)
            "Ring.submit",
            "Ring._take",
            "Ring._kick",
        }, python
        assert "c:dict.get" not in calls, calls
        if not write:
            assert bytes(buf) == DATA[4096:8192]
        assert ctx.drain(timeout=10)
        assert ctx.stats().ring == 2
    finally:
        ctx.close(timeout=10)
        os.close(fd)


def test_a_file_the_ring_does_not_know_goes_through_start() -> None:
    """A file _ring_plain does not know (a pipe): the subscript's KeyError
    sends it through _start, as dict.get's -1 did (read and write)."""
    if not HAVE_RING:
        pytest.skip("no io_uring here")
    ctx = AioContext(backend="io_uring", inline=False)
    r, w = os.pipe()
    try:
        f = ctx._file(w)
        assert not isinstance(f, OSError)
        assert f not in ctx._ring_plain
        req = ctx._start_rw(f, b"abc", 0, 3, True)
        assert req.result(timeout=10) == 3
        assert os.read(r, 3) == b"abc"
        g = ctx._file(r)
        assert not isinstance(g, OSError)
        assert g not in ctx._ring_plain
        os.write(w, b"xyz")
        buf = bytearray(3)
        assert ctx._start_rw(g, buf, 0, 3, False).result(timeout=10) == 3
        assert buf == b"xyz"
        assert ctx.drain(timeout=10)
    finally:
        ctx.close(timeout=10)
        os.close(r)
        os.close(w)


def _drain(ring: Ring) -> None:
    for _ in range(1000):
        ring.reap()
        if not ring._inflight:
            return
        ring.wait(timeout=1.0, ready=lambda: False)
    raise AssertionError("the ring kept operations")


def _old_decision(
    plugged: bool, reaper_holds: bool, untaken: int, in_kernel: int, sched: bool, flagged: bool
) -> str:
    """Ring.submit's hold rules as they were written before (the reference)."""
    if plugged and (untaken < KICK_AT or in_kernel):
        if not sched or flagged:
            return "held"
        return "scheduled"
    if reaper_holds and (untaken < KICK_AT or in_kernel):
        return "held"
    return "kicked"


def test_submits_hold_rules_decide_as_before() -> None:
    """Every combination of the plug (none, plug(), hold()), the reaper's
    hold, the count held back (around KICK_AT), something in the kernel or
    not, and hold()'s flush already scheduled or not: submit holds,
    schedules a flush, or kicks exactly as the rules did before their tests
    were reordered."""
    try:
        efd = os.eventfd(0)
    except (AttributeError, OSError):  # pragma: no cover
        pytest.skip("no eventfd")
    try:
        ring = Ring(64, eventfd=efd)  # owner mode: nothing is reaped behind the test
    except RingUnavailable as e:  # pragma: no cover
        os.close(efd)
        pytest.skip(f"io_uring: {e}")
    scheduled: list[int] = []
    try:
        for plug, reaper_holds, untaken, in_kernel, flagged in itertools.product(
            ["none", "plug", "hold"], [False, True], [0, KICK_AT - 2, KICK_AT - 1], [0, 3], [False, True]
        ):  # fmt: skip
            if plug == "none" and flagged:
                continue
            if plug == "plug":
                assert ring.plug()
            elif plug == "hold":
                assert ring.hold(lambda: scheduled.append(1))
            # The state to test, set by hand: `untaken` published and not
            # taken (NOPs, sent below), and the kernel's count.
            for _ in range(untaken):
                with ring._lock:
                    ring._push(OP_NOP, -1, 0, 0, 0, 0, 0)
            real = ring._in_kernel
            with ring._lock:
                ring._in_kernel = real + in_kernel
                ring._reaper_holds = reaper_holds
                ring._flush_scheduled = flagged
            del scheduled[:]
            taken = ring._taken
            ident = ring.submit(OP_NOP, -1, 0, 0, 0, 0, lambda res: None)
            assert ident
            with ring._lock:
                kicked = ring._taken != taken
                ring._reaper_holds = False
                # (A take counted what it sent: the count by hand comes off.)
                ring._in_kernel -= in_kernel
            got = "kicked" if kicked else ("scheduled" if scheduled else "held")
            want = _old_decision(
                plug != "none", reaper_holds, untaken + 1, in_kernel, plug == "hold", flagged
            )
            assert got == want, (plug, reaper_holds, untaken, in_kernel, flagged)
            if plug == "none":
                ring.flush()
            else:
                ring.unplug()
            _drain(ring)
    finally:
        ring.close()
        os.close(efd)


def test_submit_kicks_at_kick_at_with_nothing_in_the_kernel() -> None:
    """A burst under plug() with nothing in the kernel goes at the
    KICK_AT-th submission, and not before (the lockstep-batch rule)."""
    try:
        efd = os.eventfd(0)
    except (AttributeError, OSError):  # pragma: no cover
        pytest.skip("no eventfd")
    try:
        ring = Ring(64, eventfd=efd)
    except RingUnavailable as e:  # pragma: no cover
        os.close(efd)
        pytest.skip(f"io_uring: {e}")
    try:
        assert ring._in_kernel == 0
        assert ring.plug()
        start = ring._taken
        for i in range(1, KICK_AT + 1):
            ring.submit(OP_NOP, -1, 0, 0, 0, 0, lambda res: None)
            assert (ring._taken != start) == (i == KICK_AT), i
        ring.unplug()
        _drain(ring)
    finally:
        ring.close()
        os.close(efd)
