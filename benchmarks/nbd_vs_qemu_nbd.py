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
        [--modes cached,direct] [--clients fio,qemu-img] [--directory /var/tmp]
        [--compare NAME=SRC ...] [--servers SUBSTRING,...]

``--compare NAME=SRC`` adds the threadlets servers of another source tree
(run with ``PYTHONPATH=SRC``), named ``... [NAME]``, measured in the same
rounds: before/after figures from one run.  Each cell shows the median and,
with several rounds, the range of the rounds.
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


#: A server's command line, and the PYTHONPATH it runs with (None: inherited).
Server = tuple[list[str], str | None]


def servers(
    image: str, direct: bool, compare: dict[str, str] | None = None
) -> dict[str, Server | None]:
    py = [sys.executable, "-m", "threadlets.cli", "nbd", "serve", image]
    py += ["--direct"] if direct else []
    py += ["--bind"]
    qemu = shutil.which("qemu-nbd")
    nbdkit = shutil.which("nbdkit")
    cache = "none" if direct else "writeback"
    qemu_args = ["-f", "raw", f"--cache={cache}", "-t", "-b", "127.0.0.1", "-x", "", "-p"]
    kit_args = ["cache=none"] if direct else []
    table: dict[str, Server | None] = {}
    for label, src in [("", None), *(compare or {}).items()]:
        suffix = f" [{label}]" if label else ""
        for backend in ("threads", "io_uring"):
            cmd = [*py, "127.0.0.1:{port}", "--backend", backend]
            table[f"threadlets ({backend}){suffix}"] = (cmd, src)
    table["qemu-nbd --aio=threads"] = (
        ([qemu, "--aio=threads", *qemu_args, "{port}", image], None) if qemu else None
    )
    table["qemu-nbd --aio=io_uring"] = (
        ([qemu, "--aio=io_uring", *qemu_args, "{port}", image], None) if qemu else None
    )
    table["nbdkit file"] = (
        ([nbdkit, "-f", "-i", "127.0.0.1", "-p", "{port}", "file", image, *kit_args], None)
        if nbdkit
        else None
    )
    return table


@contextlib.contextmanager
def running(server: Server) -> Iterator[int]:
    cmd, src = server
    port = free_port()
    argv = [a.replace("{port}", str(port)) for a in cmd]
    env = None if src is None else {**os.environ, "PYTHONPATH": src}
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
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
    ap.add_argument("--directory", default="/var/tmp", help="where the image goes")
    ap.add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="NAME=SRC",
        help="also the threadlets servers of the source tree SRC, named NAME",
    )
    ap.add_argument("--servers", default="", help="only servers whose name has one of these")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    compare: dict[str, str] = {}
    for item in args.compare:
        label, sep, src = item.partition("=")
        if not sep or not label or not src:
            ap.error(f"--compare wants NAME=SRC, not {item!r}")
        compare[label] = os.path.abspath(src)
    only = [x for x in args.servers.split(",") if x]
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
    spans: dict[str, dict[str, dict[str, tuple[float, float]]]] = {}
    with tempfile.TemporaryDirectory(dir=args.directory) as tmp:
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
            table = servers(image, direct=mode == "direct", compare=compare)
            table = {
                name: cmd
                for name, cmd in table.items()
                if not only or any(x in name for x in only) or name == "qemu-nbd --aio=threads"
            }
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
                key = f"{client_name}, {mode}"
                results[key] = {
                    name: {rw: statistics.median(v) for rw, v in per.items()}
                    for name, per in rounds.items()
                    if per
                }
                spans[key] = {
                    name: {rw: (min(v), max(v)) for rw, v in per.items()}
                    for name, per in rounds.items()
                    if per
                }
    if args.json:
        out = {"block": BLOCK, "depth": DEPTH, "results": results, "ranges": spans}
        print(json.dumps(out, indent=2))
        return 0
    print(
        f"{BLOCK // 1024} KiB random, depth {DEPTH}; ops/s median [range of "
        f"{args.repeats} rounds]; ratio of medians to qemu-nbd --aio=threads"
    )
    width = max(26, *(len(n) for t in results.values() for n in t))
    for key, table_results in results.items():
        print(f"\n{key}")
        print(
            f"{'server':{width}} {'read ops/s':>22} {'ratio':>6} {'write ops/s':>22} {'ratio':>6}"
        )
        base = table_results.get("qemu-nbd --aio=threads")
        for name, r in table_results.items():
            line = f"{name:{width}}"
            for rw in ("randread", "randwrite"):
                lo, hi = spans[key][name][rw]
                ratio = f"{r[rw] / base[rw]:.2f}x" if base else "-"
                line += f" {r[rw]:7.0f} [{lo:6.0f}-{hi:6.0f}] {ratio:>6}"
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
