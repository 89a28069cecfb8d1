"""The ``threadlets`` command: one entry point, one subcommand per tool.

This module owns argument parsing and dispatch only; each tool's logic lives
in its own module.  Output goes through rich (the ``tools`` extra).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib.util
import json
import math
import os
import signal
import sys
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

from threadlets import __version__

# The engine and the tools are imported by the functions that use them,
# inside main()'s handling of Ctrl-C: one during the imports exits 130
# quietly, as one later does.  (``import threadlets`` itself imports
# nothing: see threadlets/__init__.py.)

#: Exit status when stdout is a closed pipe: what a shell shows for SIGPIPE.
EXIT_BROKEN_PIPE = 128 + 13
#: Upper bounds beyond which a count is a typo, not a wish.
MAX_OPS = 10**12
MAX_CONCURRENCY = 1 << 16


def _console(stderr: bool = False) -> Any:
    """A rich Console whose broken pipe is a BrokenPipeError (rich's own
    answer, SystemExit(1), would read as "mismatch" from stress)."""
    from rich.console import Console

    class _Console(Console):
        def on_broken_pipe(self) -> None:
            raise BrokenPipeError(32, "Broken pipe")

    return _Console(stderr=stderr)


def _auto_backend() -> tuple[str, str]:
    """What AioContext(backend="auto") gets here (the front ends' default),
    found by making one."""
    from threadlets.engine import AioContext
    from threadlets.uring import Ring, RingUnavailable

    with AioContext(backend="auto") as ctx:
        got = ctx.backend
    if got == "io_uring":
        return got, "the front ends and threadlets.posix use the kernel's ring"
    try:
        Ring(1).close()
    except RingUnavailable as e:
        return got, f"no ring: {e.strerror}"
    return got, "threads"  # pragma: no cover


def _info(args: argparse.Namespace) -> int:
    from threadlets.pool import DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_THREADS
    from threadlets.probe import probe_direct_io, probe_io_uring, probe_nowait

    directory = os.path.abspath(args.directory)
    try:
        # The probes need a file there; in portable mode they make none,
        # so the directory is tried first, the same way on every platform.
        with tempfile.TemporaryFile(dir=directory):
            pass
        nowait_ok, nowait_note = probe_nowait(directory)
        direct = probe_direct_io(directory)
    except OSError as e:
        args.parser.error(f"cannot probe in {directory!r}: {e.strerror}")  # exits 2
    uring = probe_io_uring()
    backend, backend_note = _auto_backend()
    facts: dict[str, object] = {
        "version": __version__,
        "python": sys.version.split()[0],
        "platform": f"{os.uname().sysname} {os.uname().release} {os.uname().machine}",
        "cpus": os.cpu_count(),
        "directory": directory,
        "rwf_nowait": nowait_ok,
        "rwf_nowait_note": nowait_note,
        "o_direct": direct.supported,
        "o_direct_request_alignment": direct.request_alignment,
        "o_direct_buffer_alignment": direct.buffer_alignment,
        "o_direct_note": direct.reason or "supported",
        "io_uring": uring.supported,
        "io_uring_note": uring.reason,
        "auto_backend": backend,
        "auto_backend_note": backend_note,
        "default_max_threads": DEFAULT_MAX_THREADS,
        "default_min_threads": 0,
        "default_idle_timeout_s": DEFAULT_IDLE_TIMEOUT,
    }
    if args.json:
        print(json.dumps(facts, indent=2))
        return 0
    from rich.table import Table

    table = Table(title=f"threadlets {__version__}: what this machine supports")
    table.add_column("feature")
    table.add_column("value")
    table.add_column("note")

    def yes(flag: bool) -> str:
        return "[green]yes[/]" if flag else "[red]no[/]"

    table.add_row("platform", str(facts["platform"]), f"Python {facts['python']}")
    table.add_row("CPUs", str(facts["cpus"]), "")
    table.add_row("RWF_NOWAIT reads", yes(nowait_ok), nowait_note)
    align = (
        f"request {direct.request_alignment} B, buffer {direct.buffer_alignment} B"
        if direct.supported
        else direct.reason
    )
    table.add_row("O_DIRECT", yes(direct.supported), f"{align} (in {directory})")
    table.add_row("io_uring", yes(uring.supported), uring.reason)
    table.add_row('backend "auto"', backend, backend_note)
    table.add_row(
        "default pool limits",
        f"max {DEFAULT_MAX_THREADS}, min 0",
        f"idle workers retire after {DEFAULT_IDLE_TIMEOUT:g} s",
    )
    _console().print(table)
    return 0


_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _plain_number(text: str) -> bool:
    """Whether ``text`` is a number as a person types one: ASCII, no sign
    but "-", no ``_``, no blanks (float() also takes "+4", " 4", "1_000"
    and non-ASCII digits)."""
    return text.isascii() and not any(c in text for c in "_+ \t\n\r\f\v")


def parse_size(text: str) -> int:
    """'4K', '256M', '1G', '4096' -> bytes (binary units)."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    num, unit = (t[:-1], t[-1]) if t and t[-1] in _UNITS else (t, "")
    try:
        if not _plain_number(num):
            raise ValueError(num)
        value = float(num) * _UNITS[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (say 4K, 256M, 1G)") from None
    if not math.isfinite(value) or value < 0 or value != int(value):
        raise argparse.ArgumentTypeError(f"not a size: {text!r}")
    return int(value)


def _positive_size(text: str) -> int:
    value = parse_size(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"a size must be > 0: {text!r}")
    return value


def parse_duration(text: str) -> float:
    """'20s', '2m', '1h', '0.5' -> seconds."""
    t = text.strip().lower()
    scale = {"s": 1, "m": 60, "h": 3600}.get(t[-1:])
    try:
        if not _plain_number(t[:-1] if scale else t):
            raise ValueError(t)
        value = float(t[:-1]) * scale if scale else float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (say 20s, 2m)") from None
    from threadlets.stress import MAX_DURATION

    if not 0 < value <= MAX_DURATION:  # also refuses nan and inf
        raise argparse.ArgumentTypeError(
            f"a duration must be > 0 and at most {MAX_DURATION:.0f} s: {text!r}"
        )
    return value


def _count(least: int, most: int = MAX_OPS) -> Any:
    def parse(text: str) -> int:
        # ASCII digits only: int() also takes "+5", " 5", "1_000" and
        # non-ASCII digits.
        if not (text.isascii() and text.isdigit()):
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}")
        value = int(text)
        if not least <= value <= most:
            raise argparse.ArgumentTypeError(f"must be {least}..{most}: {text!r}")
        return value

    parse.__name__ = "count"
    return parse


def _seconds(text: str) -> float:
    try:
        if not _plain_number(text):
            raise ValueError(text)
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    from threadlets.stress import MAX_DURATION

    if not 0 < value <= MAX_DURATION:  # also refuses nan and inf
        raise argparse.ArgumentTypeError(
            f"seconds must be > 0 and at most {MAX_DURATION:.0f}: {text!r}"
        )
    return value


def _path(text: str) -> str:
    """A path given on the command line: not empty, and on one line (a
    line break in a path is a slip of the shell, and would split the one-line
    messages that name it)."""
    if not text:
        raise argparse.ArgumentTypeError("an empty path")
    if any(c in text for c in "\n\r\0"):
        raise argparse.ArgumentTypeError(f"a path with a line break or NUL: {text!r}")
    return text


def _existing_directory(text: str) -> str:
    if not os.path.isdir(_path(text)):
        raise argparse.ArgumentTypeError(f"no such directory: {text!r}")
    return text


def _directory(text: str) -> str:
    """An existing directory this process can make files in."""
    if not os.path.isdir(_path(text)):
        raise argparse.ArgumentTypeError(f"no such directory: {text!r}")
    # Tried, not asked: os.access() says yes to root in /proc or /sys.
    try:
        os.rmdir(tempfile.mkdtemp(dir=text, prefix="threadlets-check-"))
    except OSError as e:
        raise argparse.ArgumentTypeError(f"cannot write in {text!r}: {e.strerror}") from None
    return text


def _output_file(text: str) -> str:
    """A file path that can be written, checked before measuring: not a
    directory, in a directory that exists, and one the file system takes.
    The last is tried -- the file opened for writing, without truncating it,
    and removed again if the check made it -- because os.access() answers
    for permission bits only: root may "write" into /proc or /sys."""
    parent = os.path.dirname(os.path.abspath(_path(text)))
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a directory")
    if not os.path.isdir(parent):
        raise argparse.ArgumentTypeError(f"no such directory: {parent!r}")
    # (Through a symlink the open makes the link's target: that is what
    # to remove, the link itself stays.)
    made = os.path.realpath(text)
    existed = os.path.lexists(made)
    try:
        # (O_NONBLOCK: a FIFO without a reader says ENXIO instead of hanging.)
        fd = os.open(text, os.O_WRONLY | os.O_CREAT | os.O_NONBLOCK | os.O_CLOEXEC, 0o666)
    except OSError as e:
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: {e.strerror}") from None
    os.close(fd)
    if not existed:
        with contextlib.suppress(OSError):
            os.unlink(made)
    return text


def parse_mix(text: str) -> dict[str, int]:
    """'read=40,write=30' -> {'read': 40, 'write': 30}."""
    from threadlets.stress import KINDS

    mix: dict[str, int] = {}
    for part in text.split(","):
        name, sep, weight = part.partition("=")
        name = name.strip()
        if not sep or name not in KINDS:
            raise argparse.ArgumentTypeError(
                f"bad --mix entry {part!r}: use KIND=WEIGHT with KIND in {', '.join(KINDS)}"
            )
        if name in mix:  # (the last one silently won: a typo for another kind)
            raise argparse.ArgumentTypeError(f"--mix names {name} twice")
        try:
            weight = weight.strip()  # (as the name is)
            if not (weight.isascii() and weight.isdigit()):
                raise ValueError(weight)
            mix[name] = int(weight)
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad weight in --mix entry {part!r}") from None
        if mix[name] < 0:
            raise argparse.ArgumentTypeError(f"negative weight in --mix entry {part!r}")
    return mix


def _rate(text: str) -> float:
    try:
        if not _plain_number(text):
            raise ValueError(text)
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a rate: {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"a rate is between 0 and 1, not {text}")
    return value


def _stress(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from threadlets.stress import StressConfig, StressError, run_stress

    console = _console(stderr=args.json)
    cfg = StressConfig(
        path=args.path,
        size=args.size,
        duration=None if args.ops is not None else args.duration,
        ops=args.ops,
        concurrency=args.concurrency,
        block_size=args.block_size,
        direct=args.direct,
        backend=args.backend,
        sqpoll=args.sqpoll,
        seed=args.seed,
        cancel_rate=args.cancel_rate,
        inject_faults=args.inject_faults,
        fio_pattern=args.fio_pattern,
        corrupt_after=args.corrupt_after,
        force=args.force,
    )
    if args.mix is not None:
        cfg.mix = args.mix
    try:
        cfg.check()
    except StressError as e:
        args.parser.error(str(e))  # exits 2
    total = float(cfg.ops) if cfg.ops is not None else cfg.duration

    def started(path: str, size: int, backend: str) -> None:
        print(
            f"threadlets stress: started on {path} ({size:,} bytes, backend {backend}, "
            f"seed {cfg.seed}); Ctrl-C stops and reports",
            file=sys.stderr,
            flush=True,
        )

    cfg.on_start = started
    with Progress(
        TextColumn("[bold]stress[/]"),
        BarColumn(),
        TextColumn("{task.fields[ops]:>9,} ops"),
        TextColumn("{task.fields[rate]:>9,.0f} ops/s"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=args.json or not console.is_terminal,
    ) as progress:
        task = progress.add_task("stress", total=total, ops=0, rate=0.0)

        def tick(ops: int, elapsed: float) -> None:
            done = ops if cfg.ops is not None else elapsed
            progress.update(task, completed=done, ops=ops, rate=ops / elapsed if elapsed else 0)

        cfg.progress = tick
        try:
            report = run_stress(cfg)
        except StressError as e:
            progress.stop()
            print(f"threadlets stress: error: {e}", file=sys.stderr)
            return 2
    if args.json:
        print(json.dumps(report.as_json(), indent=2))
    else:
        _print_stress(console, report, Table, args.sqpoll)
    if not report.ok:
        return 1
    return 128 + report.stopped_by if report.interrupted else 0


def _print_stress(console: Any, report: Any, table_cls: Any, sqpoll: bool = False) -> None:
    from rich.markup import escape

    for m in report.mismatches:
        console.print(f"[red]{m.describe()}[/]")
    table = table_cls(title=f"threadlets stress, seed {report.seed}")
    table.add_column("operation")
    table.add_column("count", justify="right")
    table.add_column("p50 us", justify="right")
    table.add_column("p99 us", justify="right")
    table.add_column("max us", justify="right")
    for kind, count in sorted(report.by_kind.items()):
        lat = report.latency_us.get(kind, {})
        table.add_row(
            kind,
            f"{count:,}",
            str(lat.get("p50", "")),
            str(lat.get("p99", "")),
            str(lat.get("max", "")),
        )
    console.print(table)
    facts = table_cls(show_header=False)
    facts.add_column()
    facts.add_column()
    facts.add_row(
        "operations",
        f"{report.ops:,} in {report.seconds:.2f} s ({report.ops_per_second:,.0f} ops/s)",
    )
    facts.add_row("target", f"{escape(report.path)} ({report.size:,} bytes)")
    facts.add_row("backend", report.backend)
    if sqpoll or report.sqpoll:
        facts.add_row(
            "SQPOLL",
            "in effect (a kernel thread polled the ring)"
            if report.sqpoll
            else "asked, not in effect (no ring, or the kernel refused it)",
        )
    facts.add_row("bytes read / written", f"{report.bytes_read:,} / {report.bytes_written:,}")
    facts.add_row("verified reads", f"{report.verified_reads:,}")
    facts.add_row(
        "cancels", ", ".join(f"{k} {v}" for k, v in sorted(report.cancels.items())) or "none"
    )
    facts.add_row("expected errors", _fmt_counts(report.expected_errors))
    facts.add_row("unexpected errors", _fmt_counts(report.unexpected_errors))
    if report.faults:
        facts.add_row("injected", f"{report.faults}")
    if report.fio_check is not None:
        facts.add_row("fio check", report.fio_check)
    facts.add_row("mismatches", str(len(report.mismatches)))
    if not report.ok:
        verdict = "[red]FAILED[/]"
    elif report.interrupted:
        verdict = "[yellow]INTERRUPTED[/]: no mismatch in what ran"
    else:
        verdict = "[green]OK[/]"
    facts.add_row("verdict", verdict)
    console.print(facts)


def _fmt_counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none"


def _bench(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from threadlets.bench import WORKLOADS, BenchConfig, Step, plot, run_bench, to_markdown

    console = _console(stderr=True)
    cfg = BenchConfig(
        # (Named twice, a workload runs once: the progress counted it twice.)
        workloads=list(dict.fromkeys(args.workload or WORKLOADS)),
        quick=args.quick,
        directory=args.directory,
    )
    if args.seconds is not None:
        cfg.seconds = args.seconds
    if args.repeats is not None:
        cfg.repeats = args.repeats
    live = console.is_terminal
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[left]}"),
        console=console,
        transient=True,
        disable=not live,
    ) as progress:
        task = progress.add_task("making the test file", total=None, left="")

        def show(step: Step) -> None:
            what = (
                f"workload {step.workload_index}/{step.workloads} {step.workload}: {step.what}"
                + (f", round {step.round}/{step.rounds}" if step.rounds > 1 else "")
            )
            left = f"about {_fmt_seconds(step.seconds_left)} left"
            if live:
                progress.update(
                    task, description=what, completed=step.done, total=step.total, left=left
                )
            else:
                print(
                    f"threadlets bench: {what} (measurement {step.done + 1}/{step.total}, {left})",
                    file=sys.stderr,
                    flush=True,
                )

        def scratch(directory: str) -> None:
            print(
                f"threadlets bench: scratch files in {directory} "
                "(removed at the end, Ctrl-C included)",
                file=sys.stderr,
                flush=True,
            )

        cfg.progress = show
        cfg.on_scratch = scratch
        partial = cfg.report
        try:
            report = run_bench(cfg)
        except OSError as e:  # (the scratch files are gone already)
            progress.stop()
            print(f"threadlets bench: error: {e}", file=sys.stderr)
            return 1
        except (KeyboardInterrupt, SystemExit) as e:
            # Stopped (Ctrl-C: 130; SIGTERM, SIGHUP: 128 + the signal), the
            # scratch files removed: what was measured so far is printed,
            # as stress prints the report of what ran ("interrupted": true).
            # No --plot or --markdown file is written from a partial run.
            progress.stop()
            status = 130 if isinstance(e, KeyboardInterrupt) else e.code
            if not partial.get("interrupted"):  # (stopped before it began)
                raise
            partial["command"] = "threadlets bench " + " ".join(args.argv)
            with contextlib.suppress(KeyboardInterrupt):  # (a third Ctrl-C)
                print(f"threadlets bench: {_stopped_by(status)}", file=sys.stderr, flush=True)
                _print_bench(args, partial)
            if isinstance(status, int):
                return status
            raise
    report["command"] = "threadlets bench " + " ".join(args.argv)
    # A file that cannot be written (a full disk) fails the command, but the
    # run's figures are still printed: not a whole run lost for one file.
    status = 0
    outputs: list[tuple[str, Callable[[], None]]] = []
    if args.plot:
        outputs.append((args.plot, lambda: plot(report, args.plot)))
    if args.markdown:
        text = to_markdown(report, report["command"])
        outputs.append((args.markdown, lambda: _write_text(args.markdown, text)))
    for name, write in outputs:
        try:
            write()
        except OSError as e:
            print(f"threadlets bench: cannot write {name}: {e.strerror or e}", file=sys.stderr)
            status = 1
    _print_bench(args, report)
    return status


def _stopped_by(status: object) -> str:
    """What stopped a run that exits ``status`` (130: Ctrl-C)."""
    if not isinstance(status, int) or status == 130:
        return "interrupted"
    try:
        return f"stopped by {signal.Signals(status - 128).name}"
    except ValueError:
        return "interrupted"


def _write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _print_bench(args: argparse.Namespace, report: dict[str, Any]) -> None:
    from threadlets.bench import to_markdown

    if args.json:
        print(json.dumps(report, indent=2), flush=True)
    else:
        from rich.markdown import Markdown

        text = to_markdown(report, report["command"])
        if report.get("interrupted"):
            text += "\n**Interrupted**: the figures above are what was measured before.\n"
        _console().print(Markdown(text))


def _fmt_seconds(seconds: float) -> str:
    s = max(0, round(seconds))
    return f"{s // 60}m {s % 60:02d}s" if s >= 60 else f"{s}s"


def _plot_file(text: str) -> str:
    if importlib.util.find_spec("matplotlib") is None:
        raise argparse.ArgumentTypeError("--plot needs matplotlib: pip install 'threadlets[tools]'")
    return _output_file(text)


def _nbd(args: argparse.Namespace) -> int:
    import asyncio

    from threadlets.nbd import open_export, parse_bind, serve

    if args.nbd_command is None:
        args.parser.print_help(sys.stderr)
        return 2
    host, port = parse_bind(args.bind)
    try:
        export = open_export(
            args.image, name=args.export_name, read_only=args.read_only, direct=args.direct
        )
    except OSError as e:
        # ("dir: Is a directory", as the other refusals name the image;
        # not "[Errno 21] Is a directory: 'dir'".)
        print(f"threadlets nbd serve: {args.image}: {e.strerror or e}", file=sys.stderr)
        return 1
    except ValueError as e:
        print(f"threadlets nbd serve: {e}", file=sys.stderr)
        return 1

    listening = []

    def ready(server: Any) -> None:
        listening.append(True)
        if args.socket:
            where = f"nbd+unix:///{args.export_name}?socket={args.socket}"
        else:
            host, port = server.address[:2]
            host = f"[{host}]" if ":" in host else host
            where = f"nbd://{host}:{port}/{args.export_name}"
        print(
            f"serving {args.image} ({export.info.size} bytes, backend "
            f"{server.ctx.backend}) on {where}; Ctrl-C stops",
            file=sys.stderr,
            flush=True,
        )

    async def run() -> None:
        # SIGINT and SIGTERM stop the server gracefully, as serve() itself
        # has them; so does SIGHUP (the terminal closed), whose default
        # action left the unix socket behind and the image unflushed.  A
        # SIGHUP ignored at start (nohup) stays ignored.
        import signal

        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        handled = []
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            if sig != signal.SIGHUP or signal.getsignal(sig) is not signal.SIG_IGN:
                loop.add_signal_handler(sig, stop.set)
                handled.append(sig)
        try:
            await serve(
                export,
                host=host,
                port=port,
                socket_path=args.socket,
                backend=args.backend,
                max_connections=args.max_connections,
                stop=stop,
                ready=ready,
            )
        finally:
            for sig in handled:
                loop.remove_signal_handler(sig)

    try:
        asyncio.run(run())
    except OSError as e:
        if listening or e.filename:
            print(f"threadlets nbd serve: {e}", file=sys.stderr)
        else:  # ("[Errno 13] Permission denied", of which socket?)
            where = args.socket or args.bind
            print(f"threadlets nbd serve: cannot listen on {where}: {e.strerror}", file=sys.stderr)
        return 1
    finally:
        export.close()
    return 0


def _bind_address(text: str) -> str:
    """What parse_bind takes, and more strictly: a port of ASCII digits
    only (int() also takes "+80", " 80", "1_000"), no empty address or
    brackets, and a host this machine can resolve (else the server fails
    only after opening the image)."""
    import socket

    from threadlets.nbd import parse_bind

    try:
        host, port = parse_bind(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    bracketed = text.startswith("[")
    tail = text[text.find("]") + 1 :] if bracketed else text
    port_text = tail.partition(":")[2] if tail.count(":") == 1 else None
    if (
        not text
        or text.startswith("[]")
        or (port_text is not None and not (port_text.isascii() and port_text.isdigit()))
    ):
        raise argparse.ArgumentTypeError(f"bad address {text!r} (say HOST:PORT, [IPV6]:PORT)")
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (OSError, UnicodeError) as e:
        raise argparse.ArgumentTypeError(f"cannot resolve {host!r}: {e}") from None
    return text


def _socket_path(text: str) -> str:
    """A unix socket path the server can bind: new, in a directory that
    exists, short enough for sockaddr_un."""
    _path(text)
    if len(os.fsencode(text)) > 107:
        raise argparse.ArgumentTypeError(f"a unix socket path is at most 107 bytes: {text!r}")
    if os.path.lexists(text):
        raise argparse.ArgumentTypeError(f"{text!r} exists (remove it first)")
    parent = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(parent):
        raise argparse.ArgumentTypeError(f"no such directory: {parent!r}")
    return text


def _export_name(text: str) -> str:
    """An NBD export name: UTF-8, at most 4096 bytes, no NUL."""
    try:
        size = len(text.encode("utf-8"))
    except UnicodeError:
        raise argparse.ArgumentTypeError(f"an export name must be UTF-8: {text!r}") from None
    if size > 4096 or "\0" in text:
        raise argparse.ArgumentTypeError("an export name is at most 4096 bytes, without NUL")
    return text


def build_parser() -> argparse.ArgumentParser:
    from threadlets.engine import BACKENDS

    # No abbreviated options (allow_abbrev=False, on every parser): with
    # them, "--dur 5" meant --duration, and an option added later that
    # shares the prefix would silently change an old command's meaning.
    parser = argparse.ArgumentParser(
        prog="threadlets",
        description="Fast, correct asynchronous file and block I/O.",
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"threadlets {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = sub.add_parser("info", allow_abbrev=False, help="print what this machine supports")
    info.add_argument(
        "--directory",
        type=_existing_directory,
        default=".",
        help="where to probe O_DIRECT and RWF_NOWAIT (default: .)",
    )
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.set_defaults(func=_info, parser=info)

    st = sub.add_parser(
        "stress",
        allow_abbrev=False,
        help="hammer a file through the engine and verify every byte",
        description="Random concurrent reads, writes, vectored I/O, flushes, discards, "
        "write-zeroes, truncates and cancels, each read checked against a model of "
        "what the file must hold.  Exit status 1 on any mismatch or unexpected error.",
    )
    st.add_argument(
        "path", nargs="?", type=_path, help="file or block device (default: a temporary file)"
    )
    st.add_argument(
        "--size",
        type=_positive_size,
        help="bytes to use (default 256M; on a block device, all of it)",
    )
    when = st.add_mutually_exclusive_group()
    when.add_argument(
        "--duration", type=parse_duration, default=20.0, help="run time (default 20s)"
    )
    when.add_argument(
        "--ops", type=_count(1), help="run exactly this many operations (reproducible)"
    )
    st.add_argument(
        "--concurrency",
        type=_count(1, MAX_CONCURRENCY),
        default=32,
        help="requests in flight (default 32)",
    )
    st.add_argument("--block-size", type=_positive_size, default=4096, help="I/O unit (default 4K)")
    st.add_argument("--mix", type=parse_mix, help="weights, e.g. read=40,write=30,flush=5")
    st.add_argument("--direct", action="store_true", help="open with O_DIRECT (aligned I/O)")
    st.add_argument(
        "--backend",
        choices=BACKENDS,
        default="auto",
        help="what runs requests that do not finish inline (default auto, as the front "
        "ends: io_uring where the kernel has it; the report says which ran)",
    )
    st.add_argument(
        "--sqpoll",
        action="store_true",
        help="ask the ring for IORING_SETUP_SQPOLL: a kernel thread polls it, so "
        "submissions need no system call, at the cost of a CPU busy while requests "
        "flow (io_uring and auto only; the report says whether it was in effect)",
    )
    st.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    st.add_argument("--cancel-rate", type=_rate, default=0.05, help="share of requests cancelled")
    st.add_argument(
        "--inject-faults",
        type=_rate,
        default=0.0,
        metavar="RATE",
        help="inject EIO/ENOSPC/EINTR and short transfers at this rate",
    )
    st.add_argument(
        "--fio-pattern",
        action="store_true",
        help="finish by writing fio's %%o pattern and have fio verify it",
    )
    st.add_argument(
        "--corrupt-after",
        type=_count(0),
        metavar="N",
        help="self-test: flip a byte behind the engine's back after N ops",
    )
    st.add_argument(
        "--force", action="store_true", help="overwrite PATH if it is an existing regular file"
    )
    st.add_argument("--json", action="store_true", help="print the report as one JSON object")
    st.set_defaults(func=_stress, parser=st)

    from threadlets.bench import WORKLOADS

    be = sub.add_parser(
        "bench",
        allow_abbrev=False,
        help="measure threadlets beside the peers, side by side",
        description="Workloads: " + "; ".join(f"{k} ({v})" for k, v in WORKLOADS.items()),
    )
    be.add_argument(
        "--workload",
        action="append",
        choices=list(WORKLOADS),
        help="run only this workload (repeatable; default: all)",
    )
    be.add_argument("--quick", action="store_true", help="tiny and short: checks the harness")
    be.add_argument("--seconds", type=_seconds, help="length of one measurement (default 2)")
    be.add_argument(
        "--repeats", type=_count(1, 1000), help="rounds (the median is reported; default 3)"
    )
    be.add_argument(
        "--directory",
        type=_directory,
        help=f"where the scratch files go (default: the system temp directory, "
        f"{tempfile.gettempdir()}); they are removed at the end, Ctrl-C included",
    )
    be.add_argument("--json", action="store_true", help="print the results as JSON")
    be.add_argument("--plot", type=_plot_file, metavar="FILE.png", help="write a PNG chart")
    be.add_argument(
        "--markdown", type=_output_file, metavar="FILE.md", help="write the tables as Markdown"
    )
    be.set_defaults(func=_bench)

    nbd = sub.add_parser(
        "nbd", allow_abbrev=False, help="serve a file or block device to NBD clients"
    )
    nbd.set_defaults(func=_nbd, parser=nbd, nbd_command=None)
    nbd_sub = nbd.add_subparsers(dest="nbd_command", metavar="NBD_COMMAND")
    ns = nbd_sub.add_parser(
        "serve",
        allow_abbrev=False,
        help="serve IMAGE over NBD until Ctrl-C, SIGTERM or SIGHUP",
        description="Serve a file or block device to NBD clients (qemu, nbdinfo, nbdcopy, "
        "the Linux nbd driver) through the engine.  SIGINT, SIGTERM and SIGHUP stop it "
        "gracefully: "
        "requests in flight finish, the image is flushed.",
    )
    ns.add_argument("image", type=_path, help="regular file or block device to export")
    where = ns.add_mutually_exclusive_group()
    where.add_argument(
        "--bind",
        type=_bind_address,
        default="127.0.0.1:10809",
        metavar="HOST:PORT",
        help="TCP address to listen on (default 127.0.0.1:10809, this machine only)",
    )
    where.add_argument(
        "--socket", type=_socket_path, metavar="PATH", help="listen on a unix socket instead"
    )
    ns.add_argument(
        "--export-name", type=_export_name, default="", help="the export's name (default: empty)"
    )
    ns.add_argument("--read-only", action="store_true", help="refuse writes")
    ns.add_argument("--direct", action="store_true", help="open the image with O_DIRECT")
    ns.add_argument(
        "--backend",
        choices=BACKENDS,
        default="auto",
        help="engine backend (default auto: io_uring where the kernel has it)",
    )
    ns.add_argument(
        "--max-connections",
        type=_count(1, MAX_CONCURRENCY),
        default=16,
        help="clients at once (default 16)",
    )
    return parser


def _open_standard_fds() -> set[int]:
    """A closed stdin, stdout or stderr (``2>&-``) becomes /dev/null.  Else
    the next file opened (stress's target, its scratch file) takes that
    number, and with sys.stderr None, print(file=sys.stderr) writes to
    stdout: the progress lines landed in the --json output.  Returns the
    numbers that were closed."""
    closed = set()
    for fd, name in ((0, "stdin"), (1, "stdout"), (2, "stderr")):
        try:
            os.fstat(fd)
        except OSError:
            closed.add(fd)
            null = os.open(os.devnull, os.O_RDONLY if fd == 0 else os.O_WRONLY)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
            if getattr(sys, name) is None:
                # (Kept open for the process: it is sys.stdin/stdout/stderr now.)
                setattr(sys, name, open(fd, "r" if fd == 0 else "w", closefd=False))  # noqa: SIM115
    return closed


class _Stdout:
    """sys.stdout while a command runs: the first write or flush that
    stdout refuses (a reader gone: EPIPE; a full disk; stdout closed at
    start: EBADF, as the write to a closed descriptor would be) is recorded
    in ``error`` and what follows is dropped, so that the command finishes
    (its scratch files removed) and main() can say the report was lost
    instead of exiting 0 as if it had been written."""

    def __init__(self, inner: Any, closed: bool) -> None:
        self.inner = inner
        self.error = errno.EBADF if closed else 0

    def write(self, text: str) -> int:
        if text and not self.error:
            try:
                self.inner.write(text)
            except OSError as e:
                self.error = e.errno or errno.EIO
        return len(text)

    def flush(self) -> None:
        if not self.error:
            try:
                self.inner.flush()
            except OSError as e:
                self.error = e.errno or errno.EIO

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def _report_lost(out: _Stdout, command: str, status: int) -> int:
    """The exit status of a command whose stdout refused what it wrote:
    141 for a reader gone (what a shell shows for a death by SIGPIPE, as
    ``cmd | head`` usually ends), else the command's own status if it
    failed, or 1 -- never 0, which would claim the report was written."""
    out.flush()
    if not out.error:
        return status
    # Nothing more for the interpreter to fail to flush at exit.
    with contextlib.suppress(OSError, ValueError, AttributeError):
        if out.inner.fileno() == 1:
            _to_devnull(1)
    if out.error == errno.EPIPE:
        return EXIT_BROKEN_PIPE
    with contextlib.suppress(OSError):
        print(f"{command}: write error: {os.strerror(out.error)}", file=sys.stderr)
    return status or 1


def _to_devnull(fd: int) -> None:
    with contextlib.suppress(OSError):
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, fd)
        os.close(null)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    closed = _open_standard_fds()
    real = sys.stdout
    out = _Stdout(real, 1 in closed)
    sys.stdout = out
    # (Parsing imports the tools' modules: Ctrl-C may land there too.)
    command = "threadlets"
    try:
        try:
            args = build_parser().parse_args(argv)
            args.argv = argv[1:]
            command = f"threadlets {args.command}"
            result: int = args.func(args)
        except SystemExit as e:
            # --help and --version (0), a usage error (2), SIGTERM (143):
            # raised on, with the status a lost report makes it.
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            lost = _report_lost(out, command, code)
            if lost != code:
                raise SystemExit(lost) from None
            raise
        return _report_lost(out, command, result)
    except KeyboardInterrupt:
        with contextlib.suppress(OSError):
            print(f"{command}: interrupted", file=sys.stderr)
        return _report_lost(out, command, 130)
    except BrokenPipeError:
        # Whoever read stderr stopped (2>&1 | head): no traceback, and
        # nothing more for the interpreter to fail to flush at exit.
        _to_devnull(2)
        return EXIT_BROKEN_PIPE
    finally:
        if sys.stdout is out:  # (a test's capture may have been swapped in meanwhile)
            sys.stdout = real


if __name__ == "__main__":
    sys.exit(main())
