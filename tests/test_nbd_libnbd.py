"""The NBD server against libnbd's own client (Debian: python3-libnbd):
many reads and writes in flight on one connection with structured
replies, base:allocation block status against SEEK_DATA/SEEK_HOLE,
trim, write-zeroes and flush, every result checked against the image file.

python3-libnbd installs for the system's python3.  When this interpreter
is the same CPython minor version (the extension's ABI tag matches), the
module is loaded from the system's dist-packages by path, without putting
that directory on sys.path; otherwise the tests skip, saying why.  The
server runs in-process (its own event loop thread) on a unix socket.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import random
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.test_nbd_server import BACKENDS, ServerThread, pattern
from threadlets.nbd.server import open_export

SIZE = 8 << 20
DIST_PACKAGES = "/usr/lib/python3/dist-packages"


def load_nbd() -> ModuleType | str:
    """libnbd's Python module, or why it cannot be loaded here."""
    if "nbd" in sys.modules:
        return sys.modules["nbd"]
    try:
        import nbd  # type: ignore[import-not-found]

        return nbd  # type: ignore[no-any-return]
    except ImportError:
        pass
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    so = os.path.join(DIST_PACKAGES, f"libnbdmod{suffix}")
    py = os.path.join(DIST_PACKAGES, "nbd.py")
    if not os.path.exists(py):
        return "python3-libnbd is not installed (Debian: see .ci/run's apt-get line)"
    if not os.path.exists(so):
        built = [os.path.basename(p) for p in glob.glob(f"{DIST_PACKAGES}/libnbdmod*.so")]
        return f"python3-libnbd is built for {built}, not this Python ({suffix})"
    for name, path in (("libnbdmod", so), ("nbd", py)):
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as e:
            sys.modules.pop(name, None)
            return f"python3-libnbd does not load here: {type(e).__name__}: {e}"
    return sys.modules["nbd"]


_NBD = load_nbd()


def need_nbd() -> Any:
    if isinstance(_NBD, str):
        pytest.skip(_NBD)
    return _NBD


@pytest.fixture
def image(tmp_path: Path) -> Path:
    p = tmp_path / "image.raw"
    with open(p, "wb") as f:
        f.truncate(SIZE)
    return p


def serve(image: Path, backend: str, **export: Any) -> tuple[ServerThread, str]:
    # A short path: sun_path holds 108 bytes, a pytest tmp_path may be longer.
    sock = os.path.join(tempfile.mkdtemp(prefix="nbd-"), "sock")
    st = ServerThread(open_export(image, name="disk", **export), backend=backend)
    return st.start(unix=sock), sock


@pytest.fixture(params=BACKENDS)
def served(request: pytest.FixtureRequest, image: Path) -> Iterator[str]:
    """The server's unix socket path."""
    st, sock = serve(image, request.param)
    try:
        yield sock
    finally:
        st.stop()
        remove_socket(sock)


def remove_socket(sock: str) -> None:
    """Remove the socket and its directory."""
    Path(sock).unlink(missing_ok=True)
    os.rmdir(os.path.dirname(sock))


def connect(sock: str, *meta: str) -> Any:
    nbd = need_nbd()
    h = nbd.NBD()
    h.set_export_name("disk")
    for m in meta:
        h.add_meta_context(m)
    h.connect_unix(sock)
    return h


def wait_all(h: Any, cookies: list[int]) -> None:
    """Poll until every cookie completed (aio_command_completed raises
    nbd.Error for one that failed)."""
    pending = set(cookies)
    while pending:
        h.poll(10_000)
        pending = {c for c in pending if not h.aio_command_completed(c)}


def seek_extents(path: Path) -> list[tuple[int, int]]:
    """(offset, is_data) runs of the file by SEEK_DATA/SEEK_HOLE."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        out: list[tuple[int, int]] = []
        pos = 0
        while pos < size:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                data = size
            if data > pos:
                out.append((pos, 0))
                pos = data
                continue
            out.append((pos, 1))
            pos = os.lseek(fd, pos, os.SEEK_HOLE)
        return out
    finally:
        os.close(fd)


def status_extents(h: Any, size: int, flags: int = 0) -> list[tuple[int, int]]:
    """The export's (offset, is_data) runs by NBD_CMD_BLOCK_STATUS, merged."""
    nbd = need_nbd()
    runs: list[tuple[int, int]] = []
    starts: list[int] = []
    got: list[tuple[int, int]] = []

    def extent(meta: str, offset: int, entries: list[int], err: Any) -> int:
        assert meta == nbd.CONTEXT_BASE_ALLOCATION
        starts.append(offset)
        got.extend(zip(entries[::2], entries[1::2], strict=True))
        return 0

    pos = 0
    while pos < size:
        starts.clear()
        got.clear()
        h.block_status(size - pos, pos, extent, flags)
        assert starts == [pos]
        assert got
        if flags & nbd.CMD_FLAG_REQ_ONE:
            assert len(got) == 1
        for length, state in got:
            assert length > 0
            assert state in (0, nbd.STATE_HOLE | nbd.STATE_ZERO), state
            data = int(state == 0)
            if not runs or runs[-1][1] != data:
                runs.append((pos, data))
            pos += length
        assert pos <= size
    return runs


def test_concurrent_reads_and_writes_with_structured_replies(served: str, image: Path) -> None:
    nbd = need_nbd()
    h = connect(served)
    try:
        assert h.get_structured_replies_negotiated()
        assert h.can_fua()
        assert h.can_multi_conn()
        rng = random.Random(15)
        # 96 writes of random sizes at distinct slots, a third of them FUA,
        # all issued before the first poll: they are in flight together.
        slot = 64 << 10
        offsets = rng.sample(range(0, SIZE - 8 * slot, slot), 96)  # the last 8: below
        data = {off: rng.randbytes(rng.randrange(1, slot)) for off in offsets}
        cookies = [
            h.aio_pwrite(
                nbd.Buffer.from_bytearray(d), off, flags=nbd.CMD_FLAG_FUA if i % 3 == 0 else 0
            )
            for i, (off, d) in enumerate(data.items())
        ]
        assert h.aio_in_flight() > 1
        wait_all(h, cookies)
        # Reads, some structured with a chunk callback, with writes to
        # other bytes still in flight.
        bufs = {off: nbd.Buffer(len(d)) for off, d in data.items()}
        chunks: list[tuple[int, int, int]] = []

        def chunk(sub: Any, offset: int, status: int, err: Any) -> int:
            chunks.append((offset, len(sub), status))
            return 0

        more = {SIZE - slot * (i + 1): rng.randbytes(slot) for i in range(8)}
        assert not set(more) & set(data)
        cookies = []
        for i, (off, b) in enumerate(bufs.items()):
            if i % 2:
                cookies.append(h.aio_pread_structured(b, off, chunk))
            else:
                cookies.append(h.aio_pread(b, off))
            if i < len(more):
                woff = list(more)[i]
                cookies.append(h.aio_pwrite(nbd.Buffer.from_bytearray(more[woff]), woff))
        assert h.aio_in_flight() > 1
        wait_all(h, cookies)
        for off, d in data.items():
            assert bytes(bufs[off].to_bytearray()) == d, off
        assert chunks
        assert all(status == nbd.READ_DATA for _, _, status in chunks)
        h.flush()
    finally:
        h.shutdown()
    expected = bytearray(SIZE)
    for off, d in (data | more).items():
        expected[off : off + len(d)] = d
    assert image.read_bytes() == expected


def test_block_status_matches_seek_data_and_seek_hole(served: str, image: Path) -> None:
    nbd = need_nbd()
    with open(image, "r+b") as f:
        for off, n in ((0, 4096), (1 << 20, 256 << 10), (3 << 20, 1 << 20), (SIZE - 8192, 8192)):
            f.seek(off)
            f.write(pattern(n, seed=off))
    truth = seek_extents(image)
    assert any(d for _, d in truth)
    assert any(not d for _, d in truth)
    h = connect(served, nbd.CONTEXT_BASE_ALLOCATION)
    try:
        assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        assert status_extents(h, SIZE) == truth
        assert status_extents(h, SIZE, nbd.CMD_FLAG_REQ_ONE) == truth  # one extent a reply
        # The holes read as zeros, the data as written.
        for (off, is_data), end in zip(truth, [o for o, _ in truth[1:]] + [SIZE], strict=True):
            got = h.pread(end - off, off)
            if not is_data:
                assert got == bytes(end - off)
    finally:
        h.shutdown()


def test_trim_zero_and_flush_read_back(served: str, image: Path) -> None:
    nbd = need_nbd()
    image.write_bytes(pattern(SIZE))
    h = connect(served, nbd.CONTEXT_BASE_ALLOCATION)
    try:
        assert h.can_trim()
        assert h.can_zero()
        assert h.can_flush()
        h.trim(1 << 20, 1 << 20)
        h.zero(1 << 20, 3 << 20)  # may punch a hole
        h.zero(1 << 20, 5 << 20, nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FUA)
        h.zero(100, 7 << 20)  # unaligned: written as zeros
        h.flush()
        assert h.pread(1 << 20, 3 << 20) == bytes(1 << 20)
        assert h.pread(1 << 20, 5 << 20) == bytes(1 << 20)
        assert h.pread(100, 7 << 20) == bytes(100)
        runs = dict(status_extents(h, SIZE))
        assert runs.get(5 << 20, 1) == 1  # NO_HOLE: still allocated
        # TRIM is advisory: the range reads as before or as zeros, as the
        # image file says.
        with open(image, "rb") as f:
            f.seek(1 << 20)
            trimmed = f.read(1 << 20)
        assert trimmed in (bytes(1 << 20), pattern(SIZE)[1 << 20 : 2 << 20])
        assert h.pread(1 << 20, 1 << 20) == trimmed
    finally:
        h.shutdown()
    expected = bytearray(pattern(SIZE))
    expected[1 << 20 : 2 << 20] = trimmed
    expected[3 << 20 : 4 << 20] = bytes(1 << 20)
    expected[5 << 20 : 6 << 20] = bytes(1 << 20)
    expected[7 << 20 : (7 << 20) + 100] = bytes(100)
    assert image.read_bytes() == expected


@pytest.fixture
def direct_image() -> Iterator[Path]:
    """An image on /var/tmp (a disk file system, where /tmp may be tmpfs);
    skips where O_DIRECT is refused."""
    with tempfile.TemporaryDirectory(dir="/var/tmp") as d:
        p = Path(d) / "image.raw"
        p.write_bytes(pattern(SIZE))
        try:
            os.close(os.open(p, os.O_RDWR | os.O_DIRECT))
        except OSError as e:
            pytest.skip(f"O_DIRECT refused on /var/tmp: {e}")
        yield p


@pytest.mark.parametrize("backend", BACKENDS)
def test_direct_unaligned_requests_work(direct_image: Path, backend: str) -> None:
    """A client that ignores the advertised minimum block size (libnbd's
    strict alignment turned off) still gets its odd reads and writes."""
    nbd = need_nbd()
    st, sock = serve(direct_image, backend, direct=True)
    try:
        h = connect(sock)
        try:
            assert h.get_block_size(nbd.SIZE_MINIMUM) > 1  # the O_DIRECT alignment
            h.set_strict_mode(h.get_strict_mode() & ~nbd.STRICT_ALIGN)
            expected = bytearray(pattern(SIZE))
            rng = random.Random(3)
            writes = [(511, 3), (4095, 2), (12345, 7000)] + [
                (rng.randrange(SIZE - 9000), rng.randrange(1, 9000)) for _ in range(20)
            ]
            cookies = []
            for off, n in writes:
                d = rng.randbytes(n)
                expected[off : off + n] = d
                cookies.append(h.aio_pwrite(nbd.Buffer.from_bytearray(d), off))
                wait_all(h, cookies[-1:])  # in order: the writes may overlap
            h.zero(5, 1 << 20, nbd.CMD_FLAG_NO_HOLE)
            expected[1 << 20 : (1 << 20) + 5] = bytes(5)
            for off in (1, 511, 513, 4095, 12345, SIZE - 1):
                assert h.pread(1, off) == expected[off : off + 1], off
            reads = [(off, nbd.Buffer(n)) for off, n in writes]
            wait_all(h, [h.aio_pread(b, off) for off, b in reads])
            for off, b in reads:
                assert b.to_bytearray() == expected[off : off + len(b)], off
            h.flush()
        finally:
            h.shutdown()
    finally:
        st.stop()
        remove_socket(sock)
    assert direct_image.read_bytes() == expected
