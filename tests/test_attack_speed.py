"""Attacks on the speed recovery of the core: posix's fd identity through
raw system calls, the completion eventfd written and read holding the GIL,
and the reaper's holding of submissions."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

import threadlets.posix as px
from threadlets import AioContext, RingUnavailable

DATA = bytes(range(256)) * 32  # 8 KiB


@pytest.fixture(params=["threads", "io_uring"])
def ctx(request: pytest.FixtureRequest) -> Iterator[AioContext]:
    try:
        c = AioContext(deliver=False, backend=request.param)
    except RingUnavailable as e:
        pytest.skip(f"io_uring: {e}")
    try:
        yield c
    finally:
        c.close()


def _read(rt: px.PosixAio, fd: int, offset: int, n: int) -> bytes:
    buf = bytearray(n)
    cb = px.aiocb(fd, offset, buf, n)
    rt.aio_read(cb)
    rt.aio_suspend([cb], 10)
    assert rt.aio_error(cb) == 0
    return bytes(buf[: rt.aio_return(cb)])


@pytest.mark.parametrize("raw", [True, False], ids=["raw", "os"])
def test_fifo_number_reused_for_a_regular_file_with_the_same_flags(
    ctx: AioContext, tmp_path: Path, raw: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A FIFO and a regular file opened O_RDWR have the same F_GETFL flags
    (O_RDWR|O_LARGEFILE).  The engine remembers a FIFO as a stream that
    takes no positional calls: if the reuse goes unnoticed, a read of the
    file at an offset reads at the file position (offset 0) instead.
    Failed before: the read at 4112 returned the bytes at 0."""
    if not raw:
        monkeypatch.setattr(px, "_raw_syscall", None)  # portable mode's path
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    reg = tmp_path / "reg"
    reg.write_bytes(DATA)
    rt = px.PosixAio(ctx)
    fd = os.open(fifo, os.O_RDWR)
    try:
        os.write(fd, b"hello")
        assert _read(rt, fd, 0, 100) == b"hello"
    finally:
        os.close(fd)
    fd2 = os.open(reg, os.O_RDWR)
    try:
        assert fd2 == fd  # the number is reused
        assert _read(rt, fd2, 4096 + 16, 16) == DATA[4096 + 16 : 4096 + 32]
    finally:
        os.close(fd2)
