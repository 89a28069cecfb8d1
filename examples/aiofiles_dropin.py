"""aiofiles code, unchanged but for one import, on threadlets' engine.

python examples/aiofiles_dropin.py
"""

from __future__ import annotations

import asyncio
import tempfile

from threadlets import aiofiles  # was: import aiofiles


async def main(where: str) -> None:
    path = f"{where}/notes.txt"
    async with aiofiles.open(path, "w") as f:
        await f.write("first line\nsecond line\n")

    async with aiofiles.open(path) as f:
        lines = [line async for line in f]
    assert lines == ["first line\n", "second line\n"]

    st = await aiofiles.os.stat(path)
    assert st.st_size == len("".join(lines))
    assert await aiofiles.os.path.isfile(path)
    await aiofiles.os.rename(path, f"{where}/renamed.txt")
    assert await aiofiles.os.listdir(where) == ["renamed.txt"]

    async with aiofiles.tempfile.TemporaryFile("w+b") as t:
        await t.write(b"scratch")
        await t.seek(0)
        assert await t.read() == b"scratch"

    await aiofiles.stdout.write("aiofiles_dropin: ok\n")
    await aiofiles.stdout.flush()


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as d:
        asyncio.run(main(d))
