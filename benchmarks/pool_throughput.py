"""Submit-and-wait throughput of small work items: ThreadletQueue beside
concurrent.futures.ThreadPoolExecutor with the same worker count, in one run.

Two shapes, each repeated and interleaved (A, B, A, B, ...) so that noise
from a shared machine hits both alike; the median of the repeats is shown.

* batch:     submit N no-op items, then wait for each.
* pingpong:  submit one item and wait for it, N times (pure latency).

    python benchmarks/pool_throughput.py [--items 20000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import statistics
import time
from collections.abc import Callable

import threadlets


def noop() -> int:
    return 1


def batch_tl(workers: int, n: int) -> float:
    with threadlets.ThreadletQueue(max_threads=workers) as q:
        t0 = time.perf_counter()
        items = [q.submit(noop) for _ in range(n)]
        for t in items:
            t.result()
        return n / (time.perf_counter() - t0)


def batch_tpe(workers: int, n: int) -> float:
    with cf.ThreadPoolExecutor(workers) as ex:
        t0 = time.perf_counter()
        futures = [ex.submit(noop) for _ in range(n)]
        for f in futures:
            f.result()
        return n / (time.perf_counter() - t0)


def pingpong_tl(workers: int, n: int) -> float:
    with threadlets.ThreadletQueue(max_threads=workers) as q:
        t0 = time.perf_counter()
        for _ in range(n):
            q.submit(noop).result()
        return n / (time.perf_counter() - t0)


def pingpong_tpe(workers: int, n: int) -> float:
    with cf.ThreadPoolExecutor(workers) as ex:
        t0 = time.perf_counter()
        for _ in range(n):
            ex.submit(noop).result()
        return n / (time.perf_counter() - t0)


CASES: dict[str, tuple[Callable[[int, int], float], Callable[[int, int], float]]] = {
    "batch": (batch_tl, batch_tpe),
    "pingpong": (pingpong_tl, pingpong_tpe),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 4, 16])
    args = parser.parse_args()
    print("| shape | workers | ThreadletQueue items/s | ThreadPoolExecutor items/s | ratio |")
    print("|---|---|---|---|---|")
    for shape, (tl, tpe) in CASES.items():
        for w in args.workers:
            n = args.items if shape == "batch" else args.items // 4
            a: list[float] = []
            b: list[float] = []
            for _ in range(args.repeats):
                a.append(tl(w, n))
                b.append(tpe(w, n))
            ma, mb = statistics.median(a), statistics.median(b)
            ratios = sorted(x / y for x, y in zip(a, b, strict=True))
            print(
                f"| {shape} | {w} | {ma:,.0f} | {mb:,.0f} | {ma / mb:.2f} "
                f"(min {ratios[0]:.2f}, max {ratios[-1]:.2f}) |"
            )


if __name__ == "__main__":
    main()
