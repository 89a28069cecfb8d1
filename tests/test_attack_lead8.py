"""The lead's attack round 8 (session 8)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from threadlets import oneshot

from .conftest import call_interrupted_at


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("kind", ["file", "directory"])
def test_ctrl_c_as_the_inline_read_closes_its_file_closes_it_once(
    tmp_path: Path, kind: str
) -> None:
    # read_bytes()'s inline read closed its descriptor, and a Ctrl-C landing
    # as os.close returned made its clean-up close the number again: EBADF
    # in place of the KeyboardInterrupt -- or, in a program with other
    # threads, the close of another thread's file that got the number.
    p = tmp_path / "f"
    if kind == "file":
        p.write_bytes(b"x" * 100)
        oneshot._read_inline(str(p))  # (warm: the page cache, the imports)
    else:
        p.mkdir()
    if oneshot._openat2 is None:
        pytest.skip("no inline open here (openat2 RESOLVE_CACHED, or portable mode)")
    n = 0
    while True:
        n += 1
        before = _fds()
        seen = call_interrupted_at(n, oneshot._read_inline, str(p))
        assert _fds() == before, n  # nothing left open (nor a stray close)
        if seen[0] < n:
            break  # ran to its end without reaching the n-th C return
    assert n > 3
