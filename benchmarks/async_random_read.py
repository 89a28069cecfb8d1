"""Cached 4 KiB random reads from a 64 MiB file by 32 asyncio tasks, through
threadlets and what users pick instead, side by side in one run; then the
latency of one awaited cached read at a time.

Contenders (each only where installed): threadlets.open, aiofiles,
asyncio.to_thread, anyio.to_thread, caio's default context, and a direct
synchronous os.pread loop (it blocks the loop; it is the limit).

    python benchmarks/async_random_read.py [--seconds 1] [--repeats 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable

import threadlets

BLOCK = 4096
TASKS = 32
SIZE = 64 << 20

Reader = Callable[[int], Awaitable[object]]


def make_file(directory: str) -> str:
    fd, path = tempfile.mkstemp(dir=directory, prefix="threadlets-bench-")
    chunk = os.urandom(1 << 20)
    for off in range(0, SIZE, len(chunk)):
        os.pwrite(fd, chunk, off)
    os.close(fd)
    with open(path, "rb") as f:  # into the page cache
        while f.read(1 << 20):
            pass
    return path


async def run_tasks(read: Reader, offsets: list[int], seconds: float) -> float:
    """TASKS tasks read until the deadline; ops/s over all of them.  Each
    task checks the clock every 64 reads, so a contender that never yields
    (the direct loop) still stops."""
    count = 0
    deadline = time.perf_counter() + seconds

    async def task(i: int) -> None:
        nonlocal count
        k = i * 977
        n = len(offsets)
        while time.perf_counter() < deadline:
            for _ in range(64):
                await read(offsets[k % n])
                k += 1
            count += 64

    t0 = time.perf_counter()
    await asyncio.gather(*(task(i) for i in range(TASKS)))
    return count / (time.perf_counter() - t0)


async def latency(read: Reader, offsets: list[int], n: int = 2000) -> tuple[float, float]:
    samples = []
    for k in range(n):
        t0 = time.perf_counter()
        await read(offsets[k])
        samples.append(time.perf_counter() - t0)
    samples.sort()
    return samples[len(samples) // 2] * 1e6, samples[int(len(samples) * 0.99)] * 1e6


# -- contenders: each makes a reader inside the running loop, and a closer --------------


async def c_direct(path: str) -> tuple[Reader, Callable[[], Awaitable[None]]]:
    """The limit: a synchronous os.pread in the task (it blocks the loop)."""
    fd = os.open(path, os.O_RDONLY)

    async def read(off: int) -> bytes:
        return os.pread(fd, BLOCK, off)

    async def close() -> None:
        os.close(fd)

    return read, close


async def c_threadlets(path: str) -> tuple[Reader, Callable[[], Awaitable[None]]]:
    f = await threadlets.open(path, "rb")
    return (lambda off: f.pread(BLOCK, off)), f.close


async def c_aiofiles(path: str) -> tuple[Reader, Callable[[], Awaitable[None]]] | None:
    try:
        import aiofiles
    except ImportError:
        return None
    f = await aiofiles.open(path, "rb")
    lock = asyncio.Lock()  # seek+read must not interleave between tasks

    async def read(off: int) -> bytes:
        async with lock:
            await f.seek(off)
            data: bytes = await f.read(BLOCK)
            return data

    return read, f.close


async def c_to_thread(path: str) -> tuple[Reader, Callable[[], Awaitable[None]]]:
    fd = os.open(path, os.O_RDONLY)

    async def close() -> None:
        os.close(fd)

    return (lambda off: asyncio.to_thread(os.pread, fd, BLOCK, off)), close


async def c_anyio(path: str) -> tuple[Reader, Callable[[], Awaitable[None]]] | None:
    try:
        import anyio.to_thread
    except ImportError:
        return None
    fd = os.open(path, os.O_RDONLY)

    async def close() -> None:
        os.close(fd)

    return (lambda off: anyio.to_thread.run_sync(os.pread, fd, BLOCK, off)), close


async def c_caio(path: str) -> tuple[Reader, Callable[[], Awaitable[None]]] | None:
    try:
        import caio
    except ImportError:
        return None
    ctx = caio.AsyncioContext()
    fd = os.open(path, os.O_RDONLY)

    async def close() -> None:
        ctx.close()
        os.close(fd)

    return (lambda off: ctx.read(BLOCK, fd, off)), close


DIRECT = "direct os.pread loop (blocks the loop)"
CONTENDERS = {
    DIRECT: c_direct,
    "threadlets.open().pread": c_threadlets,
    "caio (default context)": c_caio,
    "asyncio.to_thread(os.pread)": c_to_thread,
    "anyio.to_thread.run_sync(os.pread)": c_anyio,
    "aiofiles seek+read": c_aiofiles,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--directory", default=".")
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop")
    args = parser.parse_args()
    path = make_file(args.directory)
    rng = random.Random(7)
    offsets = [rng.randrange(SIZE // BLOCK) * BLOCK for _ in range(1 << 16)]
    runner = asyncio.run
    if args.uvloop:
        import uvloop

        runner = uvloop.run
    try:
        rates: dict[str, list[float]] = {}
        lat: dict[str, tuple[float, float]] = {}
        for rnd in range(args.repeats):
            for name, make in CONTENDERS.items():

                async def one(make=make, name=name, rnd=rnd) -> None:  # type: ignore[no-untyped-def]
                    made = await make(path)
                    if made is None:
                        return
                    read, close = made
                    try:
                        rates.setdefault(name, []).append(
                            await run_tasks(read, offsets, args.seconds)
                        )
                        if rnd == 0:
                            lat[name] = await latency(read, offsets)
                    finally:
                        await close()

                runner(one())
        base = rates[DIRECT]
        aiofiles_rates = rates.get("aiofiles seek+read")
        print(f"{TASKS} tasks, cached 4 KiB random reads, 64 MiB file, {args.repeats} rounds\n")
        print("| path | ops/s (median) | vs direct loop | vs aiofiles | latency p50 / p99 (us) |")
        print("|---|---|---|---|---|")
        for name, vals in rates.items():
            r_direct = statistics.median(v / b for v, b in zip(vals, base, strict=True))
            r_aio = (
                f"{statistics.median(v / b for v, b in zip(vals, aiofiles_rates, strict=True)):.1f}"
                if aiofiles_rates
                else "n/a"
            )
            p50, p99 = lat[name]
            print(
                f"| {name} | {statistics.median(vals):,.0f} | {r_direct:.2f} | {r_aio} "
                f"| {p50:.1f} / {p99:.1f} |"
            )
    finally:
        os.unlink(path)


if __name__ == "__main__":
    main()
