"""The ``threadlets`` command: one entry point, one subcommand per tool.

This module owns argument parsing and dispatch only; each tool's logic lives
in its own module.  Output goes through rich (the ``tools`` extra).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from threadlets import __version__
from threadlets.pool import DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_THREADS
from threadlets.probe import probe_direct_io, probe_io_uring, probe_nowait


def _info(args: argparse.Namespace) -> int:
    directory = os.path.abspath(args.directory)
    nowait_ok, nowait_note = probe_nowait(directory)
    direct = probe_direct_io(directory)
    uring = probe_io_uring()
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
        "default_max_threads": DEFAULT_MAX_THREADS,
        "default_min_threads": 0,
        "default_idle_timeout_s": DEFAULT_IDLE_TIMEOUT,
    }
    if args.json:
        print(json.dumps(facts, indent=2))
        return 0
    from rich.console import Console
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
    table.add_row(
        "default pool limits",
        f"max {DEFAULT_MAX_THREADS}, min 0",
        f"idle workers retire after {DEFAULT_IDLE_TIMEOUT:g} s",
    )
    Console().print(table)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="threadlets", description="Fast, correct asynchronous file and block I/O."
    )
    parser.add_argument("--version", action="version", version=f"threadlets {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = sub.add_parser("info", help="print what this machine supports")
    info.add_argument(
        "--directory", default=".", help="where to probe O_DIRECT and RWF_NOWAIT (default: .)"
    )
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.set_defaults(func=_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
