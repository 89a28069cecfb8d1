"""The documentation: the site builds with warnings as errors, and the CLI page
covers every command and option of the parser."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from threadlets.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent


def _commands(
    parser: argparse.ArgumentParser, prefix: str = "threadlets"
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield prefix, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, f"{prefix} {name}")


def test_cli_page_covers_the_parser() -> None:
    page = (ROOT / "docs" / "cli.md").read_text()
    missing = []
    for command, parser in _commands(build_parser()):
        if f"`{command}`" not in page:
            missing.append(f"the command {command!r}")
        for action in parser._actions:
            for option in action.option_strings:
                if option not in page:
                    missing.append(f"{command} {option}")
            if isinstance(action, argparse._SubParsersAction):
                missing += [
                    f"{command} {n}" for n in action.choices if f"{command} {n}" not in page
                ]
            elif not action.option_strings and action.dest not in page:
                missing.append(f"{command} argument {action.dest}")
    assert not missing, f"docs/cli.md does not mention: {missing}"


@pytest.mark.timeout(120)
def test_docs_build_strict(tmp_path: Path) -> None:
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    src = str(ROOT / "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        check=False,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for page in ("queues", "engine", "posix", "files", "nbd", "cli"):
        html = (tmp_path / "site" / page / "index.html").read_text()
        assert "doc-heading" in html or page == "cli", f"{page}: no generated reference"
