"""The paio engine: every request kind against real files, faults through
the seam, O_DIRECT bounce buffers, sticky flush, ENOTSUP memory, the three
cancel outcomes, re-entrant callbacks and completion batching."""

from __future__ import annotations

import errno
import fcntl
import os
import select
import struct
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

import threadlets
from threadlets import AioContext, AioRequest, CancelResult, ThreadletQueue, ThreadletState
from threadlets.ops import IOV_MAX
from threadlets.probe import buffer_address, probe_direct_io, probe_io_uring
from threadlets.syscalls import FaultInjector, Syscalls

from .conftest import PATTERN, Gate

FIGETBSZ = 2


@pytest.fixture(params=["threads", "io_uring"])
def ctx(request: pytest.FixtureRequest) -> Iterator[AioContext]:
    """A context on each backend (the tests that use it hold on both)."""
    if request.param == "io_uring" and not probe_io_uring().supported:
        pytest.skip("no io_uring here")
    q = ThreadletQueue(max_threads=4)
    c = AioContext(q, backend=request.param)
    yield c
    assert c.close(timeout=10)
    assert q.close(timeout=10)


def run(ctx: AioContext, req: AioRequest) -> int:
    assert ctx.wait(req, timeout=10)
    return req.result()


# -- reads and writes --------------------------------------------------------------


@pytest.mark.parametrize("inline", [True, False])
def test_read_write_roundtrip(fd: int, inline: bool) -> None:
    with ThreadletQueue() as q, AioContext(q, inline=inline) as ctx:
        assert run(ctx, ctx.write(fd, 100, b"hello, world")) == 12
        buf = bytearray(12)
        assert run(ctx, ctx.read(fd, 100, buf)) == 12
        assert buf == b"hello, world"
        assert os.pread(fd, 12, 100) == b"hello, world"
        s = ctx.stats()
        if inline:
            assert s.inline >= 1
        else:
            assert s.inline == 0
            assert s.threaded == 2


def test_vectored_read_and_write(ctx: AioContext, fd: int) -> None:
    parts = [b"a" * 3, b"", b"bb" * 100, bytearray(b"c" * 4096), memoryview(b"dd")]
    total = sum(len(p) for p in parts)
    assert run(ctx, ctx.write(fd, 10, parts)) == total
    bufs = [bytearray(len(p)) for p in parts]
    assert run(ctx, ctx.read(fd, 10, bufs)) == total
    assert [bytes(b) for b in bufs] == [bytes(p) for p in parts]


def test_more_buffers_than_iov_max(ctx: AioContext, fd: int) -> None:
    n = IOV_MAX * 2 + 7
    parts = [bytes([i % 251]) * 3 for i in range(n)]
    assert run(ctx, ctx.write(fd, 0, parts)) == 3 * n
    assert os.pread(fd, 3 * n, 0) == b"".join(parts)
    bufs = [bytearray(3) for _ in range(n)]
    assert run(ctx, ctx.read(fd, 0, bufs)) == 3 * n
    assert b"".join(bufs) == b"".join(parts)


def test_read_stops_at_eof_or_zero_fills(ctx: AioContext, fd: int) -> None:
    size = len(PATTERN)
    buf = bytearray(b"\xff" * 100)
    assert run(ctx, ctx.read(fd, size - 10, buf)) == 10
    assert buf[:10] == PATTERN[-10:]
    assert buf[10:] == b"\xff" * 90  # untouched past end of file
    buf = bytearray(b"\xff" * 100)
    assert run(ctx, ctx.read(fd, size - 10, buf, zero_fill=True)) == 100
    assert buf == PATTERN[-10:] + bytes(90)
    assert run(ctx, ctx.read(fd, size + 5000, bytearray(10))) == 0


def test_inline_read_completes_at_submit_but_calls_back_later(ctx: AioContext, fd: int) -> None:
    os.pread(fd, len(PATTERN), 0)  # into the page cache
    called: list[AioRequest] = []
    buf = bytearray(4096)
    req = ctx.read(fd, 0, buf, callback=called.append)
    assert req.state is ThreadletState.DONE
    assert buf == PATTERN[:4096]
    assert called == []  # no callback inside the submit call
    assert ctx.process_completions() == 1
    assert called == [req]
    assert ctx.process_completions() == 0
    assert ctx.stats().inline == 1


# -- the other request kinds ---------------------------------------------------------


def test_flush(ctx: AioContext, fd: int) -> None:
    assert run(ctx, ctx.flush(fd)) == 0
    assert run(ctx, ctx.flush(fd, datasync=False)) == 0


def test_ioctl(ctx: AioContext, fd: int) -> None:
    arg = bytearray(4)
    assert run(ctx, ctx.ioctl(fd, FIGETBSZ, arg)) == 0
    assert struct.unpack("i", arg)[0] == os.fstat(fd).st_blksize
    with pytest.raises(OSError, match="not supported") as info:
        run(ctx, ctx.ioctl(fd, 0x5401, bytearray(64)))  # TCGETS: not a tty
    assert info.value.errno == errno.ENOTSUP


def test_discard_punches_a_hole(ctx: AioContext, fd: int) -> None:
    assert run(ctx, ctx.discard(fd, 4096, 8192)) == 0
    data = os.pread(fd, len(PATTERN), 0)
    assert len(data) == len(PATTERN)  # size kept
    assert data[:4096] == PATTERN[:4096]
    assert data[4096:12288] == bytes(8192)
    assert data[12288:] == PATTERN[12288:]


def test_write_zeroes_zeroes_and_extends(ctx: AioContext, fd: int) -> None:
    assert run(ctx, ctx.write_zeroes(fd, 100, 300)) == 0
    assert os.pread(fd, 500, 0) == PATTERN[:100] + bytes(300) + PATTERN[400:500]
    size = len(PATTERN)
    assert run(ctx, ctx.write_zeroes(fd, size - 10, 1000)) == 0
    assert os.fstat(fd).st_size == size + 990
    assert os.pread(fd, 1000, size - 10) == bytes(1000)


def test_allocate_and_truncate(ctx: AioContext, fd: int) -> None:
    assert run(ctx, ctx.truncate(fd, 100)) == 0
    assert os.fstat(fd).st_size == 100
    assert os.pread(fd, 200, 0) == PATTERN[:100]
    assert run(ctx, ctx.allocate(fd, 0, 1 << 20)) == 0
    st = os.fstat(fd)
    assert st.st_size == 1 << 20
    assert st.st_blocks * 512 >= 1 << 20
    assert run(ctx, ctx.truncate(fd, 0)) == 0
    assert os.fstat(fd).st_size == 0


def test_copy_range(ctx: AioContext, fd: int, tmp_path: Path) -> None:
    dst = os.open(tmp_path / "copy", os.O_RDWR | os.O_CREAT)
    try:
        assert run(ctx, ctx.copy_range(fd, 1000, dst, 10, 5000)) == 5000
        assert os.pread(dst, 6000, 0) == bytes(10) + PATTERN[1000:6000]
        # Short only at the end of the source.
        assert run(ctx, ctx.copy_range(fd, len(PATTERN) - 100, dst, 0, 5000)) == 100
    finally:
        os.close(dst)


# -- faults through the seam -------------------------------------------------------


class Scripted(Syscalls):
    """Real system calls, except the ones a test scripts, in order."""

    def __init__(self) -> None:
        self.script: dict[str, list[Any]] = {}
        self.calls: dict[str, int] = {}
        self.gate: threading.Event | None = None
        self.entered = threading.Event()

    def _next(self, name: str) -> Any:
        self.calls[name] = self.calls.get(name, 0) + 1
        todo = self.script.get(name)
        return todo.pop(0) if todo else None

    def preadv(self, fd: int, buffers: Sequence[Any], offset: int, flags: int = 0) -> int:
        if flags:  # the inline attempt: let the worker do it
            raise BlockingIOError(errno.EAGAIN, "scripted")
        if self.gate is not None:
            self.entered.set()
            assert self.gate.wait(30)
        step = self._next("preadv")
        if isinstance(step, int):  # a short read of `step` bytes
            return os.preadv(fd, [memoryview(buffers[0])[:step]], offset)
        if isinstance(step, OSError):
            raise step
        return os.preadv(fd, buffers, offset)

    def pwritev(self, fd: int, buffers: Sequence[Any], offset: int, flags: int = 0) -> int:
        if flags:
            raise OSError(errno.EOPNOTSUPP, "scripted")
        step = self._next("pwritev")
        if isinstance(step, int):
            return os.pwritev(fd, [memoryview(buffers[0])[:step]], offset) if step else 0
        if isinstance(step, OSError):
            raise step
        return os.pwritev(fd, buffers, offset)

    def fdatasync(self, fd: int) -> None:
        step = self._next("fdatasync")
        if isinstance(step, OSError):
            raise step
        os.fdatasync(fd)

    def fallocate(self, fd: int, mode: int, offset: int, length: int) -> None:
        step = self._next(f"fallocate{mode}")
        if isinstance(step, OSError):
            raise step
        super().fallocate(fd, mode, offset, length)


@pytest.fixture
def scripted() -> Iterator[tuple[AioContext, Scripted]]:
    sc = Scripted()
    q = ThreadletQueue(max_threads=2)
    c = AioContext(q, syscalls=sc)
    yield c, sc
    sc.gate = None
    assert c.close(timeout=10)
    assert q.close(timeout=10)


def test_short_transfers_resume_inside_the_buffer_list(
    scripted: tuple[AioContext, Scripted], fd: int
) -> None:
    ctx, sc = scripted
    sc.script["preadv"] = [3, OSError(errno.EINTR, "x"), 1]
    bufs = [bytearray(5), bytearray(5)]
    assert run(ctx, ctx.read(fd, 0, bufs)) == 10
    assert b"".join(bufs) == PATTERN[:10]
    assert sc.calls["preadv"] == 4  # 3 bytes, EINTR, 1 byte, the rest
    sc.script["pwritev"] = [2, OSError(errno.EINTR, "x")]
    assert run(ctx, ctx.write(fd, 0, [b"abc", b"defg"])) == 7
    assert os.pread(fd, 7, 0) == b"abcdefg"


def test_write_without_progress_is_enospc(scripted: tuple[AioContext, Scripted], fd: int) -> None:
    ctx, sc = scripted
    sc.script["pwritev"] = [0]
    req = ctx.write(fd, 0, b"xyz")
    assert ctx.wait(req, 10)
    assert req.error == errno.ENOSPC
    with pytest.raises(OSError, match="no progress"):
        req.result()


def test_eio_is_the_result(scripted: tuple[AioContext, Scripted], fd: int) -> None:
    ctx, sc = scripted
    sc.script["preadv"] = [OSError(errno.EIO, "disk on fire")]
    buf = bytearray(b"untouched")
    req = ctx.read(fd, 0, buf)
    assert ctx.wait(req, 10)
    assert req.error == errno.EIO
    assert req.state is ThreadletState.DONE


def test_flush_error_is_sticky(scripted: tuple[AioContext, Scripted], fd: int) -> None:
    ctx, sc = scripted
    sc.script["fdatasync"] = [OSError(errno.EIO, "writeback lost")]
    first = ctx.flush(fd)
    ctx.wait(first, 10)
    assert first.error == errno.EIO
    second = ctx.flush(fd)
    ctx.wait(second, 10)
    assert second.error == errno.EIO  # though the kernel would now say 0
    assert sc.calls["fdatasync"] == 1  # and it was not even asked
    # Reads and writes are not affected.
    assert run(ctx, ctx.write(fd, 0, b"ok")) == 2


def test_not_supported_is_enotsup_and_remembered(
    scripted: tuple[AioContext, Scripted], fd: int
) -> None:
    ctx, sc = scripted
    punch = 0x03  # PUNCH_HOLE | KEEP_SIZE
    sc.script[f"fallocate{punch}"] = [OSError(errno.EOPNOTSUPP, "no holes here")]
    for _ in range(3):
        req = ctx.discard(fd, 0, 4096)
        ctx.wait(req, 10)
        assert req.error == errno.ENOTSUP
    assert sc.calls[f"fallocate{punch}"] == 1
    # write_zeroes falls back to writing zeros: ZERO_RANGE unsupported too.
    sc.script["fallocate16"] = [OSError(errno.ENODEV, "no zero range")]
    assert run(ctx, ctx.write_zeroes(fd, 10, 5000)) == 0
    assert os.pread(fd, 5020, 0) == PATTERN[:10] + bytes(5000) + PATTERN[5010:5020]
    assert run(ctx, ctx.write_zeroes(fd, 0, 10)) == 0
    assert sc.calls["fallocate16"] == 1
    assert sc.calls[f"fallocate{punch}"] == 1


def test_fault_injector_is_deterministic(tmp_path: Path) -> None:
    def one_run() -> tuple[list[int], Any]:
        p = tmp_path / "det"
        p.write_bytes(PATTERN)
        fd = os.open(p, os.O_RDWR)
        inj = FaultInjector(0.3, seed=42)
        errors = []
        with ThreadletQueue(max_threads=1) as q, AioContext(q, inline=False, syscalls=inj) as c:
            for i in range(200):
                req = c.write(fd, i * 7, b"x" * 50) if i % 2 else c.read(fd, i * 7, bytearray(50))
                c.wait(req, 10)
                errors.append(req.error)
        os.close(fd)
        return errors, inj.stats

    first, stats1 = one_run()
    second, stats2 = one_run()
    assert first == second
    assert stats1 == stats2
    assert stats1.short > 0
    assert {errno.EIO, errno.ENOSPC} <= set(first)
    assert errno.EINTR not in first  # always retried


# -- O_DIRECT ----------------------------------------------------------------------------


@pytest.fixture
def direct_fd(tmp_path: Path) -> Iterator[int]:
    if not probe_direct_io(str(tmp_path)).supported:
        pytest.skip("O_DIRECT is not supported here")
    p = tmp_path / "direct"
    p.write_bytes(PATTERN * 4)
    fd = os.open(p, os.O_RDWR | os.O_DIRECT)
    yield fd
    os.close(fd)


def test_direct_aligned_and_misaligned(ctx: AioContext, direct_fd: int) -> None:
    data = PATTERN * 4
    # Aligned: straight through.
    buf = threadlets.aligned_buffer(4096)
    assert run(ctx, ctx.read(direct_fd, 4096, buf)) == 4096
    assert buf == data[4096:8192]
    # Misaligned memory, offset and length: through the bounce buffer.
    for offset, length in [(1, 10), (4095, 2), (100, 9000), (0, 513), (len(data) - 7, 100)]:
        raw = bytearray(length + 1)
        view = memoryview(raw)[1:]  # an odd address
        want = data[offset : offset + length]
        assert run(ctx, ctx.read(direct_fd, offset, view)) == len(want)
        assert view[: len(want)] == want


def test_direct_misaligned_writes_keep_neighbours(ctx: AioContext, direct_fd: int) -> None:
    data = bytearray(PATTERN * 4)
    size = len(data)
    for offset, payload in [(1, b"A" * 10), (4090, b"B" * 20), (8192, b"C" * 4096)]:
        raw = bytearray(len(payload) + 3)
        view = memoryview(raw)[3:]
        view[:] = payload
        assert run(ctx, ctx.write(direct_fd, offset, view)) == len(payload)
        data[offset : offset + len(payload)] = payload
    # Past the end: the file grows to exactly offset + length.
    assert run(ctx, ctx.write(direct_fd, size + 10, b"tail")) == 4
    data[size:] = bytes(10) + b"tail"
    assert os.fstat(direct_fd).st_size == size + 14
    check = threadlets.aligned_buffer(size + 4096)
    n = os.preadv(direct_fd, [check], 0)
    assert check[:n] == data


def test_aligned_buffer() -> None:
    for align in (None, 512, 4096, 65536):
        b = threadlets.aligned_buffer(1000, align)
        assert len(b) == 1000
        assert not b.readonly
        addr = buffer_address(b)
        assert addr is not None
        assert addr % (align or 4096) == 0
    with pytest.raises(ValueError, match="power of two"):
        threadlets.aligned_buffer(10, 3)
    with pytest.raises(ValueError, match=">= 0"):
        threadlets.aligned_buffer(-1)
    with pytest.raises(TypeError):
        threadlets.aligned_buffer("10")  # type: ignore[arg-type]


# -- cancel --------------------------------------------------------------------------------


def test_three_cancel_outcomes(scripted: tuple[AioContext, Scripted], fd: int) -> None:
    ctx, sc = scripted
    ctx.queue.set_limits(max_threads=1)
    # RUNNING: the worker is inside preadv, held by the gate.
    sc.gate = threading.Event()
    running_buf = bytearray(8)
    running = ctx.read(fd, 0, running_buf)
    assert sc.entered.wait(10)
    # QUEUED behind it: a write and a read that must never happen.
    queued_write = ctx.write(fd, 0, b"NEVER")
    queued_buf = bytearray(b"keep me!")
    queued_read = ctx.read(fd, 0, queued_buf)
    calls: list[tuple[str, int]] = []
    for r in (running, queued_write, queued_read):
        r.callback = lambda r: calls.append((r.kind, r.error))

    assert running.cancel() is CancelResult.NOTCANCELED
    assert queued_write.cancel() is CancelResult.CANCELED
    assert queued_read.cancel() is CancelResult.CANCELED
    assert calls == []  # callbacks never run inside cancel()
    assert queued_write.error == errno.ECANCELED
    sc.gate.set()
    assert ctx.drain(timeout=10)
    assert running.result() == 8
    assert running_buf == PATTERN[:8]
    assert queued_buf == b"keep me!"
    assert os.pread(fd, 5, 0) == PATTERN[:5]
    assert sorted(calls) == [("read", 0), ("read", errno.ECANCELED), ("write", errno.ECANCELED)]
    for r in (running, queued_write, queued_read):
        assert r.cancel() is CancelResult.ALLDONE


def test_cancel_inline_completed_is_alldone(ctx: AioContext, fd: int) -> None:
    os.pread(fd, 4096, 0)
    req = ctx.read(fd, 0, bytearray(10))
    assert req.state is ThreadletState.DONE
    assert req.cancel() is CancelResult.ALLDONE


# -- completion contexts ----------------------------------------------------------------------


def test_completions_are_batched_into_one_wakeup(fd: int) -> None:
    with ThreadletQueue(max_threads=1) as q, AioContext(q, inline=False) as ctx:
        gate = Gate()
        q.submit(gate)
        assert gate.started.wait(10)
        reqs = [ctx.read(fd, i * 10, bytearray(10)) for i in range(50)]
        gate.release.set()
        for r in reqs:
            assert r.wait(10)  # finished (any thread may wait like this)
        assert ctx.stats().wakeups == 1  # 50 completions, one eventfd write
        assert ctx.process_completions() == 50
        s = ctx.stats()
        assert (s.batches, s.processed, s.outstanding) == (1, 50, 0)


def test_contexts_sharing_a_queue_see_only_their_own(fd: int) -> None:
    with ThreadletQueue(max_threads=2) as q:
        a, b = AioContext(q, inline=False), AioContext(q, inline=False)
        seen_a: list[AioRequest] = []
        seen_b: list[AioRequest] = []
        ra = [a.read(fd, 0, bytearray(4), callback=seen_a.append) for _ in range(20)]
        rb = [b.read(fd, 0, bytearray(4), callback=seen_b.append) for _ in range(30)]
        assert a.drain(10)
        assert b.drain(10)
        assert sorted(map(id, seen_a)) == sorted(map(id, ra))
        assert sorted(map(id, seen_b)) == sorted(map(id, rb))
        a.close()
        b.close()


def test_reentrant_callbacks(ctx: AioContext, fd: int) -> None:
    log: list[str] = []
    victim_holder: list[AioRequest] = []

    def on_first(r: AioRequest) -> None:
        log.append("first")
        # Submit from a callback, wait for it from a callback...
        inner = ctx.read(fd, 0, bytearray(4), callback=lambda r: log.append("inner"))
        assert ctx.wait(inner, 10)
        # ...cancel another request and process completions again.
        victim_holder[0].cancel()
        ctx.process_completions()
        log.append("first done")

    ctx.queue.set_limits(max_threads=1)
    gate = Gate()
    ctx.queue.submit(gate)
    assert gate.started.wait(10)
    ctx.read(fd, 0, bytearray(4), callback=on_first)
    victim_holder.append(ctx.write(fd, 0, b"zzzz", callback=lambda r: log.append("victim")))
    gate.release.set()
    assert ctx.drain(timeout=10)
    assert log[0] == "first"
    assert "inner" in log
    assert log.count("victim") == 1
    assert log.index("inner") < log.index("first done")
    assert ctx.stats().outstanding == 0


def test_process_completions_logs_callback_errors(
    ctx: AioContext, fd: int, caplog: pytest.LogCaptureFixture
) -> None:
    got: list[int] = []
    ctx.read(fd, 0, bytearray(1), callback=lambda r: 1 / 0)
    ctx.read(fd, 0, bytearray(1), callback=lambda r: got.append(r.result()))
    assert ctx.drain(10)
    assert got == [1]
    assert "exception in completion callback" in caplog.text


def test_wait_timeout_and_eventfd(ctx: AioContext, fd: int) -> None:
    if ctx.backend != "threads":
        pytest.skip("holds a request back by gating the thread pool")
    sc_gate = Gate()
    ctx.queue.set_limits(max_threads=1)
    ctx.queue.submit(sc_gate)
    assert sc_gate.started.wait(10)
    req = ctx.write(fd, 0, b"x")
    assert not ctx.wait(req, timeout=0.01)
    assert select.select([ctx.fileno()], [], [], 0)[0] == []
    sc_gate.release.set()
    assert req.wait(10)
    assert select.select([ctx.fileno()], [], [], 10)[0] == [ctx.fileno()]
    assert ctx.wait(req, timeout=0)


# -- bad input ------------------------------------------------------------------------------


def test_bad_arguments_raise_at_submit(ctx: AioContext, fd: int) -> None:
    cases: list[tuple[Any, type[Exception], str]] = [
        (lambda: ctx.read(fd, -1, bytearray(1)), ValueError, "offset must be >= 0"),
        (lambda: ctx.read(fd, 2**63 - 1, bytearray(2)), ValueError, "largest file offset"),
        (lambda: ctx.read(fd, 0, b"readonly"), TypeError, "read-only"),
        (lambda: ctx.read(fd, 0, 42), TypeError, "expected a buffer"),
        (lambda: ctx.read(fd, 0, [bytearray(1), "x"]), TypeError, "expected a buffer"),
        (lambda: ctx.write(fd, 0.5, b"x"), TypeError, "offset must be an int"),
        (lambda: ctx.write("3", 0, b"x"), TypeError, "fd must be an int"),
        (lambda: ctx.write(-3, 0, b"x"), ValueError, "fd must be >= 0"),
        (lambda: ctx.discard(fd, 0, -5), ValueError, "length must be >= 0"),
        (lambda: ctx.allocate(fd, 0, 0), ValueError, "length must be > 0"),
        (lambda: ctx.ioctl(fd, FIGETBSZ, "x"), TypeError, "arg must be"),
        (lambda: ctx.wait("nope"), TypeError, "expected an AioRequest"),
    ]
    for call, exc, match in cases:
        with pytest.raises(exc, match=match):
            call()
    assert os.pread(fd, len(PATTERN) + 1, 0) == PATTERN  # nothing written
    assert ctx.stats().submitted == 0


def test_bad_fds_fail_in_the_result(ctx: AioContext, path: Path) -> None:
    r = os.open(path, os.O_RDONLY)
    w = os.open(path, os.O_WRONLY)
    closed = os.open(path, os.O_RDONLY)
    os.close(closed)
    try:
        cases = [
            ctx.read(closed, 0, bytearray(4)),
            ctx.write(r, 0, b"nope"),
            ctx.read(w, 0, bytearray(4)),
            ctx.flush(closed),
        ]
        assert ctx.drain(10)
        assert [c.error for c in cases] == [errno.EBADF] * 4
    finally:
        os.close(r)
        os.close(w)
    assert path.read_bytes() == PATTERN


def test_closed_context_refuses_work(fd: int) -> None:
    c = AioContext()
    assert c.close()
    assert c.close()
    with pytest.raises(RuntimeError, match="closed"):
        c.write(fd, 0, b"x")
    with pytest.raises(RuntimeError, match="closed"):
        c.read(fd, 0, bytearray(1))
    assert os.pread(fd, 1, 0) == PATTERN[:1]
    with pytest.raises(TypeError, match="ThreadletQueue"):
        AioContext(queue=object())  # type: ignore[arg-type]


def test_fcntl_flags_direct(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        assert not flags & getattr(os, "O_DIRECT", 0)
    finally:
        os.close(fd)


def test_empty_buffer_lists_are_zero_length_requests(ctx: AioContext, fd: int) -> None:
    assert run(ctx, ctx.read(fd, 0, [])) == 0
    assert run(ctx, ctx.write(fd, 0, [])) == 0
    assert run(ctx, ctx.read(fd, 0, bytearray())) == 0
    assert os.pread(fd, len(PATTERN) + 1, 0) == PATTERN


class _PartlyCached(Syscalls):
    """The inline attempt finds only the first bytes cached; writes are
    taken inline in part (as a file system with RWF_NOWAIT writes may)."""

    def __init__(self) -> None:
        self.inline_calls = 0
        self.worker_offsets: list[int] = []

    def preadv(self, fd: int, buffers: Sequence[Any], offset: int, flags: int = 0) -> int:
        if flags:
            self.inline_calls += 1
            return os.preadv(fd, [memoryview(buffers[0])[:100]], offset)
        self.worker_offsets.append(offset)
        return os.preadv(fd, buffers, offset)

    def pwritev(self, fd: int, buffers: Sequence[Any], offset: int, flags: int = 0) -> int:
        if flags:
            self.inline_calls += 1
            return os.pwritev(fd, [memoryview(buffers[0])[:3]], offset)
        self.worker_offsets.append(offset)
        return os.pwritev(fd, buffers, offset)


def test_a_short_inline_attempt_is_resumed_by_a_worker(fd: int) -> None:
    sc = _PartlyCached()
    with ThreadletQueue(max_threads=1) as q, AioContext(q, syscalls=sc) as ctx:
        buf = bytearray(1000)
        req = ctx.read(fd, 10, buf)
        assert ctx.wait(req, 10)
        assert req.result() == 1000
        assert buf == PATTERN[10:1010]
        assert sc.worker_offsets == [110]  # the worker went on from byte 100
        req = ctx.write(fd, 0, [b"abcdef", b"gh"])
        assert ctx.wait(req, 10)
        assert req.result() == 8
        assert os.pread(fd, 8, 0) == b"abcdefgh"
        assert sc.worker_offsets[-1] == 3
        assert sc.inline_calls == 2
        assert ctx.stats().inline == 0  # neither finished inline
