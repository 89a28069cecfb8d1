"""The io_uring backend: the ring itself (submission, plugging, reaping,
close) and the engine on it -- contents verified, every way a request leaves
the ring (full transfer, short, error, alignment the ring cannot take),
foreign-thread waits in owner mode, the reaper mode of non-delivering
contexts, cancel, close and fork."""

from __future__ import annotations

import errno
import os
import random
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import threadlets
from threadlets import AioContext, CancelResult, ThreadletQueue
from threadlets.probe import buffer_address, probe_direct_io, probe_io_uring
from threadlets.syscalls import FaultInjector
from threadlets.uring import (
    DEFER_AT,
    KICK_AT,
    OP_FSYNC,
    OP_NOP,
    OP_READ,
    OP_WRITE,
    Ring,
    call_after_batch,
)

from .conftest import PATTERN, wait_until

pytestmark = pytest.mark.skipif(
    not probe_io_uring().supported or os.uname().machine != "x86_64",
    reason="io_uring backend not available here",
)


@pytest.fixture
def ctx() -> Iterator[AioContext]:
    q = ThreadletQueue(max_threads=4)
    c = AioContext(q, backend="io_uring", inline=False)
    yield c
    assert c.close(timeout=10)
    assert q.close(timeout=10)


# -- the ring ------------------------------------------------------------------------


def test_ring_read_write_fsync(fd: int) -> None:
    ring = Ring(8)
    results: list[int] = []
    done = threading.Semaphore(0)

    def cb(res: int) -> None:
        results.append(res)
        done.release()

    buf = threadlets.aligned_buffer(4096)
    data = bytearray(b"ring" * 25)
    assert ring.submit(OP_WRITE, fd, 10, buffer_address(memoryview(data)) or 0, 100, 0, cb)
    assert done.acquire(timeout=10)
    assert ring.submit(OP_READ, fd, 0, buffer_address(buf) or 0, 4096, 0, cb)
    assert done.acquire(timeout=10)
    assert ring.submit(OP_FSYNC, fd, 0, 0, 0, 0, cb)
    assert done.acquire(timeout=10)
    assert ring.submit(OP_READ, 999_999, 0, buffer_address(buf) or 0, 1, 0, cb)  # EBADF
    assert done.acquire(timeout=10)
    assert results == [100, 4096, 0, -9]
    assert bytes(buf[:110]) == PATTERN[:10] + b"ring" * 25
    ring.close()
    assert ring.join(10)
    assert not ring.submit(OP_READ, fd, 0, buffer_address(buf) or 0, 1, 0, cb)  # closed


def test_ring_plug_holds_submissions_until_unplug(fd: int) -> None:
    """While this thread holds the plug, its SQEs are published but the
    kernel has not taken them (the SQ head stays behind); unplug submits
    them in one go.  Without SQPOLL the kernel only reads the SQ inside
    io_uring_enter, so this is deterministic."""
    ring = Ring(16)
    done = threading.Semaphore(0)
    bufs = [bytearray(512) for _ in range(4)]
    assert ring.plug()
    for i, b in enumerate(bufs):
        assert ring.submit(OP_READ, fd, i * 512, buffer_address(memoryview(b)) or 0, 512, 0,
                           lambda res: done.release())  # fmt: skip
    assert (ring._tail - ring._sq_head.value) & 0xFFFFFFFF == 4  # nothing taken yet
    # Another thread does not queue behind this thread's plug.
    other = threading.Thread(target=lambda: ring.plug() or ring.flush())
    other.start()
    other.join()
    ring.unplug()
    assert ring._sq_head.value == ring._tail
    for _ in bufs:
        assert done.acquire(timeout=10)
    assert [bytes(b) for b in bufs] == [PATTERN[i * 512 : (i + 1) * 512] for i in range(4)]
    ring.close()
    assert ring.join(10)


def test_a_plugged_burst_starts_the_idle_device_early(fd: int) -> None:
    """With nothing of the ring's in the kernel, the KICK_AT-th submission
    under the plug sends what is held (the device would otherwise sit idle
    while the rest of the burst is made: lockstep batches, issue 13); with
    some in the kernel the burst waits for the unplug."""
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    ring = Ring(128, eventfd=efd)  # owner mode: nothing is reaped behind the test
    results: list[int] = []
    count = 2 * KICK_AT + 3
    bufs = [bytearray(64) for _ in range(count)]
    try:
        assert ring.plug()
        try:
            for i, b in enumerate(bufs):
                assert ring.submit(OP_READ, fd, 64 * i, buffer_address(memoryview(b)) or 0, 64, 0,
                                   results.append)  # fmt: skip
                # The first KICK_AT went at once; the rest wait: the kernel
                # has those in hand (and nothing reaps them here).
                held = i + 1 if i + 1 < KICK_AT else i + 1 - KICK_AT
                assert ring._unsubmitted == held, i
        finally:
            ring.unplug()
        while len(results) < count:
            ring.wait(10)
            ring.reap()
        assert results == [64] * count
        assert [bytes(b) for b in bufs] == [PATTERN[64 * i : 64 * (i + 1)] for i in range(count)]
    finally:
        ring.close()
        assert ring.join(10)
        os.close(efd)


def test_hold_schedules_one_flush_per_batch(fd: int) -> None:
    """A permanent plug (an event loop's): submissions wait for a flush,
    and only the first one after each flush asks for one to be scheduled."""
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    ring = Ring(16, eventfd=efd)
    scheduled: list[int] = []
    results: list[int] = []
    try:
        assert ring.hold(lambda: scheduled.append(ring._unsubmitted))
        assert not ring.plug()  # the hold is the plug
        bufs = [bytearray(64) for _ in range(6)]
        for i, b in enumerate(bufs[:3]):
            assert ring.submit(OP_READ, fd, 64 * i, buffer_address(memoryview(b)) or 0, 64, 0,
                               results.append)  # fmt: skip
        assert scheduled == [1]  # asked once, by the first
        assert ring._unsubmitted == 3
        assert ring._in_kernel == 0
        ring.flush()
        assert ring._in_kernel == 3
        for i, b in enumerate(bufs[3:], 3):
            assert ring.submit(OP_READ, fd, 64 * i, buffer_address(memoryview(b)) or 0, 64, 0,
                               results.append)  # fmt: skip
        assert scheduled == [1, 1]  # asked again after the flush
        ring.flush()
        while len(results) < 6:
            ring.wait(10)
            ring.reap()
        assert results == [64] * 6
        assert [bytes(b) for b in bufs] == [PATTERN[64 * i : 64 * (i + 1)] for i in range(6)]
    finally:
        ring.close()
        os.close(efd)


def test_call_after_batch_runs_once_after_the_whole_batch(fd: int) -> None:
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    ring = Ring(16, eventfd=efd)
    events: list[str] = []

    def after() -> None:
        events.append("after")

    def cb(res: int) -> None:
        events.append(f"done {res}")
        assert call_after_batch(after)

    try:
        assert not call_after_batch(after)  # not in a reap: the caller runs it
        assert ring.plug()
        bufs = [bytearray(8 * (i + 1)) for i in range(3)]
        for b in bufs:
            assert ring.submit(OP_READ, fd, 0, buffer_address(memoryview(b)) or 0, len(b), 0, cb)
        ring.unplug()
        got = reaps = 0
        while got < 3:
            ring.wait(10)
            n = ring.reap()
            got += n
            reaps += n > 0
        # One "after" per reap that handed something out, after all of it.
        assert events.count("after") == reaps
        assert events[-1] == "after"
        assert sorted(e for e in events if e != "after") == ["done 16", "done 24", "done 8"]
        assert events[0] != "after"
    finally:
        ring.close()
        os.close(efd)


def test_ring_refuses_more_than_entries_in_flight(tmp_path: Path) -> None:
    r, w = os.pipe()  # reads of an empty pipe stay in flight until written
    ring = Ring(4)
    got: list[int] = []
    bufs = [bytearray(1) for _ in range(ring.entries + 1)]
    taken = [
        bool(ring.submit(OP_READ, r, 0, buffer_address(memoryview(b)) or 0, 1, 0, got.append))
        for b in bufs
    ]
    assert taken == [True] * ring.entries + [False]
    os.write(w, b"x" * ring.entries)
    ring.close()
    assert ring.join(10)
    assert got == [1] * ring.entries
    os.close(r)
    os.close(w)


@pytest.mark.parametrize("reaper", [True, False])
def test_submissions_never_wait_on_stuck_operations(fd: int, reaper: bool) -> None:
    """Pipe reads that will never complete sit in the kernel; a file read
    submitted after them goes to the kernel at once and completes."""
    efd = os.eventfd(0, os.EFD_NONBLOCK) if not reaper else None
    ring = Ring(32, eventfd=efd)
    r, w = os.pipe()
    try:
        if reaper:  # asleep before the stuck ones arrive: a long sleep, then
            wait_until(lambda: _in_io_uring_enter(ring))
        stuck = [bytearray(1) for _ in range(16)]
        for b in stuck:
            assert ring.submit(OP_READ, r, 0, buffer_address(memoryview(b)) or 0, 1, 0,
                               lambda res: None)  # fmt: skip
        done = threading.Event()
        buf = bytearray(16)
        assert ring.submit(
            OP_READ, fd, 0, buffer_address(memoryview(buf)) or 0, 16, 0, lambda res: done.set()
        )
        assert ring._unsubmitted == 0  # not held back: straight to the kernel
        if not reaper:
            ring.wait(10)
            ring.reap()
        assert done.wait(10)
        assert buf == PATTERN[:16]
        os.write(w, b"x" * len(stuck))  # let the stuck ones finish
        if not reaper:
            while ring._inflight:
                ring.wait(10)
                ring.reap()
    finally:
        ring.close()
        assert ring.join(10)
        os.close(r)
        os.close(w)
        if efd is not None:
            os.close(efd)


def test_short_sleeps_send_held_back_work_past_stuck_operations(fd: int) -> None:
    """With DEFER_AT operations stuck in the kernel the reaper sleeps short
    and submissions are held back for it: they still complete (HOLD_MAX
    later at the latest), and once a short sleep sees nothing the reaper
    goes back to sleeping until a completion (no stream of wakeups)."""
    ring = Ring(32)
    r, w = os.pipe()
    try:
        for _ in range(DEFER_AT):
            b = bytearray(1)
            assert ring.submit(OP_READ, r, 0, buffer_address(memoryview(b)) or 0, 1, 0,
                               lambda res, b=b: None)  # fmt: skip
        for i in range(5):  # each completion wakes the reaper, which then sleeps short
            done = threading.Event()
            buf = bytearray(16)
            assert ring.submit(OP_READ, fd, 16 * i, buffer_address(memoryview(buf)) or 0, 16,
                               0, lambda res, done=done: done.set())  # fmt: skip
            assert done.wait(10)
            assert buf == PATTERN[16 * i : 16 * (i + 1)]
        wait_until(lambda: not ring._reaper_holds)  # quiet: a long sleep now
        wakeups = ring.wakeups
        assert ring.submit(OP_NOP, -1, 0, 0, 0, 0, lambda res: None)
        wait_until(lambda: ring.wakeups > wakeups)
        os.write(w, b"x" * DEFER_AT)
    finally:
        ring.close()
        assert ring.join(10)
        os.close(r)
        os.close(w)


def _in_io_uring_enter(ring: Ring) -> bool:
    """The reaper thread is blocked in io_uring_enter (from /proc)."""
    assert ring._reaper is not None
    try:
        with open(f"/proc/self/task/{ring._reaper.native_id}/syscall") as f:
            return f.read().split()[0] == "426"
    except (OSError, IndexError):
        pytest.skip("cannot read /proc/self/task/*/syscall here")


def test_reaper_sends_what_was_held_back_during_its_pass(fd: int) -> None:
    """While the reaper is busy in a completion callback, another thread's
    submission is held back; the end of the reaper's pass sends it."""
    ring = Ring(8)
    in_callback, release = threading.Event(), threading.Event()
    first, second = bytearray(8), bytearray(8)
    done = threading.Event()

    def slow(res: int) -> None:
        in_callback.set()
        assert release.wait(10)

    assert ring.submit(OP_READ, fd, 0, buffer_address(memoryview(first)) or 0, 8, 0, slow)
    assert in_callback.wait(10)
    assert ring.submit(
        OP_READ, fd, 8, buffer_address(memoryview(second)) or 0, 8, 0, lambda res: done.set()
    )
    assert ring._unsubmitted == 1  # held back: the reaper is mid-pass
    release.set()
    assert done.wait(10)
    assert second == PATTERN[8:16]
    ring.close()
    assert ring.join(10)


# -- the engine on the ring ------------------------------------------------------------


def test_read_write_roundtrip_on_the_ring(ctx: AioContext, fd: int) -> None:
    assert ctx.backend == "io_uring"
    req = ctx.write(fd, 100, b"hello, world")
    assert ctx.wait(req, timeout=10)
    assert req.result() == 12
    buf = bytearray(4096)
    req = ctx.read(fd, 0, buf)
    assert ctx.wait(req, timeout=10)
    assert req.result() == 4096
    assert bytes(buf) == PATTERN[:100] + b"hello, world" + PATTERN[112:4096]
    s = ctx.stats()
    assert s.ring == 2
    assert s.threaded == 0
    assert s.outstanding == 0


def test_many_concurrent_requests_verified(ctx: AioContext, fd: int) -> None:
    """Writes of distinct blocks, all in flight together, then reads of all
    of them, all in flight together: every byte where it belongs."""
    rng = random.Random(7)
    blocks = {i: rng.randbytes(512) for i in range(64)}
    reqs = [ctx.write(fd, i * 512, data) for i, data in blocks.items()]
    assert ctx.drain(timeout=10)
    assert [r.result() for r in reqs] == [512] * 64
    bufs = {i: bytearray(512) for i in blocks}
    reqs = [ctx.read(fd, i * 512, b) for i, b in bufs.items()]
    assert ctx.drain(timeout=10)
    assert all(r.result() == 512 for r in reqs)
    assert all(bufs[i] == blocks[i] for i in blocks)
    assert ctx.stats().ring == 128


def test_short_read_at_eof_finishes_on_a_worker(ctx: AioContext, fd: int) -> None:
    buf = bytearray(4096)
    req = ctx.read(fd, len(PATTERN) - 100, buf)
    assert ctx.wait(req, timeout=10)
    assert req.result() == 100
    assert bytes(buf[:100]) == PATTERN[-100:]
    req = ctx.read(fd, len(PATTERN) - 100, bytearray(4096), zero_fill=True)
    assert ctx.wait(req, timeout=10)
    assert req.result() == 4096
    req = ctx.read(fd, len(PATTERN) + 4096, bytearray(10))
    assert ctx.wait(req, timeout=10)
    assert req.result() == 0


def test_short_ring_read_finishes_even_if_the_queue_closed(fd: int) -> None:
    """The rest of a short ring read goes to the context's queue; if that
    queue was closed meanwhile, the reaping thread finishes it itself."""
    q = ThreadletQueue(max_threads=2)
    ctx = AioContext(q, backend="io_uring", inline=False)
    try:
        req = ctx.read(fd, len(PATTERN) - 10, bytearray(4096))  # short: EOF
        assert q.close(timeout=10)
        assert ctx.wait(req, timeout=10)
        assert req.result() == 10
    finally:
        ctx.close(timeout=10)


def test_errors_come_back_with_the_thread_paths_errno(ctx: AioContext, path: Path) -> None:
    rfd = os.open(path, os.O_RDONLY)
    try:
        req = ctx.write(rfd, 0, b"nope")  # EBADF: not open for writing
        assert ctx.wait(req, timeout=10)
        assert req.error == 9
        assert os.pread(rfd, 4, 0) == PATTERN[:4]
    finally:
        os.close(rfd)


def test_vectored_requests_go_to_the_ring_read_only_views_to_threads(
    ctx: AioContext, fd: int
) -> None:
    bufs = [bytearray(3), bytearray(0), bytearray(5)]  # (an empty one is left out)
    req = ctx.read(fd, 0, bufs)
    assert ctx.wait(req, timeout=10)
    assert req.result() == 8
    assert bytes(bufs[0] + bufs[2]) == PATTERN[:8]
    assert ctx.stats().ring == 1
    data = b"0123456789"
    req = ctx.write(fd, 0, memoryview(data)[2:6])  # a slice of bytes: no address for the kernel
    assert ctx.wait(req, timeout=10)
    assert req.result() == 4
    assert os.pread(fd, 4, 0) == b"2345"
    s = ctx.stats()
    assert s.ring == 1
    assert s.threaded == 1


def test_a_ring_request_that_moved_nothing_is_cancelled(ctx: AioContext) -> None:
    """IORING_OP_ASYNC_CANCEL: the same answers as on the threads backend
    (CANCELED: nothing touched), and the request reads CANCELLED at once."""
    r, w = os.pipe()
    try:
        buf = bytearray(3)
        req = ctx.read(r, 0, buf)  # stays in the kernel until the pipe has data
        assert req.state is threadlets.ThreadletState.RUNNING
        assert req.cancel() is CancelResult.CANCELED
        assert req.state is threadlets.ThreadletState.CANCELLED
        assert req.cancel() is CancelResult.ALLDONE
        assert ctx.wait(req, timeout=10)
        os.write(w, b"xyz")
        assert os.read(r, 3) == b"xyz"  # nothing was consumed
        assert buf == bytes(3)
    finally:
        ctx.forget(r)
        os.close(r)
        os.close(w)


def test_a_ring_request_the_kernel_completed_is_not_cancelled(ctx: AioContext) -> None:
    r, w = os.pipe()
    try:
        buf = bytearray(3)
        req = ctx.read(r, 0, buf)
        assert req.state is threadlets.ThreadletState.RUNNING
        os.write(w, b"abc")
        ring = ctx._ring
        assert ring is not None
        wait_until(lambda: ring._cq_tail.value != ring._cq_head.value)  # posted, not reaped
        assert req.cancel() is CancelResult.ALLDONE  # (the kernel says -ENOENT)
        assert ctx.wait(req, timeout=10)
        assert req.result() == 3
        assert buf == b"abc"
    finally:
        ctx.forget(r)
        os.close(r)
        os.close(w)


def test_the_buffer_stays_pinned_while_the_kernel_has_it(ctx: AioContext) -> None:
    """The kernel writes through a raw address: while a ring read is in
    flight the memory stays where it is, even if the caller releases its
    memoryview (the bytearray under it cannot be resized)."""
    r, w = os.pipe()
    try:
        first = ctx.read(r, 0, bytearray(1))  # the context knows the fd from now on:
        os.write(w, b"1")  # the next read takes the fast path, which keeps the
        assert ctx.wait(first, timeout=10)  # caller's own memoryview
        raw = bytearray(4)
        view = memoryview(raw)
        req = ctx.read(r, 0, view)
        assert ctx.stats().ring == 2
        view.release()
        with pytest.raises(BufferError):
            raw.extend(b"more")
        os.write(w, b"data")
        assert ctx.wait(req, timeout=10)
        assert raw == b"data"
        del req  # the request (and its pin) goes; the buffer is free again
        ctx.process_completions()
        raw.extend(b"more")
        assert raw == b"datamore"
    finally:
        ctx.forget(r)
        os.close(r)
        os.close(w)


def test_callbacks_resubmit_through_the_plug(ctx: AioContext, fd: int) -> None:
    """Each completion's callback submits the next read (held back by the
    plug during process_completions, then sent in one go)."""
    seen: list[bytes] = []
    bufs = [bytearray(256) for _ in range(8)]

    def chain(i: int, left: int) -> None:
        def cb(req: threadlets.AioRequest) -> None:
            assert req.result() == 256
            seen.append(bytes(bufs[i]))
            if left:
                chain(i, left - 1)

        ctx.read(fd, ((i * 7 + left) % 64) * 256, bufs[i], callback=cb)

    for i in range(8):
        chain(i, 20)
    assert ctx.drain(timeout=10)
    assert len(seen) == 8 * 21
    assert all(s in PATTERN for s in seen)


def test_callback_waiting_on_a_held_back_request(ctx: AioContext, fd: int) -> None:
    """A callback that submits and then waits for that request (which the
    plug holds back) must not deadlock: wait() sends it first."""
    out: list[int] = []

    def cb(req: threadlets.AioRequest) -> None:
        inner = ctx.read(fd, 0, bytearray(16))
        assert inner.wait(timeout=10)
        out.append(inner.result())

    ctx.read(fd, 0, bytearray(16), callback=cb)
    assert ctx.drain(timeout=10)
    assert out == [16]


def test_foreign_thread_wait_reaps_in_owner_mode(ctx: AioContext) -> None:
    """Nobody processes the context's completions: a thread waiting on the
    request itself reaps the ring (and the owner later sees the request)."""
    r, w = os.pipe()
    try:
        buf = bytearray(2)
        req = ctx.read(r, 0, buf)
        result: list[bool] = []
        t = threading.Thread(target=lambda: result.append(req.wait(timeout=10)))
        t.start()
        os.write(w, b"ok")
        t.join()
        assert result == [True]
        assert buf == b"ok"
        assert ctx.process_completions() == 1
    finally:
        ctx.forget(r)
        os.close(r)
        os.close(w)


def test_foreign_wait_follows_a_request_to_the_workers(ctx: AioContext, fd: int) -> None:
    """A short ring read finishes on a worker: a waiter blocked in the ring
    must learn that (the NOP wakes it) and wait for the worker instead."""
    results: list[int] = []
    gate = threading.Event()
    blocker = ctx.queue.submit(gate.wait, 10)  # the one worker is busy until set
    try:
        ctx.queue.set_limits(max_threads=1)
        req = ctx.read(fd, len(PATTERN) - 10, bytearray(100))  # short: worker's turn

        def waiter() -> None:
            assert req.wait(timeout=10)
            results.append(req.result())

        t = threading.Thread(target=waiter)
        t.start()
        gate.set()
        t.join(timeout=20)
        assert results == [10]
    finally:
        gate.set()
        blocker.wait(10)
        ctx.queue.set_limits(max_threads=4)


def test_non_delivering_context_uses_a_reaper(fd: int) -> None:
    with AioContext(deliver=False, backend="io_uring", inline=False) as ctx:
        assert ctx._ring is not None
        assert not ctx._ring.owner_mode
        buf = bytearray(64)
        req = ctx.read(fd, 64, buf)
        assert req.wait(timeout=10)
        assert req.result() == 64
        assert buf == PATTERN[64:128]
        ring = ctx._ring
    assert ring.join(10)  # closing let the reaper finish and release the ring


@pytest.mark.skipif(not probe_direct_io(".").supported, reason="no O_DIRECT here")
def test_direct_aligned_on_the_ring_unaligned_bounced(ctx: AioContext, path: Path) -> None:
    dfd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        ab = threadlets.aligned_buffer(4096)
        req = ctx.read(dfd, 4096, ab)
        assert ctx.wait(req, timeout=10)
        assert req.result() == 4096
        assert bytes(ab) == PATTERN[4096:8192]
        assert ctx.stats().ring == 1
        raw = bytearray(5000)
        req = ctx.read(dfd, 4097, memoryview(raw)[1:4097])  # misaligned: bounce on a worker
        assert ctx.wait(req, timeout=10)
        assert req.result() == 4096
        assert bytes(raw[1:4097]) == PATTERN[4097:8193]
        assert ctx.stats().ring == 1
    finally:
        ctx.forget(dfd)
        os.close(dfd)


def test_backend_arguments() -> None:
    with pytest.raises(ValueError, match="backend must be one of"):
        AioContext(backend="fibers")
    with pytest.raises(ValueError, match="threads backend"):
        AioContext(backend="io_uring", syscalls=FaultInjector(0.1, seed=1))
    with AioContext(backend="auto", syscalls=FaultInjector(0.1, seed=1)) as c:
        assert c.backend == "threads"  # faults enter through the threads only
    with AioContext(backend="auto") as c:
        assert c.backend == "io_uring"
    with AioContext() as c:
        assert c.backend == "threads"


def test_forked_child_leaves_the_parents_completions_alone(path: Path) -> None:
    """The ring's memory is shared across fork: a child processing its copy
    of the context must not reap (or submit) the parent's operations."""
    code = """
import os, sys, time, threadlets
ctx = threadlets.AioContext(backend="io_uring", inline=False)
r, w = os.pipe()
buf = bytearray(2)
req = ctx.read(r, 0, buf)  # in the kernel until the pipe has data
os.write(w, b"ok")
ring = ctx._ring
deadline = time.monotonic() + 10
while ring._cq_tail.value == ring._cq_head.value:  # posted, not yet reaped
    assert time.monotonic() < deadline
    time.sleep(0.001)
pid = os.fork()
if pid == 0:
    ctx.process_completions()
    ring.reap()
    ring.flush()
    os._exit(0 if ctx._ring is None else 1)  # the child's context left the ring
_, status = os.waitpid(pid, 0)
assert ctx.wait(req, timeout=10), "the child took the parent's completion"
assert req.result() == 2 and buf == b"ok"
ctx.close()
sys.exit(os.waitstatus_to_exitcode(status))
"""
    proc = subprocess.run(
        [sys.executable, "-c", code], check=False, timeout=60, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr


def test_forked_child_falls_back_to_threads(path: Path) -> None:
    code = f"""
import os, sys, threadlets
ctx = threadlets.AioContext(backend="io_uring", inline=False)
fd = os.open({str(path)!r}, os.O_RDONLY)
pid = os.fork()
if pid == 0:
    buf = bytearray(8)
    req = ctx.read(fd, 8, buf)
    ok = ctx.wait(req, timeout=10) and req.result() == 8 and buf == bytes(range(8, 16))
    ok = ok and ctx.stats().ring == 0 and ctx.stats().threaded == 1
    os._exit(0 if ok else 1)
_, status = os.waitpid(pid, 0)
buf = bytearray(8)
req = ctx.read(fd, 0, buf)
assert ctx.wait(req, timeout=10) and buf == bytes(range(8)) and ctx.stats().ring == 1
ctx.close()
sys.exit(os.waitstatus_to_exitcode(status))
"""
    proc = subprocess.run(
        [sys.executable, "-c", code], check=False, timeout=60, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr


# -- every request kind the kernel has an opcode for --------------------------------------


def _kinds(ctx: AioContext, fd: int) -> dict[str, threadlets.AioRequest]:
    """One request of each kind that can go to the ring."""
    a, b = bytearray(100), bytearray(200)
    return {
        "readv": ctx.read(fd, 0, [a, b]),
        "writev": ctx.write(fd, 8192, [b"x" * 100, b"y" * 50]),
        "flush": ctx.flush(fd),
        "fsync": ctx.flush(fd, datasync=False),
        "discard": ctx.discard(fd, 4096, 4096),
        "allocate": ctx.allocate(fd, 16384, 4096),
        "write_zeroes": ctx.write_zeroes(fd, 0, 512),
    }


def test_every_kind_with_an_opcode_goes_to_the_ring(ctx: AioContext, fd: int) -> None:
    before = ctx.stats().ring
    reqs = _kinds(ctx, fd)
    for kind, req in reqs.items():
        assert ctx.wait(req, timeout=10), kind
        req.result()  # raises if it failed
    assert ctx.stats().ring - before == len(reqs)
    assert reqs["readv"].result() == 300
    assert reqs["writev"].result() == 150
    assert os.pread(fd, 150, 8192) == b"x" * 100 + b"y" * 50
    assert os.pread(fd, 512, 0) == bytes(512)
    assert os.pread(fd, 4096, 4096) == bytes(4096)  # the hole reads as zeros
    assert os.fstat(fd).st_size >= 16384 + 4096  # allocate extended it


@pytest.mark.parametrize(
    "missing", [OP_FSYNC, threadlets.uring.OP_FALLOCATE, threadlets.uring.OP_READV]
)
def test_an_opcode_the_kernel_lacks_goes_to_the_pool(
    ctx: AioContext, fd: int, missing: int
) -> None:
    """What the probe says is missing runs on a worker, with the same result."""
    ring = ctx._ring
    assert ring is not None
    ring.supported = ring.supported - {missing}
    for kind, req in _kinds(ctx, fd).items():
        assert ctx.wait(req, timeout=10), kind
        req.result()
    assert os.pread(fd, 150, 8192) == b"x" * 100 + b"y" * 50
    kinds_on_it = {OP_FSYNC: 2, threadlets.uring.OP_FALLOCATE: 3, threadlets.uring.OP_READV: 1}
    assert ctx.stats().ring == 7 - kinds_on_it[missing]


def test_flush_errors_on_the_ring_follow_ops(ctx: AioContext) -> None:
    """fsync of a pipe: EINVAL, not remembered (the fd cannot be flushed);
    the same answer as the threads give."""
    r, w = os.pipe()
    try:
        for _ in range(2):
            req = ctx.flush(w)
            assert ctx.wait(req, timeout=10)
            with pytest.raises(OSError) as e:
                req.result()
            assert e.value.errno == errno.EINVAL
    finally:
        os.close(r)
        os.close(w)


def test_a_ring_flush_can_be_cancelled_or_not_but_answers(ctx: AioContext, fd: int) -> None:
    req = ctx.flush(fd)
    answer = req.cancel()
    assert answer in (CancelResult.CANCELED, CancelResult.NOTCANCELED, CancelResult.ALLDONE)
    assert ctx.wait(req, timeout=10)
    if answer is CancelResult.CANCELED:
        assert req.state is threadlets.ThreadletState.CANCELLED
    else:
        assert req.result() == 0
