"""The core's per-request cost on several source trees, alternated round by
round in one run (so a noisy machine hits every tree alike).

Each round runs, for every tree in turn, a child process with
``PYTHONPATH=<tree>/src`` that measures five loops (4 KiB random reads,
depth 32, on a 16 MiB scratch file in ``--directory``): engine O_DIRECT on
io_uring and on the thread pool (each completion callback submits the
next), engine cached reads with the inline path off, on each backend, and
threadlets.posix's aio_read loop of benchmarks/posix_vs_glibc.py (O_DIRECT).
Prints, per tree and loop, the median ops/s and CPU microseconds per
request, and the median of the per-round ratios to the first tree.

    git worktree add --detach /tmp/before 8d57167
    python benchmarks/core_before_after.py /tmp/before . [--rounds 5]
"""

from __future__ import annotations

import argparse
import collections
import itertools
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

BLOCK, DEPTH = 4096, 32
LOOPS = [
    "io_uring O_DIRECT",
    "threads O_DIRECT",
    "io_uring cached",
    "threads cached",
    "posix O_DIRECT",
]


def _direct(path: str, offs: list[int], sec: float, backend: str) -> tuple[float, float]:
    import threadlets
    from threadlets.probe import aligned_buffer

    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    q = threadlets.ThreadletQueue(max_threads=8)
    ctx = threadlets.AioContext(q, backend=backend)
    counter, stop = itertools.count(), [False]

    def slot(buf: object) -> object:
        def submit(_: object = None) -> None:
            if not stop[0]:
                ctx.read(fd, offs[next(counter) % len(offs)], buf, callback=submit)  # type: ignore[arg-type]

        return submit

    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(DEPTH):
        slot(aligned_buffer(BLOCK))()  # type: ignore[operator]
    while time.perf_counter() < t0 + sec:
        ctx.poll(0.1)
    stop[0] = True
    el, cpu = time.perf_counter() - t0, time.process_time() - c0
    done = next(counter) - DEPTH
    ctx.drain()
    ctx.close()
    q.close()
    os.close(fd)
    return done / el, cpu / done * 1e6


def _cached(path: str, offs: list[int], sec: float, backend: str) -> tuple[float, float]:
    import threadlets

    fd = os.open(path, os.O_RDONLY)
    q = threadlets.ThreadletQueue(max_threads=8)
    ctx = threadlets.AioContext(q, inline=False, backend=backend)
    bufs = [bytearray(BLOCK) for _ in range(DEPTH)]
    inflight: collections.deque[object] = collections.deque()
    pairs = [(off, bufs[k % DEPTH]) for k, off in enumerate(offs[:4096])]
    n, t0, c0 = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() < t0 + sec:
        for off, buf in pairs:
            r = ctx.read(fd, off, buf)
            if not r.done():
                inflight.append(r)
                if len(inflight) == DEPTH:
                    ctx.wait(inflight.popleft())  # type: ignore[arg-type]
        n += len(pairs)
    while inflight:
        ctx.wait(inflight.popleft())  # type: ignore[arg-type]
    el, cpu = time.perf_counter() - t0, time.process_time() - c0
    ctx.close()
    q.close()
    os.close(fd)
    return n / el, cpu / n * 1e6


def _posix(path: str, offs: list[int], sec: float) -> tuple[float, float]:
    """benchmarks/posix_vs_glibc.py's loop: aio_suspend on 32 aiocbs, then
    every finished one collected and resubmitted."""
    import errno

    import threadlets.posix as px
    from threadlets.probe import aligned_buffer

    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    cbs = [px.aiocb(fd, offs[i], aligned_buffer(BLOCK)) for i in range(DEPTH)]
    for cb in cbs:
        px.aio_read(cb)
    n, k = 0, DEPTH
    t0, c0 = time.perf_counter(), time.process_time()
    while time.perf_counter() < t0 + sec:
        px.aio_suspend(cbs, None)
        for cb in cbs:
            if px.aio_error(cb) != errno.EINPROGRESS:
                px.aio_return(cb)
                n += 1
                cb.aio_offset = offs[k % len(offs)]
                k += 1
                px.aio_read(cb)
    el, cpu = time.perf_counter() - t0, time.process_time() - c0
    for cb in cbs:
        px.aio_suspend([cb], None)
    os.close(fd)
    return n / el, cpu / n * 1e6


#: The loops' own functions (what bytecodes_per_request.py leaves out).
LOOP_FUNCTIONS = ("_direct", "_cached", "_posix")


def child(path: str, sec: float, which: list[int]) -> None:
    offs = [random.Random(1).randrange((16 << 20) // BLOCK) * BLOCK for _ in range(10000)]
    run = [
        lambda: _direct(path, offs, sec, "io_uring"),
        lambda: _direct(path, offs, sec, "threads"),
        lambda: _cached(path, offs, sec, "io_uring"),
        lambda: _cached(path, offs, sec, "threads"),
        lambda: _posix(path, offs, sec),
    ]
    out = [run[k]() for k in which]
    print(" ".join(f"{a:.1f} {b:.2f}" for a, b in out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trees", nargs="*", help="source trees (each has src/threadlets)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=1.5)
    parser.add_argument("--directory", default=tempfile.gettempdir())
    parser.add_argument(
        "--loops",
        default=",".join(str(k + 1) for k in range(len(LOOPS))),
        help="which loops, by number: " + ", ".join(f"{k + 1} {n}" for k, n in enumerate(LOOPS)),
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    try:
        which = [int(x) - 1 for x in args.loops.split(",")]
    except ValueError:
        parser.error("--loops takes numbers separated by commas")
    if not which or not all(0 <= k < len(LOOPS) for k in which):
        parser.error(f"--loops: numbers from 1 to {len(LOOPS)}")
    if args.child:
        child(args.child, args.seconds, which)
        return
    if not args.trees:
        parser.error("give at least one source tree")
    if args.rounds < 1 or not args.seconds > 0:
        parser.error("--rounds must be >= 1 and --seconds > 0")
    fd, path = tempfile.mkstemp(prefix="threadlets-ab-", dir=args.directory)
    try:
        os.write(fd, os.urandom(16 << 20))
        os.fsync(fd)
        os.close(fd)
        res: dict[str, list[list[float]]] = {t: [] for t in args.trees}
        for _ in range(args.rounds):
            for tree in args.trees:
                env = dict(os.environ, PYTHONPATH=os.path.join(os.path.abspath(tree), "src"))
                cmd = [sys.executable, __file__, "--child", path, "--seconds", str(args.seconds)]
                cmd += ["--loops", args.loops]
                out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
                res[tree].append([float(x) for x in out.stdout.split()])
        first = res[args.trees[0]]
        names = [LOOPS[k] for k in which]
        print("| tree | " + " | ".join(f"{name}: ops/s, CPU us/req" for name in names) + " |")
        print("|---" * (len(names) + 1) + "|")
        for tree, rows in res.items():
            cells = []
            for k in range(len(names)):
                ops = [r[2 * k] for r in rows]
                cpu = [r[2 * k + 1] for r in rows]
                rops = statistics.median(a / b[2 * k] for a, b in zip(ops, first, strict=True))
                rcpu = statistics.median(a / b[2 * k + 1] for a, b in zip(cpu, first, strict=True))
                cells.append(
                    f"{statistics.median(ops):,.0f} ({rops:.2f}x), "
                    f"{statistics.median(cpu):.1f} ({rcpu:.2f}x)"
                )
            print(f"| {tree} | " + " | ".join(cells) + " |")
    finally:
        os.unlink(path)


if __name__ == "__main__":
    main()
