"""Attacks on threadlets.open's write buffer, each against io.open as the
oracle: a file collected unclosed writes what its buffer held (io's
finalizer flushes); a non-contiguous buffer is refused with io's BufferError
before anything moves."""

from __future__ import annotations

import gc
import io
import os
from pathlib import Path
from typing import Any

import pytest

import threadlets

BACKENDS = [
    pytest.param(("asyncio", {}), id="asyncio"),
    pytest.param(("trio", {}), id="trio"),
]


@pytest.fixture(params=BACKENDS)
def anyio_backend(request: pytest.FixtureRequest) -> Any:
    return request.param


def _collect(box: list[Any]) -> None:
    """Drop the only reference to the file in ``box`` and collect it."""
    box.clear()
    gc.collect()


def _io_collected(path: Path, mode: str, data: bytes) -> bytes:
    f = open(path, mode)  # noqa: SIM115
    f.write(data)
    boxf: list[Any] = [f]
    del f
    with pytest.warns(ResourceWarning):
        _collect(boxf)
    return path.read_bytes()


@pytest.mark.anyio
@pytest.mark.parametrize("mode", ["wb", "ab", "r+b", "w+b"])
async def test_collected_unclosed_file_writes_its_buffer(tmp_path: Path, mode: str) -> None:
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    for p in (ours, theirs):
        p.write_bytes(b"0123456789")
    f = await threadlets.open(ours, mode)
    if "a" not in mode:
        await f.seek(3)
    await f.write(b"hello")
    assert b"hello" not in ours.read_bytes()  # (still buffered)
    boxf: list[Any] = [f]
    del f
    with pytest.warns(ResourceWarning):
        _collect(boxf)
    g = open(theirs, mode)  # noqa: SIM115
    if "a" not in mode:
        g.seek(3)
    g.write(b"hello")
    boxg: list[Any] = [g]
    del g
    with pytest.warns(ResourceWarning):
        _collect(boxg)
    assert ours.read_bytes() == theirs.read_bytes()


@pytest.mark.anyio
async def test_collected_closefd_false_writes_its_buffer(tmp_path: Path) -> None:
    p = tmp_path / "f"
    fd = os.open(p, os.O_WRONLY | os.O_CREAT)
    try:
        f = await threadlets.open(fd, "wb", closefd=False)
        await f.write(b"zz")
        del f
        gc.collect()
        assert p.read_bytes() == b"zz"
        # io does the same:
        g = open(fd, "ab", closefd=False)  # noqa: SIM115
        g.write(b"yy")
        del g
        gc.collect()
        assert p.read_bytes() == b"zzyy"
    finally:
        os.close(fd)


@pytest.mark.anyio
@pytest.mark.parametrize("buffering", [-1, 0, 4])
async def test_non_contiguous_buffer_is_refused_as_io_does(tmp_path: Path, buffering: int) -> None:
    view = memoryview(bytearray(b"abcdef"))[::2]
    with open(tmp_path / "io", "wb", buffering=buffering) as g:
        g.write(b"ab")
        with pytest.raises(BufferError):
            g.write(view)
    async with await threadlets.open(tmp_path / "t", "wb", buffering=buffering) as f:
        await f.write(b"ab")
        with pytest.raises(BufferError, match="contiguous"):
            await f.write(view)
        assert await f.tell() == 2
    assert (tmp_path / "t").read_bytes() == (tmp_path / "io").read_bytes() == b"ab"


def test_io_oracle_flushes_on_collection(tmp_path: Path) -> None:
    """The oracle itself: io's finalizer writes the buffer."""
    assert _io_collected(tmp_path / "x", "wb", b"abc") == b"abc"
    assert io.DEFAULT_BUFFER_SIZE > 3


@pytest.mark.anyio
async def test_collected_text_file_writes_its_buffer(tmp_path: Path) -> None:
    """Text mode too (the text layer and its binary stream form a cycle):
    the BOM and the translated newlines land as io's finalizer writes them."""
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    f = await threadlets.open(ours, "w", encoding="utf-16", newline="\r\n")
    await f.write("a\nb")
    box: list[Any] = [f]
    del f
    with pytest.warns(ResourceWarning):
        _collect(box)
    g = open(theirs, "w", encoding="utf-16", newline="\r\n")  # noqa: SIM115
    g.write("a\nb")
    boxg: list[Any] = [g]
    del g
    with pytest.warns(ResourceWarning):
        _collect(boxg)
    assert ours.read_bytes() == theirs.read_bytes() == "a\r\nb".encode("utf-16")
