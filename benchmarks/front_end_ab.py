"""The async front end on several source trees, alternated round by round
in one run (a noisy machine hits every tree alike): 32 asyncio tasks at
depth 32 on one file, each awaiting

* ``direct-read``: ``f.preadinto`` of 4 KiB at random offsets, O_DIRECT;
* ``cached-write``: ``f.pwrite`` of 4 KiB at random offsets, page cache,
  ``buffering=0``;

and ``posix``: benchmarks/posix_vs_glibc.py's loop (aio_suspend on 32
aiocbs, every finished one collected and resubmitted), O_DIRECT.  Each tree
runs in a child with ``PYTHONPATH=TREE/src`` and the default backend;
``--sqpoll`` has the children ask for IORING_SETUP_SQPOLL (a kernel thread
polls the ring; the opt-in that costs a CPU while requests flow): the front
end through ``threadlets.awaitable.configure(sqpoll=True)``, posix through
``threadlets.posix.set_context(AioContext(deliver=False, backend="auto",
sqpoll=True))``.  A child whose ring does not poll then fails the run (its
figures would not be what was asked); so does a tree without the API.

    python benchmarks/front_end_ab.py TREE [TREE ...] [--rounds 3]
        [--seconds 1.5] [--directory /var/tmp] [--loops direct-read,cached-write,posix]
        [--sqpoll]

Prints ops/s per loop and tree: the median of the rounds, the ratio to the
first tree, and every round.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import core_before_after as loops

BLOCK, DEPTH, SIZE = 4096, 32, 128 << 20
LOOPS = ("direct-read", "cached-write", "posix")


def _offsets() -> list[int]:
    rnd = random.Random(1)
    return [rnd.randrange(SIZE // BLOCK) * BLOCK for _ in range(100_000)]


def _front_end(loop: str, path: str, sec: float, sqpoll: bool = False) -> float:
    import threadlets
    import threadlets.awaitable as aw
    from threadlets.probe import aligned_buffer

    offs = _offsets()
    if sqpoll:
        aw.configure(sqpoll=True)  # (the default backend, "auto", as without)

    async def main() -> float:
        n = 0
        direct = loop == "direct-read"
        mode = "rb" if direct else "r+b"
        async with threadlets.open(path, mode, direct=direct, buffering=0) as f:
            if sqpoll:
                _check_sqpoll(aw.current().ctx)
            stop = time.perf_counter() + sec

            async def task(i: int) -> None:
                nonlocal n
                buf = aligned_buffer(BLOCK) if direct else os.urandom(BLOCK)
                k = i
                while time.perf_counter() < stop:
                    if direct:
                        await f.preadinto(buf, offs[k % len(offs)])
                    else:
                        await f.pwrite(buf, offs[k % len(offs)])
                    k += DEPTH
                    n += 1

            t0 = time.perf_counter()
            await asyncio.gather(*(task(i) for i in range(DEPTH)))
            return n / (time.perf_counter() - t0)

    return asyncio.run(main())


def _check_sqpoll(ctx: object) -> None:
    if not getattr(ctx, "sqpoll", False):
        sys.exit("--sqpoll: this ring does not poll (no ring, or the kernel refused SQPOLL)")


def child(loop: str, path: str, sec: float, sqpoll: bool = False) -> None:
    if loop == "posix":
        if sqpoll:
            import threadlets
            import threadlets.posix as px

            ctx = threadlets.AioContext(deliver=False, backend="auto", sqpoll=True)
            _check_sqpoll(ctx)
            px.set_context(ctx)
        rate = loops._posix(path, _offsets(), sec)[0]  # core_before_after's loop
        if sqpoll:
            px.set_context(None)
            ctx.close()
    else:
        rate = _front_end(loop, path, sec, sqpoll)
    print(f"{rate:.0f}")


def main() -> None:
    if len(sys.argv) in (5, 6) and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], float(sys.argv[4]), sys.argv[5:] == ["--sqpoll"])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trees", nargs="+", help="source trees (each has src/threadlets)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=1.5)
    parser.add_argument("--directory", default="/var/tmp", help="where the scratch file goes")
    parser.add_argument("--loops", default=",".join(LOOPS))
    parser.add_argument(
        "--sqpoll",
        action="store_true",
        help="the children ask for IORING_SETUP_SQPOLL (threadlets.awaitable.configure(sqpoll=True))",
    )
    args = parser.parse_args()
    loops = args.loops.split(",")
    if not set(loops) <= set(LOOPS) or args.rounds < 1 or not args.seconds > 0:
        parser.error(f"--loops from {','.join(LOOPS)}; --rounds >= 1; --seconds > 0")
    fd, path = tempfile.mkstemp(prefix="threadlets-feab-", dir=args.directory)
    try:
        with os.fdopen(fd, "wb") as f:
            for _ in range(SIZE // (1 << 20)):
                f.write(os.urandom(1 << 20))
        rates: dict[tuple[str, str], list[float]] = {}
        for _ in range(args.rounds):
            for loop in loops:
                for tree in args.trees:
                    env = dict(os.environ, PYTHONPATH=os.path.join(os.path.abspath(tree), "src"))
                    cmd = [sys.executable, __file__, "--child", loop, path, str(args.seconds)]
                    cmd += ["--sqpoll"] if args.sqpoll else []
                    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
                    if out.returncode != 0:
                        sys.exit(f"{loop} on {tree} failed:\n{out.stderr.strip()[-2000:]}")
                    rates.setdefault((loop, tree), []).append(float(out.stdout.split()[-1]))
        for loop in loops:
            first = statistics.median(rates[(loop, args.trees[0])])
            for tree in args.trees:
                got = rates[(loop, tree)]
                med = statistics.median(got)
                rounds = ", ".join(f"{r:,.0f}" for r in got)
                print(f"{loop:13} {tree}: {med:,.0f} ops/s ({med / first:.2f}x) [{rounds}]")
    finally:
        os.unlink(path)


if __name__ == "__main__":
    main()
