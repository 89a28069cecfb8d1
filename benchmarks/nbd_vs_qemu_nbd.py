"""The threadlets NBD server beside qemu-nbd and nbdkit, one client for all.

Each server exports the same 256 MiB raw image (on /var/tmp, a disk file
system, where /tmp may be tmpfs) on a loopback port.  Clients, each run
against every server: ``fio --ioengine=nbd`` (4 KiB random reads, then
random writes, queue depth 32, one job) where fio has the nbd engine, and
``qemu-img bench`` on an ``nbd://`` URI (4 KiB, depth 32, a strided
offset pattern; its time includes connecting).  Two image modes:

* cached: the image in the page cache.  ``threadlets nbd serve``,
  ``qemu-nbd --cache=writeback``, ``nbdkit file``.
* direct: O_DIRECT.  ``threadlets nbd serve --direct``,
  ``qemu-nbd --cache=none``, and ``nbdkit file cache=none`` (nbdkit's file
  plugin has no O_DIRECT: it only keeps its pages out of the cache).

Servers: ``threadlets nbd serve`` (threads and io_uring backends),
``qemu-nbd --aio=threads`` and ``--aio=io_uring``, nbdkit.  Reported: ops/s
(median of the rounds) and the ratio to ``qemu-nbd --aio=threads`` in the
same client and mode.

    python benchmarks/nbd_vs_qemu_nbd.py [--seconds 5] [--repeats 3] [--size BYTES]
        [--modes cached,direct] [--clients fio,qemu-img]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator

BLOCK = 4096
DEPTH = 32


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)  # a benchmark harness, not a test: polling is fine
    raise RuntimeError("server did not start listening")


MODES = ("cached", "direct")
CLIENTS = ("fio", "qemu-img")


def servers(image: str, direct: bool) -> dict[str, list[str] | None]:
    py = [sys.executable, "-m", "threadlets.cli", "nbd", "serve", image]
    py += ["--direct"] if direct else []
    py += ["--bind"]
    qemu = shutil.which("qemu-nbd")
    nbdkit = shutil.which("nbdkit")
    cache = "none" if direct else "writeback"
    qemu_args = ["-f", "raw", f"--cache={cache}", "-t", "-b", "127.0.0.1", "-x", "", "-p"]
    kit_args = ["cache=none"] if direct else []
    return {
        "threadlets (threads)": [*py, "127.0.0.1:{port}", "--backend", "threads"],
        "threadlets (io_uring)": [*py, "127.0.0.1:{port}", "--backend", "io_uring"],
        "qemu-nbd --aio=threads": (
            [qemu, "--aio=threads", *qemu_args, "{port}", image] if qemu else None
        ),
        "qemu-nbd --aio=io_uring": (
            [qemu, "--aio=io_uring", *qemu_args, "{port}", image] if qemu else None
        ),
        "nbdkit file": (
            [nbdkit, "-f", "-i", "127.0.0.1", "-p", "{port}", "file", image, *kit_args]
            if nbdkit
            else None
        ),
    }


@contextlib.contextmanager
def running(cmd: list[str]) -> Iterator[int]:
    port = free_port()
    argv = [a.replace("{port}", str(port)) for a in cmd]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_listening(port, proc)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def fio_has_nbd() -> bool:
    fio = shutil.which("fio")
    if fio is None:
        return False
    out = subprocess.run([fio, "--enghelp=nbd"], check=False, capture_output=True, text=True)
    return out.returncode == 0 and "uri" in out.stdout


def fio_iops(port: int, rw: str, seconds: float, size: int) -> float:
    out = subprocess.run(
        [
            "fio",
            "--name=nbd",
            "--ioengine=nbd",
            f"--uri=nbd://127.0.0.1:{port}/",
            f"--rw={rw}",
            f"--bs={BLOCK}",
            f"--iodepth={DEPTH}",
            f"--size={size}",
            "--time_based",
            f"--runtime={seconds}",
            "--randrepeat=0",
            "--output-format=json",
        ],
        cwd=tempfile.gettempdir(),  # anything fio leaves behind goes there
        capture_output=True,
        text=True,
        check=True,
    )
    job = json.loads(out.stdout[out.stdout.index("{") :])["jobs"][0]
    side = "read" if "read" in rw else "write"
    return float(job[side]["iops"])


def qemu_bench_iops(port: int, rw: str, seconds: float, size: int) -> float:
    """qemu-img bench runs a count of requests, not a time: a short first
    run measures the rate, the second runs about ``seconds`` at it."""

    def bench(count: int) -> float:
        argv = ["qemu-img", "bench", "-f", "raw", "-d", str(DEPTH), "-s", str(BLOCK)]
        argv += ["-c", str(count), "-S", str(BLOCK * 7919 % size)]
        if "write" in rw:
            argv.append("-w")
        t0 = time.perf_counter()
        subprocess.run([*argv, f"nbd://127.0.0.1:{port}/"], capture_output=True, check=True)
        return count / (time.perf_counter() - t0)

    rate = bench(4 * DEPTH)
    return bench(max(4 * DEPTH, int(rate * seconds)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--size", type=int, default=256 * 1024 * 1024)
    ap.add_argument("--modes", default=",".join(MODES), help="cached,direct")
    ap.add_argument("--clients", default=",".join(CLIENTS), help="fio,qemu-img")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    wanted = [c for c in args.clients.split(",") if c]
    if set(modes) - set(MODES) or set(wanted) - set(CLIENTS) or not modes or not wanted:
        ap.error(f"--modes from {','.join(MODES)}, --clients from {','.join(CLIENTS)}")
    clients: dict[str, Callable[[int, str, float, int], float]] = {}
    if "fio" in wanted and fio_has_nbd():
        clients["fio --ioengine=nbd"] = fio_iops
    if "qemu-img" in wanted and shutil.which("qemu-img"):
        clients["qemu-img bench"] = qemu_bench_iops
    if not clients:
        ap.error("none of the clients asked for is installed (fio with its nbd engine, qemu-img)")
    # (client, mode) -> server -> rw -> ops/s
    results: dict[str, dict[str, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        image = os.path.join(tmp, "image.raw")
        with open(image, "wb") as f:
            for _ in range(max(1, args.size // (1 << 20))):
                f.write(os.urandom(1 << 20))
        size = os.path.getsize(image)
        for mode in modes:
            if mode == "cached":
                with open(image, "rb") as f:  # into the page cache
                    while f.read(1 << 20):
                        pass
            table = servers(image, direct=mode == "direct")
            for client_name, client in clients.items():
                rounds: dict[str, dict[str, list[float]]] = {name: {} for name in table}
                for _ in range(args.repeats):
                    for name, cmd in table.items():
                        if cmd is None:
                            continue
                        for rw in ("randread", "randwrite"):
                            with running(cmd) as port:
                                iops = client(port, rw, args.seconds, size)
                            rounds[name].setdefault(rw, []).append(iops)
                results[f"{client_name}, {mode}"] = {
                    name: {rw: statistics.median(v) for rw, v in per.items()}
                    for name, per in rounds.items()
                    if per
                }
    if args.json:
        print(json.dumps({"block": BLOCK, "depth": DEPTH, "results": results}, indent=2))
        return 0
    print(f"{BLOCK // 1024} KiB random, depth {DEPTH}; ratio to qemu-nbd --aio=threads")
    for key, table_results in results.items():
        print(f"\n{key}")
        print(f"{'server':26} {'read ops/s':>11} {'ratio':>6} {'write ops/s':>12} {'ratio':>6}")
        base = table_results.get("qemu-nbd --aio=threads")
        for name, r in table_results.items():
            cells = []
            for rw in ("randread", "randwrite"):
                ratio = f"{r[rw] / base[rw]:.2f}x" if base else "-"
                cells.append((r[rw], ratio))
            (rd, rr), (wr, wrr) = cells
            print(f"{name:26} {rd:11.0f} {rr:>6} {wr:12.0f} {wrr:>6}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
