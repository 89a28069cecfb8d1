"""32 outstanding 4 KiB O_DIRECT random reads on one file: threadlets.posix
beside glibc's aio_read (through ctypes), in one run.

Each side keeps 32 aiocbs in flight: aio_suspend on the list, then every
finished one is collected with aio_return and resubmitted at the next
offset.  glibc runs one request per file descriptor at a time; threadlets
runs them in parallel.  The "sqpoll" row runs threadlets.posix on an
``AioContext(deliver=False, backend="io_uring", sqpoll=True)`` (a kernel
thread polls the ring: the opt-in that costs a CPU while requests flow);
skipped, with a note, where the ring or SQPOLL is unavailable.

    python benchmarks/posix_vs_glibc.py [--seconds 2] [--repeats 5]
"""

from __future__ import annotations

import argparse
import errno
import os
import random
import statistics
import sys
import time
from pathlib import Path
from types import ModuleType

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests import glibc_aio

import threadlets
import threadlets.posix as px
from threadlets.bench import make_file

BLOCK = 4096
DEPTH = 32


def run(impl: ModuleType, path: str, seconds: float, offsets: list[int]) -> float:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        cbs = [impl.aiocb(fd, offsets[i], threadlets.aligned_buffer(BLOCK)) for i in range(DEPTH)]
        for cb in cbs:
            impl.aio_read(cb)
        n = 0
        k = DEPTH
        t0 = time.perf_counter()
        deadline = t0 + seconds
        while time.perf_counter() < deadline:
            impl.aio_suspend(cbs, None)
            for cb in cbs:
                if impl.aio_error(cb) != errno.EINPROGRESS:
                    assert impl.aio_return(cb) == BLOCK
                    n += 1
                    cb.aio_offset = offsets[k % len(offsets)]
                    k += 1
                    impl.aio_read(cb)
        elapsed = time.perf_counter() - t0
        for cb in cbs:
            impl.aio_suspend([cb], None)
        return n / elapsed
    finally:
        os.close(fd)


def run_sqpoll(path: str, seconds: float, offsets: list[int]) -> float | str:
    """threadlets.posix on a polling ring: ops/s, or why it cannot run here."""
    try:
        ctx = threadlets.AioContext(deliver=False, backend="io_uring", sqpoll=True)
    except threadlets.RingUnavailable as e:
        return f"no io_uring ring here ({e.strerror or e})"
    try:
        if not ctx.sqpoll:
            return "the kernel refused IORING_SETUP_SQPOLL here"
        with px.use_context(ctx):
            return run(px, path, seconds, offsets)
    finally:
        ctx.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--directory", default=".")
    args = parser.parse_args()
    if not glibc_aio.AVAILABLE:
        sys.exit("glibc's AIO cannot be bound here")
    size = 64 << 20
    path = make_file(args.directory, size)
    rng = random.Random(1)
    offsets = [rng.randrange(size // BLOCK) * BLOCK for _ in range(1 << 16)]
    try:
        ours: list[float] = []
        sqpoll: list[float] = []
        skipped = ""
        glibc: list[float] = []
        for _ in range(args.repeats):
            ours.append(run(px, path, args.seconds, offsets))
            if not skipped:
                got = run_sqpoll(path, args.seconds, offsets)
                if isinstance(got, str):
                    skipped = got
                    sqpoll.clear()  # (no row: its rounds would not pair with glibc's)
                else:
                    sqpoll.append(got)
            glibc.append(run(glibc_aio, path, args.seconds, offsets))
        print("| path | ops/s (median) | vs glibc (median of rounds) | range |")
        print("|---|---|---|---|")
        print(f"| glibc aio_read (ctypes) | {statistics.median(glibc):,.0f} | 1.00 | |")
        rows = [("threadlets.posix aio_read", ours)]
        if sqpoll:
            rows.append(("threadlets.posix aio_read, sqpoll", sqpoll))
        for name, rates in rows:
            ratios = sorted(a / b for a, b in zip(rates, glibc, strict=True))
            print(
                f"| {name} | {statistics.median(rates):,.0f} | "
                f"{statistics.median(ratios):.2f} | {ratios[0]:.2f}-{ratios[-1]:.2f} |"
            )
        if skipped:
            print(f"\nthreadlets.posix aio_read, sqpoll: skipped: {skipped}")
    finally:
        os.unlink(path)


if __name__ == "__main__":
    main()
