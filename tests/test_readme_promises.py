"""Every promise in the README is a test: the ones no other test checked.

Each test cites the sentence it checks (README.md or a page of docs/).
The code blocks of the README and the docs run here as shown, each in a
fresh interpreter with a scratch directory as its working directory, on
both engine backends and every event loop concerned; the command lines
are checked against the parser.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import inspect
import json
import os
import re
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import threadlets
from threadlets import AioContext, CancelResult, FaultInjector, ThreadletQueue
from threadlets.cli import build_parser, main, parse_duration, parse_size
from threadlets.stress import DEFAULT_SIZE

from .conftest import HAVE_RING, Gate, wait_until

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
#: The pages whose promises are checked here (benchmarks.md is a log of
#: measurements, bench.md a generated table).
DOCS = sorted(
    p for p in (ROOT / "docs").glob("*.md") if p.name not in ("benchmarks.md", "bench.md")
)

try:
    import uvloop  # noqa: F401

    HAVE_UVLOOP = True
except ImportError:  # pragma: no cover
    HAVE_UVLOOP = False


def _blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", text, re.S | re.M)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    src = str(Path(threadlets.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    return env


# -- the two commands at the top of the README ------------------------------------------------


# README: "python3 -m venv .venv && .venv/bin/pip install -q -e '.[tools]' &&
# .venv/bin/threadlets stress --size 64M --duration 10s" and "... '.[test]' &&
# .venv/bin/python -m pytest"; "Linux, Python 3.11 or newer".  (Both were
# run on a fresh clone by hand; this checks what they rely on.)
def test_top_commands_name_real_extras_a_script_and_valid_flags() -> None:
    first = _blocks(README, "sh")[0].splitlines()
    assert first == [
        "python3 -m venv .venv && .venv/bin/pip install -q -e '.[tools]' && "
        ".venv/bin/threadlets stress --size 64M --duration 10s",
        "python3 -m venv .venv && .venv/bin/pip install -q -e '.[test]' && "
        ".venv/bin/python -m pytest",
    ]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["requires-python"] == ">=3.11"
    assert project["scripts"]["threadlets"] == "threadlets.cli:main"
    extras = project["optional-dependencies"]
    assert any(d.startswith("rich") for d in extras["tools"])  # the tables stress draws
    for tool in ("pytest", "ruff", "mypy", "mkdocs"):  # "including ruff and mypy --strict"
        assert any(d.startswith(tool) for d in extras["test"]), tool
    args = build_parser().parse_args(["stress", "--size", "64M", "--duration", "10s"])
    assert (args.size, args.duration) == (64 << 20, 10.0)


# README: "a 10-second `threadlets stress` on a temporary file, which hammers it
# with concurrent reads, writes, vectored I/O, flushes, discards, write-zeroes,
# truncates and cancels ... (exit status 1 on any mismatch)".  The default mix
# has every one of them, and the temporary file is gone afterwards.
def test_default_stress_does_every_operation_on_a_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    assert main(["stress", "--size", "1M", "--ops", "1500", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is True
    kinds = set(report["by_kind"])
    assert {"read", "readv", "write", "writev", "flush", "discard", "write_zeroes"} <= kinds
    assert "truncate" in kinds
    assert sum(report["cancels"].values()) > 0
    assert list(tmp_path.iterdir()) == []


# README: "A mismatch prints the offset, the expected and found bytes, the
# operations on that range and the seed, and exits 1."  (The JSON form is
# checked in test_stress.py; this is the text a person reads.)
def test_a_mismatch_prints_offset_bytes_operations_and_seed(tmp_path: Path) -> None:
    args = [sys.executable, "-m", "threadlets.cli", "stress", str(tmp_path / "f")]
    args += ["--size", "1M", "--ops", "1200", "--seed", "5", "--corrupt-after", "800"]

    def stress(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*args, *extra], capture_output=True, text=True, timeout=120, check=False, env=_env()
        )

    proc = stress()
    assert proc.returncode == 1, proc.stdout + proc.stderr
    out = proc.stdout + proc.stderr
    report = json.loads(stress("--force", "--json").stdout)
    (m,) = report["mismatches"]
    assert f"at offset {m['offset']} (seed 5)" in out
    assert bytes.fromhex(m["expected"]).hex(" ")[:23] in out
    assert bytes.fromhex(m["found"]).hex(" ")[:23] in out
    assert m["history"], "the report names the operations on the range"
    assert all(str(h) in out for h in m["history"][-2:])


# -- the command lines: docs/cli.md and the README's Tools section ----------------------------


def _subparsers(
    parser: argparse.ArgumentParser, prefix: str = "threadlets"
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield prefix, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _subparsers(sub, f"{prefix} {name}")


# docs/cli.md: "The usage texts below are the parser's own `--help` output".
@pytest.mark.parametrize("command", ["", "info", "stress", "bench", "nbd", "nbd serve"])
def test_cli_page_usage_texts_are_the_parsers_help(command: str) -> None:
    env = dict(_env(), COLUMNS="80")
    got = subprocess.run(
        [sys.executable, "-m", "threadlets.cli", *command.split(), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env=env,
    ).stdout
    got = got.replace("python -m threadlets.cli", "threadlets").replace("cli.py", "threadlets")
    page = "\n".join(_blocks((ROOT / "docs" / "cli.md").read_text(), "text"))
    assert got.strip() in page, f"docs/cli.md does not show `threadlets {command} --help`:\n{got}"


def _synopsis(text: str, command: str) -> str:
    """The README's `threadlets COMMAND [...]` synopsis (one code span)."""
    flat = re.sub(r"\s*\n\s*", " ", text)
    m = re.search(rf"`threadlets {command} ([^`]*)`", flat)
    assert m, f"no synopsis of threadlets {command} in the README"
    return m.group(1)


def _option(parser: argparse.ArgumentParser, flag: str) -> argparse.Action:
    for action in parser._actions:
        if flag in action.option_strings:
            return action
    raise AssertionError(f"{flag} is in the README but not in the parser")


def _command(name: str) -> argparse.ArgumentParser:
    return dict(_subparsers(build_parser()))[f"threadlets {name}"]


# README, Tools: "`threadlets stress [PATH] [--size 256M] [--duration 20s | --ops N]
# [--concurrency 32] [--block-size 4K] [--mix read=40,write=30,...] [--direct]
# [--backend threads|io_uring|auto] [--seed S] [--cancel-rate 0.05]
# [--inject-faults RATE] [--force] [--fio-pattern] [--json]`"; "`threadlets
# bench [--workload NAME]... [--quick] [--json] [--plot FILE.png]`"; NBD:
# "`threadlets nbd serve IMAGE [--bind 127.0.0.1:10809 | --socket PATH]
# [--export-name NAME] [--read-only] [--direct] [--backend auto|threads|io_uring]
# [--max-connections N]`".  Every flag is the parser's; a value that reads as
# a default is the default; a list of choices is the parser's list.
@pytest.mark.parametrize("command", ["stress", "bench", "nbd serve"])
def test_readme_synopses_are_the_parsers(command: str) -> None:
    synopsis = _synopsis(README, command)
    parser = _command(command)
    convert: dict[str, Any] = {
        "--size": parse_size,
        "--duration": parse_duration,
        "--concurrency": int,
        "--block-size": parse_size,
        "--cancel-rate": float,
        "--bind": str,
    }
    seen = set()
    for flag, value in re.findall(r"(--[a-z-]+)(?: ([^\s\]|]+))?", synopsis):
        action = _option(parser, flag)
        seen.add(flag)
        if "|" in (value or "") or flag == "--backend":
            listed = re.search(rf"{flag} ([a-z_|]+)", synopsis)
            assert listed, flag
            assert set(listed.group(1).split("|")) == set(action.choices or ()), flag
        elif flag in convert and value:
            default = action.default
            if flag == "--size":  # None: resolved by the stress tool (a file's default)
                assert default is None
                default = DEFAULT_SIZE
            assert convert[flag](value) == default, (flag, value, default)
    # "[--workload NAME ...]" would say one option takes several values.
    for flag in re.findall(r"\[(--[a-z-]+) [^\]|]* \.\.\.\]", synopsis):
        assert _option(parser, flag).nargs in ("+", "*"), f"{flag} takes one value"
    # And the options a reader needs are all there (only the self-test's
    # --corrupt-after and the measuring knobs are left to docs/cli.md).
    left = {
        o for a in parser._actions for o in a.option_strings if o.startswith("--") and o != "--help"
    } - seen
    assert left <= {"--corrupt-after", "--seconds", "--repeats", "--directory", "--markdown"}


# README: "`[--workload NAME]...`" (repeatable) and the NBD defaults:
# "Localhost by default".
def test_repeated_workloads_parse_and_nbd_listens_on_localhost() -> None:
    args = build_parser().parse_args(
        ["bench", "--workload", "cached-read-qd1", "--workload", "small-files", "--quick"]
    )
    assert args.workload == ["cached-read-qd1", "small-files"]
    serve = build_parser().parse_args(["nbd", "serve", str(ROOT / "README.md")])
    assert serve.bind.startswith("127.0.0.1:")
    assert serve.max_connections == 16  # docs/cli.md: "clients at once (default 16)"


# README: "`threadlets info`: what this machine supports (RWF_NOWAIT, O_DIRECT
# alignment, io_uring, pool limits)"; semantics: "Default max 64".
def test_info_reports_what_the_readme_lists(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["info", "--json", "--directory", str(tmp_path)]) == 0
    facts = json.loads(capsys.readouterr().out)
    for key in ("rwf_nowait", "o_direct", "o_direct_request_alignment", "io_uring"):
        assert key in facts, key
    assert facts["default_max_threads"] == ThreadletQueue().stats().max_threads == 64


# -- speed figures point to docs/benchmarks.md ------------------------------------------------

_TIMES = "x\u00d7"  # an x, or the multiplication sign
_SPEED = re.compile(r"~?(\d+(?:\.\d+)?)\s*[x\N{MULTIPLICATION SIGN}] (?:faster|both)")


# Task rule: the README promises no speed figure without pointing to
# docs/benchmarks.md, where the figure is, with its command.
def test_readme_speed_figures_point_to_the_benchmarks_page() -> None:
    bench = (ROOT / "docs" / "benchmarks.md").read_text()
    paragraphs = re.split(r"\n\s*\n", README)
    found = 0
    for para in paragraphs:
        for figure in _SPEED.findall(para):
            found += 1
            assert "docs/benchmarks.md" in para, f"{figure}x without docs/benchmarks.md:\n{para}"
            assert re.search(rf"\b{re.escape(figure)}\s*[{_TIMES}]", bench), (
                f"{figure}x not in benchmarks"
            )
    assert found >= 3  # 95x, 54x, ~50x


# -- names the README and the docs rely on -----------------------------------------------------


# README, Layout: the module table; and the names the text uses.
def test_layout_modules_and_named_api_exist() -> None:
    import importlib

    modules = re.findall(r"^\| `(threadlets[.\w]*)`", README, re.M)
    modules += ["threadlets.stress", "threadlets.bench", "threadlets.cli", "threadlets.nbd.proto"]
    for name in modules:
        importlib.import_module(name)
    for name in [
        "ThreadletQueue",
        "submit",
        "CancelResult",
        "AioContext",
        "AioRequest",
        "aligned_buffer",
        "RingUnavailable",
        "FaultInjector",
        "open",
        "wrap",
        "read_bytes",
        "read_text",
        "write_bytes",
        "write_text",
        "Path",
    ]:
        assert hasattr(threadlets, name), name
    assert [r.name for r in CancelResult] == ["CANCELED", "NOTCANCELED", "ALLDONE"]
    from threadlets import awaitable, posix, probe

    assert callable(probe.capabilities)
    assert callable(probe.portable)
    assert callable(awaitable.configure)
    # README: "A residual window is documented in `threadlets.engine`."
    from threadlets import engine

    assert engine.__doc__
    assert "One window is left" in engine.__doc__
    # README, POSIX AIO: the functions, the runtime object and the context switch.
    for name in [
        "aiocb",
        "sigevent",
        "aio_read",
        "aio_write",
        "aio_fsync",
        "aio_error",
        "aio_return",
        "aio_cancel",
        "aio_suspend",
        "lio_listio",
        "PosixAio",
        "set_context",
        "use_context",
    ]:
        assert hasattr(posix, name), name


# docs/aiofiles-migration.md: "The module layout and names are aiofiles': ..."
def test_aiofiles_names_listed_in_the_migration_page_exist() -> None:
    from threadlets import aiofiles

    page = (ROOT / "docs" / "aiofiles-migration.md").read_text()
    listing = page[page.index("The module layout") : page.index("The file objects wrap")]
    os_part = listing[listing.index("`os` (") : listing.index("`ospath` (")]
    ospath_part = listing[listing.index("`ospath` (") : listing.index("`tempfile` (")]
    temp_part = listing[listing.index("`tempfile` (") : listing.index("`stdin`")]
    names = lambda part: re.findall(r"`(\w+)`", part)[1:]  # noqa: E731
    for name in names(os_part):
        assert hasattr(aiofiles.os, name), f"aiofiles.os.{name}"
    assert hasattr(aiofiles.os, "path")
    for name in names(ospath_part):
        assert hasattr(aiofiles.ospath, name), f"aiofiles.ospath.{name}"
    for name in names(temp_part):
        assert hasattr(aiofiles.tempfile, name), f"aiofiles.tempfile.{name}"
    for name in ("open", "stdin", "stdout", "stderr", "stdin_bytes", "stdout_bytes"):
        assert hasattr(aiofiles, name), name
    assert callable(aiofiles.threadpool.open)
    assert callable(aiofiles.threadpool.wrap)


# -- every code block runs as shown ------------------------------------------------------------

_LOOPS = {
    "asyncio": "import asyncio\nasyncio.run(main())\n",
    "uvloop": "import uvloop\nuvloop.run(main())\n",
    "trio": "import trio\ntrio.run(main)\n",
    "anyio-asyncio": "import anyio\nanyio.run(main, backend='asyncio')\n",
    "anyio-trio": "import anyio\nanyio.run(main, backend='trio')\n",
}


def _python_blocks() -> list[Any]:
    out = []
    for page in [ROOT / "README.md", *DOCS]:
        blocks = _blocks(page.read_text(), "python")
        for i, code in enumerate(blocks):
            # The one-import block (only imports) is run as part of the next.
            if all(line.startswith(("import ", "from ")) for line in code.strip().splitlines()):
                continue
            script = code
            if page.name == "aiofiles-migration.md":
                # "Everything else stays as it was": the body of a coroutine,
                # after the block of imports above it.
                body = "".join("    " + line + "\n" for line in code.splitlines())
                script = blocks[0] + "\nasync def main():\n" + body
            out.append(pytest.param(script, id=f"{page.name}-{i}"))
    return out


def _setup(where: Path) -> None:
    """The files the examples open: disk.img (2 MiB) and data.bin (lines)."""
    (where / "disk.img").write_bytes(bytes(range(256)) * 8192)
    (where / "data.bin").write_bytes(b"".join(b"line %d\n" % i for i in range(2000)))


# Task rule: "every code block in README/docs must run as shown".  The queue
# example prints 6 and a definite cancel answer; the engine example's read,
# write_zeroes and discard land; async examples run on every loop.
@pytest.mark.parametrize("engine", ["threads", "io_uring"])
@pytest.mark.parametrize("code", _python_blocks())
def test_code_block_runs(code: str, engine: str, tmp_path: Path) -> None:
    if engine == "io_uring" and not HAVE_RING:
        pytest.skip("no io_uring here")
    is_async = "async def main" in code
    prelude = (
        f"import threadlets.awaitable\nthreadlets.awaitable.configure(backend={engine!r})\n"
        if is_async
        else ""
    )
    if not is_async:
        code = code.replace("AioContext()", f"AioContext(backend={engine!r})")
    loops = [n for n in _LOOPS if n != "uvloop" or HAVE_UVLOOP] if is_async else [""]
    for loop in loops:
        _setup(tmp_path)
        script = prelude + code + "\n" + (_LOOPS[loop] if loop else "")
        proc = subprocess.run(
            [sys.executable, "-W", "error::ResourceWarning", "-c", script],
            cwd=tmp_path,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert proc.returncode == 0, f"{loop}:\n{script}\n{proc.stdout}{proc.stderr}"
        assert "Warning" not in proc.stderr, proc.stderr
        if "print(t.result(timeout=5))        # 6" in code:
            # (The callback prints from a worker: each piece of its print --
            # "done:", " ", the state, "\n" -- may land between two pieces of
            # the main thread's, even glued to a word: "DONE6".  So its
            # pieces are taken out first, and the rest read as words.)
            assert "done:" in proc.stdout
            assert "ThreadletState.DONE" in proc.stdout
            rest = proc.stdout.replace("done:", " ", 1).replace("ThreadletState.DONE", " ", 1)
            words = rest.split()
            assert "6" in words
            assert {"CANCELED", "NOTCANCELED", "ALLDONE"} & set(words)
        if "print(w.cancel().name)" in code:
            assert {"CANCELED", "NOTCANCELED", "ALLDONE"} & set(proc.stdout.split())
            assert "read 4096" in proc.stdout
            data = (tmp_path / "disk.img").read_bytes()
            if "write_zeroes" in code:
                assert data[:512] == bytes(512)  # write_zeroes(fd, 0, 512)
            if "discard" in code:
                assert data[1 << 20 : 2 << 20] == bytes(1 << 20)  # the punched hole
        for p in tmp_path.iterdir():
            if p.is_dir():
                continue
            p.unlink()


# README, Documentation / docs/index.md: every `threadlets ...` command shown
# in a shell block parses.
def test_shell_blocks_use_real_commands() -> None:
    shown = 0
    for page in [ROOT / "README.md", *DOCS]:
        for block in _blocks(page.read_text(), "sh"):
            for m in re.finditer(r"threadlets ((?:stress|bench|info|nbd)[^&\n]*)", block):
                build_parser().parse_args(m.group(1).split())
                shown += 1
            if "mkdocs build --strict" in block:
                assert ".[test]" in block
    assert shown >= 2


# -- threadlet queues --------------------------------------------------------------------------


# README: "workers above `min_threads` retire after `idle_timeout` seconds
# without work; `min_threads` are started at once and kept warm."
def test_min_threads_start_at_once_and_stay() -> None:
    with ThreadletQueue(min_threads=2, max_threads=4, idle_timeout=0.01) as q:
        assert q.stats().threads == 2
        # (A worker counts as idle only once it waits: the new warm ones first.)
        wait_until(lambda: q.stats().idle == 2)
        gates = [Gate() for _ in range(3)]
        for gate in gates:
            q.submit(gate)
            assert gate.started.wait(10)
        assert q.stats().threads == 3
        for gate in gates:
            gate.release.set()
        assert q.drain(10)
        wait_until(lambda: q.stats().retired == 1)  # the one above min_threads
        assert q.stats().threads == 2  # and no more: the warm ones stay
        q.submit(sum, [1]).wait()
        assert q.stats().spawned == 3


# README: "add_done_callback(fn) runs once ... at once if it already finished.
# Otherwise it runs in the thread that finished it (a worker, or the one that
# cancelled it)."
def test_a_callback_runs_in_the_thread_that_finished_the_threadlet() -> None:
    with ThreadletQueue(max_threads=1) as q:
        gate = Gate()
        blocker = q.submit(gate)
        assert gate.started.wait(10)
        queued = q.submit(sum, [1])
        where: list[str] = []
        queued.add_done_callback(lambda t: where.append(threading.current_thread().name))
        blocker.add_done_callback(lambda t: where.append(threading.current_thread().name))
        outcome: list[CancelResult] = []
        canceller = threading.Thread(
            target=lambda: outcome.append(queued.cancel()), name="the-canceller"
        )
        canceller.start()
        canceller.join()
        assert outcome == [CancelResult.CANCELED]
        assert where == ["the-canceller"]
        gate.release.set()
        assert blocker.wait(10)
        assert q.drain(10)
        assert len(where) == 2
        assert where[1] not in ("the-canceller", threading.current_thread().name)
        late: list[str] = []
        blocker.add_done_callback(lambda t: late.append(threading.current_thread().name))
        assert late == [threading.current_thread().name]  # at once, here


# README: "`stats()` gives threads, idle, queued, running, submitted,
# completed, cancelled, spawned, retired and peak threads".
def test_queue_stats_have_the_readme_fields() -> None:
    with ThreadletQueue(max_threads=2) as q:
        s = q.stats()
        for field in [
            "threads",
            "idle",
            "queued",
            "running",
            "submitted",
            "completed",
            "cancelled",
            "spawned",
            "retired",
            "peak_threads",
        ]:
            assert isinstance(getattr(s, field), int), field


# -- the paio engine ---------------------------------------------------------------------------


# README: "Callbacks do not nest: one that waits for another request
# (`req.wait()`) gets it finished, and that request's callback runs after it
# returns".
def test_a_callback_waiting_for_another_request_does_not_run_its_callback(backend: str) -> None:
    with AioContext(backend=backend) as ctx:
        gate = Gate(5)
        order: list[str] = []
        other = ctx.call(gate, callback=lambda r: order.append("other"))
        assert gate.started.wait(10)

        def first_done(r: threadlets.AioRequest) -> None:
            order.append("first begins")
            gate.release.set()
            assert other.wait(10)
            assert other.result() == 5
            order.append("first ends")

        ctx.call(sum, [1], callback=first_done)
        assert ctx.drain(10) is not False
        assert order == ["first begins", "first ends", "other"]


# README: "`openat`/`stat`/`close_fd` (as `os.open`/`os.stat`/`os.close`: same
# results, same errors; `close_fd`'s result is 0, the system call's)".
def test_close_fd_result_is_the_system_calls(backend: str, tmp_path: Path) -> None:
    fd = os.open(tmp_path, os.O_RDONLY)
    with AioContext(backend=backend) as ctx:
        req = ctx.close_fd(fd)
        assert req.wait(10)
        assert req.result() == 0
    with pytest.raises(OSError) as exc:
        os.fstat(fd)
    assert exc.value.errno == errno.EBADF


# README: "`AioContext(syscalls=threadlets.FaultInjector(rate, seed))` makes system
# calls fail with EIO/ENOSPC/EINTR or come up short, deterministically from the
# seed. Faults enter through the threads backend (the default);
# `backend="io_uring"` refuses `syscalls=` with `ValueError`."
def test_fault_injection_is_a_function_of_the_seed(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(bytes(1 << 18))

    def run(seed: int) -> list[Any]:
        got: list[Any] = []
        fd = os.open(p, os.O_RDWR)
        try:
            with AioContext(syscalls=FaultInjector(0.3, seed), inline=False) as ctx:
                assert ctx.backend == "threads"
                for i in range(60):
                    if i % 2:
                        req = ctx.write(fd, i * 4096, b"w" * 4096)
                    else:
                        req = ctx.read(fd, i * 4096, bytearray(4096))
                    assert req.wait(10)
                    try:
                        got.append(req.result())
                    except OSError as e:
                        got.append(errno.errorcode[e.errno or 0])
        finally:
            os.close(fd)
        return got

    first = run(7)
    assert run(7) == first
    assert {"EIO", "ENOSPC"} & set(first) or any(isinstance(x, int) and x < 4096 for x in first)
    assert run(8) != first
    if HAVE_RING:
        with pytest.raises(ValueError):
            AioContext(backend="io_uring", syscalls=FaultInjector(0.1, 1))


# -- async files -------------------------------------------------------------------------------

FRONT_LOOPS = ["asyncio", "trio"] + (["uvloop"] if HAVE_UVLOOP else [])


def _run(loop: str, fn: Any) -> Any:
    if loop == "trio":
        import trio

        return trio.run(fn)
    if loop == "uvloop":
        import uvloop

        return uvloop.run(fn())
    return asyncio.run(fn())


@pytest.fixture
def engine(backend: str) -> Iterator[str]:
    """New loops' engine backend."""
    import threadlets.awaitable as aw

    aw.configure(backend=backend)
    try:
        yield backend
    finally:
        aw.configure()


# README: "On regular files and block devices, stream writes (binary and
# text) are gathered in a buffer of `buffering` bytes (default 64 KiB) and
# sent as one request when it would overflow and before a read, `seek`,
# `truncate`, `flush`, `close` or any positional call ...; a write larger
# than the buffer goes straight through."  (docs/aiofiles-migration.md said
# binary writes were not buffered: fixed there.)
@pytest.mark.parametrize("loop", FRONT_LOOPS)
@pytest.mark.parametrize("mode", ["wb", "w"])
def test_stream_writes_are_buffered_as_the_readme_says(
    tmp_path: Path, engine: str, loop: str, mode: str
) -> None:
    p = tmp_path / "f"
    unit: Any = "x" * 1000 if mode == "w" else b"x" * 1000

    async def main() -> None:
        async with threadlets.open(p, mode) as f:
            for _ in range(65):  # 65,000 bytes: fits 64 KiB
                await f.write(unit)
            assert p.stat().st_size == 0
            await f.write(unit)  # would overflow: the buffer goes
            assert p.stat().st_size >= 65_000
            await f.flush()
            assert p.stat().st_size == 66_000
            await f.write(unit)
            assert p.stat().st_size == 66_000
            await f.seek(0, os.SEEK_END)  # before a seek
            assert p.stat().st_size == 67_000
        async with threadlets.open(p, mode, buffering=4096) as f:
            await f.write(unit * 5)  # larger than the buffer: straight through
            assert p.stat().st_size == 5000

    _run(loop, main)


# docs/aiofiles-migration.md: "`isatty()`, `seekable()`, `readable()` and
# `writable()` are plain methods, as on a Python file"; "`threadlets.open` takes
# the built-in `open()`'s arguments and defaults (`mode="r"` is text; an int
# descriptor; `buffering`, `closefd`, `opener`), and returns `AsyncTextFile`
# (reads give `str`) or `AsyncBinaryFile` (`bytes`) by mode".
@pytest.mark.parametrize("loop", FRONT_LOOPS)
def test_open_takes_the_builtin_arguments(tmp_path: Path, engine: str, loop: str) -> None:
    p = tmp_path / "f"
    p.write_bytes(b"abc\n")
    opened: list[int] = []

    def opener(path: str, flags: int) -> int:
        fd = os.open(path, flags)
        opened.append(fd)
        return fd

    async def main() -> None:
        async with threadlets.open(p) as f:
            assert isinstance(f, threadlets.AsyncTextFile)
            assert await f.read() == "abc\n"
            for name in ("isatty", "seekable", "readable", "writable"):
                method = getattr(f, name)
                assert not inspect.iscoroutinefunction(method), name
                with open(p) as builtin:
                    assert method() == getattr(builtin, name)(), name
        async with threadlets.open(p, "rb", opener=opener) as f:
            assert isinstance(f, threadlets.AsyncBinaryFile)
            assert await f.read() == b"abc\n"
        assert opened
        assert len(opened) == 1
        fd = os.open(p, os.O_RDONLY)
        try:
            async with threadlets.open(fd, "rb", closefd=False) as f:
                assert await f.read(2) == b"ab"
            assert os.fstat(fd)  # still open
        finally:
            os.close(fd)

    _run(loop, main)


# docs/aiofiles-migration.md, What differs: "`loop=` | ignored (the running
# loop is used)".
def test_aiofiles_loop_keyword_is_ignored(tmp_path: Path, engine: str) -> None:
    from threadlets import aiofiles

    p = tmp_path / "f"
    p.write_text("hello")
    other = asyncio.new_event_loop()

    async def main() -> None:
        async with aiofiles.open(p, loop=other) as f:
            assert await f.read() == "hello"

    try:
        asyncio.run(main())
    finally:
        other.close()


# README, POSIX AIO: "`set_context(ctx)` / `with use_context(ctx):` run the
# functions on a context of your own (it must be `AioContext(deliver=False)`)".
def test_posix_takes_only_a_non_delivering_context(backend: str) -> None:
    from threadlets import posix

    with AioContext(backend=backend) as delivering, pytest.raises(ValueError):
        posix.set_context(delivering)
    with AioContext(backend=backend, deliver=False) as own, posix.use_context(own):
        assert own.stats().submitted == 0
        r, w = os.pipe()
        try:
            os.write(w, b"x")
            cb = posix.aiocb(r, 0, bytearray(1))
            posix.aio_read(cb)
            posix.aio_suspend([cb], 10)
            assert posix.aio_return(cb) == 1
        finally:
            os.close(r)
            os.close(w)
        assert own.stats().submitted >= 1


# docs/aiofiles-migration.md: "a read of a cached file (up to 256 KiB) needs no
# request at all"; "a cached file opens inline too"; README: "Cached reads
# complete inline, without a thread hop" and "cached files opened and read
# with no thread hop".
@pytest.mark.linux_only("rwf_nowait")
@pytest.mark.parametrize("loop", FRONT_LOOPS)
def test_cached_files_open_and_read_with_no_thread_hop(
    tmp_path: Path, engine: str, loop: str
) -> None:
    from threadlets import awaitable

    small, large = tmp_path / "small", tmp_path / "large"
    small.write_bytes(os.urandom(256 * 1024))
    large.write_bytes(os.urandom(256 * 1024 + 1))
    assert small.read_bytes()
    assert large.read_bytes()

    async def main() -> None:
        ctx = awaitable.current().ctx
        before = ctx.stats()
        assert await threadlets.read_bytes(small) == small.read_bytes()
        assert ctx.stats().submitted == before.submitted  # no request at all
        assert await threadlets.read_bytes(large) == large.read_bytes()
        assert ctx.stats().submitted == before.submitted + 1  # past 256 KiB: one
        before = ctx.stats()
        f = await threadlets.open(small, "rb")
        try:
            assert ctx.stats().submitted == before.submitted  # opened inline
            assert await f.read(10) == small.read_bytes()[:10]
            after = ctx.stats()
            assert (after.threaded, after.ring) == (before.threaded, before.ring)
            assert after.inline == before.inline + 1
        finally:
            await f.close()

    _run(loop, main)


# docs/aiofiles-migration.md, What differs: "a call cancelled while queued |
# never runs"; "a call cancelled while it runs | the task waits until the call
# finished, then sees the cancellation"; README: "a cancelled call never
# leaves work running behind the task's back" (on trio as well as asyncio).
@pytest.mark.parametrize("loop", ["asyncio", "trio"])
def test_aiofiles_cancelled_calls_never_run_behind_the_task(
    tmp_path: Path, backend: str, loop: str
) -> None:
    import anyio

    from threadlets import aiofiles, awaitable

    q = ThreadletQueue(max_threads=1)
    gate = Gate()
    q.submit(gate)
    assert gate.started.wait(10)
    awaitable.configure(queue=q, inline=False, backend=backend)
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    started, release, finished = threading.Event(), threading.Event(), threading.Event()

    def blocking() -> str:
        started.set()
        assert release.wait(10)
        finished.set()
        return "ran"

    seen: list[tuple[str, bool]] = []

    async def main() -> None:
        scopes: list[anyio.CancelScope] = []

        async def call(fn: Any, *args: Any) -> None:
            with anyio.CancelScope() as scope:
                scopes.append(scope)
                try:
                    await fn(*args)
                except anyio.get_cancelled_exc_class():
                    seen.append(("cancelled", finished.is_set()))
                    raise
                seen.append(("returned", finished.is_set()))

        async with anyio.create_task_group() as tg:
            tg.start_soon(call, aiofiles.os.remove, victim)
            await anyio.wait_all_tasks_blocked()
            assert q.stats().queued == 1  # behind the gate
            scopes.pop().cancel()
        assert seen == [("cancelled", False)]
        gate.release.set()
        assert q.drain(10)
        assert victim.read_text() == "keep me"  # it never ran
        seen.clear()
        async with anyio.create_task_group() as tg:
            tg.start_soon(call, aiofiles.os.wrap(blocking))
            await anyio.to_thread.run_sync(started.wait, 10)
            scopes.pop().cancel()
            await anyio.wait_all_tasks_blocked()
            assert seen == []  # still waiting for the call
            release.set()
        assert seen == [("cancelled", True)]

    try:
        anyio.run(main, backend=loop)
    finally:
        awaitable.configure()
        gate.release.set()
        release.set()
        assert q.close(timeout=10)


# docs/aiofiles-migration.md: "types | inline: `open()` is overloaded on the mode
# (text: `str`, binary: `bytes`)"; "returns `AsyncTextFile` (reads give `str`) or
# `AsyncBinaryFile` (`bytes`) by mode, which mypy checks".
def test_open_is_typed_by_mode(tmp_path: Path) -> None:
    snippet = tmp_path / "typed.py"
    snippet.write_text(
        "from typing import assert_type\n"
        "import threadlets\n"
        "from threadlets import aiofiles\n"
        "async def f() -> None:\n"
        "    async with threadlets.open('x', 'rb') as b:\n"
        "        assert_type(b, threadlets.AsyncBinaryFile)\n"
        "        assert_type(await b.read(), bytes)\n"
        "    async with threadlets.open('x') as t:\n"
        "        assert_type(t, threadlets.AsyncTextFile)\n"
        "        assert_type(await t.read(), str)\n"
        "    async with aiofiles.open('x') as a:\n"
        "        assert_type(await a.read(), str)\n"
        "    async with aiofiles.open('x', 'rb') as ab:\n"
        "        assert_type(await ab.read(), bytes)\n"
    )
    src = str(Path(threadlets.__file__).resolve().parent.parent)
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--cache-dir", os.devnull, str(snippet)],
        cwd=tmp_path,
        env=dict(_env(), MYPYPATH=src),
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


# README: "Linux, Python 3.11 or newer; other POSIX systems through the
# portable fallbacks"; "`.ci/run` installs [fio]"; "`.ci/run` runs the test
# suite that way too (`THREADLETS_PORTABLE=1 .venv/bin/python -m pytest`...)".
def test_ci_script_does_what_the_readme_says() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    assert "apt-get install" in ci
    assert " fio " in ci
    assert "THREADLETS_PORTABLE=1 .venv/bin/python -m pytest" in ci
    assert _blocks(README, "sh")[0].splitlines()[1] in ci  # the README's test command


# README: "after `os.fork()` the child's queues start afresh with none of the
# parent's workers (only new `min_threads` ones). Work queued or running in
# the parent at the fork belongs to the parent; in the child those threadlets
# read as `CANCELLED` (their callbacks do not run there), so nothing runs
# twice"; "`submitted == completed + cancelled + queued + running`".
@pytest.mark.parametrize("min_threads", [0, 1])
def test_fork_child_runs_no_parent_callback(min_threads: int) -> None:
    q = ThreadletQueue(max_threads=1, min_threads=min_threads)
    gate = Gate()
    running = q.submit(gate)
    assert gate.started.wait(10)
    queued = q.submit(sum, [1])
    calls: list[tuple[str, int]] = []
    running.add_done_callback(lambda t: calls.append(("running", os.getpid())))
    queued.add_done_callback(lambda t: calls.append(("queued", os.getpid())))
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report and leave without pytest's teardown
        try:
            s = q.stats()
            fresh = s.threads == s.spawned == min_threads
            states = (running.state.name, queued.state.name)
            consistent = s.submitted == s.completed + s.cancelled + s.queued + s.running
            q.close(10)
            verdict = [fresh, states == ("CANCELLED", "CANCELLED"), consistent, calls == []]
            os.write(w, ",".join(str(int(x)) for x in verdict).encode())
        finally:
            os._exit(0)
    os.close(w)
    _, status = os.waitpid(pid, 0)
    report = os.read(r, 100).decode()
    os.close(r)
    assert os.waitstatus_to_exitcode(status) == 0
    assert report == "1,1,1,1"
    gate.release.set()
    assert q.drain(10)
    assert sorted(calls) == [("queued", os.getpid()), ("running", os.getpid())]
    assert q.close(10)


# README: "Workers are daemon threads: a blocked one never hangs interpreter
# exit".
def test_blocked_workers_do_not_hold_the_interpreter() -> None:
    script = (
        "import threading, threadlets\n"
        "q = threadlets.ThreadletQueue(min_threads=2)\n"
        "started = threading.Event()\n"
        "q.submit(lambda: (started.set(), threading.Event().wait()))\n"
        "threadlets.submit(threading.Event().wait)\n"
        "assert started.wait(10)\n"
        "print('leaving')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,  # a safety net: the exit is at once
        check=False,
    )
    assert (proc.returncode, proc.stdout) == (0, "leaving\n"), proc.stderr


# README: "Each `write()` stays contiguous, so `"a"` files shared by several
# writers get whole lines."  Several file objects (one per task) append to one
# file, with writes that straddle the 64 KiB buffer and some larger than it.
@pytest.mark.parametrize("loop", FRONT_LOOPS)
@pytest.mark.parametrize("mode", ["a", "ab"])
def test_append_writers_sharing_a_file_get_whole_lines(
    tmp_path: Path, engine: str, loop: str, mode: str
) -> None:
    import anyio

    p = tmp_path / "log"

    def line(w: str, i: int) -> str:
        return f"{w}:{i}:{'x' * (70_000 if i % 40 == 39 else (i * 7919) % 3000)}\n"

    lines = {w: [line(w, i) for i in range(120)] for w in "ABCD"}

    async def writer(name: str) -> None:
        async with threadlets.open(p, mode) as f:
            for line in lines[name]:
                await f.write(line if mode == "a" else line.encode())
                await anyio.sleep(0)

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            for name in lines:
                tg.start_soon(writer, name)

    if loop == "trio":
        anyio.run(main, backend="trio")
    else:
        anyio.run(main, backend="asyncio", backend_options={"use_uvloop": loop == "uvloop"})
    got = p.read_text().splitlines(keepends=True)
    assert sorted(got) == sorted(x for ls in lines.values() for x in ls)
    for name, mine in lines.items():  # each writer's lines in its own order
        assert [x for x in got if x.startswith(f"{name}:")] == mine
