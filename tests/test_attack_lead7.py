"""The lead's attack round 7: reads of the descriptors that are streams but
no pipe, socket or terminal (an epoll or eventfd descriptor, a
directory), on both backends, against ``os.read``: the io_uring backend
handed them to the ring, which waits through poll, and a read of an epoll
descriptor stayed RUNNING for good where os.read says EINVAL; so did one of
a pidfd (session 8), after epoll alone was sent to a worker.  Only the
anonymous inodes known to read stay on the ring: a read of an empty
eventfd waiting there is taken back by cancel() (on a worker it could not
be: h-att)."""

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


def _pidfd() -> int:
    return os.pidfd_open(os.getpid())


@pytest.fixture(params=["epoll", "pidfd", "eventfd", "directory"])
def stream_fd(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[int, int]]:
    """Two descriptors of the kind: one for os.read, one for the engine."""
    make: Callable[[], int] = {
        "epoll": _epoll,
        "pidfd": _pidfd,
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


def test_a_read_waiting_on_an_empty_eventfd_is_cancelled_on_the_ring(backend: str) -> None:
    if backend != "io_uring":
        pytest.skip("a worker blocked in read(2) cannot be taken back")
    efd = os.eventfd(0, os.EFD_CLOEXEC)
    ctx = AioContext(backend=backend, deliver=False)
    try:
        req = ctx.read(efd, 0, bytearray(8))
        assert not req.wait(0.05)  # (nothing to read: it waits)
        answer = req.cancel()
        if answer.name != "CANCELED":
            os.eventfd_write(efd, 1)  # release the worker that has it
        assert answer.name == "CANCELED"
        assert req.wait(10)
    finally:
        assert ctx.close(10)
        os.close(efd)
