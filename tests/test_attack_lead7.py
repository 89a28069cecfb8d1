"""The lead's attack round 7: reads of the descriptors that are streams but
no pipe, socket or terminal (an epoll or eventfd descriptor, a
directory), on both backends, against ``os.read``: the io_uring backend
handed them to the ring, which waits through poll, and a read of an epoll
descriptor stayed RUNNING for good where os.read says EINVAL."""

from __future__ import annotations

import os
import select
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from threadlets import AioContext


def _outcome(fn: Callable[[], bytes]) -> tuple[str, object]:
    try:
        return ("ok", fn())
    except OSError as e:
        return ("raised", e.errno)


def _epoll() -> int:
    ep = select.epoll()
    try:
        return os.dup(ep.fileno())
    finally:
        ep.close()


def _eventfd() -> int:
    fd = os.eventfd(0, os.EFD_CLOEXEC)
    os.eventfd_write(fd, 5)
    return fd


@pytest.fixture(params=["epoll", "eventfd", "directory"])
def stream_fd(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[int, int]]:
    """Two descriptors of the kind: one for os.read, one for the engine."""
    make: Callable[[], int] = {
        "epoll": _epoll,
        "eventfd": _eventfd,
        "directory": lambda: os.open(tmp_path, os.O_RDONLY),
    }[request.param]
    fds = make(), make()
    try:
        yield fds
    finally:
        for fd in fds:
            os.close(fd)


@pytest.mark.parametrize("size", [8, 4096])
def test_a_read_of_a_stream_that_is_no_pipe_answers_as_os_read(
    backend: str, stream_fd: tuple[int, int], size: int
) -> None:
    theirs, ours = stream_fd
    expected = _outcome(lambda: os.read(theirs, size))
    ctx = AioContext(backend=backend, deliver=False)
    try:
        buf = bytearray(size)
        req = ctx.read(ours, 0, buf)
        if not req.wait(10):
            req.cancel()  # (so that close() returns)
            pytest.fail("the read never finished")
        got = _outcome(lambda: bytes(buf[: req.result()]))
    finally:
        assert ctx.close(10)
    assert got == expected
