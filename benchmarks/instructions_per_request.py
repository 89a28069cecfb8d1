"""User-space machine instructions per request, counted by valgrind: the
engine's cost per request with nothing of the machine's load in it (the
timings of core_before_after.py move 20% between runs here; these counts
move about 2%, with the batch sizes).

Each tree runs one of core_before_after.py's engine loops (4 KiB random
reads at depth 32, each completion submitting the next) for a fixed number
of requests under ``valgrind --tool=callgrind``, twice (``--small`` and
``--large`` requests); the difference of the two totals over the difference
of the counts is the cost of one request, start-up and tear-down cancelled
out.  C work counts (locks, ctypes, struct, allocation), which
bytecodes_per_request.py does not see; kernel time does not.  Valgrind runs
one thread at a time: the loops with threads are counted, not timed.

    python benchmarks/instructions_per_request.py LOOP TREE [TREE ...]

LOOP is one of io_uring-direct, threads-direct, io_uring-cached,
threads-cached (cached: a page-cached file with the inline path off).
Needs valgrind; about a minute per tree and loop.
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile

LOOPS = ("io_uring-direct", "threads-direct", "io_uring-cached", "threads-cached")
BLOCK, DEPTH = 4096, 32


def child(loop: str, path: str, count: int) -> None:
    import threadlets
    from threadlets.probe import aligned_buffer

    backend, mode = loop.split("-")
    offs = [random.Random(1).randrange((16 << 20) // BLOCK) * BLOCK for _ in range(10000)]
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if mode == "direct" else 0))
    try:
        queue = threadlets.ThreadletQueue(max_threads=8)
        ctx = threadlets.AioContext(queue, backend=backend, inline=False)
        counter, left = itertools.count(), [count]

        def slot(buf: bytearray) -> object:
            def submit(_: object = None) -> None:
                if left[0] > 0:
                    left[0] -= 1
                    off = offs[next(counter) % len(offs)]
                    ctx.read(fd, off, buf, callback=submit)  # type: ignore[arg-type]

            return submit

        for _ in range(DEPTH):
            slot(aligned_buffer(BLOCK))()  # type: ignore[operator]
        while ctx.stats().outstanding:
            ctx.poll(0.1)
        ctx.close()
        queue.close()
    finally:
        os.close(fd)


def instructions(tree: str, loop: str, path: str, count: int) -> int:
    env = dict(os.environ, PYTHONPATH=os.path.join(os.path.abspath(tree), "src"))
    cmd = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable]
    cmd += [__file__, "--child", loop, path, str(count)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    found = re.search(r"Collected : (\d+)", out.stderr)
    if found is None:
        raise SystemExit(f"no count from valgrind for {tree}: {out.stderr[-500:]}")
    return int(found.group(1))


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("loop", choices=LOOPS)
    parser.add_argument("trees", nargs="+", help="source trees (each has src/threadlets)")
    parser.add_argument("--small", type=int, default=1000, help="requests of the short run")
    parser.add_argument("--large", type=int, default=5000, help="requests of the long run")
    parser.add_argument("--directory", default="/var/tmp", help="where the scratch file goes")
    args = parser.parse_args()
    if not 0 < args.small < args.large:
        parser.error("need 0 < --small < --large")
    if shutil.which("valgrind") is None:
        parser.error("valgrind is not installed")
    fd, path = tempfile.mkstemp(prefix="threadlets-ipr-", dir=args.directory)
    try:
        os.write(fd, os.urandom(16 << 20))
        os.fsync(fd)
        os.close(fd)
        for tree in args.trees:
            small = instructions(tree, args.loop, path, args.small)
            large = instructions(tree, args.loop, path, args.large)
            print(
                f"{args.loop} {tree}: {(large - small) / (args.large - args.small):,.0f} per request"
            )
    finally:
        os.unlink(path)


if __name__ == "__main__":
    main()
