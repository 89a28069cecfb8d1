"""4 KiB random reads at queue depth 32 through AioContext, beside a direct
synchronous os.pread loop, in one run.

Cached: a 64 MiB file read once so it sits in the page cache; AioContext
with the inline (RWF_NOWAIT) path on and off.  O_DIRECT: the same reads with
O_DIRECT through AioContext beside ``qemu-img bench -f raw -i threads -t none
-d 32 -s 4096`` on the same file, if qemu-img is installed.

    python benchmarks/engine_random_read.py [--seconds 2] [--repeats 3] [--direct]
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable

import threadlets

BLOCK = 4096
DEPTH = 32


def make_file(directory: str, size: int) -> str:
    fd, path = tempfile.mkstemp(dir=directory, prefix="threadlets-bench-")
    chunk = os.urandom(1 << 20)
    for off in range(0, size, len(chunk)):
        os.pwrite(fd, chunk, off)
    os.fsync(fd)
    os.close(fd)
    return path


def offsets(size: int, n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    blocks = size // BLOCK
    return [rng.randrange(blocks) * BLOCK for _ in range(n)]


def direct_loop(path: str, offs: list[int], seconds: float) -> float:
    fd = os.open(path, os.O_RDONLY)
    try:
        n, t0 = 0, time.perf_counter()
        deadline = t0 + seconds
        while True:
            for off in offs[:4096]:
                os.pread(fd, BLOCK, off)
            n += 4096
            if time.perf_counter() > deadline:
                break
        return n / (time.perf_counter() - t0)
    finally:
        os.close(fd)


def engine(path: str, offs: list[int], seconds: float, inline: bool, direct: bool) -> float:
    flags = os.O_RDONLY | (os.O_DIRECT if direct else 0)
    fd = os.open(path, flags)
    q = threadlets.ThreadletQueue(max_threads=DEPTH)
    ctx = threadlets.AioContext(q, inline=inline)
    bufs = [threadlets.aligned_buffer(BLOCK) for _ in range(DEPTH)]
    try:
        # Keep up to DEPTH requests in flight: submit, and once DEPTH are
        # outstanding wait for the oldest (cached reads finish at submit).
        inflight: collections.deque[threadlets.AioRequest] = collections.deque()
        wait, read = ctx.wait, ctx.read
        n = 0
        t0 = time.perf_counter()
        deadline = t0 + seconds
        while True:
            for k, off in enumerate(offs[:4096]):
                r = read(fd, off, bufs[k & (DEPTH - 1)])
                if not r._processed:
                    inflight.append(r)
                    if len(inflight) == DEPTH:
                        wait(inflight.popleft())
            n += 4096
            if time.perf_counter() > deadline:
                break
        while inflight:
            wait(inflight.popleft())
        i = n + DEPTH
        elapsed = time.perf_counter() - t0
        ctx.drain()
        return (i - DEPTH) / elapsed
    finally:
        ctx.close()
        q.close()
        os.close(fd)


def qemu_img_bench(path: str, count: int) -> float | None:
    exe = shutil.which("qemu-img")
    if exe is None:
        return None
    cmd = [exe, "bench", "-f", "raw", "-i", "threads", "-t", "none", "-d", str(DEPTH)]
    cmd += ["-s", str(BLOCK), "-S", str(BLOCK * 7919), "-c", str(count), path]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    m = re.search(r"Run completed in ([\d.]+) seconds", out)
    elapsed = float(m.group(1)) if m else time.perf_counter() - t0
    return count / elapsed


def run(name: str, fn: Callable[[], float | None], results: dict[str, list[float]]) -> None:
    v = fn()
    if v is not None:
        results.setdefault(name, []).append(v)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size-mib", type=int, default=64)
    parser.add_argument("--directory", default=".")
    parser.add_argument("--direct", action="store_true", help="also run the O_DIRECT comparison")
    args = parser.parse_args()
    size = args.size_mib << 20
    path = make_file(args.directory, size)
    try:
        with open(path, "rb") as f:
            while f.read(1 << 20):
                pass
        offs = offsets(size, 1 << 16, 1)
        res: dict[str, list[float]] = {}
        for _ in range(args.repeats):
            run("direct os.pread loop", lambda: direct_loop(path, offs, args.seconds), res)
            run("AioContext, inline on", lambda: engine(path, offs, args.seconds, True, False), res)
            run(
                "AioContext, inline off",
                lambda: engine(path, offs, args.seconds, False, False),
                res,
            )
        base = statistics.median(res["direct os.pread loop"])
        print("Cached 4 KiB random reads, depth 32, 64 MiB file\n")
        print("| path | ops/s (median) | vs direct loop |")
        print("|---|---|---|")
        for name, vals in res.items():
            m = statistics.median(vals)
            print(f"| {name} | {m:,.0f} | {m / base:.2f} |")
        if args.direct:
            dres: dict[str, list[float]] = {}
            for _ in range(args.repeats):
                run(
                    "qemu-img bench -i threads -t none", lambda: qemu_img_bench(path, 200_000), dres
                )
                run(
                    "AioContext O_DIRECT",
                    lambda: engine(path, offs, args.seconds, True, True),
                    dres,
                )
            print("\nO_DIRECT 4 KiB random reads, depth 32\n")
            print("| path | ops/s (median) | vs qemu-img |")
            print("|---|---|---|")
            qbase = statistics.median(dres.get("qemu-img bench -i threads -t none", [0.0])) or None
            for name, vals in dres.items():
                m = statistics.median(vals)
                ratio = f"{m / qbase:.2f}" if qbase else "n/a"
                print(f"| {name} | {m:,.0f} | {ratio} |")
    finally:
        os.unlink(path)


if __name__ == "__main__":
    main()
