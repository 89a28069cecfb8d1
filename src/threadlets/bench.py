"""``threadlets bench``: threadlets beside what users would pick instead,
measured in one run, on the same file, with a table and a picture.

This module owns the workloads, the contenders and the measurement loop.
Every measurement runs each contender once per round, back to back, for
``repeats`` rounds, and reports the median and the spread (min..max) of the
rounds: on a shared machine only numbers taken side by side compare.

Contenders are taken only where installed: threadlets (as configured by
default: inline path, io_uring where available; and "threads only": no
inline path, the thread pool), aiofiles, caio, anyio, asyncio.to_thread, a direct
synchronous loop (the limit: it blocks the event loop), and the external
references fio (psync, io_uring) and ``qemu-img bench`` (threads,
io_uring).
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import threadlets
import threadlets.awaitable as aw
from threadlets.probe import probe_direct_io

__all__ = ["WORKLOADS", "BenchConfig", "plot", "run_bench", "to_markdown"]

BLOCK = 4096


@dataclass
class BenchConfig:
    workloads: list[str] = field(default_factory=lambda: list(_workload_names()))
    quick: bool = False
    seconds: float = 2.0
    repeats: int = 3
    directory: str = "."
    progress: Callable[[str], None] | None = None

    def __post_init__(self) -> None:
        if self.quick:
            self.seconds = 0.25
            self.repeats = 1

    @property
    def size(self) -> int:
        return (8 if self.quick else 64) << 20


@dataclass
class Result:
    ops: int
    seconds: float
    latencies: list[float] = field(default_factory=list)  # seconds, a sample
    bytes_per_op: int = BLOCK

    @property
    def rate(self) -> float:
        return self.ops / self.seconds if self.seconds else 0.0


Runner = Callable[[], Result | None]


# -- helpers -------------------------------------------------------------------------------------


def make_file(directory: str, size: int) -> str:
    """A file of ``size`` random bytes, synced to disk (benchmarks read it)."""
    fd, path = tempfile.mkstemp(dir=directory, prefix="threadlets-bench-")
    chunk = os.urandom(1 << 20)
    for off in range(0, size, len(chunk)):
        os.pwrite(fd, chunk[: min(len(chunk), size - off)], off)
    os.fsync(fd)
    os.close(fd)
    return path


def _cache(path: str) -> None:
    with open(path, "rb") as f:
        while f.read(1 << 20):
            pass


def _offsets(size: int, n: int = 1 << 15, seed: int = 1) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(size // BLOCK) * BLOCK for _ in range(n)]


async def _tasks(op: Callable[[int], Awaitable[object]], depth: int, seconds: float) -> Result:
    """``depth`` tasks call ``op(k)`` until the deadline (each checks the
    clock every 16 calls, so a contender that never yields still stops)."""
    count = 0
    lat: list[float] = []
    deadline = time.perf_counter() + seconds

    async def task(i: int) -> None:
        nonlocal count
        k = i * 977
        while time.perf_counter() < deadline:
            for _ in range(16):
                t0 = time.perf_counter()
                await op(k)
                if k % 7 == 0:
                    lat.append(time.perf_counter() - t0)
                k += 1
            count += 16

    t0 = time.perf_counter()
    await asyncio.gather(*(task(i) for i in range(depth)))
    return Result(count, time.perf_counter() - t0, lat)


# -- read/write contenders (asyncio) ----------------------------------------------------------------


async def _c_threadlets(
    path: str, write: bool, direct: bool, inline: bool = True, backend: str = "auto"
) -> Any:
    aw.configure(inline=inline, backend=backend)
    try:
        f = await threadlets.open(path, "r+b", direct=direct)
    finally:
        aw.configure()
    if direct:
        bufs = [threadlets.aligned_buffer(BLOCK) for _ in range(256)]

        async def op(off: int, data: bytes | None) -> object:
            if data is not None:
                return await f.pwrite(data, off)
            return await f.preadinto(bufs[(off // BLOCK) % 256], off)

        return op, f.close

    async def op2(off: int, data: bytes | None) -> object:
        if data is not None:
            return await f.pwrite(data, off)
        return await f.pread(BLOCK, off)

    return op2, f.close


async def _c_threadlets_threads(path: str, write: bool, direct: bool) -> Any:
    return await _c_threadlets(path, write, direct, inline=False, backend="threads")


async def _c_aiofiles(path: str, write: bool, direct: bool) -> Any:
    if direct:
        return None
    try:
        import aiofiles
    except ImportError:
        return None
    f = await aiofiles.open(path, "r+b")
    lock = asyncio.Lock()  # seek + read/write must not interleave

    async def op(off: int, data: bytes | None) -> object:
        async with lock:
            await f.seek(off)
            if data is not None:
                return await f.write(data)
            return await f.read(BLOCK)

    return op, f.close


def _fd_contender(
    call: Callable[..., Awaitable[object]],
) -> Callable[[str, bool, bool], Awaitable[Any]]:
    async def make(path: str, write: bool, direct: bool) -> Any:
        if direct:
            return None
        fd = os.open(path, os.O_RDWR)

        async def op(off: int, data: bytes | None) -> object:
            if data is not None:
                return await call(os.pwrite, fd, data, off)
            return await call(os.pread, fd, BLOCK, off)

        async def close() -> None:
            os.close(fd)

        return op, close

    return make


async def _to_thread(fn: Callable[..., object], *args: object) -> object:
    return await asyncio.to_thread(fn, *args)


async def _anyio_thread(fn: Callable[..., object], *args: object) -> object:
    import anyio.to_thread

    return await anyio.to_thread.run_sync(fn, *args)


async def _c_caio(path: str, write: bool, direct: bool) -> Any:
    if direct:
        return None
    try:
        import caio
    except ImportError:
        return None
    ctx = caio.AsyncioContext()
    fd = os.open(path, os.O_RDWR)

    async def op(off: int, data: bytes | None) -> object:
        if data is not None:
            return await ctx.write(data, fd, off)
        return await ctx.read(BLOCK, fd, off)

    async def close() -> None:
        ctx.close()
        os.close(fd)

    return op, close


async def _c_direct(path: str, write: bool, direct: bool) -> Any:
    flags = os.O_RDWR | (os.O_DIRECT if direct else 0)
    fd = os.open(path, flags)
    buf = threadlets.aligned_buffer(BLOCK)

    async def op(off: int, data: bytes | None) -> object:
        if data is not None:
            if direct:
                buf[:] = data
                return os.pwritev(fd, [buf], off)
            return os.pwrite(fd, data, off)
        if direct:
            return os.preadv(fd, [buf], off)
        return os.pread(fd, BLOCK, off)

    async def close() -> None:
        os.close(fd)

    return op, close


ASYNC_CONTENDERS: dict[str, Any] = {
    "threadlets": _c_threadlets,
    "threadlets (threads only)": _c_threadlets_threads,
    "caio": _c_caio,
    "asyncio.to_thread": _fd_contender(_to_thread),
    "anyio.to_thread": _fd_contender(_anyio_thread),
    "aiofiles": _c_aiofiles,
    "direct loop (blocks the loop)": _c_direct,
}
DIRECT = "direct loop (blocks the loop)"


def _async_runner(
    make: Any, path: str, offsets: list[int], depth: int, seconds: float, write: bool, direct: bool
) -> Runner:
    payload = os.urandom(BLOCK)

    def run() -> Result | None:
        async def main() -> Result | None:
            made = await make(path, write, direct)
            if made is None:
                return None
            op, close = made
            try:
                n = len(offsets)
                return await _tasks(
                    lambda k: op(offsets[k % n], payload if write else None), depth, seconds
                )
            finally:
                await close()

        return asyncio.run(main())

    return run


# -- external references ----------------------------------------------------------------------------


def _fio(
    path: str, size: int, rw: str, depth: int, direct: bool, engine: str, seconds: float
) -> Runner:
    def run() -> Result | None:
        exe = shutil.which("fio")
        if exe is None:
            return None
        cmd = [
            exe,
            "--name=bench",
            f"--filename={path}",
            f"--rw={rw}",
            f"--bs={BLOCK}",
            f"--size={size}",
            f"--direct={int(direct)}",
            "--time_based",
            f"--runtime={max(1, round(seconds))}",
            "--output-format=json",
            "--randrepeat=0",
            f"--ioengine={engine}",
            "--thread",
            "--group_reporting",
        ]
        if engine == "psync":
            cmd.append(f"--numjobs={depth}")
        else:
            cmd.append(f"--iodepth={depth}")
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            return None
        job = json.loads(proc.stdout)["jobs"][0]["write" if "write" in rw else "read"]
        pct = job.get("clat_ns", {}).get("percentile", {})
        lat = [pct[k] / 1e9 for k in ("50.000000", "99.000000") if k in pct]
        runtime = job.get("runtime", 0) / 1000 or max(1, round(seconds))
        return Result(int(job["iops"] * runtime), runtime, lat if len(lat) == 2 else [])

    return run


def _qemu(
    path: str, size: int, depth: int, direct: bool, aio: str, write: bool, seconds: float
) -> Runner:
    def run() -> Result | None:
        exe = shutil.which("qemu-img")
        if exe is None:
            return None
        count = max(2000, int(30_000 * seconds))
        cmd = [exe, "bench", "-f", "raw", "-i", aio, "-t", "none" if direct else "writeback"]
        cmd += ["-d", str(depth), "-s", str(BLOCK), "-S", str(BLOCK * 7919), "-c", str(count)]
        if write:
            cmd.append("-w")
        proc = subprocess.run([*cmd, path], capture_output=True, text=True, check=False)
        m = re.search(r"Run completed in ([\d.]+) seconds", proc.stdout)
        if proc.returncode != 0 or m is None:
            return None
        return Result(count, float(m.group(1)))

    return run


# -- workloads ------------------------------------------------------------------------------------------


def _rw_workload(
    cfg: BenchConfig, path: str, depth: int, write: bool, direct: bool, cached: bool
) -> dict[str, Runner]:
    offsets = _offsets(cfg.size)
    runners = {
        name: _async_runner(make, path, offsets, depth, cfg.seconds, write, direct)
        for name, make in ASYNC_CONTENDERS.items()
    }
    rw = "randwrite" if write else "randread"
    runners["fio psync"] = _fio(path, cfg.size, rw, depth, direct, "psync", cfg.seconds)
    runners["fio io_uring"] = _fio(path, cfg.size, rw, depth, direct, "io_uring", cfg.seconds)
    runners["qemu-img bench threads"] = _qemu(
        path, cfg.size, depth, direct, "threads", write, cfg.seconds
    )
    runners["qemu-img bench io_uring"] = _qemu(
        path, cfg.size, depth, direct, "io_uring", write, cfg.seconds
    )
    return runners


def _seq_fdatasync(cfg: BenchConfig, path: str) -> dict[str, Runner]:
    """Sequential 1 MiB writes with an fdatasync every 64 MiB (8 in quick mode)."""
    chunk = 1 << 20
    every = (8 if cfg.quick else 64) << 20
    data = os.urandom(chunk)

    def threadlets_run() -> Result | None:
        async def main() -> Result:
            async with threadlets.open(path, "r+b") as f:
                return await _seq(lambda off: f.pwrite(data, off), f.fdatasync)

        return asyncio.run(main())

    def thread_run(call: Callable[..., Awaitable[object]]) -> Runner:
        def run() -> Result | None:
            async def main() -> Result:
                fd = os.open(path, os.O_RDWR)
                try:
                    return await _seq(
                        lambda off: call(os.pwrite, fd, data, off),
                        lambda: call(os.fdatasync, fd),
                    )
                finally:
                    os.close(fd)

            return asyncio.run(main())

        return run

    async def _seq(
        write: Callable[[int], Awaitable[object]], sync: Callable[[], Awaitable[object]]
    ) -> Result:
        n = 0
        lat: list[float] = []
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < cfg.seconds:
            s = time.perf_counter()
            await write((n * chunk) % cfg.size)
            lat.append(time.perf_counter() - s)
            n += 1
            if (n * chunk) % every == 0:
                await sync()
        return Result(n, time.perf_counter() - t0, lat, chunk)

    def direct_run() -> Result | None:
        fd = os.open(path, os.O_RDWR)
        try:
            n = 0
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < cfg.seconds:
                os.pwrite(fd, data, (n * chunk) % cfg.size)
                n += 1
                if (n * chunk) % every == 0:
                    os.fdatasync(fd)
            return Result(n, time.perf_counter() - t0, [], chunk)
        finally:
            os.close(fd)

    return {
        "threadlets": threadlets_run,
        "asyncio.to_thread": thread_run(_to_thread),
        "anyio.to_thread": thread_run(_anyio_thread),
        DIRECT: direct_run,
    }


def _small_files(cfg: BenchConfig, directory: str) -> dict[str, Runner]:
    """Open, read and close many small files, 32 tasks at once."""
    nfiles = 64 if cfg.quick else 512
    paths = []
    for i in range(nfiles):
        p = os.path.join(directory, f"small-{i}")
        with open(p, "wb") as f:
            f.write(os.urandom(BLOCK))
        paths.append(p)

    def async_run(read_file: Callable[[str], Awaitable[object]]) -> Runner:
        def run() -> Result | None:
            return asyncio.run(_tasks(lambda k: read_file(paths[k % nfiles]), 32, cfg.seconds))

        return run

    async def tl(p: str) -> object:
        async with threadlets.open(p, "rb") as f:
            return await f.read()

    def sync_read(p: str) -> bytes:
        with open(p, "rb") as f:
            return f.read()

    async def direct(p: str) -> object:
        return sync_read(p)

    runners = {
        "threadlets": async_run(tl),
        "asyncio.to_thread": async_run(lambda p: asyncio.to_thread(sync_read, p)),
        "anyio.to_thread": async_run(lambda p: _anyio_thread(sync_read, p)),
        DIRECT: async_run(direct),
    }
    try:
        import aiofiles

        async def af(p: str) -> object:
            async with aiofiles.open(p, "rb") as f:
                return await f.read()

        runners["aiofiles"] = async_run(af)
    except ImportError:
        pass
    return runners


WORKLOADS = {
    "cached-read-qd1": "cached 4 KiB random reads, 1 task",
    "cached-read-qd32": "cached 4 KiB random reads, 32 tasks",
    "direct-read-qd32": "O_DIRECT 4 KiB random reads, depth 32",
    "random-write-qd32": "4 KiB random writes (page cache), depth 32",
    "seq-write-fdatasync": "sequential 1 MiB writes, fdatasync every 64 MiB",
    "small-files": "open + read + close of 4 KiB files, 32 tasks",
    "queue-depth": "cached reads through threadlets against queue depth 1..256",
}


def _workload_names() -> list[str]:
    return list(WORKLOADS)


def _runners(name: str, cfg: BenchConfig, path: str, scratch: str) -> dict[str, Runner]:
    if name == "cached-read-qd1":
        return _rw_workload(cfg, path, 1, False, False, True)
    if name == "cached-read-qd32":
        return _rw_workload(cfg, path, 32, False, False, True)
    if name == "direct-read-qd32":
        if not probe_direct_io(cfg.directory).supported:
            return {}
        r = _rw_workload(cfg, path, 32, False, True, False)
        return {
            k: v
            for k, v in r.items()
            if k in ("threadlets", DIRECT) or k.startswith(("fio", "qemu"))
        }
    if name == "random-write-qd32":
        return _rw_workload(cfg, path, 32, True, False, True)
    if name == "seq-write-fdatasync":
        return _seq_fdatasync(cfg, path)
    if name == "small-files":
        return _small_files(cfg, scratch)
    raise ValueError(f"unknown workload {name!r}")


# -- the run ---------------------------------------------------------------------------------------------


def _pct(vals: list[float], q: float) -> float | None:
    if not vals:
        return None
    vals = sorted(vals)
    return vals[min(len(vals) - 1, int(len(vals) * q))]


def _queue_depth_sweep(cfg: BenchConfig, path: str) -> dict[str, Any]:
    """threadlets (threads only, so the pool matters) against queue depth,
    and the pool's thread count sampled over the sweep."""
    depths = [1, 4, 16, 64, 256] if cfg.quick else [1, 2, 4, 8, 16, 32, 64, 128, 256]
    offsets = _offsets(cfg.size)
    q = threadlets.ThreadletQueue(name="bench-sweep")
    aw.configure(queue=q, inline=False, backend="threads")
    samples: list[tuple[float, int]] = []
    t_start = time.perf_counter()
    try:
        out = []
        for d in depths:

            async def main(d: int = d) -> Result:
                async with threadlets.open(path, "rb") as f:
                    sampler = asyncio.ensure_future(_sample_threads(q, samples, t_start))
                    try:
                        return await _tasks(
                            lambda k: f.pread(BLOCK, offsets[k % len(offsets)]), d, cfg.seconds
                        )
                    finally:
                        sampler.cancel()

            r = asyncio.run(main())
            out.append({"depth": d, "ops_per_s": round(r.rate, 1)})
            if cfg.progress:
                cfg.progress(f"queue-depth {d}")
    finally:
        aw.configure()
        q.close(timeout=10)
    return {
        "points": out,
        "threads_over_time": [{"t": round(t, 3), "threads": n} for t, n in samples],
    }


async def _sample_threads(
    q: threadlets.ThreadletQueue, samples: list[tuple[float, int]], t0: float
) -> None:
    while True:
        samples.append((time.perf_counter() - t0, q.stats().threads))
        await asyncio.sleep(0.01)


def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    """Run the chosen workloads; the result has the documented JSON shape."""
    unknown = set(cfg.workloads) - set(WORKLOADS)
    if unknown:
        raise ValueError(f"unknown workloads: {sorted(unknown)}; choose from {list(WORKLOADS)}")
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
        },
        "config": {
            "seconds": cfg.seconds,
            "repeats": cfg.repeats,
            "quick": cfg.quick,
            "file_mib": cfg.size >> 20,
        },
        "workloads": {},
    }
    scratch = tempfile.mkdtemp(dir=cfg.directory, prefix="threadlets-bench-")
    path = make_file(scratch, cfg.size)
    try:
        for name in cfg.workloads:
            if name == "queue-depth":
                _cache(path)
                report["queue_depth"] = _queue_depth_sweep(cfg, path)
                continue
            runners = _runners(name, cfg, path, scratch)
            rounds: dict[str, list[Result]] = {}
            for _ in range(cfg.repeats):
                for cname, run in runners.items():
                    if name.startswith(("cached", "random-write")):
                        _cache(path)
                    if cfg.progress:
                        cfg.progress(f"{name}: {cname}")
                    res = run()
                    if res is not None:
                        rounds.setdefault(cname, []).append(res)
            report["workloads"][name] = _summarise(WORKLOADS[name], rounds)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return report


def _summarise(title: str, rounds: dict[str, list[Result]]) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    for cname, results in rounds.items():
        rates = [r.rate for r in results]
        lat = [x for r in results for x in r.latencies]
        med = statistics.median(rates)
        rows[cname] = {
            "ops_per_s": round(med, 1),
            "spread": [round(min(rates), 1), round(max(rates), 1)],
            "mib_per_s": round(med * results[0].bytes_per_op / (1 << 20), 2),
            "p50_us": None if not lat else round(_pct(lat, 0.5) * 1e6, 1),  # type: ignore[operator]
            "p99_us": None if not lat else round(_pct(lat, 0.99) * 1e6, 1),  # type: ignore[operator]
        }
    best = max((r["ops_per_s"] for r in rows.values()), default=0.0)
    direct = rows.get(DIRECT, {}).get("ops_per_s")
    for r in rows.values():
        r["vs_best"] = round(r["ops_per_s"] / best, 3) if best else None
        r["vs_direct"] = round(r["ops_per_s"] / direct, 3) if direct else None
    return {"title": title, "contenders": rows}


# -- output ------------------------------------------------------------------------------------------------


def to_markdown(report: dict[str, Any], command: str) -> str:
    lines = [
        f"Command: `{command}`  ",
        f"Date: {report['date']}  ",
        f"Machine: {report['machine']['platform']}, {report['machine']['cpus']} CPUs, "
        f"Python {report['machine']['python']}  ",
        f"Each figure: median of {report['config']['repeats']} rounds of "
        f"{report['config']['seconds']} s; spread is min-max of the rounds.",
        "",
    ]
    for name, w in report["workloads"].items():
        lines += [f"### {name}: {w['title']}", ""]
        lines += ["| contender | ops/s | spread | MiB/s | p50 us | p99 us | vs best | vs direct |"]
        lines += ["|---|---|---|---|---|---|---|---|"]
        for cname, r in sorted(w["contenders"].items(), key=lambda kv: -kv[1]["ops_per_s"]):
            lines.append(
                f"| {cname} | {r['ops_per_s']:,.0f} | {r['spread'][0]:,.0f}-{r['spread'][1]:,.0f} "
                f"| {r['mib_per_s']} | {r['p50_us'] if r['p50_us'] is not None else 'n/a'} "
                f"| {r['p99_us'] if r['p99_us'] is not None else 'n/a'} | {r['vs_best']} "
                f"| {r['vs_direct'] if r['vs_direct'] is not None else 'n/a'} |"
            )
        lines.append("")
    if "queue_depth" in report:
        lines += ["### queue-depth: threadlets (threads only) against queue depth", ""]
        lines += ["| depth | ops/s |", "|---|---|"]
        lines += [
            f"| {p['depth']} | {p['ops_per_s']:,.0f} |" for p in report["queue_depth"]["points"]
        ]
        lines.append("")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: str) -> None:
    """A PNG: ops/s per contender for each workload, and ops/s against
    queue depth with the pool's thread count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["workloads"])
    panels = len(names) + (2 if "queue_depth" in report else 0)
    fig, axes = plt.subplots(max(panels, 1), 1, figsize=(10, 3.2 * max(panels, 1)), squeeze=False)
    for ax, name in zip(axes[:, 0], names, strict=False):
        rows = sorted(
            report["workloads"][name]["contenders"].items(), key=lambda kv: kv[1]["ops_per_s"]
        )
        labels = [k for k, _ in rows]
        vals = [v["ops_per_s"] for _, v in rows]
        colors = ["tab:orange" if k.startswith("threadlets") else "tab:blue" for k in labels]
        ax.barh(labels, vals, color=colors)
        ax.set_xscale("log")
        ax.set_title(f"{name}: {report['workloads'][name]['title']}")
        ax.set_xlabel("ops/s (log)")
    if "queue_depth" in report:
        ax = axes[len(names), 0]
        pts = report["queue_depth"]["points"]
        ax.plot(
            [p["depth"] for p in pts], [p["ops_per_s"] for p in pts], marker="o", color="tab:orange"
        )
        ax.set_xscale("log", base=2)
        ax.set_xlabel("queue depth (tasks)")
        ax.set_ylabel("ops/s")
        ax.set_title("threadlets (threads only): throughput against queue depth")
        threads = report["queue_depth"]["threads_over_time"]
        ax = axes[len(names) + 1, 0]
        ax.plot([t["t"] for t in threads], [t["threads"] for t in threads], color="tab:gray")
        ax.set_xlabel("seconds into the sweep")
        ax.set_ylabel("pool threads")
        ax.set_title("the elastic pool's thread count over the sweep")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=90)
    plt.close(fig)
