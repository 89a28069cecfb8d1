"""Small-file reads, 32 tasks: threadlets' one-call helper against the rest.

Each task reads a 4 KiB file (512 of them, in the page cache) whole, again
and again, for ``--seconds``; the best of ``--repeats`` runs is reported as
files per second.  Contenders: ``threadlets.read_bytes`` (open, read and
close as one request), ``threadlets.open`` + read, ``asyncio.to_thread``
doing open+read+close, aiofiles (if installed) and threadlets.aiofiles.

    PYTHONPATH=src python tools/bench_small_files.py --seconds 1 --repeats 3
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from collections.abc import Awaitable, Callable

import threadlets
import threadlets.aiofiles
import threadlets.awaitable

NFILES = 512
SIZE = 4096
TASKS = 32


def sync_read(p: str) -> bytes:
    with open(p, "rb") as f:
        return f.read()


async def tl_open(p: str) -> bytes:
    async with threadlets.open(p, "rb") as f:
        return await f.read()


async def tl_aiofiles(p: str) -> bytes:
    async with threadlets.aiofiles.open(p, "rb") as f:
        return await f.read()


async def real_aiofiles(p: str) -> bytes:
    import aiofiles

    async with aiofiles.open(p, "rb") as f:
        return await f.read()


async def to_thread(p: str) -> bytes:
    return await asyncio.to_thread(sync_read, p)


CONTENDERS: dict[str, Callable[[str], Awaitable[bytes]]] = {
    "threadlets.read_bytes": threadlets.read_bytes,
    # The same, with the inline path off: every file is one hop to a worker.
    "read_bytes (worker)": threadlets.read_bytes,
    "threadlets.open": tl_open,
    "asyncio.to_thread": to_thread,
    "threadlets.aiofiles": tl_aiofiles,
    "aiofiles": real_aiofiles,
}


async def one_run(
    read: Callable[[str], Awaitable[bytes]], paths: list[str], seconds: float
) -> float:
    done = 0
    stop = time.perf_counter() + seconds

    async def task(k: int) -> None:
        nonlocal done
        while time.perf_counter() < stop:
            data = await read(paths[k % NFILES])
            assert len(data) == SIZE
            k += TASKS
            done += 1

    start = time.perf_counter()
    await asyncio.gather(*(task(k) for k in range(TASKS)))
    return done / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        paths = []
        for i in range(NFILES):
            p = os.path.join(d, f"small-{i}")
            with open(p, "wb") as f:
                f.write(os.urandom(SIZE))
            paths.append(p)
        results = {}
        for name, read in CONTENDERS.items():
            if name == "aiofiles":
                try:
                    import aiofiles  # noqa: F401
                except ImportError:
                    continue
            threadlets.awaitable.configure(inline="worker" not in name)
            try:
                runs = [
                    asyncio.run(one_run(read, paths, args.seconds)) for _ in range(args.repeats)
                ]
            finally:
                threadlets.awaitable.configure()
            results[name] = max(runs)
        base = results["asyncio.to_thread"]
        for name, rate in results.items():
            print(f"{name:24} {rate:10.0f} files/s  {rate / base:5.2f}x asyncio.to_thread")


if __name__ == "__main__":
    main()
