"""4 KiB random reads at queue depth 32 through AioContext, beside a direct
synchronous os.pread loop, in one run.

Cached: a 64 MiB file read once so it sits in the page cache; AioContext
with the inline (RWF_NOWAIT) path on and off.  O_DIRECT: the same reads with
O_DIRECT through AioContext (thread-pool and io_uring backends, and
io_uring with ``sqpoll=True``: a kernel thread polls the ring, the opt-in
that costs a CPU while requests flow) beside
``qemu-img bench -f raw -i threads -t none -d 32 -s 4096`` (and ``-i
io_uring``) on the same file, if qemu-img is installed.

    python benchmarks/engine_random_read.py [--seconds 2] [--repeats 3] [--direct]
"""

from __future__ import annotations

import argparse
import collections
import itertools
import os
import random
import re
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable

import threadlets
from threadlets.bench import make_file
from threadlets.probe import probe_io_uring

BLOCK = 4096
DEPTH = 32
#: Worker threads of the engine's queue (see docs/benchmarks.md for why 8).
THREADS = 8
QEMU = "qemu-img bench -i threads -t none"
QEMU_URING = "qemu-img bench -i io_uring -t none"
SQPOLL = "AioContext O_DIRECT, io_uring backend, sqpoll"


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


def engine_cached(path: str, offs: list[int], seconds: float, inline: bool) -> float:
    """Up to DEPTH reads in flight: submit; once DEPTH are outstanding, wait
    for the oldest.  Cached reads on the inline path finish at submit."""
    fd = os.open(path, os.O_RDONLY)
    q = threadlets.ThreadletQueue(max_threads=THREADS)
    ctx = threadlets.AioContext(q, inline=inline)
    bufs = [bytearray(BLOCK) for _ in range(DEPTH)]
    try:
        inflight: collections.deque[threadlets.AioRequest] = collections.deque()
        wait, read = ctx.wait, ctx.read
        pairs = [(off, bufs[k % DEPTH]) for k, off in enumerate(offs[:4096])]
        n = 0
        t0 = time.perf_counter()
        deadline = t0 + seconds
        while True:
            for off, buf in pairs:
                r = read(fd, off, buf)
                if not r.done():
                    inflight.append(r)
                    if len(inflight) == DEPTH:
                        wait(inflight.popleft())
            n += len(pairs)
            if time.perf_counter() > deadline:
                break
        while inflight:
            wait(inflight.popleft())
        return n / (time.perf_counter() - t0)
    finally:
        ctx.close()
        q.close()
        os.close(fd)


def engine_direct(
    path: str, offs: list[int], seconds: float, backend: str = "threads", sqpoll: bool = False
) -> float | None:
    """Exactly DEPTH O_DIRECT reads in flight, as qemu-img bench keeps them:
    each completion callback submits the next read into its buffer.  None
    if ``sqpoll`` was asked and the ring does not poll (the kernel refused)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    q = threadlets.ThreadletQueue(max_threads=THREADS)
    try:
        ctx = threadlets.AioContext(q, backend=backend, sqpoll=sqpoll)
    except BaseException:
        q.close()
        os.close(fd)
        raise
    if sqpoll and not ctx.sqpoll:
        ctx.close()
        q.close()
        os.close(fd)
        return None
    counter = itertools.count()
    noffs = len(offs)
    stop = False

    def slot(buf: memoryview) -> Callable[[object], None]:
        def submit(_: object = None) -> None:
            if not stop:
                ctx.read(fd, offs[next(counter) % noffs], buf, callback=submit)

        return submit

    try:
        t0 = time.perf_counter()
        for _ in range(DEPTH):
            slot(threadlets.aligned_buffer(BLOCK))()
        deadline = t0 + seconds
        while time.perf_counter() < deadline:
            ctx.poll(0.1)
        stop = True
        elapsed = time.perf_counter() - t0
        done = next(counter) - DEPTH
        ctx.drain()
        return done / elapsed
    finally:
        ctx.close()
        q.close()
        os.close(fd)


def qemu_img_bench(path: str, count: int, aio: str = "threads") -> float | None:
    exe = shutil.which("qemu-img")
    if exe is None:
        return None
    cmd = [exe, "bench", "-f", "raw", "-i", aio, "-t", "none", "-d", str(DEPTH)]
    cmd += ["-s", str(BLOCK), "-S", str(BLOCK * 7919), "-c", str(count), path]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    m = re.search(r"Run completed in ([\d.]+) seconds", out)
    elapsed = float(m.group(1)) if m else time.perf_counter() - t0
    return count / elapsed


def table(title: str, base: str, res: dict[str, list[float]]) -> None:
    """Median ops/s per path, and the median of the per-round ratios to
    ``base`` (each round runs every path once, back to back)."""
    print(f"{title}\n")
    print(f"| path | ops/s (median) | vs {base} (median of rounds) | range |")
    print("|---|---|---|---|")
    for name, vals in res.items():
        ratios = sorted(v / b for v, b in zip(vals, res[base], strict=True))
        print(
            f"| {name} | {statistics.median(vals):,.0f} | {statistics.median(ratios):.2f} "
            f"| {ratios[0]:.2f}-{ratios[-1]:.2f} |"
        )
    print()


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
        cases: dict[str, Callable[[], float | None]] = {
            "direct os.pread loop": lambda: direct_loop(path, offs, args.seconds),
            "AioContext, inline on": lambda: engine_cached(path, offs, args.seconds, True),
            "AioContext, inline off": lambda: engine_cached(path, offs, args.seconds, False),
        }
        for _ in range(args.repeats):
            for name, fn in cases.items():
                v = fn()
                assert v is not None
                res.setdefault(name, []).append(v)
        table("Cached 4 KiB random reads, depth 32, 64 MiB file", "direct os.pread loop", res)
        if args.direct:
            dres: dict[str, list[float]] = {}
            have_qemu = shutil.which("qemu-img") is not None
            have_uring = probe_io_uring().supported
            have_sqpoll = have_uring
            for _ in range(args.repeats):
                if have_qemu:
                    q = qemu_img_bench(path, int(40_000 * args.seconds))
                    assert q is not None
                    dres.setdefault(QEMU, []).append(q)
                t = engine_direct(path, offs, args.seconds)
                assert t is not None
                dres.setdefault("AioContext O_DIRECT, threads backend", []).append(t)
                if have_uring:
                    u = engine_direct(path, offs, args.seconds, "io_uring")
                    assert u is not None
                    dres.setdefault("AioContext O_DIRECT, io_uring backend", []).append(u)
                    if have_sqpoll:
                        s = engine_direct(path, offs, args.seconds, "io_uring", sqpoll=True)
                        if s is None:
                            have_sqpoll = False  # (no row: rounds would not pair)
                            dres.pop(SQPOLL, None)
                        else:
                            dres.setdefault(SQPOLL, []).append(s)
                    if have_qemu:
                        q = qemu_img_bench(path, int(100_000 * args.seconds), "io_uring")
                        assert q is not None
                        dres.setdefault(QEMU_URING, []).append(q)
            if have_qemu:
                table("O_DIRECT 4 KiB random reads, depth 32", QEMU, dres)
            else:
                print("qemu-img is not installed: O_DIRECT figures alone:", dres)
            if have_uring and not have_sqpoll:
                print(f"{SQPOLL}: skipped, the kernel refused IORING_SETUP_SQPOLL here")
    finally:
        os.unlink(path)


if __name__ == "__main__":
    main()
