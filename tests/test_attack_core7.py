"""The core against its promises, seventh session: interrupts in hand-overs,
shutdown, fork and abandoned contexts."""

from __future__ import annotations

import errno
import gc
import os
import select
import sys
from pathlib import Path

import pytest

from threadlets import AioContext, AioRequest

from .conftest import interrupt_at_c_return


def _outcome(req: AioRequest) -> object:
    try:
        return req.result(timeout=0)
    except OSError as e:
        return e.errno


@pytest.mark.parametrize("kind", ["short read", "ring close refused"])
def test_ctrl_c_at_every_c_return_of_a_hand_over_to_a_worker(
    backend: str, tmp_path: Path, kind: str
) -> None:
    """A ring completion that a worker must finish (a read short at end of
    file, a close the ring refused) is handed over inside
    process_completions().  Ctrl-C landing in that hand-over, before the
    continuation was queued, left the request RUNNING for good: drain() and
    close() never returned.  Now the request finishes (EINTR, carrying what
    moved, or its real answer), its callback runs once, and nothing hangs."""
    path = tmp_path / "f"
    path.write_bytes(b"x" * 100)
    fd = os.open(path, os.O_RDONLY)
    spare = 1000  # a number nothing is open on (far above what the test opens)
    with pytest.raises(OSError):
        os.fstat(spare)
    try:
        n = 0
        while True:
            n += 1
            ctx = AioContext(backend=backend, inline=False)
            calls: list[AioRequest] = []
            if kind == "short read":
                req = ctx.read(fd, 50, bytearray(200), callback=calls.append)
                good: tuple[object, ...] = (50, errno.EINTR)
            else:
                req = ctx.close_fd(spare, callback=calls.append)
                good = (errno.EBADF, errno.EINTR)
            select.select([ctx.fileno()], [], [], 10)  # finished, or on the ring
            seen = interrupt_at_c_return(n)
            try:
                ctx.process_completions()
            except KeyboardInterrupt:
                pass
            finally:
                sys.setprofile(None)
                gc.enable()
            assert ctx.drain(timeout=10), f"interrupt at C return {n}: {req!r} never finished"
            assert calls == [req], (n, calls)
            assert _outcome(req) in good, (n, _outcome(req))
            assert ctx.close(timeout=10)
            if seen[0] < n:
                break  # the whole delivery ran without reaching the n-th return
    finally:
        os.close(fd)
