"""The engine against os for transfers of no bytes (sixth session)."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest

from threadlets import AioContext


def _outcome(call: Callable[[], int]) -> int | str:
    try:
        return call()
    except OSError as e:
        return f"{type(e).__name__}({e.errno})"


@pytest.mark.parametrize("write", [False, True])
def test_a_transfer_of_no_bytes_answers_as_os_does(
    backend: str, tmp_path: Path, write: bool
) -> None:
    """ctx.read/ctx.write of no bytes make the one system call os.preadv /
    os.pwritev would, so a descriptor not open for it fails (EBADF, EISDIR)
    as there; before, the engine answered 0 without asking the kernel."""
    path = tmp_path / "f"
    path.write_bytes(b"abc")
    r, w = os.pipe()
    a, b = socket.socketpair()
    fds = {
        "read-only": os.open(path, os.O_RDONLY),
        "write-only": os.open(path, os.O_WRONLY),
        "read-write": os.open(path, os.O_RDWR),
        "directory": os.open(tmp_path, os.O_RDONLY),
        "pipe read end": r,
        "pipe write end": w,
        "socket": a.fileno(),
        "/dev/null": os.open(os.devnull, os.O_RDWR),
    }
    try:
        with AioContext(backend=backend) as ctx:
            for name, fd in fds.items():
                stream = "pipe" in name or name == "socket"
                for bufs in ([], [bytearray(0)], bytearray(0)):
                    iov = bufs if isinstance(bufs, list) else [bufs]
                    if write:
                        mine = _outcome(ctx.write(fd, 0, bufs).result)
                        theirs = _outcome(
                            partial(os.writev, fd, iov)
                            if stream
                            else partial(os.pwritev, fd, iov, 0)
                        )
                    else:
                        mine = _outcome(ctx.read(fd, 0, bufs).result)
                        theirs = _outcome(
                            partial(os.readv, fd, iov) if stream else partial(os.preadv, fd, iov, 0)
                        )
                    assert mine == theirs, (name, bufs)
    finally:
        for name, fd in fds.items():
            if name != "socket":
                os.close(fd)
        a.close()
        b.close()
