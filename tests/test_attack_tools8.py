"""The command line as users' shells run it: closed standard descriptors
(``2>&-``), and SIGHUP (the terminal closed) during bench and nbd serve."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from threadlets import cli

from .conftest import interrupt_cli_at

SRC = str(Path(cli.__file__).resolve().parent.parent)


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": SRC, **extra}


def _closing(*fds: int) -> list[str]:
    """A command line that runs the CLI with ``fds`` closed, as ``>&-`` does."""
    closes = " ".join(f"{fd}>&-" for fd in fds)
    return ["sh", "-c", f'exec "$@" {closes}', "sh", sys.executable, "-m", "threadlets.cli"]


# -- closed standard descriptors --------------------------------------------------------------


def test_a_closed_stderr_keeps_the_json_on_stdout_clean(tmp_path: Path) -> None:
    # Python sets sys.stderr to None; print(file=None) wrote the "started on"
    # line to stdout, in front of the JSON.
    proc = subprocess.run(
        [*_closing(2), "stress", "--ops", "50", "--size", "64K", "--json"],
        stdout=subprocess.PIPE,
        text=True,
        env=_env(TMPDIR=str(tmp_path)),
        cwd=tmp_path,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0
    assert json.loads(proc.stdout)["ok"] is True
    assert os.listdir(tmp_path) == []


def test_a_closed_standard_fd_is_never_the_target(tmp_path: Path) -> None:
    # With fd 2 closed the stress target was opened as fd 2: any write to
    # "stderr" (C code, a fatal error) would land in the file under test.
    probe = (
        "import os, sys\n"
        "from threadlets import cli\n"
        "cli._open_standard_fds()\n"
        "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
        "print(fd, sys.stderr is not None, sys.stdin is not None, file=sys.stdout)\n"
    )
    target = tmp_path / "target"
    proc = subprocess.run(
        ["sh", "-c", 'exec "$@" <&- 2>&-', "sh", sys.executable, "-c", probe, str(target)],
        stdout=subprocess.PIPE,
        text=True,
        env=_env(),
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0
    fd, has_stderr, has_stdin = proc.stdout.split()
    assert int(fd) > 2
    assert has_stderr == has_stdin == "True"


@pytest.mark.parametrize("fds", [(0,), (1,), (0, 1, 2)], ids=str)
def test_closed_standard_fds_are_no_traceback(tmp_path: Path, fds: tuple[int, ...]) -> None:
    proc = subprocess.run(
        [*_closing(*fds), "stress", "--ops", "50", "--size", "64K"],
        capture_output=2 not in fds,
        text=True,
        env=_env(TMPDIR=str(tmp_path)),
        cwd=tmp_path,
        timeout=60,
        check=False,
    )
    # A closed stdout: the run finishes, but its report is lost -- exit 1,
    # never 0 (tests/test_attack_left9.py).
    assert proc.returncode == (1 if 1 in fds else 0), proc.stderr
    assert "Traceback" not in (proc.stderr or "")
    assert os.listdir(tmp_path) == []


# -- SIGHUP: the terminal running the tool closed ---------------------------------------------

needs_sighup = pytest.mark.skipif(
    signal.getsignal(signal.SIGHUP) is signal.SIG_IGN, reason="SIGHUP ignored here (nohup)"
)


@needs_sighup
@pytest.mark.parametrize("marker", ["scratch files in", "workload 1/1 small-files"])
def test_sighup_during_bench_removes_the_scratch_files(tmp_path: Path, marker: str) -> None:
    # SIGHUP's default action killed bench at once: its scratch directory stayed.
    tmp, cwd = tmp_path / "tmp", tmp_path / "cwd"
    tmp.mkdir()
    cwd.mkdir()
    args = ["bench", "--quick", "--workload", "small-files"]
    status, _, err = interrupt_cli_at(
        args, marker, cwd, _env(TMPDIR=str(tmp)), timeout=60, sig=signal.SIGHUP
    )
    assert "Traceback" not in err
    assert os.listdir(tmp) == []
    assert os.listdir(cwd) == []
    assert status == 128 + signal.SIGHUP, err


@needs_sighup
def test_sighup_stops_nbd_serve_and_removes_its_socket(tmp_path: Path) -> None:
    # SIGHUP's default action killed the server: the unix socket stayed (the
    # next serve on it refused: "exists"), the image unflushed.
    image = tmp_path / "img"
    image.write_bytes(bytes(65536))
    sock = tmp_path / "s"
    status, _, err = interrupt_cli_at(
        ["nbd", "serve", str(image), "--socket", str(sock)],
        "Ctrl-C stops",
        tmp_path,
        _env(),
        timeout=60,
        sig=signal.SIGHUP,
    )
    assert "Traceback" not in err
    assert status == 0, err
    assert not sock.exists()


def test_python_dash_m_threadlets_is_the_command_line(tmp_path: Path) -> None:
    # (There was no threadlets/__main__.py: "No module named threadlets.__main__".)
    proc = subprocess.run(
        [sys.executable, "-m", "threadlets", "--version"],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("threadlets ")
