"""``threadlets bench``: threadlets beside what users would pick instead,
measured in one run, on the same file, with a table and a picture.

This module owns the workloads, the contenders and the measurement loop.
Every measurement runs each contender once per round, back to back, for
``repeats`` rounds, and reports the median and the spread (min..max) of the
rounds: on a shared machine only numbers taken side by side compare.

Contenders are taken only where installed: threadlets (as configured by
default: inline path, io_uring where available; "threads only": no inline
path, the thread pool; and "sqpoll": io_uring with IORING_SETUP_SQPOLL, a
kernel thread polling the ring, the opt-in of
``threadlets.awaitable.configure(sqpoll=True)``), aiofiles, caio, anyio,
asyncio.to_thread, a direct synchronous loop (the limit: it blocks the event
loop), and the external references fio (psync, io_uring, and io_uring with
``--sqthread_poll=1`` beside threadlets' sqpoll row) and ``qemu-img bench``
(threads, io_uring).  A contender that cannot run here for a reason worth
saying (no ring, SQPOLL refused) raises :class:`Skipped`: its workload's
``notes`` say why, instead of a row.

Scratch files live in one directory made under ``BenchConfig.directory``
(the system temp directory unless told otherwise, never the cwd by
default) and are removed however the run ends.  In the main thread the
first Ctrl-C ends the running measurement early and raises
KeyboardInterrupt between measurements, where nothing is half made (not
inside an event loop's set-up); a second raises at once.  SIGTERM stops the
run the same way and then exits (SystemExit, status 128 + SIGTERM); so does
SIGHUP (the terminal closed), with 128 + SIGHUP.  The whole
run is planned before the first measurement, so progress can say which
measurement of how many is running and about how long is left.
"""

from __future__ import annotations

import asyncio
import errno
import importlib.util
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import threadlets
import threadlets.awaitable as aw
from threadlets.probe import probe_direct_io
from threadlets.stress import fio_filename, first_signal_calls, signals_deferred

__all__ = ["WORKLOADS", "BenchConfig", "Step", "figure", "plot", "run_bench", "to_markdown"]

BLOCK = 4096
#: Set by the first Ctrl-C: measurements end early, the run stops at the next step.
_stop = threading.Event()
#: Set (with _stop) by SIGTERM or SIGHUP: the run stops as for Ctrl-C, then
#: exits 128 + the signal's number (_terminated_by).
_terminated = threading.Event()
_terminated_by = [int(signal.SIGTERM)]


@dataclass
class Step:
    """Where a run is, given to ``BenchConfig.progress`` before each measurement."""

    done: int  # measurements finished
    total: int  # measurements planned
    workload: str
    workload_index: int  # from 1
    workloads: int
    what: str  # the contender, or the queue depth
    round: int  # from 1
    rounds: int
    seconds_left: float  # an estimate: the plan, scaled by how the run keeps to it


@dataclass
class BenchConfig:
    workloads: list[str] = field(default_factory=lambda: list(_workload_names()))
    quick: bool = False
    seconds: float = 2.0
    repeats: int = 3
    #: Where the scratch directory is made; None: the system temp directory.
    directory: str | None = None
    progress: Callable[[Step], None] | None = None
    #: Called with the scratch directory once it exists, before the test file is made.
    on_scratch: Callable[[str], None] | None = None
    #: The report, filled as the run goes (run_bench returns it): a run
    #: stopped (KeyboardInterrupt; SystemExit for SIGTERM, SIGHUP) leaves
    #: here what was measured until then -- each measurement complete, one
    #: cut short left out -- with ``interrupted`` True.
    report: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.quick:
            self.seconds = 0.25
            self.repeats = 1

    def check(self) -> None:
        if not (math.isfinite(self.seconds) and self.seconds > 0):
            raise ValueError(f"seconds must be a finite number > 0, not {self.seconds}")
        if self.repeats < 1:
            raise ValueError(f"repeats must be >= 1, not {self.repeats}")
        unknown = set(self.workloads) - set(WORKLOADS)
        if unknown:
            raise ValueError(f"unknown workloads: {sorted(unknown)}; choose from {list(WORKLOADS)}")
        if self.directory is not None and not os.path.isdir(self.directory):
            raise FileNotFoundError(errno.ENOENT, "no such directory", self.directory)

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


class Skipped(Exception):
    """Raised by a runner that cannot measure here; the message (the
    reason) goes to its workload's ``notes``, in place of a row."""


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
        while time.perf_counter() < deadline and not _stop.is_set():
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
    path: str,
    write: bool,
    direct: bool,
    inline: bool = True,
    backend: str = "auto",
    sqpoll: bool = False,
) -> Any:
    aw.configure(inline=inline, backend=backend, sqpoll=sqpoll)
    try:
        if sqpoll:
            _check_sqpoll()
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


async def _c_threadlets_sqpoll(path: str, write: bool, direct: bool) -> Any:
    return await _c_threadlets(path, write, direct, backend="io_uring", sqpoll=True)


#: The note of a "sqpoll" row whose ring does not poll.
NO_SQPOLL = "skipped: the kernel refused IORING_SETUP_SQPOLL here (the ring would not poll)"


def _check_sqpoll() -> None:
    """Skipped, unless the running loop's context (made now, as configured)
    has a ring that polls."""
    from threadlets.uring import RingUnavailable

    try:
        ctx = aw.current().ctx
    except RingUnavailable as e:
        raise Skipped(f"skipped: no io_uring ring here ({e.strerror or e})") from None
    if not ctx.sqpoll:
        raise Skipped(NO_SQPOLL)


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
    "threadlets sqpoll": _c_threadlets_sqpoll,
    "caio": _c_caio,
    "asyncio.to_thread": _fd_contender(_to_thread),
    "anyio.to_thread": _fd_contender(_anyio_thread),
    "aiofiles": _c_aiofiles,
    "direct loop (blocks the loop)": _c_direct,
}
DIRECT = "direct loop (blocks the loop)"
#: The front end with threadlets.awaitable.configure(backend="io_uring", sqpoll=True).
SQPOLL = "threadlets sqpoll"
#: fio's io_uring engine with --sqthread_poll=1 (its like for like).
FIO_SQPOLL = "fio io_uring sqpoll"
#: The module a contender needs: without it, it is not planned at all.
_NEEDS = {"caio": "caio", "aiofiles": "aiofiles", "anyio.to_thread": "anyio"}


def _installed(cname: str) -> bool:
    module = _NEEDS.get(cname)
    return module is None or importlib.util.find_spec(module) is not None


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
    path: str,
    size: int,
    rw: str,
    depth: int,
    direct: bool,
    engine: str,
    seconds: float,
    sqpoll: bool = False,
) -> Runner:
    """fio on ``path``; ``sqpoll``: its io_uring engine with
    ``--sqthread_poll=1`` (a kernel thread polls its ring), a refusal then
    said in a note (Skipped) rather than a row left out silently."""

    def run() -> Result | None:
        exe = shutil.which("fio")
        if exe is None:
            return None
        cmd = [
            exe,
            "--name=bench",
            f"--filename={fio_filename(path)}",
            "--allow_file_create=0",
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
        if sqpoll:
            cmd.append("--sqthread_poll=1")
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            if sqpoll:
                why = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-1:]
                raise Skipped(f"skipped: fio --sqthread_poll=1 failed: {''.join(why)[:200]}")
            return None
        job = json.loads(proc.stdout)["jobs"][0]["write" if "write" in rw else "read"]
        pct = job.get("clat_ns", {}).get("percentile", {})
        lat = [pct[k] / 1e9 for k in ("50.000000", "99.000000") if k in pct]
        if sqpoll:
            # With --sqthread_poll fio does not time the submission, and its
            # clat (and lat) come out as nonsense (fio 3.33: seconds, at
            # 70k IOPS and depth 32): no latencies, rather than wrong ones.
            lat = []
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
        if _installed(name)
    }
    rw = "randwrite" if write else "randread"
    if shutil.which("fio"):
        runners["fio psync"] = _fio(path, cfg.size, rw, depth, direct, "psync", cfg.seconds)
        runners["fio io_uring"] = _fio(path, cfg.size, rw, depth, direct, "io_uring", cfg.seconds)
        runners[FIO_SQPOLL] = _fio(
            path, cfg.size, rw, depth, direct, "io_uring", cfg.seconds, sqpoll=True
        )
    if shutil.which("qemu-img"):
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
        while time.perf_counter() - t0 < cfg.seconds and not _stop.is_set():
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
            while time.perf_counter() - t0 < cfg.seconds and not _stop.is_set():
                os.pwrite(fd, data, (n * chunk) % cfg.size)
                n += 1
                if (n * chunk) % every == 0:
                    os.fdatasync(fd)
            return Result(n, time.perf_counter() - t0, [], chunk)
        finally:
            os.close(fd)

    runners = {
        "threadlets": threadlets_run,
        "asyncio.to_thread": thread_run(_to_thread),
        "anyio.to_thread": thread_run(_anyio_thread),
        DIRECT: direct_run,
    }
    return {k: v for k, v in runners.items() if _installed(k)}


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

    async def af(p: str) -> object:
        import aiofiles

        async with aiofiles.open(p, "rb") as f:
            return await f.read()

    runners = {
        "threadlets": async_run(tl),
        "threadlets.read_bytes": async_run(threadlets.read_bytes),
        "asyncio.to_thread": async_run(lambda p: asyncio.to_thread(sync_read, p)),
        "anyio.to_thread": async_run(lambda p: _anyio_thread(sync_read, p)),
        DIRECT: async_run(direct),
        "aiofiles": async_run(af),
    }
    return {k: v for k, v in runners.items() if _installed(k)}


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
        if not probe_direct_io(scratch).supported:
            return {}
        r = _rw_workload(cfg, path, 32, False, True, False)
        return {
            k: v
            for k, v in r.items()
            if k in ("threadlets", SQPOLL, DIRECT) or k.startswith(("fio", "qemu"))
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


def _depths(cfg: BenchConfig) -> list[int]:
    return [1, 4, 16, 64, 256] if cfg.quick else [1, 2, 4, 8, 16, 32, 64, 128, 256]


def _queue_depth_sweep(
    cfg: BenchConfig, path: str, before: Callable[[int], None], into: dict[str, Any]
) -> None:
    """threadlets (threads only, so the pool matters) against queue depth,
    and the pool's thread count sampled over the sweep, into ``into``
    (``points``, ``threads_over_time``) as it goes: a sweep stopped
    half-way reports the depths measured."""
    offsets = _offsets(cfg.size)
    q = threadlets.ThreadletQueue(name="bench-sweep")
    aw.configure(queue=q, inline=False, backend="threads")
    samples: list[tuple[float, int]] = []
    t_start = time.perf_counter()
    try:
        out: list[dict[str, Any]] = into["points"]
        for d in _depths(cfg):

            async def main(d: int = d) -> Result:
                async with threadlets.open(path, "rb") as f:
                    sampler = asyncio.ensure_future(_sample_threads(q, samples, t_start))
                    try:
                        return await _tasks(
                            lambda k: f.pread(BLOCK, offsets[k % len(offsets)]), d, cfg.seconds
                        )
                    finally:
                        sampler.cancel()

            before(d)
            r = asyncio.run(main())
            _stopped()  # (one cut short is not a figure)
            out.append({"depth": d, "ops_per_s": round(r.rate, 1)})
    finally:
        into["threads_over_time"] = [{"t": round(t, 3), "threads": n} for t, n in samples]
        aw.configure()
        q.close(timeout=10)


async def _sample_threads(
    q: threadlets.ThreadletQueue, samples: list[tuple[float, int]], t0: float
) -> None:
    while True:
        samples.append((time.perf_counter() - t0, q.stats().threads))
        await asyncio.sleep(0.01)


class _Progress:
    """Counts measurements against the plan and estimates the time left."""

    def __init__(self, cfg: BenchConfig, planned: list[float]) -> None:
        self.cfg = cfg
        self.planned = planned  # seconds, one per measurement, in run order
        self.done = 0
        self.t0: float | None = None

    def step(self, workload: str, index: int, what: str, round_: int, rounds: int) -> None:
        _stopped()
        now = time.perf_counter()
        if self.t0 is None:
            self.t0 = now
        behind = sum(self.planned[: self.done])
        scale = (now - self.t0) / behind if behind else 1.0
        left = scale * sum(self.planned[self.done :])
        if self.cfg.progress is not None:
            self.cfg.progress(
                Step(
                    self.done,
                    len(self.planned),
                    workload,
                    index,
                    len(self.cfg.workloads),
                    what,
                    round_,
                    rounds,
                    left,
                )
            )
        self.done += 1


def _stopped() -> None:
    if _stop.is_set():
        if _terminated.is_set():
            raise SystemExit(128 + _terminated_by[0])
        raise KeyboardInterrupt


def _stop_on(signum: int) -> None:
    """The first Ctrl-C, SIGTERM or SIGHUP: stop the run; it then ends with
    KeyboardInterrupt, or SystemExit(128 + the signal), its scratch files
    removed."""
    if signum != signal.SIGINT:
        _terminated_by[0] = signum
        _terminated.set()
    _stop.set()


def _exit_now(signum: int, frame: object) -> None:
    """A second SIGTERM or SIGHUP: exit at once (the scratch files still removed)."""
    raise SystemExit(128 + signum)


def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    """Run the chosen workloads; the result (``cfg.report``) has the
    documented JSON shape.  Whatever ends the run (Ctrl-C too), its scratch
    directory is removed; stopped, ``cfg.report`` has what was measured."""
    cfg.check()
    _stop.clear()
    _terminated.clear()
    with (
        first_signal_calls(signal.SIGINT, _stop_on),
        first_signal_calls(signal.SIGTERM, _stop_on, again=_exit_now),
        first_signal_calls(signal.SIGHUP, _stop_on, again=_exit_now),
    ):
        return _run(cfg, cfg.report)


def _run(cfg: BenchConfig, report: dict[str, Any]) -> dict[str, Any]:
    report.clear()
    report.update(
        {
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "machine": {
                "platform": platform.platform(),
                "kernel": f"{platform.system()} {platform.release()}",
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
            "interrupted": False,
        }
    )
    try:
        return _measure(cfg, report)
    except (KeyboardInterrupt, SystemExit):
        report["interrupted"] = True
        raise


def _measure(cfg: BenchConfig, report: dict[str, Any]) -> dict[str, Any]:
    directory = tempfile.gettempdir() if cfg.directory is None else cfg.directory
    scratch = tempfile.mkdtemp(dir=directory, prefix="threadlets-bench-")
    try:
        if cfg.on_scratch is not None:
            cfg.on_scratch(scratch)
        path = make_file(scratch, cfg.size)
        _stopped()
        plan = {
            name: {} if name == "queue-depth" else _runners(name, cfg, path, scratch)
            for name in cfg.workloads
        }
        planned: list[float] = []
        for name, runners in plan.items():
            if name == "queue-depth":
                planned += [cfg.seconds] * len(_depths(cfg))
            else:
                planned += [_planned(cfg, c) for _ in range(cfg.repeats) for c in runners]
        progress = _Progress(cfg, planned)
        for index, (name, runners) in enumerate(plan.items(), 1):
            if name == "queue-depth":
                _cache(path)
                report["queue_depth"] = {"points": [], "threads_over_time": []}
                _queue_depth_sweep(
                    cfg,
                    path,
                    lambda d, i=index: progress.step("queue-depth", i, f"depth {d}", 1, 1),  # type: ignore[misc]
                    report["queue_depth"],
                )
                continue
            rounds: dict[str, list[Result]] = {}
            notes: dict[str, str] = {}
            done = False
            try:
                for r in range(cfg.repeats):
                    for cname, run in runners.items():
                        if name.startswith(("cached", "random-write")):
                            _cache(path)
                        progress.step(name, index, cname, r + 1, cfg.repeats)
                        try:
                            res = run()
                        except Skipped as e:
                            notes[cname] = str(e)
                            res = None
                        _stopped()  # (one cut short is not a figure)
                        if res is not None:
                            rounds.setdefault(cname, []).append(res)
                done = True
            finally:
                # Stopped half-way, the rounds measured so far are reported.
                if done or rounds or notes:
                    report["workloads"][name] = _summarise(WORKLOADS[name], rounds, notes)
        _stopped()  # the last measurement may have been cut short
    finally:
        with signals_deferred():  # (a second Ctrl-C half-way left files behind)
            shutil.rmtree(scratch, ignore_errors=True)
    return report


def _planned(cfg: BenchConfig, contender: str) -> float:
    """How long one measurement of ``contender`` is meant to take."""
    return max(1.0, round(cfg.seconds)) if contender.startswith("fio") else cfg.seconds


def _summarise(
    title: str, rounds: dict[str, list[Result]], notes: dict[str, str] | None = None
) -> dict[str, Any]:
    """A workload's report: its title, a row per contender measured, and
    ``notes``: why a contender planned has no row (``{}`` if none)."""
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
    left_out = {k: v for k, v in (notes or {}).items() if k not in rows}
    return {"title": title, "contenders": rows, "notes": left_out}


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
        for cname, note in w.get("notes", {}).items():
            lines.append(f"- {cname}: {note}")
        if w.get("notes"):
            lines.append("")
    if "queue_depth" in report:
        lines += ["### queue-depth: threadlets (threads only) against queue depth", ""]
        lines += ["| depth | ops/s |", "|---|---|"]
        lines += [
            f"| {p['depth']} | {p['ops_per_s']:,.0f} |" for p in report["queue_depth"]["points"]
        ]
        lines.append("")
    return "\n".join(lines)


#: Bar colours by kind of contender (the legend names them).
_KINDS = {
    "threadlets": "tab:orange",
    "Python peers": "tab:blue",
    "direct loop (blocks the event loop)": "tab:gray",
    "fio / qemu-img (C, no Python)": "tab:green",
}


def _kind(contender: str) -> str:
    if contender.startswith("threadlets"):
        return "threadlets"
    if contender == DIRECT:
        return "direct loop (blocks the event loop)"
    if contender.startswith(("fio", "qemu-img")):
        return "fio / qemu-img (C, no Python)"
    return "Python peers"


def _title(report: dict[str, Any]) -> str:
    m, c = report["machine"], report["config"]
    kernel = m.get("kernel") or m["platform"]
    return (
        f"threadlets bench, {report['date']}: {m['cpus']} cores, {kernel}, Python {m['python']}\n"
        f"bars: median ops/s of {c['repeats']} round(s) of {c['seconds']} s "
        "(linear axis from 0); whiskers: min to max of the rounds; label: share of the best"
    )


def figure(report: dict[str, Any]) -> Any:
    """The chart as a matplotlib Figure: ops/s per contender for each
    workload on a linear axis from 0, with the spread of the rounds, and
    ops/s against queue depth with the pool's thread count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    from matplotlib.ticker import StrMethodFormatter

    names = list(report["workloads"])
    heights = [0.9 + 0.32 * len(report["workloads"][n]["contenders"]) for n in names]
    if "queue_depth" in report:
        heights += [2.6, 2.2]
    heights = heights or [1.0]
    inches = sum(heights) + 1.6
    fig, axes = plt.subplots(
        len(heights),
        1,
        figsize=(11, inches),
        squeeze=False,
        gridspec_kw={"height_ratios": heights},
    )
    for ax, name in zip(axes[:, 0], names, strict=False):
        rows = sorted(
            report["workloads"][name]["contenders"].items(), key=lambda kv: kv[1]["ops_per_s"]
        )
        labels = [k for k, _ in rows]
        vals = [v["ops_per_s"] for _, v in rows]
        low = [v["ops_per_s"] - v["spread"][0] for _, v in rows]
        high = [v["spread"][1] - v["ops_per_s"] for _, v in rows]
        colors = [_KINDS[_kind(k)] for k in labels]
        ax.barh(labels, vals, color=colors, xerr=[low, high], capsize=3, ecolor="black")
        ax.set_xscale("linear")
        ax.set_xlim(0, max((v["spread"][1] for _, v in rows), default=1) * 1.18 or 1)
        for y, (_, v) in enumerate(rows):
            share = v["vs_best"]
            if share is not None:
                ax.annotate(
                    f" {v['ops_per_s']:,.0f}  ({share:.2f} of best)",
                    (v["spread"][1], y),
                    va="center",
                    fontsize=8,
                )
        ax.set_title(f"{name}: {report['workloads'][name]['title']}", loc="left", fontsize=10)
        ax.set_xlabel("ops/s")
        ax.xaxis.set_major_formatter(StrMethodFormatter("{x:,.0f}"))
        ax.tick_params(axis="y", labelsize=8)
    if "queue_depth" in report:
        ax = axes[len(names), 0]
        pts = report["queue_depth"]["points"]
        ax.plot(
            [p["depth"] for p in pts], [p["ops_per_s"] for p in pts], marker="o", color="tab:orange"
        )
        ax.set_xscale("log", base=2)
        ax.set_xticks([p["depth"] for p in pts], [str(p["depth"]) for p in pts])
        ax.set_ylim(bottom=0)
        ax.set_xlabel("queue depth (tasks, log scale)")
        ax.set_ylabel("ops/s")
        ax.yaxis.set_major_formatter(StrMethodFormatter("{x:,.0f}"))
        ax.set_title(
            "threadlets (threads only): throughput against queue depth", loc="left", fontsize=10
        )
        threads = report["queue_depth"]["threads_over_time"]
        ax = axes[len(names) + 1, 0]
        ax.plot([t["t"] for t in threads], [t["threads"] for t in threads], color="tab:gray")
        ax.set_ylim(bottom=0)
        ax.set_xlabel("seconds into the sweep")
        ax.set_ylabel("pool threads")
        ax.set_title("the elastic pool's thread count over the sweep", loc="left", fontsize=10)
    handles: list[Any] = [Patch(color=color, label=kind) for kind, color in _KINDS.items()]
    handles.append(Line2D([], [], color="black", marker="|", label="min to max of the rounds"))
    # Title and legend take the top inch, whatever the figure's height.
    fig.legend(
        handles=handles,
        loc="upper center",
        ncol=3,
        fontsize=8,
        bbox_to_anchor=(0.5, 1 - 0.1 / inches),
    )
    fig.suptitle(_title(report), fontsize=9, y=1 - 0.05 / inches, va="bottom")
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / inches))
    return fig


def plot(report: dict[str, Any], path: str) -> None:
    """Write :func:`figure` as a PNG."""
    import matplotlib.pyplot as plt

    fig = figure(report)
    try:
        fig.savefig(path, format="png", dpi=90, bbox_inches="tight")
    finally:
        plt.close(fig)
