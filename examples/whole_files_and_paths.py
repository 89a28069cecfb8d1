"""threadlets' own calls: whole files in one request, an async Path, and a
typed open() -- the same code on asyncio and on trio.

    python examples/whole_files_and_paths.py
"""

from __future__ import annotations

import asyncio
import tempfile

import threadlets
from threadlets import Path


async def main(where: str) -> None:
    root = Path(where)
    config = root / "app" / "config.ini"
    await config.parent.mkdir(parents=True, exist_ok=True)

    # Open, write and close as one request on a worker.
    await threadlets.write_text(config, "[app]\nname = demo\n", encoding="utf-8")
    # Open, read and close: inline if the file is cached, else one request.
    text = await threadlets.read_text(config, encoding="utf-8")
    assert text.startswith("[app]")
    assert await config.read_bytes() == text.encode()

    # A file's reads are str in text mode (the default, as open()) and bytes
    # in binary mode, for mypy too.
    async with threadlets.open(config) as f:
        first: str = await f.readline()
    async with config.open("rb") as b:
        raw: bytes = await b.read(5)
    assert (first, raw) == ("[app]\n", b"[app]")

    names = [p.name async for p in (root / "app").iterdir()]
    assert names == ["config.ini"]
    assert [p.name async for p in root.rglob("*.ini")] == ["config.ini"]
    await config.unlink()


def run_everywhere() -> None:
    with tempfile.TemporaryDirectory() as d:
        asyncio.run(main(d))
    try:
        import trio
    except ImportError:
        loops = "asyncio"
    else:
        with tempfile.TemporaryDirectory() as d:
            trio.run(main, d)
        loops = "asyncio and trio"
    print(f"whole_files_and_paths: ok on {loops}")


if __name__ == "__main__":
    run_everywhere()
