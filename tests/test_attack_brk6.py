"""Attacks on opt-in IORING_SETUP_SQPOLL (issue 13): what a plain ring
promises holds on an SQPOLL ring too.  Each test is parametrised plain
ring / SQPOLL ring where the defect concerns both."""

from __future__ import annotations

import ctypes
import errno
import gc
import os
from collections.abc import Callable

import pytest

from threadlets import uring

from .conftest import HAVE_RING, ring_or_skip, sq_thread_asleep, wait_until

pytestmark = pytest.mark.linux_only("io_uring")


def _all_released() -> bool:
    uring._sweep_abandoned()
    return not uring._abandoned


# -- an owner-mode ring given up on with its SQ full of SQEs not consumed --------------------


@pytest.mark.parametrize("how", ["close", "collected"])
@pytest.mark.parametrize("sqpoll", [False, True], ids=["plain", "sqpoll"])
def test_given_up_with_the_sq_full_of_unconsumed_reads_cancels_them_all(
    sqpoll: bool, how: str, pipe_fds: tuple[int, int]
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
        ring = ring_or_skip(8, sqpoll, efd)
        r, _ = pipe_fds
        if sqpoll:
            wait_until(lambda: sq_thread_asleep(ring))
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


# -- cancel on a ring at its cap -------------------------------------------------------------


@pytest.mark.parametrize("owner", [False, True], ids=["reaper", "owner"])
@pytest.mark.parametrize("sqpoll", [False, True], ids=["plain", "sqpoll"])
def test_cancel_on_a_ring_at_its_cap_takes_the_read_back(
    sqpoll: bool, owner: bool, pipe_fds: tuple[int, int]
) -> None:
    """Every slot a read of an empty pipe (the ring at its cap): cancel
    still goes (its CQE has room: the CQ is twice as large), and answers 0,
    the read coming back -ECANCELED.  Refused, the read was answered
    "running" and waited for good."""
    efd = os.eventfd(0) if owner else None
    try:
        ring = ring_or_skip(8, sqpoll, efd)
        r, _ = pipe_fds
        bufs = [(ctypes.c_char * 1)() for _ in range(ring.entries)]
        got: list[int] = []
        idents = [
            ring.submit(uring.OP_READ, r, 0, ctypes.addressof(b), 1, 0, got.append) for b in bufs
        ]
        assert all(idents)
        assert not ring.submit(uring.OP_NOP, -1, 0, 0, 0, 0, got.append)  # at its cap
        answers: list[int] = []

        def answered(k: int) -> Callable[[], bool]:
            def done() -> bool:
                if owner:
                    ring.reap()
                return len(got) >= k and len(answers) >= k

            return done

        for k, ident in enumerate(idents, 1):
            assert ring.cancel(ident, answers.append)
            wait_until(answered(k))  # (as AioRequest.cancel waits for its answer)
        assert answers == [0] * ring.entries
        assert got == [-errno.ECANCELED] * ring.entries
        ring.close()
        assert ring.join(10)
    finally:
        if efd is not None:
            os.close(efd)


def test_cancel_with_the_sq_full_of_unconsumed_sqes_waits_for_room(
    pipe_fds: tuple[int, int],
) -> None:
    """SQPOLL: the SQ full of reads published while the SQ thread slept (a
    plug held them): a cancel wakes the thread and waits for a slot, then
    goes -- not over the oldest SQE not consumed, and not refused."""
    ring = ring_or_skip(8, True)
    r, _ = pipe_fds
    wait_until(lambda: sq_thread_asleep(ring))
    bufs = [(ctypes.c_char * 1)() for _ in range(ring.entries)]
    got: list[int] = []
    assert ring.plug()
    idents = [ring.submit(uring.OP_READ, r, 0, ctypes.addressof(b), 1, 0, got.append) for b in bufs]
    assert all(idents)
    assert (ring._tail - ring._sq_head.value) & 0xFFFFFFFF == ring.entries  # none consumed
    answers: list[int] = []
    for k, ident in enumerate(idents, 1):
        assert ring.cancel(ident, answers.append)
        wait_until(lambda: len(answers) >= k)  # noqa: B023  (as AioRequest.cancel waits)
    ring.unplug()
    wait_until(lambda: len(got) == ring.entries and len(answers) == ring.entries)
    assert answers == [0] * ring.entries
    assert got == [-errno.ECANCELED] * ring.entries
    ring.close()
    assert ring.join(10)


@pytest.mark.parametrize("sqpoll", [False, True], ids=["plain", "sqpoll"])
def test_posix_aio_cancel_of_a_full_ring_of_pipe_reads(
    sqpoll: bool, pipe_fds: tuple[int, int]
) -> None:
    """threadlets.posix on a ring context: a lio_listio of as many reads of
    a pipe as the ring holds, two bytes written, aio_cancel(fd): the two
    read, every other one AIO_CANCELED (ECANCELED) -- on an SQPOLL ring as
    on a plain one, where the SQ thread had not even taken the reads (or
    the reaper not reaped the two) when the cancels came.  Each refused
    (the ring at its cap) was answered AIO_NOTCANCELED and never finished."""
    import threadlets.posix as px
    from threadlets.engine import RING_ENTRIES, AioContext

    if not HAVE_RING:
        pytest.skip("no io_uring here")
    ctx = AioContext(deliver=False, backend="io_uring", sqpoll=sqpoll, inline=False)
    r, w = pipe_fds
    try:
        if sqpoll and not ctx.sqpoll:
            pytest.skip("the kernel refused IORING_SETUP_SQPOLL here")
        ring = ctx._ring
        assert ring is not None
        with px.use_context(ctx):
            if sqpoll:
                wait_until(lambda: sq_thread_asleep(ring))
            cbs = [
                px.aiocb(r, 0, bytearray(1), 1, lio_opcode=px.LIO_READ) for _ in range(RING_ENTRIES)
            ]
            px.lio_listio(px.LIO_NOWAIT, cbs)
            os.write(w, b"ab")
            assert px.aio_cancel(r) == px.AIO_CANCELED
            for cb in cbs:
                while px.aio_error(cb) == errno.EINPROGRESS:
                    px.aio_suspend([cb], 10)
            errs = [px.aio_error(cb) for cb in cbs]
            assert errs.count(0) == 2
            assert errs.count(errno.ECANCELED) == len(cbs) - 2
    finally:
        assert ctx.close(timeout=10)


# -- benchmarks/front_end_floor.py -----------------------------------------------------------


def test_front_end_floor_sqpoll_row_refuses_a_ring_that_does_not_poll(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """front_end_floor.py --sqpoll: a child asked for the "front end,
    sqpoll" row whose ring does not poll (the kernel refused SQPOLL) fails
    the run, as front_end_ab.py's does, instead of measuring a plain ring
    under the SQPOLL label."""
    import asyncio
    import importlib.util
    import tempfile
    from pathlib import Path

    from threadlets import awaitable as aw

    if not HAVE_RING:
        pytest.skip("no io_uring here")
    bench = Path(__file__).resolve().parent.parent / "benchmarks" / "front_end_floor.py"
    spec = importlib.util.spec_from_file_location("front_end_floor_brk6", bench)
    assert spec is not None
    assert spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    setup, enter, register = uring._syscalls()

    def refusing(nr: int, entries: int, addr: int) -> int:
        if ctypes.c_uint32.from_address(addr + 8).value & uring._SETUP_SQPOLL:
            ctypes.set_errno(errno.EPERM)
            return -1
        return int(setup(nr, entries, addr))

    monkeypatch.setattr(uring, "_syscalls", lambda: (refusing, enter, register))
    d = "/var/tmp" if os.access("/var/tmp", os.W_OK) else None
    fd, path = tempfile.mkstemp(prefix="threadlets-brk6-", dir=d)
    try:
        os.write(fd, bytes(1 << 16))
        with pytest.raises(RuntimeError, match="does not poll"):
            asyncio.run(mod._front_end(path, 0.01, True))
    finally:
        aw.configure()
        os.close(fd)
        os.unlink(path)


def test_cancel_and_give_up_with_a_failing_kick_do_not_spin(pipe_fds: tuple[int, int]) -> None:
    """A plain ring whose SQ is full of held SQEs and whose io_uring_enter
    fails (the kick logs and gives up): cancel() answers False and an
    owner-mode close() returns, instead of waiting for room that never
    comes."""
    import threading

    efd = os.eventfd(0)
    try:
        ring = ring_or_skip(8, False, efd)
        r, _ = pipe_fds
        bufs = [(ctypes.c_char * 1)() for _ in range(ring.entries)]
        assert ring.plug()
        idents = [
            ring.submit(uring.OP_READ, r, 0, ctypes.addressof(b), 1, 0, lambda res: None)
            for b in bufs
        ]
        assert all(idents)
        enter = ring._enter

        def failing(*args: int) -> int:
            ctypes.set_errno(errno.EIO)
            return -1

        ring._enter = failing
        out: list[object] = []
        t = threading.Thread(target=lambda: out.append(ring.cancel(idents[0], lambda res: None)))
        t.start()
        t.join(10)
        stuck = t.is_alive()
        t2 = threading.Thread(target=ring.close)
        if not stuck:
            t2.start()
            t2.join(10)
            stuck = t2.is_alive()
        ring._enter = enter  # (lets a spinning loop out)
        t.join(10)
        if t2.ident is not None:
            t2.join(10)
        assert not stuck
        assert out == [False]
        ring.flush()  # (the reads go now; given up on, nothing cancels them:)
        os.write(pipe_fds[1], bytes(ring.entries))
        wait_until(_all_released)
    finally:
        os.close(efd)
