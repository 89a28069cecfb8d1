"""``threadlets info``: what it reports is what the library finds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from threadlets import AioContext
from threadlets.cli import main
from threadlets.probe import probe_direct_io, probe_io_uring


def test_info_json_matches_the_probes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--json", "--directory", str(tmp_path)]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["io_uring"] == probe_io_uring().supported
    assert facts["o_direct"] == probe_direct_io(str(tmp_path)).supported
    with AioContext(backend="auto") as ctx:
        assert facts["auto_backend"] == ctx.backend
    assert facts["auto_backend_note"]


def test_info_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--directory", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "io_uring" in out
    assert 'backend "auto"' in out
