"""threadlets.aiofiles beyond aiofiles' own suite (which runs on asyncio
only, see test_aiofiles_suite.py): the same calls on trio and uvloop, the
engine doing the work, types, and the module layout matching aiofiles'."""

from __future__ import annotations

import concurrent.futures
import io
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from threadlets import aiofiles
from threadlets.awaitable import current

from .test_asyncfile import anyio_backend

__all__ = ["anyio_backend"]  # fixture used by name

pytestmark = pytest.mark.anyio


async def test_open_read_write_on_every_loop(tmp_path: Path) -> None:
    p = tmp_path / "f.txt"
    async with aiofiles.open(p, "w", encoding="utf-8") as f:
        await f.write("héllo\nworld\n")
    async with aiofiles.open(p, encoding="utf-8") as f:
        assert [line async for line in f] == ["héllo\n", "world\n"]
    async with aiofiles.open(p, "rb") as b:
        assert await b.read(2) == b"h\xc3"
        assert await b.peek(1)
        assert await b.tell() == 2
    f = await aiofiles.open(p, "rb", buffering=0)
    assert isinstance(f._file, io.FileIO)
    assert await f.readall() == "héllo\nworld\n".encode()
    await f.close()
    assert f.closed


async def test_calls_are_engine_requests(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(b"x")
    ctx = current().ctx
    before = ctx.stats().threaded
    assert (await aiofiles.os.stat(p)).st_size == 1
    assert await aiofiles.os.path.exists(p)
    assert ctx.stats().threaded >= before + 2


async def test_os_and_tempfile(tmp_path: Path) -> None:
    d = tmp_path / "d"
    await aiofiles.os.makedirs(d / "e")
    assert sorted(await aiofiles.os.listdir(d)) == ["e"]
    await aiofiles.os.rmdir(d / "e")
    async with aiofiles.tempfile.NamedTemporaryFile("w+", dir=d) as t:
        await t.write("abc")
        await t.seek(0)
        assert await t.read() == "abc"
        name = t.name
        assert os.path.exists(name)
    assert not os.path.exists(name)
    async with aiofiles.tempfile.TemporaryDirectory(dir=d) as where:
        assert os.path.isdir(where)
    assert not os.path.exists(where)
    async with aiofiles.tempfile.SpooledTemporaryFile(max_size=4) as s:
        await s.write(b"12345")
        assert s._file._rolled
        await s.seek(0)
        assert await s.read() == b"12345"


@pytest.mark.parametrize("anyio_backend", [("asyncio", {})])
async def test_executor_is_honoured(tmp_path: Path, anyio_backend: Any) -> None:
    seen: list[str] = []

    def where() -> str:
        seen.append(threading.current_thread().name)
        return "ok"

    with concurrent.futures.ThreadPoolExecutor(thread_name_prefix="mine") as pool:
        assert await aiofiles.os.wrap(where)(executor=pool) == "ok"
    assert seen[0].startswith("mine")


def test_layout_matches_aiofiles() -> None:
    real = pytest.importorskip("aiofiles")
    import importlib

    for mod in ("", ".os", ".ospath", ".tempfile", ".threadpool"):
        theirs = importlib.import_module("aiofiles" + mod)
        ours = importlib.import_module("threadlets.aiofiles" + mod)
        missing = {n for n in getattr(theirs, "__all__", ()) if not hasattr(ours, n)}
        assert not missing, (mod, missing)
    assert real.__name__ == "aiofiles"


def test_wrap_rejects_what_aiofiles_rejects() -> None:
    for thing in (int, [1, 2, 3], io.FileIO):
        with pytest.raises(TypeError):
            aiofiles.threadpool.wrap(thing)
