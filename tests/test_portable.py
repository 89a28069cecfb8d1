"""Portable mode: ``THREADLETS_PORTABLE=1`` turns every Linux-only
capability off (eventfd, RWF_NOWAIT, io_uring, O_DIRECT, openat2) and the
fallbacks run instead, as on macOS or a BSD.

The variable is read once, at import, so what the mode does is observed in a
fresh interpreter started with it (and, to show that the variable is what
makes the difference, in one started without it).  The F_NOCACHE fallback of
``direct=True`` exists only on macOS: it is checked here with the two
constants swapped for a stand-in command.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import threadlets
from threadlets import asyncfile, probe

SRC = str(Path(threadlets.__file__).resolve().parent.parent)

#: Prints, as JSON, what threadlets does in this interpreter.  Written
#: against the public API (and fstat) so that it runs on any version.
OBSERVE = r"""
import asyncio, dataclasses, errno, json, os, stat, sys, threading
import threadlets
from threadlets import AioContext, RingUnavailable, probe
from threadlets.awaitable import current
from threadlets.syscalls import Syscalls

path = sys.argv[1]
out = {}
caps = getattr(probe, "capabilities", None)
out["capabilities"] = dataclasses.asdict(caps()) if caps else None
out["portable"] = probe.portable() if hasattr(probe, "portable") else None
out["O_DIRECT"], out["RWF_NOWAIT"] = probe.O_DIRECT, probe.RWF_NOWAIT
out["probe_io_uring"] = probe.probe_io_uring().reason
out["probe_nowait"] = probe.probe_nowait(os.path.dirname(path))[1]
out["probe_direct_io"] = probe.probe_direct_io(os.path.dirname(path)).reason


def is_pipe(fd):
    return stat.S_ISFIFO(os.fstat(fd).st_mode)


class Recording(Syscalls):
    def __init__(self):
        self.threads = set()

    def preadv(self, fd, buffers, offset, flags=0):
        self.threads.add(threading.get_ident())
        return os.preadv(fd, buffers, offset, flags)


fd = os.open(path, os.O_RDONLY)
with AioContext() as ctx:  # the file was just written: its pages are cached
    out["inline"] = ctx.inline
    out["notifier_is_pipe"] = is_pipe(ctx.fileno())
    out["inline_reader"] = ctx.inline_reader(fd) is not None
    bufs = [bytearray(100) for _ in range(20)]
    done = []
    reqs = [ctx.read(fd, 100 * i, b, callback=done.append) for i, b in enumerate(bufs)]
    for r in reqs:
        assert ctx.wait(r, timeout=30)
    ctx.process_completions()
    out["read_ok"] = len(done) == 20 and b"".join(bufs) == open(path, "rb").read()[:2000]
    s = ctx.stats()
    out["stats"] = {"inline": s.inline, "threaded": s.threaded, "ring": s.ring}
sc = Recording()
with AioContext(syscalls=sc) as ctx:
    r = ctx.read(fd, 0, bytearray(10))
    assert ctx.wait(r, timeout=30) and r.result() == 10
    out["preadv_in_submitter"] = threading.get_ident() in sc.threads
with AioContext(backend="auto") as ctx:
    out["auto"] = ctx.backend
before = len(os.listdir("/proc/self/fd"))
try:
    AioContext(backend="io_uring").close()
    out["io_uring"] = None
except RingUnavailable as e:
    out["io_uring"] = [e.errno, str(e)]
out["io_uring_fds_leaked"] = len(os.listdir("/proc/self/fd")) - before
os.close(fd)


async def front_end():
    async with threadlets.open(path, "rb") as f:
        data = await f.read()
    ctx = current().ctx
    res = {"backend": ctx.backend, "notifier_is_pipe": is_pipe(ctx.fileno())}
    res["read_ok"] = data == open(path, "rb").read()
    res["read_bytes_ok"] = await threadlets.read_bytes(path) == data
    res["inline"] = ctx.stats().inline
    try:
        threadlets.open(path, "rb", direct=True)
        res["direct"] = None
    except OSError as e:
        res["direct"] = [e.errno, str(e)]
    return res


out["front_end"] = asyncio.run(front_end())
print(json.dumps(out))
"""


def _env(portable: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("THREADLETS_PORTABLE", None)
    if portable is not None:
        env["THREADLETS_PORTABLE"] = portable
    env["PYTHONPATH"] = os.pathsep.join(p for p in (SRC, env.get("PYTHONPATH")) if p)
    return env


def _observe(tmp: Path, portable: str | None) -> dict[str, Any]:
    data = tmp / "data"
    data.write_bytes(bytes(range(256)) * 64)
    proc = subprocess.run(
        [sys.executable, "-c", OBSERVE, str(data)],
        env=_env(portable),
        capture_output=True,
        text=True,
        timeout=120,  # a safety net only
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


@pytest.fixture(scope="module")
def seen(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """What a process started with THREADLETS_PORTABLE=1 does."""
    return _observe(tmp_path_factory.mktemp("portable"), "1")


def test_every_linux_only_capability_is_off(seen: dict[str, Any]) -> None:
    assert seen["portable"] is True
    assert seen["capabilities"] == {
        "portable": True,
        "eventfd": False,
        "rwf_nowait": False,
        "io_uring": False,
        "o_direct": False,
        "openat2": False,
        "f_nocache": hasattr(fcntl, "F_NOCACHE"),  # not Linux-only: macOS's
    }
    assert seen["O_DIRECT"] == 0
    assert seen["RWF_NOWAIT"] == 0
    for probed in ("probe_io_uring", "probe_nowait", "probe_direct_io"):
        assert "THREADLETS_PORTABLE=1" in seen[probed], probed


def test_the_notifier_is_a_pipe(seen: dict[str, Any]) -> None:
    assert seen["notifier_is_pipe"]
    assert seen["front_end"]["notifier_is_pipe"]
    assert seen["read_ok"]  # 20 reads, each callback run once, through the pipe


def test_no_read_is_tried_inline(seen: dict[str, Any]) -> None:
    assert seen["inline"] is False
    assert seen["inline_reader"] is False
    assert seen["stats"] == {"inline": 0, "threaded": 20, "ring": 0}
    assert seen["preadv_in_submitter"] is False  # every read ran on a worker
    assert seen["front_end"]["inline"] == 0
    assert seen["front_end"]["read_ok"]
    assert seen["front_end"]["read_bytes_ok"]


def test_auto_is_threads_and_io_uring_is_refused(seen: dict[str, Any]) -> None:
    assert seen["auto"] == "threads"
    assert seen["front_end"]["backend"] == "threads"
    assert seen["io_uring"] is not None, "AioContext(backend='io_uring') was not refused"
    code, message = seen["io_uring"]
    assert code == errno.ENOSYS
    assert "io_uring is turned off by THREADLETS_PORTABLE=1" in message
    assert seen["io_uring_fds_leaked"] == 0  # the notifier made first was closed


@pytest.mark.skipif(hasattr(fcntl, "F_NOCACHE"), reason="F_NOCACHE is the fallback here")
def test_direct_open_is_refused_at_the_call(seen: dict[str, Any]) -> None:
    assert seen["front_end"]["direct"] is not None, "open(direct=True) was not refused"
    code, message = seen["front_end"]["direct"]
    assert code == errno.ENOTSUP
    assert "O_DIRECT is turned off by THREADLETS_PORTABLE=1" in message


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux's capabilities")
@pytest.mark.parametrize("value", [None, "0", ""])
def test_without_the_variable_linux_keeps_them(tmp_path: Path, value: str | None) -> None:
    seen = _observe(tmp_path, value)
    assert seen["portable"] is False
    assert seen["capabilities"]["eventfd"]
    assert seen["capabilities"]["rwf_nowait"]
    assert not seen["notifier_is_pipe"]
    assert not seen["front_end"]["notifier_is_pipe"]
    assert seen["inline"] is True
    assert seen["front_end"]["direct"] is None


def test_info_reports_portable_mode(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "threadlets.cli", "info", "--json", "--directory", str(tmp_path)],
        env=_env("1"),
        capture_output=True,
        text=True,
        timeout=120,  # a safety net only
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    facts = json.loads(proc.stdout)
    assert facts["rwf_nowait"] is False
    assert facts["o_direct"] is False
    assert facts["io_uring"] is False
    assert facts["auto_backend"] == "threads"
    for note in ("rwf_nowait_note", "o_direct_note", "io_uring_note"):
        assert "THREADLETS_PORTABLE=1" in facts[note], note


class _Fcntl:
    """The fcntl module, but for a stand-in F_NOCACHE command, which it records."""

    NOCACHE = 0x7E57

    def __init__(self) -> None:
        self.nocache: list[tuple[int, int]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(fcntl, name)

    def fcntl(self, fd: int, cmd: int, arg: int = 0) -> int:
        if cmd == self.NOCACHE:
            self.nocache.append((fd, arg))
            return 0
        return fcntl.fcntl(fd, cmd, arg)


def test_direct_without_o_direct_sets_f_nocache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As on macOS: no O_DIRECT, so the descriptor opened gets F_NOCACHE."""
    fake = _Fcntl()
    monkeypatch.setattr(asyncfile, "O_DIRECT", 0)
    monkeypatch.setattr(asyncfile, "F_NOCACHE", fake.NOCACHE)
    monkeypatch.setattr(asyncfile, "fcntl", fake)
    p = tmp_path / "f"
    p.write_bytes(b"cached no more")

    async def main() -> tuple[bytes, int]:
        async with threadlets.open(p, "rb", direct=True) as f:
            return await f.read(), f.fileno()

    data, fd = asyncio.run(main())
    assert data == b"cached no more"
    assert fake.nocache == [(fd, 1)]


def test_direct_without_o_direct_or_f_nocache_is_enotsup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where there is neither: OSError(ENOTSUP) at the call, nothing opened
    or created."""
    monkeypatch.setattr(asyncfile, "O_DIRECT", 0)
    monkeypatch.setattr(asyncfile, "F_NOCACHE", 0)
    p = tmp_path / "new"
    with pytest.raises(OSError) as e:
        threadlets.open(p, "wb", direct=True)
    assert e.value.errno == errno.ENOTSUP
    assert "O_DIRECT" in str(e.value)
    assert "F_NOCACHE" in str(e.value)
    assert not p.exists()


def test_this_process_capabilities_match_the_mode() -> None:
    """The suite itself: in portable mode nothing Linux-only is on."""
    caps = probe.capabilities()
    assert caps.portable == probe.portable()
    assert caps.portable == (os.environ.get("THREADLETS_PORTABLE", "") not in ("", "0"))
    if caps.portable:
        assert not caps.eventfd
        assert not caps.rwf_nowait
        assert not caps.io_uring
        assert not caps.o_direct
        assert probe.O_DIRECT == 0
        assert probe.RWF_NOWAIT == 0
