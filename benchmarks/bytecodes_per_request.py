"""Bytecodes executed per request, per function, for one of
core_before_after.py's loops: a count that does not depend on the
machine's load (the timings do), for comparing trees exactly.

    PYTHONPATH=<tree>/src python benchmarks/bytecodes_per_request.py LOOP [--top 30]

LOOP is one of: io_uring-direct, threads-direct, io_uring-cached,
threads-cached, posix.  Every thread started after the warm-up is traced
(sys.settrace with opcode events); requests are counted as calls of the
engine's read() (posix: aio_read()).  Tracing makes the loop ~50x slower:
only the counts mean anything.
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import sys
import tempfile
import threading
from pathlib import Path
from types import FrameType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import core_before_after as loops

LOOPS = {
    "io_uring-direct": lambda p, o, s: loops._direct(p, o, s, "io_uring"),
    "threads-direct": lambda p, o, s: loops._direct(p, o, s, "threads"),
    "io_uring-cached": lambda p, o, s: loops._cached(p, o, s, "io_uring"),
    "threads-cached": lambda p, o, s: loops._cached(p, o, s, "threads"),
    "posix": loops._posix,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("loop", choices=sorted(LOOPS))
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--directory", default=tempfile.gettempdir())
    args = parser.parse_args()
    run = LOOPS[args.loop]
    counts: collections.Counter[str] = collections.Counter()
    requests = [0]
    entry = "aio_read" if args.loop == "posix" else "read"

    def tracer(frame: FrameType, event: str, arg: Any) -> Any:
        frame.f_trace_opcodes = True
        code = frame.f_code
        if event == "opcode":
            counts[getattr(code, "co_qualname", code.co_name)] += 1
        elif (
            event == "call"
            and code.co_name == entry
            and code.co_filename.endswith(("engine.py", "posix.py"))
        ):
            requests[0] += 1
        return tracer

    fd, path = tempfile.mkstemp(prefix="threadlets-bytecodes-", dir=args.directory)
    try:
        os.write(fd, os.urandom(16 << 20))
        os.close(fd)
        offs = [random.Random(1).randrange((16 << 20) // 4096) * 4096 for _ in range(10000)]
        run(path, offs, 0.2)  # warm-up
        threading.settrace(tracer)
        sys.settrace(tracer)
        try:
            run(path, offs, args.seconds)
        finally:
            sys.settrace(None)
            threading.settrace(None)  # type: ignore[arg-type]
    finally:
        os.unlink(path)
    n = requests[0]
    loop_fn = sum(c for name, c in counts.items() if name.split(".")[0] in loops.LOOP_FUNCTIONS)
    total = sum(counts.values()) - loop_fn
    print(
        f"{args.loop}: {n} requests, {total / n:.1f} bytecodes per request (the loop's own excluded)"
    )
    for name, c in counts.most_common(args.top):
        print(f"  {c / n:7.1f}  {name}")


if __name__ == "__main__":
    main()
