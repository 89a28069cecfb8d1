"""The NBD server's per-request paths on an O_DIRECT export (issue 15): a
WRITE of whole blocks costs one pwritev and nothing else (no fstat, no
per-file lock), and the file keeps its size and contents whatever mix of
aligned and unaligned WRITEs runs at once, the unaligned size of the last
block included."""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.test_nbd_server import BACKENDS, ServerThread, pattern
from threadlets.nbd.proto import Cmd
from threadlets.nbd.server import open_export
from threadlets.syscalls import Syscalls

#: Not a multiple of any block size: the last block is partly past the end.
SIZE = 64 * 4096 + 1000


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    value: str = request.param
    return value


@pytest.fixture
def direct_image(tmp_path: Path) -> Iterator[Path]:
    for d in (tmp_path, Path("/var/tmp")):
        with tempfile.TemporaryDirectory(dir=d, prefix="threadlets-test-") as sub:
            p = Path(sub) / "image.raw"
            p.write_bytes(pattern(SIZE))
            try:
                os.close(os.open(p, os.O_RDWR | os.O_DIRECT))
            except OSError:
                continue
            yield p
            return
    pytest.skip("O_DIRECT works neither in tmp_path nor in /var/tmp")


def _serve(image: Path, backend: str) -> ServerThread:
    try:
        export = open_export(image, direct=True)
    except OSError as e:
        if e.errno != errno.ENOTSUP:
            raise
        pytest.skip(str(e))  # no O_DIRECT in threadlets here (portable mode)
    return ServerThread(export, backend=backend).start()


def test_whole_block_writes_look_up_no_size(
    direct_image: Path, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Depth 32 of 4 KiB WRITEs to an O_DIRECT export: no fstat on any
    of them (the first version made one per WRITE, under a per-file lock
    its workers queued on, to learn whether the write extended the file)."""
    st = _serve(direct_image, backend)
    fstats: list[int] = []
    real = Syscalls.fstat

    def counting(self: Syscalls, fd: int) -> Any:
        fstats.append(fd)
        return real(self, fd)

    try:
        c = st.client()
        try:
            c.write(0, pattern(4096, 99))  # the file's record and alignment: once
            monkeypatch.setattr(Syscalls, "fstat", counting)
            blocks = {i: pattern(4096, i) for i in range(1, 64)}
            for batch in (range(1, 33), range(33, 64)):
                handles = [c.send(Cmd.WRITE, i * 4096, 4096, data=blocks[i]) for i in batch]
                for _ in handles:
                    assert c.reply()[1] == 0
            monkeypatch.undo()
            for i, data in blocks.items():
                assert c.read(i * 4096, 4096) == data
        finally:
            c.close()
    finally:
        st.stop()
    assert fstats == []
    assert os.path.getsize(direct_image) == SIZE


def test_mixed_writes_keep_the_size_and_land(direct_image: Path, backend: str) -> None:
    """Aligned and unaligned WRITEs at once, the partial last block among
    them: every byte lands and the file keeps its size."""
    st = _serve(direct_image, backend)
    want = bytearray(pattern(SIZE))
    writes = [(i * 4096, pattern(4096, i)) for i in range(0, 64, 2)]
    writes += [(i * 4096 + 100, pattern(300, i)) for i in range(1, 64, 2)]
    writes += [(64 * 4096, pattern(500, 7)), (SIZE - 10, b"0123456789")]
    try:
        c = st.client()
        try:
            handles = [c.send(Cmd.WRITE, off, len(d), data=d) for off, d in writes]
            for _ in handles:
                assert c.reply()[1] == 0
            for off, d in writes:
                want[off : off + len(d)] = d
            assert c.read(0, SIZE) == bytes(want)
        finally:
            c.close()
    finally:
        st.stop()
    assert direct_image.read_bytes() == bytes(want)
