"""IORING_SETUP_SQPOLL (opt-in: ``AioContext(sqpoll=True)``, ``Ring(sqpoll=)``,
``configure(sqpoll=)``): every request kind the ring takes gives what the
threads give; a kick wakes the kernel's SQ thread once it went to sleep
(and only then); cancel, close, fork and Ctrl-C keep their promises; a
kernel that refuses SQPOLL gets a ring without it; nothing leaks."""

from __future__ import annotations

import asyncio
import ctypes
import errno
import gc
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import threadlets
from threadlets import awaitable as aw
from threadlets import uring
from threadlets.engine import AioContext, AioRequest
from threadlets.pool import CancelResult

from .conftest import HAVE_RING, interrupt_after_call, sq_thread_asleep, wait_until

pytestmark = pytest.mark.linux_only("io_uring")

SRC = str(Path(threadlets.__file__).resolve().parent.parent)
DATA = bytes((i * 7 + i // 251) & 0xFF for i in range(64 * 1024))


def _sq_context(**kwargs: Any) -> AioContext:
    if not HAVE_RING:
        pytest.skip("no io_uring here")
    c = AioContext(backend="io_uring", sqpoll=True, **kwargs)
    if not c.sqpoll:
        c.close()
        pytest.skip("the kernel refused IORING_SETUP_SQPOLL here")
    return c


@pytest.fixture(params=[True, False], ids=["deliver", "reaper"])
def sq(request: pytest.FixtureRequest) -> Iterator[AioContext]:
    """An SQPOLL context: owner-reaped (an eventfd) or with a reaper thread
    (deliver=False, as posix's); no inline attempts: every read on the ring."""
    c = _sq_context(deliver=request.param, inline=False)
    try:
        yield c
    finally:
        assert c.close(timeout=10)


def _wait(ctx: AioContext, req: AioRequest, timeout: float = 10) -> bool:
    return ctx.wait(req, timeout) if ctx.deliver else req.wait(timeout)


def _outcome(ctx: AioContext, req: AioRequest) -> Any:
    assert _wait(ctx, req)
    if req.cancelled():
        return "cancelled"
    exc = req.exception()
    if exc is not None:
        assert isinstance(exc, OSError)
        return (type(exc), exc.errno)
    return req.result()


# -- the request kinds, against the threads --------------------------------------------------


def _every_kind(ctx: AioContext, d: Path) -> list[Any]:
    """Each request kind the ring takes, on files of ``d``: what came back
    and what the files hold after."""
    p = d / "f"
    p.write_bytes(DATA)
    fd = os.open(p, os.O_RDWR)
    out: list[Any] = []
    try:
        one = bytearray(5000)
        out.append(_outcome(ctx, ctx.read(fd, 100, one)))
        out.append(bytes(one))
        bufs = [bytearray(3), bytearray(4096), bytearray(10)]
        out.append(_outcome(ctx, ctx.read(fd, 7, bufs)))  # READV
        out.append([bytes(b) for b in bufs])
        out.append(_outcome(ctx, ctx.read(fd, len(DATA) - 3, bytearray(10))))  # short at EOF
        out.append(_outcome(ctx, ctx.write(fd, 50, b"hello" * 99)))
        out.append(_outcome(ctx, ctx.write(fd, 9000, [b"ab", b"c" * 4096, b"de"])))  # WRITEV
        out.append(_outcome(ctx, ctx.write(fd, len(DATA) + 10, b"tail")))  # a hole, then data
        out.append(_outcome(ctx, ctx.flush(fd)))  # fdatasync
        out.append(_outcome(ctx, ctx.flush(fd, datasync=False)))  # fsync
        out.append(_outcome(ctx, ctx.allocate(fd, 0, 200_000)))
        out.append(_outcome(ctx, ctx.write_zeroes(fd, 4096, 8192)))
        out.append(_outcome(ctx, ctx.discard(fd, 20480, 4096)))
        wo = os.open(p, os.O_WRONLY)
        try:
            out.append(_outcome(ctx, ctx.read(wo, 0, bytearray(4))))  # EBADF
        finally:
            ctx.forget(wo)
            os.close(wo)
        st = _outcome(ctx, ctx.stat(str(p)))
        out.append((st.st_size, st.st_ino == os.stat(p).st_ino, st.st_mode))
        out.append(_outcome(ctx, ctx.stat(str(d / "missing"))))
        opened = _outcome(ctx, ctx.openat(str(p), os.O_RDONLY | os.O_CLOEXEC))
        assert isinstance(opened, int)
        out.append(os.pread(opened, 8, 50))
        out.append(_outcome(ctx, ctx.close_fd(opened)))
        out.append(_outcome(ctx, ctx.openat(str(d / "missing"), os.O_RDONLY)))
    finally:
        os.close(fd)
    out.append(p.read_bytes())
    return out


@pytest.mark.parametrize("deliver", [True, False])
def test_every_request_kind_agrees_with_the_threads(deliver: bool, tmp_path: Path) -> None:
    """Differential: the same sequence on an SQPOLL ring and on the pool
    gives the same answers and files; and the SQPOLL ring took what a
    plain ring takes (most of it: the kernel's ops, the rest on the pool)."""
    sq = _sq_context(deliver=deliver, inline=False)
    try:
        for name in ("t", "p", "s"):
            (tmp_path / name).mkdir()
        with AioContext(backend="threads", deliver=deliver, inline=False) as ref:
            expected = _every_kind(ref, tmp_path / "t")
        with AioContext(backend="io_uring", deliver=deliver, inline=False) as plain:
            assert not plain.sqpoll
            assert _every_kind(plain, tmp_path / "p") == expected
            plain_stats = plain.stats()
        assert _every_kind(sq, tmp_path / "s") == expected
        stats = sq.stats()
        assert (stats.ring, stats.threaded) == (plain_stats.ring, plain_stats.threaded)
        assert stats.ring >= 12
    finally:
        assert sq.close(timeout=10)


# -- the SQ thread asleep ------------------------------------------------------------------


def test_a_submission_wakes_the_sleeping_sq_thread(sq: AioContext, path: Path) -> None:
    """Once the SQ thread slept (NEED_WAKEUP: SQPOLL_IDLE_MS without work),
    a submission wakes it.  Fails if a kick leaves it asleep (a plain
    io_uring_enter only returns to_submit with SQPOLL: nothing moves)."""
    ring = sq._ring
    assert ring is not None
    fd = os.open(path, os.O_RDONLY)
    try:
        for _ in range(3):
            wait_until(lambda: sq_thread_asleep(ring))
            buf = bytearray(100)
            req = sq.read(fd, 10, buf)
            assert _outcome(sq, req) == 100
            assert bytes(buf) == path.read_bytes()[10:110]
    finally:
        os.close(fd)


def test_an_awake_sq_thread_takes_submissions_without_a_system_call(
    sq: AioContext, path: Path
) -> None:
    """A kick calls io_uring_enter only while the SQ thread sleeps (the
    mapped flags say NEED_WAKEUP), and then with IORING_ENTER_SQ_WAKEUP;
    awake, it takes a stream of reads with no system call at all."""
    ring = sq._ring
    assert ring is not None
    calls: list[tuple[bool, int]] = []
    real = ring._enter

    def enter(nr: int, fd: int, to_submit: int, min_complete: int, flags: int, *rest: Any) -> int:
        if to_submit:
            calls.append((sq_thread_asleep(ring), flags))  # (nobody else wakes it meanwhile)
        return int(real(nr, fd, to_submit, min_complete, flags, *rest))

    ring._enter = enter
    fd = os.open(path, os.O_RDONLY)
    try:
        wait_until(lambda: sq_thread_asleep(ring))
        assert _outcome(sq, sq.read(fd, 0, bytearray(8))) == 8
        # (Two, at times: a wait's flush finds the SQE not taken yet -- the
        # thread woken and not yet running -- and wakes it again.)
        assert calls
        assert all(call == (True, uring._ENTER_SQ_WAKEUP) for call in calls)
        # Awake now (it just worked; SQPOLL_IDLE_MS is long against a read):
        # most of a stream of reads, if not all, costs no system call (a
        # preemption of this thread for longer lets it sleep: one call).
        calls.clear()
        for _ in range(50):
            assert _outcome(sq, sq.read(fd, 0, bytearray(8))) == 8
        assert len(calls) < 25
        assert all(call == (True, uring._ENTER_SQ_WAKEUP) for call in calls)
    finally:
        os.close(fd)
        ring._enter = real


# -- cancel, close -------------------------------------------------------------------------


def test_cancel_gives_its_three_answers(sq: AioContext, path: Path) -> None:
    """A read waiting on a pipe: CANCELED; a finished one: ALLDONE (and a
    running one cannot be set up on demand: the kernel cancels what waits)."""
    r, w = os.pipe()
    fd = os.open(path, os.O_RDONLY)
    try:
        waiting = sq.read(r, 0, bytearray(4))
        assert waiting._on_ring
        assert waiting.cancel() == CancelResult.CANCELED
        assert _outcome(sq, waiting) == "cancelled"
        done = sq.read(fd, 0, bytearray(4))
        assert _outcome(sq, done) == 4
        assert done.cancel() == CancelResult.ALLDONE
        # The ring's own answers, all three kinds it can give: 0 (cancelled),
        # -ENOENT (not there), through Ring.cancel itself.
        ring = sq._ring
        assert ring is not None
        answers: list[int] = []
        got = threading.Event()
        res: list[int] = []
        ident = ring.submit(
            uring.OP_READ, r, 0, ctypes.addressof(_BUF), 4, 0, lambda x: (res.append(x), got.set())
        )
        assert ident
        done_cancel = threading.Event()
        assert ring.cancel(ident, lambda x: (answers.append(x), done_cancel.set()))
        _reap_until(sq, lambda: got.is_set() and done_cancel.is_set())
        assert answers == [0]
        assert res == [-errno.ECANCELED]
        answers.clear()
        done_cancel.clear()
        assert ring.cancel(ident, lambda x: (answers.append(x), done_cancel.set()))
        _reap_until(sq, done_cancel.is_set)
        assert answers == [-errno.ENOENT]
    finally:
        os.close(r)
        os.close(w)
        os.close(fd)


_BUF = (ctypes.c_char * 16)()


def _reap_until(ctx: AioContext, done: Callable[[], bool]) -> None:
    """Until ``done()``: the owner reaps the ring (deliver), or the reaper
    does (bounded: fails after 10 s)."""
    ring = ctx._ring
    assert ring is not None
    deadline = time.monotonic() + 10
    while not done():
        assert time.monotonic() < deadline, "the ring never answered"
        if ctx.deliver:
            ring.wait(0.1, done)
            ring.reap()
        else:
            wait_until(done)


@pytest.mark.parametrize("deliver", [True, False])
def test_close_with_requests_in_flight(deliver: bool, path: Path) -> None:
    """close() with reads waiting on a pipe (and the SQ thread asleep):
    they finish (written to) and close returns; the fd and the SQ thread
    go."""
    ctx = _sq_context(deliver=deliver)
    ring = ctx._ring
    assert ring is not None
    r, w = os.pipe()
    try:
        wait_until(lambda: sq_thread_asleep(ring))
        reqs = [ctx.read(r, 0, bytearray(1)) for _ in range(4)]
        assert all(req._on_ring for req in reqs)
        closer = threading.Thread(target=lambda: ctx.close(timeout=10))
        closer.start()
        os.write(w, b"abcd")
        closer.join(10)
        assert not closer.is_alive()
        assert ctx.closed
        assert sorted(req.result(0) for req in reqs) == [1, 1, 1, 1]
        assert ring.join(10)
        assert ring._fd_closed
    finally:
        os.close(r)
        os.close(w)


# -- fork ------------------------------------------------------------------------------------


def test_a_forked_child_uses_the_pool_and_the_parent_finishes(path: Path) -> None:
    """The SQ thread stays the parent's: the forked child never publishes
    an SQE (the ring refuses it there); its requests go to the pool; the
    parent's read in flight at the fork completes in the parent."""
    _sq_context().close()  # (skips where there is no SQPOLL)
    code = f"""
import os, sys, ctypes
from threadlets import AioContext, uring
ctx = AioContext(backend="io_uring", sqpoll=True, inline=False)
assert ctx.sqpoll
ring = ctx._ring
r, w = os.pipe()
req = ctx.read(r, 0, bytearray(4))
assert req._on_ring
tail = ring._sq_tail.value
pid = os.fork()
if pid == 0:
    checks = [ring.submit(uring.OP_NOP, -1, 0, 0, 0, 0, print) == 0]
    buf = bytearray(5)
    fd = os.open({str(path)!r}, os.O_RDONLY)
    before = ctx.stats().threaded
    got = ctx.read(fd, 0, buf)
    checks += [ctx.wait(got, timeout=10), got.result() == 5, bytes(buf) == open(fd, "rb").read(5)]
    checks += [ctx.stats().threaded == before + 1, ctx.close(timeout=10)]
    if not all(checks):
        print(checks, file=sys.stderr)
    os._exit(0 if all(checks) else 1)
_, status = os.waitpid(pid, 0)
assert ring._sq_tail.value == tail  # the child published nothing in the shared SQ
os.write(w, b"data")
assert ctx.wait(req, timeout=10) and req.result() == 4
assert ctx.close(timeout=10)
sys.exit(os.waitstatus_to_exitcode(status))
"""
    proc = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        timeout=60,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": SRC},
    )
    assert proc.returncode == 0, proc.stderr


# -- Ctrl-C ----------------------------------------------------------------------------------


@pytest.mark.parametrize("deliver", [True, False])
def test_ctrl_c_anywhere_in_a_kick_leaves_no_request_waiting(deliver: bool, path: Path) -> None:
    """The SQ thread asleep, a held-back read is flushed and Ctrl-C lands
    at each point of the kick (_kick, _wake): the read still completes
    (its wait flushes: the next kick finds the SQE unconsumed and wakes
    the thread), and close() finishes."""
    ctx = _sq_context(deliver=deliver, inline=False)
    ring = ctx._ring
    assert ring is not None
    codes = {uring.Ring._kick.__code__, uring.Ring._wake.__code__}
    fd = os.open(path, os.O_RDONLY)
    try:
        n = 1
        while True:
            wait_until(lambda: sq_thread_asleep(ring))
            buf = bytearray(64)
            assert ring.plug()
            try:
                req = ctx.read(fd, 64, buf)
            finally:
                plugged_by = ring._plugged_by
            assert plugged_by is not None
            points = interrupt_after_call(n, codes, ring.unplug, at_entry=True)
            assert ring._plugged_by is None
            assert _wait(ctx, req), f"Ctrl-C at point {n} of the kick: the read never ran"
            assert req.result() == 64
            assert bytes(buf) == path.read_bytes()[64:128]
            if points < n:
                break
            n += 1
        assert n > 3
    finally:
        os.close(fd)
        assert ctx.close(timeout=10)


# -- setup -----------------------------------------------------------------------------------


def test_a_refused_sqpoll_falls_back_to_a_plain_ring(
    monkeypatch: pytest.MonkeyPatch, path: Path
) -> None:
    """A kernel that refuses SQPOLL (EPERM here) gets a ring without it,
    which works; the refused attempt leaves no descriptor."""
    if not HAVE_RING:
        pytest.skip("no io_uring here")
    setup, enter, register = uring._syscalls()
    asked: list[int] = []

    def refusing(nr: int, entries: int, addr: int) -> int:
        flags = ctypes.c_uint32.from_address(addr + 8).value
        idle = ctypes.c_uint32.from_address(addr + 16).value
        assert idle == (uring.SQPOLL_IDLE_MS if flags else 0)
        asked.append(flags)
        if flags & uring._SETUP_SQPOLL:
            ctypes.set_errno(errno.EPERM)
            return -1
        return int(setup(nr, entries, addr))

    monkeypatch.setattr(uring, "_syscalls", lambda: (refusing, enter, register))
    fds = len(os.listdir("/proc/self/fd"))
    ctx = AioContext(backend="io_uring", sqpoll=True)
    try:
        assert asked == [uring._SETUP_SQPOLL, 0]
        assert ctx.backend == "io_uring"
        assert not ctx.sqpoll
        assert ctx._ring is not None
        assert not ctx._ring.sqpoll
        fd = os.open(path, os.O_RDONLY)
        try:
            assert _outcome(ctx, ctx.read(fd, 0, bytearray(3))) == 3
        finally:
            os.close(fd)
    finally:
        assert ctx.close(timeout=10)
    assert len(os.listdir("/proc/self/fd")) == fds
    # And off by default, or on the threads: never asked.
    asked.clear()
    with AioContext(backend="io_uring") as plain:
        assert not plain.sqpoll
        assert asked == [0]
    with AioContext(backend="threads", sqpoll=True) as threads:
        assert not threads.sqpoll
        assert asked == [0]


# -- leaks -----------------------------------------------------------------------------------


def _sq_threads() -> int:
    n = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                n += f.read().startswith("iou-sqp-")
        except OSError:
            pass  # (gone meanwhile)
    return n


def _ring_maps() -> int:
    with open("/proc/self/maps") as f:
        return sum("io_uring" in line for line in f)


def test_open_close_cycles_leak_nothing() -> None:
    """200 SQPOLL contexts (both kinds) opened, used and closed: no
    descriptor, thread, mapping or SQ kernel thread left (the kernel ends
    its SQ thread after the ring's last fd closes: waited for)."""
    _sq_context().close()
    gc.collect()
    fds = len(os.listdir("/proc/self/fd"))
    threads = threading.active_count()
    maps = _ring_maps()
    sq_before = _sq_threads()
    r, w = os.pipe()
    try:
        for i in range(200):
            ctx = AioContext(backend="io_uring", sqpoll=True, deliver=bool(i % 2))
            assert ctx.sqpoll
            req = ctx.read(r, 0, bytearray(1))  # in flight at close: cancelled or read
            if i % 3 == 0:
                os.write(w, b"x")
                assert _wait(ctx, req)
            else:
                req.cancel()
            assert ctx.close(timeout=10)
            del ctx, req
    finally:
        os.close(r)
        os.close(w)
    gc.collect()
    assert len(os.listdir("/proc/self/fd")) <= fds
    wait_until(lambda: threading.active_count() <= threads)
    assert _ring_maps() == maps
    wait_until(lambda: _sq_threads() <= sq_before)


# -- posix -----------------------------------------------------------------------------------


def test_posix_on_an_sqpoll_context(path: Path) -> None:
    """threadlets.posix through use_context(AioContext(deliver=False,
    sqpoll=True)): reads, writes and fsyncs answer as os.pread/os.pwrite
    (the SQ thread asleep before each round), on the ring."""
    import threadlets.posix as px

    ctx = _sq_context(deliver=False, inline=False)
    ring = ctx._ring
    assert ring is not None
    data = path.read_bytes()
    fd = os.open(path, os.O_RDWR)
    try:
        with px.use_context(ctx):
            for rnd in range(3):
                wait_until(lambda: sq_thread_asleep(ring))
                bufs = [bytearray(512) for _ in range(8)]
                cbs = [px.aiocb(fd, i * 700 + rnd, bufs[i], 512) for i in range(8)]
                for cb in cbs:
                    px.aio_read(cb)
                px.aio_suspend(cbs[-1:], 10)
                for i, cb in enumerate(cbs):
                    while px.aio_error(cb) == errno.EINPROGRESS:
                        px.aio_suspend([cb], 10)
                    assert px.aio_error(cb) == 0
                    assert px.aio_return(cb) == 512
                    assert bytes(bufs[i]) == data[i * 700 + rnd : i * 700 + rnd + 512]
                wcb = px.aiocb(fd, 100 + rnd, b"written")
                px.aio_write(wcb)
                px.aio_suspend([wcb], 10)
                assert px.aio_error(wcb) == 0
                assert px.aio_return(wcb) == 7
                scb = px.aiocb(fd, 0, b"")
                px.aio_fsync(os.O_DSYNC, scb)
                px.aio_suspend([scb], 10)
                assert px.aio_error(scb) == 0
                assert os.pread(fd, 7, 100 + rnd) == b"written"
                data = os.pread(fd, len(data), 0)
        assert ctx.stats().ring >= 30
    finally:
        os.close(fd)
        assert ctx.close(timeout=10)


# -- the asyncio front end -------------------------------------------------------------------


def test_configure_sqpoll_for_the_asyncio_front_end_direct_reads(tmp_path: Path) -> None:
    """configure(sqpoll=True): a new loop's context asks for it; O_DIRECT
    reads through threadlets.open give the file's bytes.  configure()
    restores the default (off)."""
    _sq_context().close()
    d = Path("/var/tmp") if os.access("/var/tmp", os.W_OK) else tmp_path
    p = d / f"threadlets-sqpoll-{os.getpid()}"
    p.write_bytes(DATA)

    async def main() -> None:
        async with threadlets.open(p, "rb", buffering=0, direct=True) as f:
            ctx = f._ctx
            assert ctx.sqpoll
            ring = ctx._ring
            assert ring is not None
            for off in (0, 4096, 12288, 61440):
                assert await f.pread(4096, off) == DATA[off : off + 4096]
            wait_until(lambda: sq_thread_asleep(ring))
            got = await asyncio.gather(*(f.pread(4096, o * 4096) for o in range(16)))
            assert b"".join(got) == DATA

    try:
        aw.configure(sqpoll=True)
        made = aw._new_context()
        try:
            assert made.sqpoll
        finally:
            made.close()
        asyncio.run(main())
    finally:
        aw.configure()
        p.unlink()
    assert aw._settings["sqpoll"] is False


def test_close_with_the_sq_full_of_held_sqes_and_the_thread_asleep() -> None:
    """A reaper-mode ring whose SQ is full of SQEs held back by a plug
    while the SQ thread sleeps: close() sends them, then its STOP.  The
    kick only wakes the thread (it returns before the thread took any), so
    the STOP must wait for room: pushed at once it went over the oldest SQE
    not consumed (that read never ran, and the reaper never finished)."""
    if not HAVE_RING:
        pytest.skip("no io_uring here")
    for _ in range(3):
        ring = uring.Ring(8, sqpoll=True)
        if not ring.sqpoll:
            ring.close()
            pytest.skip("the kernel refused IORING_SETUP_SQPOLL here")
        r, w = os.pipe()
        try:
            bufs = [(ctypes.c_char * 1)() for _ in range(ring.entries)]
            got: list[int] = []
            wait_until(lambda: sq_thread_asleep(ring))  # noqa: B023
            assert ring.plug()
            for buf in bufs:
                assert ring.submit(uring.OP_READ, r, 0, ctypes.addressof(buf), 1, 0, got.append)
            assert (ring._tail - ring._sq_head.value) & 0xFFFFFFFF == ring.entries  # full
            ring.close()
            ring.unplug()
            os.write(w, b"x" * ring.entries)
            assert ring.join(10), f"{len(got)} of {ring.entries} reads came back"
            assert got == [1] * ring.entries
        finally:
            os.close(r)
            os.close(w)
