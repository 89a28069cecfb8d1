"""threadlets.open follows the built-in open() (issue 14, step 1): its
default mode, an int descriptor, ``buffering``, ``closefd``, ``opener``;
``read1``, ``peek``, ``isatty``, ``seekable``; and its types (a binary
file's reads are bytes, a text file's str, as mypy --strict sees them)."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import threadlets

from .test_asyncfile import anyio_backend, backend

__all__ = ["anyio_backend", "backend"]  # fixtures used by name

pytestmark = [
    pytest.mark.filterwarnings("error::ResourceWarning"),
    pytest.mark.anyio,
]

TEXT = "".join(f"line {i}: {'é' * (i % 7)}\n" for i in range(500))


@pytest.fixture
def text_path(tmp_path: Path) -> Path:
    p = tmp_path / "text.txt"
    p.write_text(TEXT, encoding="utf-8")
    return p


async def test_default_mode_is_text_as_open(text_path: Path, backend: str) -> None:
    async with threadlets.open(text_path, encoding="utf-8") as f:
        assert f.mode == "r"
        assert isinstance(f, threadlets.AsyncTextFile)
        got = await f.read()
    assert isinstance(got, str)
    with open(text_path, encoding="utf-8") as pyfile:
        assert got == pyfile.read()


async def test_int_descriptor(text_path: Path, backend: str) -> None:
    fd = os.open(text_path, os.O_RDONLY)
    os.lseek(fd, 5, os.SEEK_SET)
    async with threadlets.open(fd, "rb") as f:
        assert f.name == fd
        assert await f.read(3) == TEXT.encode()[5:8]
    with pytest.raises(OSError):
        os.fstat(fd)  # closefd=True (the default): closed with the file
    fd = os.open(text_path, os.O_RDONLY)
    try:
        async with threadlets.open(fd, "r", encoding="utf-8", closefd=False) as f:
            assert await f.readline() == TEXT.splitlines(keepends=True)[0]
        os.fstat(fd)  # still open
    finally:
        os.close(fd)


async def test_closefd_false_with_a_name_is_an_error(text_path: Path) -> None:
    with pytest.raises(ValueError, match="closefd=False"):
        threadlets.open(text_path, closefd=False)
    with pytest.raises(ValueError) as theirs:
        open(text_path, closefd=False)  # noqa: SIM115
    assert "closefd" in str(theirs.value)


async def test_buffering_checked_as_open(text_path: Path) -> None:
    for mode in ("r", "w", "a+"):
        with pytest.raises(ValueError, match="unbuffered text"):
            threadlets.open(text_path, mode, buffering=0)
        with pytest.raises(ValueError, match="unbuffered text"):
            open(text_path, mode, buffering=0)  # noqa: SIM115
    with pytest.raises(TypeError):
        threadlets.open(text_path, "rb", buffering="1")  # type: ignore[call-overload]
    with pytest.warns(RuntimeWarning, match="line buffering") as record:
        f = await threadlets.open(text_path, "rb", buffering=1)
    await f.close()
    assert len(record) == 1  # once, pointing at the caller
    assert record[0].filename == __file__


async def test_unbuffered_reads_only_what_is_asked(tmp_path: Path, backend: str) -> None:
    p = tmp_path / "b"
    p.write_bytes(b"0123456789")
    async with threadlets.open(p, "rb", buffering=0) as f:
        assert await f.read(3) == b"012"
        os.truncate(p, 4)  # unbuffered: the next read sees the file as it is now
        assert await f.read(3) == b"3"


async def test_buffering_sets_the_read_ahead(tmp_path: Path, backend: str) -> None:
    p = tmp_path / "b"
    p.write_bytes(bytes(range(256)) * 1024)  # 256 KiB
    async with threadlets.open(p, "rb", buffering=200_000) as f:
        assert await f.read(1) == b"\0"
        assert len(await f.peek()) == 200_000 - 1  # one read of 200 000 bytes
    async with threadlets.open(p, "rb") as f:
        assert await f.read(1) == b"\0"
        assert len(await f.peek()) == threadlets.asyncfile.CHUNK - 1


async def test_line_buffered_text_writes_each_line(tmp_path: Path, backend: str) -> None:
    p = tmp_path / "t"
    async with threadlets.open(p, "w", buffering=1, encoding="utf-8") as f:
        assert f._text.line_buffering
        await f.write("one\ntw")
        assert p.read_text() == "one\ntw"  # written at the newline


async def test_opener(text_path: Path, backend: str) -> None:
    seen: list[tuple[str, int]] = []

    def opener(path: str, flags: int) -> int:
        seen.append((path, flags))
        return os.open(path, flags)

    async with threadlets.open(text_path, "rb", opener=opener) as f:
        assert await f.read(4) == b"line"
    assert seen == [(str(text_path), os.O_RDONLY | os.O_CLOEXEC)]
    with pytest.raises(ValueError, match="opener returned -1"):
        await threadlets.open(text_path, "rb", opener=lambda p, fl: -1)
    with pytest.raises(TypeError):
        threadlets.open(text_path, "rb", opener=3)  # type: ignore[call-overload]


async def test_readlines_hint_read1_peek(text_path: Path, backend: str) -> None:
    data = text_path.read_bytes()
    with open(text_path, "rb") as pyfile:
        want = pyfile.readlines(30)
    async with threadlets.open(text_path, "rb") as f:
        assert await f.readlines(30) == want
        here = await f.tell()
        ahead = await f.peek(1)
        assert ahead
        assert data[here:].startswith(ahead)
        assert await f.tell() == here  # peek does not move
        assert await f.read1(5) == data[here : here + 5]
    async with threadlets.open(text_path, encoding="utf-8") as t:
        with open(text_path, encoding="utf-8") as pyfile:
            assert await t.readlines(30) == pyfile.readlines(30)


async def test_isatty_and_seekable(text_path: Path, backend: str) -> None:
    async with threadlets.open(text_path, "rb") as f:
        assert not f.isatty()
        assert f.seekable()
    r, w = os.pipe()
    async with threadlets.open(r, "rb") as f, threadlets.open(w, "wb") as g:
        assert not f.seekable()
        assert not g.seekable()
        assert not f.isatty()
    main, sub = pty.openpty()
    try:
        async with threadlets.open(sub, "rb", closefd=False) as f:
            assert f.isatty()
            assert not f.seekable()
    finally:
        os.close(main)
        os.close(sub)


async def test_closed_file_calls_raise(text_path: Path) -> None:
    f = await threadlets.open(text_path, "rb")
    await f.close()
    with pytest.raises(ValueError):
        f.isatty()
    with pytest.raises(ValueError):
        await f.peek()


# -- types ------------------------------------------------------------------------------


#: Code that type-checks, then two lines mypy --strict must reject (marked).
SNIPPET = """
import threadlets

async def main(mode: str) -> None:
    async with threadlets.open("x", "rb") as binary:
        b: bytes = await binary.read()
        await binary.write(memoryview(b))
        lines: list[bytes] = await binary.readlines()
        async for line in binary:
            assert isinstance(line, bytes)
    async with threadlets.open("x") as text:
        s: str = await text.read()
        await text.write(s)
        async for tline in text:
            t: str = tline
    f = await threadlets.open("x", "w", encoding="utf-8")
    await f.write("str")
    await f.close()
    anyfile = await threadlets.open(3, mode)
    await anyfile.close()
    async with threadlets.open("x", "rb") as binary:
        bad: str = await binary.read()  # ERROR assignment
    async with threadlets.open("x") as text:
        await text.write(b"bytes")  # ERROR arg-type


async def drop_in() -> None:
    import threadlets.aiofiles as aiofiles
    import threadlets.aiofiles.os

    async with aiofiles.open("x") as t:
        s: str = await t.read()
    async with aiofiles.open("x", "rb") as b:
        data: bytes = await b.read()
    size: int = (await aiofiles.os.stat("x")).st_size
    exists: bool = await aiofiles.os.path.exists("x")
    async with aiofiles.open("x", "rb") as b:
        wrong: str = await b.read()  # ERROR assignment
"""


@pytest.mark.parametrize("anyio_backend", [("asyncio", {})])
def test_mypy_sees_bytes_and_str(
    tmp_path: Path, anyio_backend: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("mypy.api")
    monkeypatch.setenv("MYPYPATH", str(Path(threadlets.__file__).parent.parent))
    src = tmp_path / "snippet.py"
    src.write_text(SNIPPET)
    # (In a child: mypy run in this process leaves some 600,000 objects
    # behind, and every later garbage collection of the suite walks them.)
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "mypy", "--strict", "--no-error-summary"),
            *("--cache-dir", str(tmp_path / "cache"), str(src)),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    out, err = proc.stdout, proc.stderr
    want = {
        f"{src}:{n}: {code}"
        for n, line in enumerate(SNIPPET.splitlines(), 1)
        if "# ERROR" in line
        for code in [line.split("# ERROR ")[1]]
    }
    got = {
        f"{line.split(': error:')[0]}: {line.rsplit('[', 1)[1].rstrip(']')}"
        for line in out.splitlines()
        if ": error:" in line
    }
    assert got == want, out + err
    assert 'expression has type "bytes", variable has type "str"' in out


# -- small files: open and read without a hop to a worker ----------------------------------


async def test_a_cached_small_file_needs_no_request(tmp_path: Path, backend: str) -> None:
    from threadlets import oneshot
    from threadlets.awaitable import current

    p = tmp_path / "small"
    p.write_bytes(b"s" * 4096)
    ctx = current().ctx
    if not ctx.inline or oneshot._openat2 is None:
        pytest.skip("no inline path here")
    p.read_bytes()  # cached
    before = ctx.stats()
    async with threadlets.open(p, "rb") as f:
        assert await f.read() == b"s" * 4096
    after = ctx.stats()
    assert (after.threaded, after.ring) == (before.threaded, before.ring)


@pytest.mark.parametrize("name", ["/proc/self/status", "/proc/self/mountinfo"])
async def test_read_all_of_files_whose_size_says_nothing(name: str, backend: str) -> None:
    # procfs: st_size is 0, the contents are not empty.
    async with threadlets.open(name, "rb") as f:
        got = await f.read()
    with open(name, "rb") as pyfile:
        assert got.startswith(pyfile.read(20))
    assert (await threadlets.read_bytes(name)).startswith(got[:20])


async def test_read_all_sees_a_file_grown_since_open(tmp_path: Path, backend: str) -> None:
    p = tmp_path / "grows"
    p.write_bytes(b"a" * 100)
    async with threadlets.open(p, "rb") as f:
        with open(p, "ab") as w:
            w.write(b"b" * 100)
        assert await f.read() == b"a" * 100 + b"b" * 100
