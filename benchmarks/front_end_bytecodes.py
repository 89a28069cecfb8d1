"""Bytecodes executed per request by the async front end, per function: a
count that does not depend on the machine's load.

    PYTHONPATH=<tree>/src python benchmarks/front_end_bytecodes.py MODE [--requests 3000]

MODE: ``direct-read`` (``f.preadinto`` of 4 KiB, O_DIRECT), ``cached-read``
(``f.pread``), ``cached-write`` (``f.pwrite``, ``buffering=0``); 32 asyncio
tasks on one 16 MiB scratch file at random 4 KiB offsets, on the default
backend.  Every thread is traced (sys.settrace with opcode events) after a
warm-up run; the tasks' own loop is left out of the total.  Tracing makes
the loop ~50x slower: only the counts mean anything.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import random
import sys
import tempfile
import threading
from types import FrameType
from typing import Any

import threadlets
from threadlets.probe import aligned_buffer

MODES = ("direct-read", "cached-read", "cached-write")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("mode", choices=MODES)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--directory", default="/var/tmp")
    args = parser.parse_args()
    counts: collections.Counter[str] = collections.Counter()

    def tracer(frame: FrameType, event: str, arg: Any) -> Any:
        frame.f_trace_opcodes = True
        if event == "opcode":
            c = frame.f_code
            name = getattr(c, "co_qualname", c.co_name)
            counts[f"{os.path.basename(c.co_filename)}:{name}"] += 1
        return tracer

    fd, path = tempfile.mkstemp(prefix="threadlets-fe-bytecodes-", dir=args.directory)
    try:
        os.write(fd, os.urandom(16 << 20))
        os.close(fd)
        offsets = [random.Random(1).randrange((16 << 20) // 4096) * 4096 for _ in range(20000)]
        asyncio.run(_loop(args.mode, path, offsets, 2000, None))
        asyncio.run(_loop(args.mode, path, offsets, args.requests, tracer))
    finally:
        os.unlink(path)
    n = args.requests
    total = sum(v for k, v in counts.items() if not k.startswith("front_end_bytecodes.py:"))
    print(f"{args.mode}: {total / n:.1f} bytecodes per request (the tasks' loop excluded)")
    for name, c in counts.most_common(args.top):
        print(f"  {c / n:7.1f}  {name}")


async def _loop(mode: str, path: str, offsets: list[int], n: int, tracer: Any) -> None:
    f = await threadlets.open(
        path, "r+b", direct=mode == "direct-read", buffering=0 if mode == "cached-write" else -1
    )
    bufs = [aligned_buffer(4096) for _ in range(32)]
    data = os.urandom(4096)
    left = [n]

    async def task(i: int) -> None:
        k, buf = i * 977, bufs[i]
        while left[0] > 0:
            left[0] -= 1
            off = offsets[k % len(offsets)]
            k += 1
            if mode == "direct-read":
                await f.preadinto(buf, off)
            elif mode == "cached-read":
                await f.pread(4096, off)
            else:
                await f.pwrite(data, off)

    if tracer is not None:
        threading.settrace(tracer)
        sys.settrace(tracer)
    try:
        await asyncio.gather(*(task(i) for i in range(32)))
    finally:
        sys.settrace(None)
        threading.settrace(None)  # type: ignore[arg-type]
    await f.close()


if __name__ == "__main__":
    main()
