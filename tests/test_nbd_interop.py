"""The NBD server against real clients: nbdinfo, qemu-io, qemu-img, nbdcopy,
fio's nbd engine (Debian: libnbd-bin, qemu-utils, fio).  The server runs
in-process on a free loopback port or a unix socket in tmp_path; a test
whose client is not installed is skipped, saying which."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.test_nbd_server import BACKENDS, ServerThread, pattern
from threadlets.nbd.server import open_export

SIZE = 8 << 20
TIMEOUT = 60


def need(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        pytest.skip(f"{binary} is not installed (Debian: see .ci/run's apt-get line)")
    return path


def run(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(
        argv, capture_output=True, text=True, timeout=TIMEOUT, check=False, cwd=cwd
    )
    assert out.returncode == 0, f"{argv}: {out.returncode}\n{out.stdout}\n{out.stderr}"
    return out


@pytest.fixture
def image(tmp_path: Path) -> Path:
    p = tmp_path / "image.raw"
    with open(p, "wb") as f:
        f.truncate(SIZE)
    return p


@pytest.fixture(params=BACKENDS)
def served(request: pytest.FixtureRequest, image: Path) -> Iterator[ServerThread]:
    st = ServerThread(open_export(image, name="disk"), backend=request.param).start()
    try:
        yield st
    finally:
        st.stop()


def uri(st: ServerThread) -> str:
    host, port = st.address[:2]
    return f"nbd://{host}:{port}/disk"


def test_nbdinfo_shows_the_export_and_its_flags(served: ServerThread) -> None:
    need("nbdinfo")
    info = json.loads(run("nbdinfo", "--json", uri(served)).stdout)
    assert info["protocol"] == "newstyle-fixed"
    (export,) = info["exports"]
    assert export["export-name"] == "disk"
    assert export["export-size"] == SIZE
    for flag in ("can_flush", "can_fua", "can_trim", "can_zero", "can_multi_conn", "can_cache"):
        assert export[flag] is True, flag
    assert export["is_read_only"] is False
    assert export["block_size_minimum"] == 1
    assert export["block_size_maximum"] == 32 << 20
    listed = json.loads(run("nbdinfo", "--list", "--json", uri(served)).stdout)
    assert [e["export-name"] for e in listed["exports"]] == ["disk"]


def test_nbdinfo_map_sees_holes_and_data(served: ServerThread, image: Path) -> None:
    need("nbdinfo")
    with open(image, "r+b") as f:
        f.seek(1 << 20)
        f.write(pattern(65536))
    out = json.loads(run("nbdinfo", "--map", "--json", uri(served)).stdout)
    data = [(e["offset"], e["length"]) for e in out if e["type"] == 0]
    assert data
    assert all(off <= 1 << 20 < off + n or off < (1 << 20) + 65536 <= off + n for off, n in data)
    assert sum(e["length"] for e in out) == SIZE


def test_qemu_io_patterns_read_back(served: ServerThread) -> None:
    need("qemu-io")
    cmds = [
        "write -P 0xab 0 64k",
        "read -P 0xab 0 64k",
        "write -P 0xcd -f 64k 4k",  # FUA
        "read -P 0xcd 64k 4k",
        "discard 0 32k",
        "read -P 0 0 32k",
        "read -P 0xab 32k 32k",
        "write -z 128k 64k",
        "read -P 0 128k 64k",
        "write -P 0x11 1M 1M",
        "write -z -u 1M 512k",  # may unmap: a hole
        "read -P 0 1M 512k",
        "read -P 0x11 1536k 512k",
        "aio_write -P 0x22 4M 128k",
        "aio_flush",
        "read -P 0x22 4M 128k",
        "flush",
    ]
    argv = ["qemu-io", "-f", "raw", uri(served)]
    for c in cmds:
        argv += ["-c", c]
    out = run(*argv)
    assert "Pattern verification failed" not in out.stdout + out.stderr


def test_qemu_io_beyond_the_end_fails_cleanly(served: ServerThread) -> None:
    need("qemu-io")
    out = subprocess.run(
        ["qemu-io", "-f", "raw", uri(served), "-c", f"read {SIZE - 512} 4k"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert "Input/output error" in out.stdout + out.stderr or "out of" in out.stdout + out.stderr
    run("qemu-io", "-f", "raw", uri(served), "-c", "read -P 0 0 4k")  # still serving


def test_qemu_img_convert_to_and_from_the_export(served: ServerThread, tmp_path: Path) -> None:
    need("qemu-img")
    src = tmp_path / "src.raw"
    src.write_bytes(os.urandom(SIZE // 2) + bytes(SIZE // 4) + os.urandom(SIZE // 4))
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), uri(served))
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), uri(served))
    back = tmp_path / "back.raw"
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", uri(served), str(back))
    assert back.read_bytes() == src.read_bytes()
    qcow = tmp_path / "back.qcow2"
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", uri(served), str(qcow))
    run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(src), str(qcow))


def test_nbdcopy_both_ways(served: ServerThread, tmp_path: Path, image: Path) -> None:
    need("nbdcopy")
    src = tmp_path / "src.raw"
    src.write_bytes(os.urandom(SIZE))
    run("nbdcopy", str(src), uri(served))
    assert image.read_bytes() == src.read_bytes()
    back = tmp_path / "back.raw"
    run("nbdcopy", uri(served), str(back))
    assert back.read_bytes() == src.read_bytes()


def test_unix_socket_and_read_only(image: Path, tmp_path: Path) -> None:
    need("nbdinfo")
    need("qemu-io")
    image.write_bytes(pattern(SIZE))
    sock = str(tmp_path / "nbd.sock")
    st = ServerThread(open_export(image, name="disk", read_only=True), backend="threads")
    st.start(unix=sock)
    try:
        info = json.loads(run("nbdinfo", "--json", f"nbd+unix:///disk?socket={sock}").stdout)
        assert info["exports"][0]["is_read_only"] is True
        target = f"nbd+unix:///disk?socket={sock}"
        out = subprocess.run(
            ["qemu-io", "-f", "raw", target, "-c", "write -P 0x55 0 4k"],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )
        assert out.returncode != 0  # refused (qemu sees NBD_FLAG_READ_ONLY)
        assert "wrote" not in out.stdout
        run("qemu-io", "-r", "-f", "raw", target, "-c", "read -P 0 0 1")
    finally:
        st.stop()
    assert image.read_bytes() == pattern(SIZE)


def fio_has_nbd() -> bool:
    fio = shutil.which("fio")
    if fio is None:
        return False
    out = subprocess.run(
        [fio, "--enghelp=nbd"], capture_output=True, text=True, timeout=TIMEOUT, check=False
    )
    return out.returncode == 0 and "uri" in out.stdout


@pytest.mark.skipif(not fio_has_nbd(), reason="fio or its nbd engine is not installed")
def test_fio_verify_crc32c(served: ServerThread, tmp_path: Path) -> None:
    out = run(
        "fio",
        "--name=verify",
        "--ioengine=nbd",
        f"--uri={uri(served)}",
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=32",
        f"--size={SIZE}",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        "--verify_state_save=0",
        "--output-format=json",
        cwd=tmp_path,  # where anything fio leaves behind goes
    )
    job = json.loads(out.stdout[out.stdout.index("{") :])["jobs"][0]
    assert job["error"] == 0
    assert job["write"]["total_ios"] == SIZE // 4096
    assert job["read"]["total_ios"] == SIZE // 4096  # every block read back and verified


@pytest.fixture(params=BACKENDS)
def served_direct(request: pytest.FixtureRequest) -> Iterator[tuple[ServerThread, Path]]:
    """The server started --direct, on an image on /var/tmp (a disk file
    system, where /tmp may be tmpfs); skips where O_DIRECT is refused."""
    with tempfile.TemporaryDirectory(dir="/var/tmp") as d:
        image = Path(d) / "image.raw"
        image.write_bytes(b"\x5a" * SIZE)
        try:
            export = open_export(image, name="disk", direct=True)
        except OSError as e:
            pytest.skip(f"O_DIRECT refused on /var/tmp: {e}")
        st = ServerThread(export, backend=request.param).start()
        try:
            yield st, image
        finally:
            st.stop()


def test_direct_export_says_its_alignment(served_direct: tuple[ServerThread, Path]) -> None:
    need("nbdinfo")
    st, _ = served_direct
    (export,) = json.loads(run("nbdinfo", "--json", uri(st)).stdout)["exports"]
    assert export["block_size_minimum"] in (512, 1024, 2048, 4096)
    assert export["block_size_preferred"] % export["block_size_minimum"] == 0


def test_direct_unaligned_qemu_io_reads_and_writes(
    served_direct: tuple[ServerThread, Path],
) -> None:
    need("qemu-io")
    st, image = served_direct
    cmds = [
        "read -P 0x5a 1 1",
        "read -P 0x5a 4097 1",
        f"read -P 0x5a {SIZE - 1} 1",
        "write -P 0x11 511 3",
        "read -P 0x11 511 3",
        "read -P 0x5a 510 1",
        "read -P 0x5a 514 1",
        "write -P 0x22 -f 4095 2",  # FUA, across two blocks
        "read -P 0x22 4095 2",
        "aio_write -P 0x33 12345 7000",
        "aio_flush",
        "read -P 0x33 12345 7000",
        "read -P 0x5a 19345 1",
        "write -z 100001 99",
        "read -P 0 100001 99",
        "read -P 0x5a 100000 1",
        "read -P 0x5a 100100 1",
        "flush",
    ]
    argv = ["qemu-io", "-f", "raw", uri(st)]
    for c in cmds:
        argv += ["-c", c]
    out = run(*argv)
    assert "Pattern verification failed" not in out.stdout + out.stderr
    expected = bytearray(b"\x5a" * SIZE)
    expected[511:514] = b"\x11" * 3
    expected[4095:4097] = b"\x22" * 2
    expected[12345:19345] = b"\x33" * 7000
    expected[100001:100100] = bytes(99)
    assert image.read_bytes() == expected


def test_direct_qemu_img_convert_and_compare(
    served_direct: tuple[ServerThread, Path], tmp_path: Path
) -> None:
    need("qemu-img")
    st, image = served_direct
    src = tmp_path / "src.raw"
    src.write_bytes(os.urandom(SIZE // 2) + bytes(SIZE // 4) + os.urandom(SIZE // 4 - 3) + b"end")
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), uri(st))
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), uri(st))
    back = tmp_path / "back.raw"
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", uri(st), str(back))
    assert back.read_bytes() == src.read_bytes() == image.read_bytes()
