"""What each request does to a file (threadlets.ops), driven directly with an
AioFile and a Syscalls object: buffer lists with empty and odd buffers, the
O_DIRECT bounce and read-modify-write paths and the file size, write-only
O_DIRECT descriptors, the fault injector's faults, the count that moved
before an error, and non-seekable files."""

from __future__ import annotations

import errno
import os
import pty
import socket
import stat
import sys
import tempfile
import threading
import tracemalloc
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from threadlets import AioContext, ThreadletQueue, ops
from threadlets.ops import IOV_MAX, MAX_OFFSET, AioFile
from threadlets.probe import (
    MAX_ALIGNMENT,
    aligned_buffer,
    direct_alignment,
    probe_alignment,
    probe_direct_io,
    probe_io_uring,
)
from threadlets.syscalls import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FaultInjector,
    Syscalls,
)

SC = Syscalls()
DATA = bytes(range(251)) * 200  # 50200 bytes: no period that divides a block


def _direct_dir(tmp_path: Path) -> Path:
    """A directory where O_DIRECT works: tmp_path, else /var/tmp."""
    for d in (tmp_path, Path("/var/tmp")):
        try:
            if probe_direct_io(str(d)).supported:
                return d
        except OSError:
            continue
    pytest.skip("O_DIRECT works neither in tmp_path nor in /var/tmp")


@pytest.fixture
def direct_dir(tmp_path: Path) -> Iterator[Path]:
    d = _direct_dir(tmp_path)
    if d == tmp_path:
        yield d
        return
    with tempfile.TemporaryDirectory(dir=d, prefix="threadlets-test-") as sub:
        yield Path(sub)


def _open(path: Path, flags: int, sc: Syscalls = SC) -> tuple[int, AioFile]:
    fd = os.open(path, flags)
    return fd, AioFile.from_fd(sc, fd)


def _contents(path: Path) -> bytes:
    return path.read_bytes()


# -- buffer lists ------------------------------------------------------------------


def test_bounce_read_fills_buffers_after_an_empty_one(direct_dir: Path) -> None:
    p = direct_dir / "f"
    p.write_bytes(DATA)
    fd, f = _open(p, os.O_RDWR | os.O_DIRECT)
    try:
        bufs = [bytearray(3), bytearray(0), bytearray(5), bytearray(0)]
        n = ops.read(SC, f, [memoryview(b) for b in bufs], 7, 8, False)
        assert n == 8
        assert b"".join(bufs) == DATA[7:15]
    finally:
        os.close(fd)


def test_zero_fill_reaches_every_buffer_past_iov_max(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(b"0123456789")
    fd, f = _open(p, os.O_RDONLY)
    try:
        bufs = [bytearray(b"\xff") for _ in range(2 * IOV_MAX)]
        n = ops.read(SC, f, [memoryview(b) for b in bufs], 0, len(bufs), True)
        assert n == len(bufs)
        assert b"".join(bufs) == b"0123456789" + bytes(len(bufs) - 10)
    finally:
        os.close(fd)


def test_empty_direct_write_past_the_end_changes_nothing(direct_dir: Path) -> None:
    p = direct_dir / "f"
    p.write_bytes(DATA[:12345])
    fd, f = _open(p, os.O_RDWR | os.O_DIRECT)
    try:
        assert ops.write(SC, f, [], 12346, 0) == 0
        assert ops.write(SC, f, [memoryview(b"")], 20001, 0) == 0
        assert ops.read(SC, f, [memoryview(bytearray(0))], 3, 0, False) == 0
        assert _contents(p) == DATA[:12345]
    finally:
        os.close(fd)


def test_buffer_helpers_with_empty_and_odd_buffers() -> None:
    bufs = [memoryview(bytearray(n)) for n in (0, 3, 0, 0, 1, 5, 0)]
    ops._scatter(memoryview(b"abcdefghi"), bufs)
    assert b"".join(bufs) == b"abcdefghi"
    assert [bytes(b) for b in ops._skip(bufs, 4)] == [b"efghi"]
    assert [bytes(b) for b in ops._skip(bufs, 2)] == [b"c", b"d", b"efghi"]
    dst = memoryview(bytearray(11))
    ops._gather(bufs, dst[1:10])
    assert bytes(dst) == b"\0abcdefghi\0"
    ops._gather(bufs, dst[:4], 3)
    assert bytes(dst[:4]) == b"defg"
    ops._scatter(memoryview(b"XYZ"), bufs, 2)
    assert b"".join(bufs) == b"abXYZfghi"
    ops._scatter(memoryview(b"12345"), bufs, 7)  # as far as the list goes
    assert b"".join(bufs) == b"abXYZfg12"
    ops._zero(bufs, 3)
    assert b"".join(bufs) == b"abX" + bytes(6)
    ops._zero(bufs, 0)
    assert b"".join(bufs) == bytes(9)


_buffer_lists = st.lists(st.integers(0, 5000), min_size=0, max_size=6)


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "buffered"])
@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    ops_list=st.lists(
        st.tuples(st.booleans(), st.integers(0, 20000), _buffer_lists, st.integers(0, 7)),
        min_size=1,
        max_size=6,
    ),
    chunk=st.sampled_from([1, 1500, 8192, 1 << 20]),
)
def test_read_and_write_match_preadv_pwritev(
    direct_dir: Path, direct: bool, ops_list: list[tuple[bool, int, list[int], int]], chunk: int
) -> None:
    """ops.read/ops.write against os.preadv/os.pwritev on a plain file (with
    bounce buffers of a block, a few, or the usual size)."""
    with mock.patch.object(ops, "_CHUNK", chunk):
        _match_preadv_pwritev(direct_dir, direct, ops_list)


def _match_preadv_pwritev(
    direct_dir: Path, direct: bool, ops_list: list[tuple[bool, int, list[int], int]]
) -> None:
    p, q = direct_dir / "subject", direct_dir / "oracle"
    p.write_bytes(DATA[:12345])
    q.write_bytes(DATA[:12345])
    flags = os.O_RDWR | (os.O_DIRECT if direct else 0)
    fd, f = _open(p, flags)
    oracle = os.open(q, os.O_RDWR)
    try:
        for i, (is_write, offset, lengths, skew) in enumerate(ops_list):
            # Buffers at odd addresses: slices of one bigger buffer.
            raw = bytearray(sum(lengths) + skew)
            views, pos = [], skew
            for n in lengths:
                views.append(memoryview(raw)[pos : pos + n])
                pos += n
            total = sum(lengths)
            if is_write:
                payload = bytes((i * 37 + k) % 256 for k in range(total))
                raw[skew:] = payload
                want = os.pwritev(oracle, views, offset) if total else 0
                assert ops.write(SC, f, views, offset, total) == want
            else:
                theirs = [bytearray(n) for n in lengths]
                want = os.preadv(oracle, theirs, offset) if total else 0
                assert ops.read(SC, f, views, offset, total, False) == want
                assert [bytes(v) for v in views] == [bytes(b) for b in theirs]
        assert os.fstat(fd).st_size == os.fstat(oracle).st_size
        assert _contents(p) == _contents(q)
    finally:
        os.close(fd)
        os.close(oracle)


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "buffered"])
def test_reads_near_the_largest_offset_match_preadv(direct_dir: Path, direct: bool) -> None:
    p = direct_dir / "f"
    p.write_bytes(DATA[:9000])
    fd, f = _open(p, os.O_RDWR | (os.O_DIRECT if direct else 0))
    oracle = os.open(p, os.O_RDONLY)
    try:
        for offset, length in [(MAX_OFFSET - 10, 5), (MAX_OFFSET - 5, 5), (MAX_OFFSET - 4096, 7)]:
            want = os.preadv(oracle, [bytearray(length)], offset)
            assert ops.read(SC, f, [memoryview(bytearray(length))], offset, length, False) == want
    finally:
        os.close(fd)
        os.close(oracle)


# -- O_DIRECT: the read-modify-write path and the file size --------------------------


class _SpyLock:
    """A lock that tells when ``thread`` asks for it."""

    def __init__(self, asked: threading.Event, thread: threading.Thread) -> None:
        self._lock = threading.Lock()
        self._asked = asked
        self._thread = thread

    def acquire(self) -> bool:
        if threading.current_thread() is self._thread:
            self._asked.set()
        return self._lock.acquire()

    def release(self) -> None:
        self._lock.release()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


class _PauseWrite(Syscalls):
    """pwritev at one of ``offsets`` waits for ``go`` first."""

    def __init__(self, offsets: set[int], go: threading.Event) -> None:
        self.offsets = offsets
        self.go = go
        self.paused = threading.Event()

    def pwritev(self, fd: int, buffers: Sequence[Any], offset: int, flags: int = 0) -> int:
        if offset in self.offsets:
            self.paused.set()
            assert self.go.wait(30), "never released"
        return super().pwritev(fd, buffers, offset, flags)


def _rmw_in_thread(sc: Syscalls, f: AioFile) -> tuple[threading.Thread, list[BaseException]]:
    """A thread (not started) that writes 10 B at 4100 (an RMW of a file of
    4096 B), and the list where it puts what it raised."""
    errors: list[BaseException] = []

    def rmw() -> None:
        try:
            assert ops.write(sc, f, [memoryview(b"B" * 10)], 4100, 10) == 10
        except BaseException as e:  # reported by the test
            errors.append(e)

    return threading.Thread(target=rmw), errors


@pytest.mark.parametrize("extend", ["write", "truncate", "allocate", "write_zeroes", "copy_range"])
def test_rmw_size_restore_keeps_a_concurrent_extension(direct_dir: Path, extend: str) -> None:
    """File of 4096 B; an RMW of 10 B at 4100 and, while it is between
    reading the size and restoring it, a request that takes the file to
    12288 B: both succeed and the file ends 12288 B long."""
    p = direct_dir / "f"
    p.write_bytes(DATA[:4096])
    src_p = direct_dir / "src"
    src_p.write_bytes(b"A" * 4096)
    # Go on once the extension finished (old code) or waits for the file's
    # lock (it may extend the file, so it runs after the RMW).
    progressed = threading.Event()
    # (The RMW writes its block at 4096, or its bytes at 4100 unaligned.)
    sc = _PauseWrite({4096, 4100}, progressed)
    fd, f = _open(p, os.O_RDWR | os.O_DIRECT, sc)
    s, src = _open(src_p, os.O_RDONLY)
    f._rmw_lock = _SpyLock(progressed, threading.current_thread())  # type: ignore[assignment]
    aligned = aligned_buffer(4096)
    aligned[:] = b"A" * 4096
    t, errors = _rmw_in_thread(sc, f)
    try:
        t.start()
        assert sc.paused.wait(10)  # the RMW read the size and holds the lock
        if extend == "write":
            assert ops.write(sc, f, [aligned], 8192, 4096) == 4096
        elif extend == "truncate":
            ops.truncate(sc, f, 12288)
        elif extend == "allocate":
            ops.allocate(sc, f, 8192, 4096)
        elif extend == "write_zeroes":
            ops.write_zeroes(sc, f, 8192, 4096)
        else:
            assert ops.copy_range(sc, src, 0, f, 8192, 4096) == 4096
        progressed.set()
        t.join(10)
        assert not t.is_alive()
        assert not errors
        data = _contents(p)
        tail = b"A" * 4096 if extend in ("write", "copy_range") else bytes(4096)
        assert len(data) == 12288
        assert data == DATA[:4096] + bytes(4) + b"B" * 10 + bytes(4096 - 14) + tail
    finally:
        progressed.set()
        t.join(10)
        os.close(fd)
        os.close(s)


class _Counting(Syscalls):
    """Counts fstat calls; refuses ftruncate (no write may shrink a file)."""

    def __init__(self) -> None:
        self.fstats = 0

    def fstat(self, fd: int) -> os.stat_result:
        self.fstats += 1
        return super().fstat(fd)

    def ftruncate(self, fd: int, length: int) -> None:
        raise AssertionError(f"a write truncated the file to {length}")


def test_aligned_direct_write_reads_no_size(direct_dir: Path) -> None:
    """Whole-block O_DIRECT writes, within the file and past its end, are
    one pwritev each: no fstat, no lock (the first version did both per
    write, and its threads queued on the lock)."""
    p = direct_dir / "f"
    p.write_bytes(DATA[: 4 * MAX_ALIGNMENT])
    sc = _Counting()
    fd, f = _open(p, os.O_RDWR | os.O_DIRECT, sc)
    f._rmw_lock = None  # type: ignore[assignment]  # taking it would raise
    try:
        req, _ = f.alignment(sc)
        sc.fstats = 0
        buf = aligned_buffer(2 * req)
        buf[:] = b"x" * len(buf)
        for offset in (0, 2 * MAX_ALIGNMENT, 4 * MAX_ALIGNMENT, 8 * MAX_ALIGNMENT):
            assert ops.write(sc, f, [buf], offset, len(buf)) == len(buf)
        assert sc.fstats == 0
        assert os.path.getsize(p) == 8 * MAX_ALIGNMENT + 2 * req
    finally:
        os.close(fd)


def test_aligned_extension_does_not_wait_for_an_rmw(direct_dir: Path) -> None:
    """While an RMW past the end of the file is between reading the size
    and writing, an aligned write that extends the file finishes: both
    land, the file ends at the aligned write's end."""
    p = direct_dir / "f"
    p.write_bytes(DATA[:4096])
    go = threading.Event()
    sc = _PauseWrite({4096, 4100}, go)
    fd, f = _open(p, os.O_RDWR | os.O_DIRECT, sc)
    aligned = aligned_buffer(4096)
    aligned[:] = b"A" * 4096
    t, errors = _rmw_in_thread(sc, f)
    try:
        t.start()
        assert sc.paused.wait(10)
        finished = threading.Event()
        other = threading.Thread(
            target=lambda: (ops.write(sc, f, [aligned], 8192, 4096), finished.set())
        )
        other.start()
        assert finished.wait(10), "the aligned write waited for the RMW"
        go.set()
        t.join(10)
        other.join(10)
        assert not errors
        assert _contents(p) == DATA[:4096] + bytes(4) + b"B" * 10 + bytes(4096 - 14) + b"A" * 4096
    finally:
        go.set()
        t.join(10)
        os.close(fd)


@pytest.mark.parametrize(
    ("initial", "offset", "length"),
    [
        (4096, 4100, 10),  # one block, all past the end
        (4096, 4090, 20),  # a block within the file, then past it
        (5000, 4100, 10),  # in the block the end of the file cuts
        (5000, 4100, 9000),  # from there on, over several blocks
        (12288, 100, 20000),  # the file's blocks, then past the end
        (12288, 100, 200),  # within the file: no size change
    ],
)
def test_rmw_past_the_end_extends_exactly(
    direct_dir: Path, initial: int, offset: int, length: int
) -> None:
    """An unaligned O_DIRECT write past the end of the file leaves it
    exactly ``offset + length`` long (zeros in any gap) without ever
    truncating it."""
    p = direct_dir / "f"
    p.write_bytes(DATA[:initial])
    sc = _Counting()
    fd, f = _open(p, os.O_RDWR | os.O_DIRECT, sc)
    try:
        payload = bytes([7]) * length
        assert ops.write(sc, f, [memoryview(payload)], offset, length) == length
        want = bytearray(DATA[:initial])
        want.extend(bytes(max(0, offset + length - initial)))
        want[offset : offset + length] = payload
        assert _contents(p) == bytes(want)
        with open(p, "rb") as plain:  # the O_DIRECT view agrees with the buffered one
            assert plain.read() == bytes(want)
        back = aligned_buffer(len(want) + 4096)
        assert ops.read(SC, f, [back], 0, len(back), False) == len(want)
        assert bytes(back[: len(want)]) == bytes(want)
    finally:
        os.close(fd)


def test_direct_writes_after_an_external_truncate_and_extend(direct_dir: Path) -> None:
    """Another descriptor truncates, then extends the file behind the
    AioFile's back: later writes, aligned or not, land where asked and the
    size is what the sequence of calls gives (nothing cached)."""
    p = direct_dir / "f"
    p.write_bytes(DATA[: 4 * MAX_ALIGNMENT])
    fd, f = _open(p, os.O_RDWR | os.O_DIRECT)
    other = os.open(p, os.O_RDWR)
    shadow = bytearray(DATA[: 4 * MAX_ALIGNMENT])

    def write(offset: int, payload: bytes) -> None:
        buf = aligned_buffer(len(payload))
        buf[:] = payload
        assert ops.write(SC, f, [buf], offset, len(payload)) == len(payload)
        shadow.extend(bytes(max(0, offset + len(payload) - len(shadow))))
        shadow[offset : offset + len(payload)] = payload

    try:
        req, _ = f.alignment(SC)
        write(100, b"a" * 50)  # the size is looked at once (it was 16384)
        os.ftruncate(other, 4096)
        del shadow[4096:]
        write(8200, b"b" * 10)  # past the new end: 8210, not 16384 or 12288
        assert os.path.getsize(p) == 8210
        write(4100, b"c" * 10)  # within it: the size stays
        os.ftruncate(other, 20000)
        shadow.extend(bytes(20000 - len(shadow)))
        write(12288, b"d" * req)
        write(19990, b"e" * 5)
        assert os.path.getsize(p) == 20000
        write(19998, b"f" * 5)
        assert _contents(p) == bytes(shadow)
    finally:
        os.close(fd)
        os.close(other)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    initial=st.integers(0, 3).map(lambda k: k * 1500),
    segments=st.lists(
        st.tuples(st.integers(0, 3000), st.integers(1, 5000), st.booleans()),
        min_size=2,
        max_size=8,
    ),
)
def test_concurrent_direct_writes_match_a_shadow(
    direct_dir: Path, initial: int, segments: list[tuple[int, int, bool]]
) -> None:
    """Byte-disjoint O_DIRECT writes, aligned and not, run at once: the file
    ends as the shadow model says, content and size."""
    p = direct_dir / "f"
    p.write_bytes(DATA[:initial])
    fd, f = _open(p, os.O_RDWR | os.O_DIRECT)
    req, _ = f.alignment(SC)
    shadow = bytearray(DATA[:initial])
    writes: list[tuple[int, bytes]] = []
    pos = 0
    for i, (gap, asked, align) in enumerate(segments):
        offset, length = pos + gap, asked
        if align:  # whole blocks, past everything so far
            offset = -(-offset // req) * req
            length = -(-asked // req) * req
        payload = bytes([65 + i]) * length
        writes.append((offset, payload))
        end = offset + length
        if end > len(shadow):
            shadow.extend(bytes(end - len(shadow)))
        shadow[offset:end] = payload
        pos = -(-end // req) * req if align else end
    barrier = threading.Barrier(len(writes))
    errors: list[BaseException] = []

    def one(offset: int, payload: bytes) -> None:
        buf = aligned_buffer(len(payload))
        buf[:] = payload
        try:
            barrier.wait(10)
            assert ops.write(SC, f, [buf], offset, len(payload)) == len(payload)
        except BaseException as e:  # reported by the test
            errors.append(e)

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    threads = [threading.Thread(target=one, args=w) for w in writes]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    finally:
        sys.setswitchinterval(old)
        os.close(fd)
    assert not errors
    assert _contents(p) == bytes(shadow)


def test_truncate_retries_eintr(direct_dir: Path) -> None:
    class Interrupted(Syscalls):
        calls = 0

        def ftruncate(self, fd: int, length: int) -> None:
            self.calls += 1
            if self.calls == 1:
                raise InterruptedError(errno.EINTR, "interrupted")
            super().ftruncate(fd, length)

    p = direct_dir / "f"
    p.write_bytes(DATA[:4096])
    sc = Interrupted()
    fd, f = _open(p, os.O_RDWR | os.O_DIRECT, sc)
    try:
        # (An RMW past the end never truncates: the retry is truncate's own.)
        assert ops.write(sc, f, [memoryview(b"xyz")], 4096, 3) == 3
        assert sc.calls == 0
        assert ops.truncate(sc, f, 4098) == 0
        assert sc.calls == 2
        assert _contents(p) == DATA[:4096] + b"xy"
    finally:
        os.close(fd)


def test_direct_appends_land_at_the_end(direct_dir: Path) -> None:
    p = direct_dir / "f"
    p.write_bytes(DATA[:100])
    fd, f = _open(p, os.O_WRONLY | os.O_APPEND | os.O_DIRECT)
    want = bytearray(DATA[:100])
    try:
        for n in (3, 4096 - 103, 4096, 5000, 512):
            payload = bytes([n % 251]) * n
            buf = aligned_buffer(n)
            buf[:] = payload
            assert ops.write(SC, f, [buf], 0, n) == n  # the offset is the kernel's
            want += payload
            assert _contents(p) == bytes(want)
    finally:
        os.close(fd)


# -- O_DIRECT: write-only descriptors ----------------------------------------------


def test_write_only_direct_fd_probes_and_writes(direct_dir: Path) -> None:
    p = direct_dir / "f"
    p.write_bytes(DATA[: 4 * MAX_ALIGNMENT])
    fd, f = _open(p, os.O_WRONLY | os.O_DIRECT)
    reader = os.open(p, os.O_RDONLY | os.O_DIRECT)
    try:
        assert f.alignment(SC) == probe_alignment(reader)
        shadow = bytearray(DATA[: 4 * MAX_ALIGNMENT])
        for offset, payload in [(0, b"a" * 4096), (4100, b"b" * 10), (16380, b"c" * 100)]:
            assert ops.write(SC, f, [memoryview(payload)], offset, len(payload)) == len(payload)
            end = offset + len(payload)
            shadow.extend(bytes(max(0, end - len(shadow))))
            shadow[offset:end] = payload
        assert _contents(p) == bytes(shadow)
    finally:
        os.close(fd)
        os.close(reader)


def test_direct_alignment_never_raises(direct_dir: Path) -> None:
    p = direct_dir / "f"
    p.write_bytes(DATA[: 4 * MAX_ALIGNMENT])
    r, w = os.pipe()
    try:
        # Reads fail (a pipe's write end: EBADF) and /proc/self/fd reopens
        # the pipe, whose O_DIRECT reads fail again: the strictest answer.
        assert direct_alignment(w) == (MAX_ALIGNMENT, MAX_ALIGNMENT)
    finally:
        os.close(r)
        os.close(w)
    fd = os.open(p, os.O_WRONLY | os.O_DIRECT)
    try:
        os.chmod(p, 0o200)  # the reopen is refused where permissions apply
        req, mem = direct_alignment(fd)
        assert req in (1, 512, 1024, 2048, 4096)
        assert mem in (1, 512, 1024, 2048, 4096)
    finally:
        os.close(fd)


@pytest.mark.parametrize("backend", ["threads", "io_uring"])
def test_write_only_direct_through_the_engine(direct_dir: Path, backend: str) -> None:
    if backend == "io_uring" and not probe_io_uring().supported:
        pytest.skip("no io_uring here")
    p = direct_dir / "f"
    p.write_bytes(DATA[: 4 * MAX_ALIGNMENT])
    fd = os.open(p, os.O_WRONLY | os.O_DIRECT)
    buf = aligned_buffer(4096)
    buf[:] = b"z" * 4096
    try:
        with ThreadletQueue(max_threads=2) as q, AioContext(q, backend=backend) as ctx:
            req = ctx.write(fd, 8192, buf)
            assert ctx.wait(req, 10)
            assert req.result() == 4096
            req = ctx.write(fd, 3, b"odd")
            assert ctx.wait(req, 10)
            assert req.result() == 3
    finally:
        os.close(fd)
    want = bytearray(DATA[: 4 * MAX_ALIGNMENT])
    want[8192:12288] = b"z" * 4096
    want[3:6] = b"odd"
    assert _contents(p) == bytes(want)


# -- the fault injector ----------------------------------------------------------------


def test_injected_short_transfers_on_o_direct_are_whole_blocks(direct_dir: Path) -> None:
    p = direct_dir / "f"
    p.write_bytes(DATA[: 8 * MAX_ALIGNMENT])
    inj = FaultInjector(1.0, seed=3, errors=())
    fd, f = _open(p, os.O_RDWR | os.O_DIRECT, inj)
    try:
        req, _ = f.alignment(inj)
        buf = aligned_buffer(8 * MAX_ALIGNMENT)
        for length in (req, MAX_ALIGNMENT, 3 * MAX_ALIGNMENT, 8 * MAX_ALIGNMENT - req):
            before = inj.stats.short
            assert ops.read(inj, f, [buf[:length]], 0, length, False) == length
            assert buf[:length] == DATA[:length]
            if length <= MAX_ALIGNMENT:
                assert inj.stats.short == before  # no cut the device could make
            buf[:length] = b"w" * length
            assert ops.write(inj, f, [buf[:length]], 0, length) == length
            assert _contents(p)[:length] == b"w" * length
            p.write_bytes(DATA[: 8 * MAX_ALIGNMENT])
        assert inj.stats.short > 0
    finally:
        os.close(fd)


def test_injected_enospc_only_where_space_is_allocated(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(DATA)
    inj = FaultInjector(1.0, errors=(errno.ENOSPC,), short=False)
    fd, f = _open(p, os.O_RDWR, inj)
    try:
        assert ops.read(inj, f, [memoryview(bytearray(10))], 0, 10, False) == 10
        assert ops.discard(inj, f, 0, 4096) == 0  # punching a hole allocates nothing
        with pytest.raises(OSError) as e:
            ops.allocate(inj, f, 0, 1 << 20)
        assert e.value.errno == errno.ENOSPC
        with pytest.raises(OSError) as e:
            ops.write(inj, f, [memoryview(b"x")], 0, 1)
        assert e.value.errno == errno.ENOSPC
        inj.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 4096)
    finally:
        os.close(fd)


def test_fault_injector_history_is_bounded(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(b"x")
    fd = os.open(p, os.O_RDONLY)
    try:
        idle = FaultInjector(0.0)
        for i in range(1000):
            idle.preadv(fd, [bytearray(0)], i)
        assert not idle._seen  # rate 0 keeps nothing
    finally:
        os.close(fd)
    # 200k distinct calls (through _decide: tracing every allocation of the
    # system calls too would take a minute); the memory still held at the
    # end that the last 10k allocated is the history's share of them.
    inj = FaultInjector(1e-9, errors=(), short=False)
    for i in range(190_000):
        inj._decide("pwritev", 3, i * 512, 512, True)
    tracemalloc.start()
    try:
        for i in range(190_000, 200_000):
            inj._decide("pwritev", 3, i * 512, 512, True)
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert inj.stats.calls == 200_000
    assert len(inj._seen) <= FaultInjector.HISTORY
    assert held < 512 << 10, held  # 10k remembered calls: ~1.5 MiB


def test_fault_injector_is_deterministic_with_a_bounded_history(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(DATA)
    fd = os.open(p, os.O_RDWR)

    def one_run() -> list[object]:
        inj = FaultInjector(0.3, seed=7)
        inj.HISTORY = 8  # far fewer than the distinct calls: forgetting happens
        out: list[object] = []
        for i in range(400):
            try:
                out.append(inj.preadv(fd, [bytearray(100)], (i * 13) % 50 * 100))
            except OSError as e:
                out.append(e.errno)
        return out

    try:
        assert one_run() == one_run()
    finally:
        os.close(fd)


# -- what moved before an error --------------------------------------------------------


def test_copy_range_error_after_progress_carries_the_count(tmp_path: Path) -> None:
    class FailSecondCopy(Syscalls):
        calls = 0

        def copy_file_range(
            self, src: int, dst: int, count: int, offset_src: int, offset_dst: int
        ) -> int:
            self.calls += 1
            if self.calls == 2:
                raise OSError(errno.EIO, "bad sector")
            return super().copy_file_range(src, dst, min(count, 100), offset_src, offset_dst)

    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(DATA[:1000])
    b.write_bytes(b"")
    sc = FailSecondCopy()
    s, src = _open(a, os.O_RDONLY, sc)
    d, dst = _open(b, os.O_RDWR, sc)
    try:
        with pytest.raises(OSError) as e:
            ops.copy_range(sc, src, 0, dst, 0, 1000)
        assert e.value.errno == errno.EIO
        assert e.value.transferred == 100  # type: ignore[attr-defined]
        assert _contents(b) == DATA[:100]
    finally:
        os.close(s)
        os.close(d)


class _FailSecond(Syscalls):
    """The first preadv/pwritev moves ``first`` bytes; the second fails."""

    def __init__(self, first: int, err: int = errno.ENOSPC) -> None:
        self.first = first
        self.err = err
        self.calls = 0

    def _step(self, buffers: Sequence[Any]) -> list[memoryview]:
        self.calls += 1
        if self.calls == 2:
            raise OSError(self.err, os.strerror(self.err))
        out, keep = [], self.first
        for b in buffers:
            v = memoryview(b)[:keep]
            out.append(v)
            keep -= len(v)
        return out

    def preadv(self, fd: int, buffers: Sequence[Any], offset: int, flags: int = 0) -> int:
        return super().preadv(fd, self._step(buffers), offset, flags)

    def pwritev(self, fd: int, buffers: Sequence[Any], offset: int, flags: int = 0) -> int:
        return super().pwritev(fd, self._step(buffers), offset, flags)


def test_partial_write_then_error_carries_the_count(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(b"")
    sc = _FailSecond(3000)
    fd, f = _open(p, os.O_RDWR, sc)
    try:
        with pytest.raises(OSError) as e:
            ops.write(sc, f, [memoryview(b"a" * 5000)], 0, 5000)
        assert e.value.errno == errno.ENOSPC
        assert e.value.transferred == 3000  # type: ignore[attr-defined]
        # `done` (what an earlier attempt moved) counts too.
        sc.calls = 0
        with pytest.raises(OSError) as e:
            ops.write(sc, f, [memoryview(b"b" * 5000)], 0, 5000, done=1000)
        assert e.value.transferred == 4000  # type: ignore[attr-defined]
        # Nothing moved: no count.
        sc.calls, sc.first = 1, 0
        with pytest.raises(OSError) as e:
            ops.write(sc, f, [memoryview(b"c")], 0, 1)
        assert not hasattr(e.value, "transferred")
    finally:
        os.close(fd)


def test_partial_bounce_read_then_error_delivers_and_counts(direct_dir: Path) -> None:
    p = direct_dir / "f"
    p.write_bytes(DATA[: 8 * MAX_ALIGNMENT])
    sc = _FailSecond(2 * MAX_ALIGNMENT, errno.EIO)
    fd, f = _open(p, os.O_RDWR | os.O_DIRECT, sc)
    try:
        f.alignment(sc)
        sc.calls = 0
        buf = bytearray(6 * MAX_ALIGNMENT)
        with pytest.raises(OSError) as e:
            ops.read(sc, f, [memoryview(buf)], 100, len(buf), False)
        moved = 2 * MAX_ALIGNMENT - 100
        assert e.value.errno == errno.EIO
        assert e.value.transferred == moved  # type: ignore[attr-defined]
        assert buf[:moved] == DATA[100 : 100 + moved]
    finally:
        os.close(fd)


def test_partial_rmw_write_then_error_counts_the_callers_bytes(direct_dir: Path) -> None:
    p = direct_dir / "f"
    p.write_bytes(DATA[: 8 * MAX_ALIGNMENT])

    class FailSecondWrite(Syscalls):
        writes = 0

        def pwritev(self, fd: int, buffers: Sequence[Any], offset: int, flags: int = 0) -> int:
            self.writes += 1
            if self.writes == 2:
                raise OSError(errno.ENOSPC, "full")
            return super().pwritev(fd, [memoryview(buffers[0])[:MAX_ALIGNMENT]], offset, flags)

    sc = FailSecondWrite()
    fd, f = _open(p, os.O_RDWR | os.O_DIRECT, sc)
    try:
        with pytest.raises(OSError) as e:
            ops.write(sc, f, [memoryview(b"q" * 9000)], 10, 9000)
        assert e.value.transferred == MAX_ALIGNMENT - 10  # type: ignore[attr-defined]
    finally:
        os.close(fd)


def test_partial_transfer_with_the_fault_injector(tmp_path: Path) -> None:
    """Some request gets a short transfer and then an error: its count is
    on the exception, and that many bytes are in the file."""
    p = tmp_path / "f"
    seen = 0
    for seed in range(200):
        p.write_bytes(b"")
        inj = FaultInjector(0.5, seed=seed, errors=(errno.ENOSPC,))
        fd, f = _open(p, os.O_RDWR, inj)
        try:
            ops.write(inj, f, [memoryview(b"p" * 1000)], 0, 1000)
        except OSError as e:
            n = getattr(e, "transferred", 0)
            if n:
                seen += 1
                assert _contents(p)[:n] == b"p" * n
        finally:
            os.close(fd)
    assert seen


# -- other request kinds ------------------------------------------------------------


def test_copy_range_into_o_direct_at_odd_offsets(direct_dir: Path) -> None:
    src_p, dst_p = direct_dir / "src", direct_dir / "dst"
    src_p.write_bytes(DATA[:20000])
    dst_p.write_bytes(bytes(8192))
    s, src = _open(src_p, os.O_RDONLY)
    d, dst = _open(dst_p, os.O_RDWR | os.O_DIRECT)
    try:
        assert ops.copy_range(SC, src, 5, dst, 3, 10) == 10
        assert ops.copy_range(SC, src, 100, dst, 8190, 9000) == 9000
        assert ops.copy_range(SC, src, 19990, dst, 0, 100) == 10  # end of the source
        want = bytearray(8192)
        want[3:13] = DATA[5:15]
        want[8190:] = DATA[100:9100]
        want[0:10] = DATA[19990:20000]
        assert _contents(dst_p) == bytes(want)
    finally:
        os.close(s)
        os.close(d)


def test_write_zeroes_fallback_refuses_o_append(tmp_path: Path) -> None:
    class NoFallocate(Syscalls):
        def fallocate(self, fd: int, mode: int, offset: int, length: int) -> None:
            raise OSError(errno.EOPNOTSUPP, "no")

    p = tmp_path / "f"
    p.write_bytes(DATA[:100])
    sc = NoFallocate()
    fd, f = _open(p, os.O_RDWR | os.O_APPEND, sc)
    try:
        with pytest.raises(OSError) as e:
            ops.write_zeroes(sc, f, 10, 20)
        assert e.value.errno == errno.ENOTSUP
        assert _contents(p) == DATA[:100]  # not 20 zeros appended
    finally:
        os.close(fd)


# -- files without offsets -------------------------------------------------------------


def _pairs(kind: str, tmp_path: Path) -> tuple[int, int, int, int]:
    """Two identical channels (read end, write end) x 2 of ``kind``."""
    if kind == "pipe":
        a, b = os.pipe()
        c, d = os.pipe()
        return a, b, c, d
    if kind == "fifo":
        out = []
        for name in ("f1", "f2"):
            path = tmp_path / name
            os.mkfifo(path)
            r = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
            w = os.open(path, os.O_WRONLY)
            os.set_blocking(r, True)
            out += [r, w]
        return out[0], out[1], out[2], out[3]
    if kind == "socket":
        s1, s2 = socket.socketpair()
        s3, s4 = socket.socketpair()
        return s1.detach(), s2.detach(), s3.detach(), s4.detach()
    assert kind == "pty"
    m1, t1 = os.openpty()
    m2, t2 = os.openpty()
    for t in (t1, t2):
        pty.tty.setraw(t)  # no echo, no line discipline
    return t1, m1, t2, m2


@pytest.mark.parametrize("kind", ["pipe", "fifo", "socket", "pty"])
@pytest.mark.parametrize("nonblock", [False, True])
def test_streams_match_readv_writev(kind: str, nonblock: bool, tmp_path: Path) -> None:
    mine_r, mine_w, their_r, their_w = _pairs(kind, tmp_path)
    fds = (mine_r, mine_w, their_r, their_w)
    try:
        for fd in fds:
            os.set_blocking(fd, not nonblock)
        f_r, f_w = AioFile.from_fd(SC, mine_r), AioFile.from_fd(SC, mine_w)
        assert f_r.stream
        assert f_w.stream
        # A write, then a read asking for more than there is: short.
        views = [memoryview(b"hello "), memoryview(b""), memoryview(b"world")]
        assert ops.write(SC, f_w, views, 12345, 11) == os.writev(their_w, views) == 11
        mine, theirs = (
            [bytearray(4), bytearray(0), bytearray(20)],
            [bytearray(4), bytearray(0), bytearray(20)],
        )
        mv = [memoryview(b) for b in mine]
        assert ops.read(SC, f_r, mv, 999, 24, False) == os.readv(their_r, theirs) == 11
        assert mine == theirs
        # A request that already moved bytes has had its one transfer.
        assert ops.read(SC, f_r, mv, 0, 24, False, done=5) == 5
        if nonblock:
            # Nothing there: EAGAIN, as readv says.
            with pytest.raises(BlockingIOError):
                os.readv(their_r, theirs)
            with pytest.raises(BlockingIOError):
                ops.read(SC, f_r, mv, 0, 24, False)
            # A write bigger than the room: the count that fits (on a pty
            # the room differs between two terminals, so only its kind).
            big = memoryview(b"x" * (1 << 20))
            n_ops = ops.write(SC, f_w, [big], 0, len(big))
            n_os = os.writev(their_w, [big])
            assert 0 < n_ops < len(big)
            assert 0 < n_os < len(big)
            if kind != "pty":
                assert n_ops == n_os
    finally:
        for fd in fds:
            os.close(fd)


def test_character_devices(tmp_path: Path) -> None:
    zero = os.open("/dev/zero", os.O_RDWR)
    null = os.open("/dev/null", os.O_RDWR)
    try:
        fz, fn = AioFile.from_fd(SC, zero), AioFile.from_fd(SC, null)
        # Memory devices are read to the full count, as files are (a signal
        # pending cuts a /dev/zero read short: see AioFile); neither goes to
        # the ring.
        assert not fz.stream
        assert not fn.stream
        assert fz.short_nowait
        assert fn.short_nowait
        buf = bytearray(b"\xff" * 100)
        assert ops.read(SC, fz, [memoryview(buf)], 7, 100, False) == os.readv(zero, [buf]) == 100
        assert buf == bytes(100)
        assert ops.read(SC, fn, [memoryview(buf)], 0, 100, False) == os.readv(null, [buf]) == 0
        assert ops.write(SC, fn, [memoryview(b"abc")], 5, 3) == os.writev(null, [b"abc"]) == 3
    finally:
        os.close(zero)
        os.close(null)
    p = tmp_path / "f"
    p.write_bytes(b"x")
    fd = os.open(p, os.O_RDONLY)
    try:
        assert not AioFile.from_fd(SC, fd).stream
    finally:
        os.close(fd)
    assert not AioFile(0, os.O_RDWR, stat.S_IFBLK).stream


@pytest.mark.parametrize("backend", ["threads", "io_uring"])
def test_a_short_pipe_read_is_the_answer(backend: str) -> None:
    if backend == "io_uring" and not probe_io_uring().supported:
        pytest.skip("no io_uring here")
    r, w = os.pipe()
    try:
        with ThreadletQueue(max_threads=2) as q, AioContext(q, backend=backend) as ctx:
            os.write(w, b"abc")
            buf = bytearray(100)
            req = ctx.read(r, 0, buf)
            # (If a second read waited for more, closing the pipe ends it.)
            done = ctx.wait(req, 10)
            os.close(w)
            w = -1
            assert done
            assert req.result() == 3
            assert buf[:3] == b"abc"
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


def test_packet_mode_pipe_is_a_stream() -> None:
    """pipe2(O_DIRECT): an O_DIRECT fd with no blocks; its data is never
    read by an alignment probe."""
    r, w = os.pipe2(os.O_DIRECT)
    try:
        fr, fw = AioFile.from_fd(SC, r), AioFile.from_fd(SC, w)
        assert fw.direct
        assert fw.stream
        assert ops.write(SC, fw, [memoryview(b"one")], 0, 3) == 3
        assert fr.alignment(SC) == fw.alignment(SC) == (1, 1)
        assert ops.write(SC, fw, [memoryview(b"two!")], 0, 4) == 4
        buf = bytearray(10)
        assert ops.read(SC, fr, [memoryview(buf)], 0, 10, False) == 3  # one packet
        assert buf[:3] == b"one"
        assert os.read(r, 10) == b"two!"
    finally:
        os.close(r)
        os.close(w)


def test_flush_errors_stick_once_a_direct_file_went_through_the_page_cache(
    direct_dir: Path,
) -> None:
    """An O_DIRECT file's failed flush is not sticky (no page cache), until
    an unaligned write put bytes past the last block edge in the page
    cache: from then on a lost write-back fails every later flush."""

    class FailingSync(Syscalls):
        def fdatasync(self, fd: int) -> None:
            raise OSError(errno.EIO, "write-back lost")

    p = direct_dir / "f"
    p.write_bytes(DATA[:4096])
    sc = FailingSync()
    fd, f = _open(p, os.O_RDWR | os.O_DIRECT, sc)
    try:
        buf = aligned_buffer(4096)
        assert ops.write(sc, f, [buf], 0, 4096) == 4096  # straight to the disk
        with pytest.raises(OSError, match="write-back lost"):
            ops.flush(sc, f, True)
        assert ops.flush(SC, f, True) == 0  # not sticky
        assert ops.write(sc, f, [memoryview(b"tail")], 4096, 4) == 4
        with pytest.raises(OSError, match="write-back lost"):
            ops.flush(sc, f, True)
        with pytest.raises(OSError, match="an earlier flush"):
            ops.flush(SC, f, True)  # sticky: the kernel is not even asked
    finally:
        os.close(fd)
