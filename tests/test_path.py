"""threadlets.Path: pathlib's answers, awaited, on asyncio, uvloop and
trio; pure-path calls stay synchronous and give threadlets.Path."""

from __future__ import annotations

import os
import pathlib
from pathlib import Path as SyncPath

import pytest

import threadlets
from threadlets import Path
from threadlets.awaitable import current

from .test_asyncfile import anyio_backend

__all__ = ["anyio_backend"]  # fixture used by name

pytestmark = pytest.mark.anyio


def test_pure_parts_are_pathlib_s() -> None:
    p = Path("/a/b") / "c.tar.gz"
    assert isinstance(p, Path)
    assert str(p) == "/a/b/c.tar.gz"
    assert os.fspath(p) == "/a/b/c.tar.gz"
    assert (p.name, p.stem, p.suffix, p.suffixes) == ("c.tar.gz", "c.tar", ".gz", [".tar", ".gz"])
    assert p.parent == Path("/a/b")
    assert isinstance(p.parent, Path)
    assert p.with_suffix(".zip") == Path("/a/b/c.tar.zip")
    assert p.relative_to("/a") == Path("b/c.tar.gz")
    assert p.match("*.gz")
    assert [str(q) for q in p.parents] == ["/a/b", "/a", "/"]
    assert "x" / Path("y") == Path("x/y")
    assert repr(p) == "Path('/a/b/c.tar.gz')"
    assert hash(p) == hash(Path("/a/b/c.tar.gz"))
    assert sorted([Path("b"), Path("a")]) == [Path("a"), Path("b")]


async def test_io_answers_as_pathlib(tmp_path: SyncPath) -> None:
    root = Path(tmp_path)
    d = root / "d"
    await d.mkdir()
    await (d / "sub").mkdir(parents=True, exist_ok=True)
    f = d / "f.txt"
    assert not await f.exists()
    assert await f.write_text("héllo", encoding="utf-8") == 5
    assert await f.exists()
    assert await f.is_file()
    assert not await f.is_dir()
    assert await d.is_dir()
    assert await f.read_text(encoding="utf-8") == "héllo"
    assert await f.read_bytes() == "héllo".encode()
    assert (await f.stat()).st_size == len("héllo".encode())
    assert (await f.lstat()).st_size == (await f.stat()).st_size
    link = d / "link"
    await link.symlink_to(f)
    assert await link.is_symlink()
    assert await link.readlink() == f
    assert await link.samefile(f)
    assert await link.resolve() == Path(os.path.realpath(f))
    moved = await f.rename(d / "g.txt")
    assert moved == d / "g.txt"
    assert isinstance(moved, Path)
    assert not await f.exists()
    await moved.touch()
    await moved.chmod(0o600)
    assert (await moved.stat()).st_mode & 0o777 == 0o600
    assert await moved.owner() == SyncPath(moved).owner()
    names = sorted([p.name async for p in d.iterdir()])
    assert names == sorted(os.listdir(d))
    assert [p.name async for p in root.rglob("*.txt")] == ["g.txt"]
    assert [p async for p in d.glob("nothing*")] == []
    await link.unlink()
    await moved.unlink()
    await (d / "gone").unlink(missing_ok=True)
    with pytest.raises(FileNotFoundError):
        await (d / "gone").unlink()
    await (d / "sub").rmdir()
    await d.rmdir()
    assert not await d.exists()
    assert await Path.cwd() == Path(os.getcwd())
    assert await Path("~").expanduser() == Path(os.path.expanduser("~"))
    assert await Path("x").absolute() == Path(os.getcwd()) / "x"


async def test_open_is_threadlets_open(tmp_path: SyncPath) -> None:
    p = Path(tmp_path) / "f"
    async with p.open("wb") as f:
        assert isinstance(f, threadlets.AsyncBinaryFile)
        await f.write(b"abc")
    f2 = await p.open()
    assert isinstance(f2, threadlets.AsyncTextFile)
    assert await f2.read() == "abc"
    await f2.close()


async def test_iterdir_is_batched(tmp_path: SyncPath) -> None:
    from threadlets import path as path_module

    n = path_module.BATCH * 2 + 5
    for i in range(n):
        (tmp_path / f"e{i}").touch()
    ctx = current().ctx
    before = ctx.stats().threaded
    got = [p.name async for p in Path(tmp_path).iterdir()]
    assert sorted(got) == sorted(os.listdir(tmp_path))
    assert ctx.stats().threaded - before == 1 + 3  # the call, then 3 batches


async def test_errors_as_pathlib(tmp_path: SyncPath) -> None:
    with pytest.raises(FileNotFoundError):
        await Path(tmp_path / "missing").stat()
    with pytest.raises(FileExistsError):
        await Path(tmp_path).mkdir()
    (tmp_path / "file").touch()
    with pytest.raises(NotADirectoryError):
        [p async for p in Path(tmp_path / "file").iterdir()]


def test_same_io_methods_as_anyio() -> None:
    anyio = pytest.importorskip("anyio")
    theirs = {
        n
        for n in dir(anyio.Path)
        if not n.startswith("_") and callable(getattr(pathlib.Path, n, None))
    }
    missing = {n for n in theirs if not hasattr(Path, n)}
    # Not here: from_uri/full_match/copy... are newer than Python 3.11's
    # pathlib; walk is 3.12's.
    assert missing <= {
        "walk",
        "from_uri",
        "full_match",
        "copy",
        "copy_into",
        "move",
        "move_into",
        "info",
        "link_to",
        "with_segments",
    }, missing
