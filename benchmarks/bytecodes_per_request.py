"""Bytecodes executed per request, per function, for one of
core_before_after.py's loops: a count that does not depend on the
machine's load (the timings do), for comparing trees exactly.

    PYTHONPATH=<tree>/src python benchmarks/bytecodes_per_request.py LOOP [--top 30]
        [--threads]

LOOP is one of: io_uring-direct, threads-direct, io_uring-cached,
threads-cached, posix.  Every thread started after the warm-up is traced
(sys.settrace with opcode events); requests are counted as calls of the
engine's read() (posix: aio_read()).  Tracing makes the loop ~50x slower:
only the counts mean anything.

``--threads`` counts the main thread and the other threads apart.  For
posix it also gives the runtime a context made after tracing started (the
default runtime's own was made, with its ring's reaper thread, in the
warm-up, so the reaper would not be traced): the other threads' count is
then the completion side, in the reaper.
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
    parser.add_argument(
        "--threads",
        action="store_true",
        help="count the main thread and the others (posix: the reaper) apart",
    )
    args = parser.parse_args()
    run = LOOPS[args.loop]
    counts: collections.Counter[str] = collections.Counter()
    others: collections.Counter[str] = collections.Counter() if args.threads else counts
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

    def other_tracer(frame: FrameType, event: str, arg: Any) -> Any:
        frame.f_trace_opcodes = True
        if event == "opcode":
            code = frame.f_code
            others[getattr(code, "co_qualname", code.co_name)] += 1
        return other_tracer

    fd, path = tempfile.mkstemp(prefix="threadlets-bytecodes-", dir=args.directory)
    try:
        os.write(fd, os.urandom(16 << 20))
        os.close(fd)
        offs = [random.Random(1).randrange((16 << 20) // 4096) * 4096 for _ in range(10000)]
        run(path, offs, 0.2)  # warm-up
        threading.settrace(other_tracer if args.threads else tracer)
        sys.settrace(tracer)
        try:
            if args.threads and args.loop == "posix":
                _posix_on_a_fresh_context(run, path, offs, args.seconds)
            else:
                run(path, offs, args.seconds)
        finally:
            sys.settrace(None)
            threading.settrace(None)  # type: ignore[arg-type]
    finally:
        os.unlink(path)
    n = requests[0]
    loop_fn = sum(c for name, c in counts.items() if name.split(".")[0] in loops.LOOP_FUNCTIONS)
    total = sum(counts.values()) - loop_fn
    where = " in the main thread" if args.threads else ""
    print(
        f"{args.loop}: {n} requests, {total / n:.1f} bytecodes per request{where}"
        " (the loop's own excluded)"
    )
    for name, c in counts.most_common(args.top):
        print(f"  {c / n:7.1f}  {name}")
    if args.threads:
        print(f"other threads: {sum(others.values()) / n:.1f} bytecodes per request")
        for name, c in others.most_common(args.top):
            print(f"  {c / n:7.1f}  {name}")


def _posix_on_a_fresh_context(run: Any, path: str, offs: list[int], seconds: float) -> None:
    """The posix loop on a context (and ring reaper) made now, while traced;
    closed after, and the default runtime's context given back."""
    from threadlets import AioContext
    from threadlets.posix import use_context

    ctx = AioContext(deliver=False, backend="auto")
    try:
        with use_context(ctx):
            run(path, offs, seconds)
    finally:
        ctx.close()


if __name__ == "__main__":
    main()
