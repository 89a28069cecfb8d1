"""How far a pure-Python asyncio front end can go on this machine: the
floor of the design, beside the front end and ``qemu-img bench -i
io_uring``, alternated round by round in one run.

Every contender reads 4 KiB at random offsets of one 128 MiB file with
O_DIRECT, 32 at a time:

* ``qemu-img io_uring``: ``qemu-img bench -f raw -i io_uring -t none -d 32
  -s 4096`` (C, the reference of issue 13);
* ``floor, held``: 32 asyncio tasks on :class:`threadlets.uring.Ring` alone
  -- no request object, no AioContext, no cancel, no Ctrl-C or fork care:
  each task packs its read into the ring with a plain asyncio Future's
  ``set_result`` as the callback and awaits the Future; the loop's eventfd
  reader reaps; a loop iteration's submissions go in one
  ``io_uring_enter`` (``Ring.hold`` with ``call_soon(flush)``), as the
  front end's do;
* ``floor, at once``: the same, every submission sent at once (one
  ``io_uring_enter`` each);
* ``front end``: ``threadlets.open(path, "rb", direct=True, buffering=0)``
  and ``await f.preadinto(buf, offset)`` in 32 tasks (the default
  configuration);
* ``front end, sqpoll`` (with ``--sqpoll``): the same after
  ``threadlets.awaitable.configure(backend="io_uring", sqpoll=True)``.

Each contender runs in a child process, so none inherits another's
threads, rings or heap.  Prints ops/s and the ratio to qemu-img per round
and their medians, and the loop's CPU time per request (user, system: the
system time includes an SQPOLL kernel thread's).

    python benchmarks/front_end_floor.py [--rounds 5] [--seconds 2]
        [--directory /var/tmp] [--sqpoll]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

BLOCK, DEPTH, SIZE = 4096, 32, 128 << 20


def _offsets() -> list[int]:
    rnd = random.Random(1)
    return [rnd.randrange(SIZE // BLOCK) * BLOCK for _ in range(100_000)]


async def _floor(path: str, seconds: float, hold: bool) -> int:
    from threadlets.probe import aligned_buffer
    from threadlets.uring import OP_READ, Ring

    loop = asyncio.get_running_loop()
    offs = _offsets()
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    ring = Ring(256, eventfd=efd)

    def on_eventfd() -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(efd)
        ring.reap()

    loop.add_reader(efd, on_eventfd)
    if hold:
        ring.hold(lambda: loop.call_soon(ring.flush))
    n = 0
    stop = time.perf_counter() + seconds

    async def task(i: int) -> None:
        nonlocal n
        buf = aligned_buffer(BLOCK)
        pin = ctypes.c_char.from_buffer(buf)  # held for the task's life
        addr = ctypes.addressof(pin)
        k = i
        while time.perf_counter() < stop:
            fut = loop.create_future()
            if not ring.submit(OP_READ, fd, offs[k % len(offs)], addr, BLOCK, 0, fut.set_result):
                raise RuntimeError("the ring refused a read")
            if await fut != BLOCK:
                raise RuntimeError("a short or failed read")
            k += DEPTH
            n += 1

    try:
        await asyncio.gather(*(task(i) for i in range(DEPTH)))
    finally:
        loop.remove_reader(efd)
        ring.close()
        os.close(fd)
        os.close(efd)
    return n


async def _front_end(path: str, seconds: float, sqpoll: bool) -> int:
    import threadlets
    from threadlets.awaitable import configure, current
    from threadlets.probe import aligned_buffer

    if sqpoll:
        configure(backend="io_uring", sqpoll=True)
    offs = _offsets()
    n = 0
    async with threadlets.open(path, "rb", direct=True, buffering=0) as f:
        if sqpoll and not current().ctx.sqpoll:
            # (Refused by the kernel, or no ring: the row would measure a
            # ring without SQPOLL under the SQPOLL label.)
            raise RuntimeError("--sqpoll: this ring does not poll (no ring, or SQPOLL refused)")
        stop = time.perf_counter() + seconds

        async def task(i: int) -> None:
            nonlocal n
            buf = aligned_buffer(BLOCK)
            k = i
            while time.perf_counter() < stop:
                if await f.preadinto(buf, offs[k % len(offs)]) != BLOCK:
                    raise RuntimeError("a short read")
                k += DEPTH
                n += 1

        await asyncio.gather(*(task(i) for i in range(DEPTH)))
    return n


def child(kind: str, path: str, seconds: float) -> None:
    before, t0 = os.times(), time.perf_counter()
    if kind == "floor-held":
        n = asyncio.run(_floor(path, seconds, True))
    elif kind == "floor-at-once":
        n = asyncio.run(_floor(path, seconds, False))
    else:
        n = asyncio.run(_front_end(path, seconds, kind == "front-end-sqpoll"))
    wall, after = time.perf_counter() - t0, os.times()
    user = (after.user - before.user) / n * 1e6
    system = (after.system - before.system) / n * 1e6
    print(f"{n / wall:.1f} {user:.2f} {system:.2f}")


KINDS = {
    "floor-held": "floor, held",
    "floor-at-once": "floor, at once",
    "front-end": "front end",
    "front-end-sqpoll": "front end, sqpoll",
}


def _qemu(path: str, seconds: float) -> tuple[float, float, float]:
    count = int(75_000 * seconds)  # about `seconds` here
    t0 = os.times()
    out = subprocess.run(
        [
            *("qemu-img", "bench", "-f", "raw", "-i", "io_uring", "-t", "none"),
            *("-d", str(DEPTH), "-s", str(BLOCK), "-c", str(count), path),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    t1 = os.times()
    m = re.search(r"Run completed in ([0-9.]+) seconds", out)
    if m is None:
        raise RuntimeError(f"qemu-img bench said: {out!r}")
    user = (t1.children_user - t0.children_user) / count * 1e6
    system = (t1.children_system - t0.children_system) / count * 1e6
    return count / float(m.group(1)), user, system


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--directory", default=None, help="where the scratch file goes")
    ap.add_argument("--sqpoll", action="store_true", help="also the front end with SQPOLL")
    ap.add_argument("--child", nargs=3, metavar=("KIND", "PATH", "SECONDS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, path, seconds = args.child
        child(kind, path, float(seconds))
        return
    if args.rounds < 1 or not args.seconds > 0:
        ap.error("--rounds and --seconds must be positive")
    if shutil.which("qemu-img") is None:
        ap.error("qemu-img is not installed")
    kinds = [k for k in KINDS if args.sqpoll or k != "front-end-sqpoll"]
    path = None
    try:
        fd, path = tempfile.mkstemp(prefix="threadlets-floor-", dir=args.directory)
        os.close(fd)
        with open(path, "wb") as fh:
            for _ in range(SIZE // (1 << 20)):
                fh.write(os.urandom(1 << 20))
        rates: dict[str, list[float]] = {"qemu-img io_uring": []}
        cpu: dict[str, list[tuple[float, float]]] = {"qemu-img io_uring": []}
        for r in range(args.rounds):
            rate, user, system = _qemu(path, args.seconds)
            rates["qemu-img io_uring"].append(rate)
            cpu["qemu-img io_uring"].append((user, system))
            line = [f"round {r + 1}: qemu-img {rate:,.0f}"]
            for kind in kinds:
                out = subprocess.run(
                    [sys.executable, __file__, "--child", kind, path, str(args.seconds)],
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout.split()
                rate_k, user, system = map(float, out)
                rates.setdefault(KINDS[kind], []).append(rate_k)
                cpu.setdefault(KINDS[kind], []).append((user, system))
                line.append(f"{KINDS[kind]} {rate_k:,.0f} ({rate_k / rate:.2f}x)")
            print(", ".join(line), flush=True)
    finally:
        if path is not None:
            os.unlink(path)
    qemu = rates["qemu-img io_uring"]
    print()
    print(
        "| contender | ops/s (median) | vs qemu-img io_uring (median of rounds) | range "
        "| user us/req | sys us/req |"
    )
    print("|---|---|---|---|---|---|")
    for name, values in rates.items():
        ratios = [v / q for v, q in zip(values, qemu, strict=True)]
        users = statistics.median(u for u, _ in cpu[name])
        systems = statistics.median(s for _, s in cpu[name])
        print(
            f"| {name} | {statistics.median(values):,.0f} | {statistics.median(ratios):.2f} "
            f"| {min(ratios):.2f}-{max(ratios):.2f} | {users:.2f} | {systems:.2f} |"
        )


if __name__ == "__main__":
    main()
