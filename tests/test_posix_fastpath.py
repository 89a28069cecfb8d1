"""threadlets.posix's quick submission (aio_read/aio_write of a plain aiocb
on an fd it knows) and its completion: what they cost, and that they keep
every promise of the general path -- Ctrl-C at any point, an aiocb
submitted twice at once, fsync barriers -- on both engine backends."""

from __future__ import annotations

import collections
import errno
import functools
import os
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

import threadlets.posix as px
from threadlets import AioContext, AioRequest, RingUnavailable, ThreadletQueue
from threadlets.syscalls import Syscalls

from .conftest import interrupt_at_c_return, wait_until

DATA = bytes(range(256)) * 16  # 4 KiB
BACKENDS = ["threads", "io_uring"]


def _context(backend: str, queue: ThreadletQueue | None = None, **kwargs: Any) -> AioContext:
    try:
        return AioContext(queue, deliver=False, backend=backend, **kwargs)
    except RingUnavailable as e:
        pytest.skip(f"io_uring: {e}")


@pytest.fixture
def fd(tmp_path: Path) -> Iterator[int]:
    p = tmp_path / "data"
    p.write_bytes(DATA)
    fd = os.open(p, os.O_RDWR)
    yield fd
    os.close(fd)


def _quiet(ctx: AioContext) -> bool:
    return ctx.stats().outstanding == 0


def _done(rt: px.PosixAio, cb: px.aiocb) -> tuple[int, int]:
    rt.aio_suspend([cb], 10)
    return rt.aio_error(cb), rt.aio_return(cb)


# -- cost ------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.linux_only("rwf_nowait")  # (portable mode: the general path, see posix._identity)
def test_a_read_runs_few_bytecodes_of_posix(backend: str, fd: int) -> None:
    """Issue 11 ("no speed regression"): the bytecodes posix.py runs per
    aio_read + aio_suspend + aio_error + aio_return, in every thread (the
    completion too: the queue's workers and the ring's reaper are started
    while traced).  About 550-630 here; over 940 before the quick path."""
    posix_file = px.__file__
    counts: collections.Counter[int] = collections.Counter()  # per thread: no lost update

    def tracer(frame: FrameType, event: str, arg: Any) -> Any:
        if frame.f_code.co_filename != posix_file:
            return None
        frame.f_trace_opcodes = True
        if event == "opcode":
            counts[threading.get_ident()] += 1
        return tracer

    threading.settrace(tracer)  # (the pool starts its workers when needed)
    queue = ThreadletQueue(max_threads=2)
    try:
        ctx = _context(backend, queue, inline=False)
    except BaseException:
        threading.settrace(None)
        queue.close(timeout=10)
        raise
    try:
        rt = px.PosixAio(ctx)
        cb = px.aiocb(fd, 0, bytearray(512))
        rt.aio_read(cb)  # (the first notes the fd's identity)
        assert _done(rt, cb) == (0, 512)
        counts.clear()
        n = 32
        sys.settrace(tracer)
        try:
            for k in range(n):
                cb.aio_offset = 512 * (k % 8)
                rt.aio_read(cb)
                rt.aio_suspend([cb], 10)
                rt.aio_error(cb)
                rt.aio_return(cb)
        finally:
            sys.settrace(None)
        assert _done(rt, cb) == (0, 512)
        per_request = sum(counts.values()) / n
        assert per_request < 720, f"{per_request:.0f} bytecodes of posix.py per read"
    finally:
        threading.settrace(None)
        ctx.close()
        queue.close(timeout=10)


# -- Ctrl-C ----------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["quick", "general"])
@pytest.mark.parametrize("op", ["read", "write"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_ctrl_c_at_every_c_return_of_a_submission_loses_nothing(
    backend: str, op: str, path: str, fd: int
) -> None:
    """For n = 1, 2, ...: Ctrl-C as the n-th C call of posix.py returns in
    aio_read/aio_write, on the quick path (an fd the runtime knows) or the
    general one (its first submission of the fd).  Each time the aiocb is
    finished or in flight (never stuck in progress: the general path once
    left it claimed and never launched), nothing is left on the fd's tables
    (an fsync after it, which waits for the I/O queued before it,
    finishes), and the aiocb can be submitted again."""
    ctx = _context(backend)
    try:
        n = 0
        while True:
            n += 1
            assert n < 200, "the submission never ran to its end"
            rt = px.PosixAio(ctx)
            buf = bytearray(DATA[:64]) if op == "write" else bytearray(64)
            cb = px.aiocb(fd, 0, buf)
            # (Run once first: by this runtime to take the quick path next,
            # else by another -- this one has not seen the fd yet.)
            warm = rt if path == "quick" else px.PosixAio(ctx)
            (warm.aio_read if op == "read" else warm.aio_write)(cb)
            assert _done(warm, cb) == (0, 64)
            submit = rt.aio_read if op == "read" else rt.aio_write
            interrupted = False
            seen = interrupt_at_c_return(n, only=px.__file__)
            try:
                submit(cb)
            except KeyboardInterrupt:
                interrupted = True
            finally:
                sys.setprofile(None)
            # (ECANCELED: interrupted before it reached the engine.)
            expected = [(0, 64), (errno.ECANCELED, -1)] if interrupted else [(0, 64)]
            assert _done(rt, cb) in expected, f"C return {n}"
            sync = px.aiocb(fd)
            rt.aio_fsync(os.O_SYNC, sync)
            assert _done(rt, sync) == (0, 0), f"C return {n}"
            assert not rt._fds, f"C return {n}: {rt._fds}"
            submit(cb)
            assert _done(rt, cb) == (0, 64), f"C return {n}"
            if op == "read":
                assert bytes(buf) == DATA[:64]
            if not interrupted and seen[0] < n:
                break  # it ran to its end before the n-th C return
    finally:
        ctx.close()


def test_ctrl_c_as_a_cancelled_reads_completion_lets_go_of_the_lock_starts_the_fsync(
    fd: int,
) -> None:
    """aio_cancel runs the cancelled request's completion in the caller's
    thread; finishing the read releases an fsync that waited for it.  A
    Ctrl-C landing as that completion lets go of the runtime's lock must
    not strand the fsync (claimed for launch and never launched, it stayed
    in progress for good)."""
    queue = ThreadletQueue(max_threads=1)
    gate = threading.Event()
    ctx = AioContext(queue, deliver=False, inline=False)
    try:
        rt = px.PosixAio(ctx)
        queue.submit(gate.wait, 10)  # holds the only worker
        read = px.aiocb(fd, 0, bytearray(16))
        rt.aio_read(read)  # queued behind the gate
        sync = px.aiocb(fd)
        rt.aio_fsync(os.O_SYNC, sync)  # waits for the read
        code = px.PosixAio._request_finished.__code__

        def prof(frame: Any, event: str, arg: Any) -> None:
            if event == "c_return" and frame.f_code is code and arg.__name__ == "__exit__":
                sys.setprofile(None)
                raise KeyboardInterrupt

        sys.setprofile(prof)
        try:
            with pytest.raises(KeyboardInterrupt):
                rt.aio_cancel(fd, read)
        finally:
            sys.setprofile(None)
        assert rt.aio_error(read) == errno.ECANCELED
        gate.set()
        assert _done(rt, sync) == (0, 0)
        assert not rt._fds
    finally:
        gate.set()
        ctx.close(timeout=10)
        queue.close(timeout=10)


# -- races -----------------------------------------------------------------------------


class _GatedReads(AioContext):
    """A context whose next read() waits at its door: the aiocb is then
    claimed by a quick submission and not yet handed to the engine."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.armed = False
        self.entered = threading.Event()
        self.gate = threading.Event()

    def _gate(self) -> None:
        if self.armed:
            self.armed = False
            self.entered.set()
            assert self.gate.wait(10)

    def read(self, fd: int, offset: int, buffers: Any, **kwargs: Any) -> AioRequest:
        self._gate()
        return super().read(fd, offset, buffers, **kwargs)

    def _read_checked(self, fd: int, offset: int, view: Any, *args: Any) -> AioRequest:
        # (posix's quick path: it reads a file the context knows through this.)
        self._gate()
        return super()._read_checked(fd, offset, view, *args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_aiocb_being_launched_is_in_progress_for_everyone_else(backend: str, fd: int) -> None:
    """While one thread hands a quickly claimed aiocb to the engine, a
    second submission of it is EINVAL, aio_cancel answers NOTCANCELED,
    aio_error EINPROGRESS, and the read runs once."""
    try:
        ctx = _GatedReads(deliver=False, backend=backend)
    except RingUnavailable as e:
        pytest.skip(f"io_uring: {e}")
    try:
        rt = px.PosixAio(ctx)
        cb = px.aiocb(fd, 0, bytearray(32))
        rt.aio_read(cb)
        assert _done(rt, cb) == (0, 32)
        cb.aio_buf = bytearray(32)
        ctx.armed = True
        t = threading.Thread(target=rt.aio_read, args=(cb,))
        t.start()
        try:
            assert ctx.entered.wait(10)
            with pytest.raises(OSError) as again:
                rt.aio_read(cb)
            assert again.value.errno == errno.EINVAL
            assert rt.aio_error(cb) == errno.EINPROGRESS
            assert rt.aio_cancel(fd, cb) == px.AIO_NOTCANCELED
        finally:
            ctx.gate.set()
            t.join(10)
        assert _done(rt, cb) == (0, 32)
        assert bytes(cb.aio_buf) == DATA[:32]
        wait_until(functools.partial(_quiet, ctx))
        assert not rt._fds
    finally:
        ctx.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_fd_number_reused_between_quick_submissions_is_noticed(
    backend: str, tmp_path: Path
) -> None:
    """A quick submission relies on the identity noted for the fd number;
    closed and reopened on another file (other flags), the next submission
    makes the context forget the old file and reads the new one."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"a" * 4096)
    b.write_bytes(b"b" * 4096)
    ctx = _context(backend)
    try:
        rt = px.PosixAio(ctx)
        fd = os.open(a, os.O_RDONLY)
        cb = px.aiocb(fd, 0, bytearray(8))
        for _ in range(2):  # the second one quick
            rt.aio_read(cb)
            assert _done(rt, cb) == (0, 8)
        os.close(fd)
        assert os.open(b, os.O_RDWR) == fd
        try:
            rt.aio_read(cb)
            assert _done(rt, cb) == (0, 8)
            assert bytes(cb.aio_buf) == b"b" * 8
            cb.aio_buf = b"c" * 8
            rt.aio_write(cb)  # (writable now: the engine's memory of the fd is the new one)
            assert _done(rt, cb) == (0, 8)
            assert os.pread(fd, 8, 0) == b"c" * 8
        finally:
            os.close(fd)
    finally:
        ctx.close()


class _GatedWrites(Syscalls):
    """Writes wait for ``gate`` (set: they do not); the order of writes and
    fsyncs is recorded."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.gate.set()
        self.in_write = threading.Event()
        self.order: list[str] = []

    def pwritev(self, fd: int, buffers: Sequence[Any], offset: int, flags: int = 0) -> int:
        if flags:
            raise OSError(errno.EOPNOTSUPP, "no inline writes")
        self.in_write.set()
        assert self.gate.wait(10)
        self.order.append("write")
        return os.pwritev(fd, buffers, offset)

    def fsync(self, fd: int) -> None:
        self.order.append("fsync")
        os.fsync(fd)


def test_an_fsync_waits_for_a_quick_write_queued_before_it(fd: int) -> None:
    sc = _GatedWrites()
    queue = ThreadletQueue(max_threads=4)
    ctx = AioContext(queue, deliver=False, syscalls=sc)
    try:
        rt = px.PosixAio(ctx)
        w = px.aiocb(fd, 0, b"data")
        rt.aio_write(w)  # (notes the fd: the next one is quick)
        assert _done(rt, w) == (0, 4)
        sc.gate.clear()
        sc.in_write.clear()
        sc.order.clear()
        rt.aio_write(w)
        assert sc.in_write.wait(10)
        f = px.aiocb(fd)
        rt.aio_fsync(os.O_SYNC, f)
        assert rt.aio_error(f) == errno.EINPROGRESS
        assert sc.order == []  # the fsync has not started
        sc.gate.set()
        assert _done(rt, f) == (0, 0)
        assert _done(rt, w) == (0, 4)
        assert sc.order == ["write", "fsync"]
        assert not rt._fds
    finally:
        sc.gate.set()
        ctx.close(timeout=10)
        queue.close(timeout=10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_quick_submissions_racing_set_context_all_complete(backend: str, fd: int) -> None:
    """One thread reads through the quick path while another switches the
    runtime between two contexts (thread switches forced at every chance):
    every read completes with the file's data, on one context or the other,
    and each context then drains."""
    first, second = _context(backend), _context(backend)
    rt = px.PosixAio(first)
    stop = threading.Event()
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            cb = px.aiocb(fd, 0, bytearray(64))
            for k in range(200):
                cb.aio_offset = 64 * (k % 16)
                rt.aio_read(cb)
                assert _done(rt, cb) == (0, 64)
                assert bytes(cb.aio_buf) == DATA[cb.aio_offset : cb.aio_offset + 64]
        except BaseException as e:
            errors.append(e)
        finally:
            stop.set()

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    t = threading.Thread(target=reader)
    try:
        t.start()
        while not stop.is_set():
            rt.set_context(second)
            rt.set_context(first)
        t.join(10)
    finally:
        sys.setswitchinterval(interval)
        stop.set()
        t.join(10)
        for ctx in (first, second):
            wait_until(functools.partial(_quiet, ctx))
            ctx.close()
    assert not errors, errors
    assert not rt._fds
