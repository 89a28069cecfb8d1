"""An outside attacker's regressions for the engine's openat/stat/close_fd
requests and their front ends: each test is a break that was found (and
failed on the code before its fix)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from threadlets.engine import AioContext


@pytest.fixture
def ctx(backend: str) -> Iterator[AioContext]:
    c = AioContext(backend=backend)
    yield c
    assert c.close(timeout=10)


def _os_error(fn: Callable[[], Any]) -> BaseException:
    with pytest.raises(BaseException) as info:
        fn()
    return info.value


@pytest.mark.parametrize(
    "call",
    [
        ("openat", ("f", os.O_RDONLY | os.O_CREAT, 2**40), {}),
        ("openat", ("f", os.O_RDONLY, 2**31), {}),
        ("openat", ("f", 2**40), {}),
        ("openat", ("f", -(2**31) - 1), {}),
        ("openat", ("f", os.O_RDONLY), {"dir_fd": 2**31}),
        ("stat", (2**31,), {}),
        ("stat", (2**40,), {}),
        ("stat", ("f",), {"dir_fd": 2**31}),
        ("close_fd", (2**31,), {}),
        ("close_fd", (2**64,), {}),
    ],
)
def test_numbers_past_a_c_int_raise_at_once_as_os_does(
    ctx: AioContext, tmp_path: Path, call: tuple[str, tuple[Any, ...], dict[str, Any]]
) -> None:
    """os.open/os.stat/os.close raise OverflowError before doing anything;
    the requests raised it only from the request (a started request, a
    callback run, and a file perhaps made)."""
    name, args, kwargs = call
    if args and args[0] == "f":
        args = (str(tmp_path / "f"), *args[1:])
    reference = {"openat": os.open, "stat": os.stat, "close_fd": os.close}[name]
    expected = _os_error(lambda: reference(*args, **kwargs))
    assert type(expected) is OverflowError
    calls: list[object] = []
    with pytest.raises(OverflowError) as info:
        getattr(ctx, name)(*args, **kwargs, callback=calls.append)
    assert str(info.value) == str(expected)
    assert not calls
    assert not (tmp_path / "f").exists()


def test_close_fd_closes_an_io_uring_descriptor_as_os_close_does(ctx: AioContext) -> None:
    """IORING_OP_CLOSE refuses an io_uring descriptor with EBADF (and
    closes nothing) where os.close closes it: the request said EBADF and
    the descriptor stayed open."""
    other = AioContext(backend="io_uring") if ctx.backend == "io_uring" else None
    if other is None:
        pytest.skip("the ring's close only")
    try:
        ring_fds = [
            int(fd)
            for fd in os.listdir("/proc/self/fd")
            if _link(int(fd)) == "anon_inode:[io_uring]"
        ]
        assert ring_fds
        fd = os.dup(ring_fds[0])
        assert ctx.close_fd(fd).result(timeout=10) == 0
        with pytest.raises(OSError) as info:
            os.fstat(fd)
        assert info.value.errno == 9
        # Nothing open there: os.close's EBADF, as before.
        with pytest.raises(OSError) as info:
            ctx.close_fd(fd).result(timeout=10)
        assert info.value.errno == 9
    finally:
        assert other.close(timeout=10)


def _link(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


def test_an_aiocb_queued_across_a_return_to_the_runtimes_own_context_runs_there(
    backend: str,
) -> None:
    """set_context(None) (a use_context block ends) hands later requests to
    the runtime's own context, made on first use.  An O_APPEND write that
    waited its turn across it stayed on the context given before when the
    own one had not been made yet: closing that context (it is the
    caller's again) refused the write, which failed with ECANCELED where
    glibc (and threadlets with an own context already made) wrote it."""
    from threadlets import posix

    from .conftest import wait_until

    given = AioContext(backend=backend, deliver=False)
    rt = posix.PosixAio()
    r, w = os.pipe()
    try:
        fcntl.fcntl(w, fcntl.F_SETFL, os.O_APPEND)
        filled = 0
        os.set_blocking(w, False)
        with contextlib.suppress(BlockingIOError):
            while True:
                filled += os.write(w, b"\0" * 65536)
        os.set_blocking(w, True)
        first = posix.aiocb(w, 0, b"1" * 10)
        second = posix.aiocb(w, 0, b"2" * 10)
        with rt.use_context(given):
            rt.aio_write(first)  # blocks in write(2): the pipe is full
            rt.aio_write(second)  # waits behind it (O_APPEND order)
        closer = threading.Thread(target=given.close, kwargs={"timeout": 10})
        closer.start()
        wait_until(lambda: given._cq.closing)
        got = b""
        while len(got) < filled + 10:
            got += os.read(r, 1 << 20)
        rt.aio_suspend([second], 10)
        os.set_blocking(r, False)
        with contextlib.suppress(BlockingIOError):
            got += os.read(r, 1 << 20)
        assert (rt.aio_error(first), rt.aio_return(first)) == (0, 10)
        assert (rt.aio_error(second), rt.aio_return(second)) == (0, 10)
        assert got[filled:] == b"1" * 10 + b"2" * 10
        closer.join(10)
    finally:
        os.close(r)
        os.close(w)
        given.close(timeout=10)
        own = rt._own
        if own is not None:
            own.close(timeout=10)


def test_an_output_file_check_through_a_dangling_symlink_leaves_nothing(tmp_path: Path) -> None:
    """bench --plot/--markdown try the path by opening it for writing, and
    remove what the try made.  Through a dangling symlink the try made the
    link's target, and left it (the link existed): an empty file stayed
    behind wherever the link pointed, even if bench never got to write."""
    from threadlets import cli

    link = tmp_path / "plot.png"
    link.symlink_to(tmp_path / "target.png")
    assert cli._output_file(str(link)) == str(link)
    assert not (tmp_path / "target.png").exists()
    assert link.is_symlink()


def test_a_close_after_the_loops_context_closed_still_closes(tmp_path: Path) -> None:
    """A close that waits (a write is buffered) ends with a close request
    on the ring; with the loop's context closed that request is refused at
    once, and the descriptor stayed open for good (before the ring took
    closes, os.close closed it)."""
    import asyncio

    import threadlets
    from threadlets import awaitable as aw

    from .conftest import HAVE_RING

    if not HAVE_RING:
        pytest.skip("no io_uring here")

    async def main() -> int:
        f = await threadlets.open(tmp_path / "x", "wb")
        await f.write(b"abc")
        ctx = aw.current().ctx
        if ctx.backend != "io_uring":
            pytest.skip("the loop's context is not on the ring")
        fd = f.fileno()
        assert ctx.close(timeout=10)
        with pytest.raises(RuntimeError):
            await f.close()  # (the buffered write could not be sent)
        return fd

    fd = asyncio.run(main())
    with pytest.raises(OSError):
        os.fstat(fd)
