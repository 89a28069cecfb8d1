"""Attacks on what changed in round 9 (hot path, POSIX AIO, oneshot and
the tools): each test here failed before its fix."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import threadlets
from threadlets import AioContext, oneshot, posix
from threadlets.awaitable import current
from threadlets.posix import PosixAio
from threadlets.syscalls import Syscalls

from .conftest import interrupt_at_c_return, wait_until


def _disarm() -> None:
    sys.setprofile(None)
    gc.enable()


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
@pytest.mark.parametrize("target", ["/dev/null", "fifo"])
def test_ctrl_c_as_write_bytes_submits_to_a_stream_leaks_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, target: str
) -> None:
    """write_bytes() of a stream (a device, a FIFO with a reader): the
    worker opens it and hands the descriptor to the task.  A Ctrl-C at any
    C return -- as ctx.call() returns, inside the wait's set-up, while the
    worker runs -- must not leave that descriptor open once the worker
    finished.  (Before: the worker's descriptor was handed to nobody.)"""
    if target == "fifo":
        fifo = tmp_path / "fifo"
        os.mkfifo(fifo)
        reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        where = str(fifo)
    else:
        reader = -1
        where = target
    real = oneshot._write_all
    leaks: list[tuple[int, int]] = []

    async def main() -> int:
        await threadlets.write_bytes(where, b"warm")
        io_ = current()
        loop = asyncio.get_running_loop()
        n = 0
        while True:
            n += 1
            assert n < 200, "never ran to its end"
            gate = threading.Event()

            def slow(path: object, view: memoryview, gate: threading.Event = gate) -> object:
                gate.wait()  # (running while the task is interrupted)
                return real(path, view)

            monkeypatch.setattr(oneshot, "_write_all", slow)
            # At the loop's next turn (the task suspended or gone), the
            # interrupt is disarmed first, then the worker let go.
            loop.call_soon(_disarm)
            loop.call_soon(gate.set)
            before = _open_fds()
            seen = interrupt_at_c_return(n)
            try:
                await threadlets.write_bytes(where, b"abc")
            except KeyboardInterrupt:
                pass
            finally:
                sys.setprofile(None)
                gc.enable()
            gate.set()
            assert io_.ctx.drain(timeout=10)
            await asyncio.sleep(0)  # its completion delivered
            if reader >= 0:
                while True:
                    try:
                        if not os.read(reader, 1 << 16):
                            break
                    except BlockingIOError:
                        break
            after = _open_fds()
            if after != before:
                leaks.append((n, after - before))
            if seen[0] < n:
                return n

    try:
        n = asyncio.run(main())
    finally:
        if reader >= 0:
            os.close(reader)
    assert n > 5
    assert not leaks, f"(C return, descriptors left open): {leaks}"


_TEXT_ARGS = [
    (5, None, "x"),
    (None, 5, "x"),
    ("bogus", 5, None),
    ("rot13", 5, None),
    (5, "bogus", None),
    (b"utf-8", None, None),
    ("utf-8", None, 5),
    ("bogus", None, "x"),
]


@pytest.mark.parametrize(("encoding", "errors", "newline"), _TEXT_ARGS)
def test_read_text_and_write_text_refuse_bad_arguments_as_io_open(
    tmp_path: Path, encoding: object, errors: object, newline: object
) -> None:
    """The text arguments are checked as io.open checks them: a wrong type
    (TypeError) before a wrong newline value or an unknown codec; and a
    refused write_text leaves the file as it was.  (Before: ValueError or
    LookupError where io.open says TypeError.)"""
    p = tmp_path / "f"
    p.write_bytes(b"kept\r\n")

    def expected() -> type[BaseException]:
        try:
            with open(p, encoding=encoding, errors=errors, newline=newline) as f:  # type: ignore[call-overload]
                f.read()
        except Exception as e:
            return type(e)
        raise AssertionError("io.open accepted it")

    want = expected()

    async def main() -> None:
        with pytest.raises(want):
            await threadlets.read_text(p, encoding, errors, newline)  # type: ignore[arg-type]
        with pytest.raises(want):
            await threadlets.write_text(p, "new", encoding, errors, newline)  # type: ignore[arg-type]

    asyncio.run(main())
    assert p.read_bytes() == b"kept\r\n"


class _Gated(Syscalls):
    """Reads wait until their offset's gate opens."""

    def __init__(self) -> None:
        self.gates: dict[int, threading.Event] = {}
        self.all_open = False

    def gate(self, offset: int) -> threading.Event:
        g = self.gates.setdefault(offset, threading.Event())
        if self.all_open:
            g.set()
        return g

    def open_all(self) -> None:
        self.all_open = True
        for g in list(self.gates.values()):
            g.set()

    def preadv(self, fd: int, buffers: Any, offset: int, flags: int = 0) -> int:
        assert self.gate(offset).wait(10)
        return super().preadv(fd, buffers, offset, flags)


def _reenter_at_fds_lookup(
    rt: PosixAio, handler: Callable[[], None], where: str = "_accept"
) -> list[bool]:
    """Run ``handler`` once, as a signal handler would run, where ``where``
    (_accept, or aio_read's quick path _submit_one) has looked its fd up in
    ``rt._fds`` and found nothing (the lock held: _lock is an RLock, so the
    handler's own posix call re-enters)."""
    fired = [False]
    posix_file = posix.__file__

    def prof(frame: Any, event: str, arg: Any) -> None:
        if (
            event == "c_return"
            and not fired[0]
            and frame.f_code.co_filename == posix_file
            and frame.f_code.co_name == where
            and getattr(arg, "__name__", "") == "get"
            and getattr(arg, "__self__", None) is rt._fds
        ):
            fired[0] = True
            handler()

    sys.setprofile(prof)
    return fired


def test_a_completion_of_an_aiocb_missing_from_its_fd_table_still_wakes_its_waiter(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A signal handler's aio_read, run as the main thread's lio_listio is
    inside _accept (the lock re-entered), puts its aiocb in an fd table
    that _accept then replaces: its completion meets a table without it.
    It must finish as _finish does -- the waiter in aio_suspend woken, no
    exception in the completion.  (Before: the completion's fast path,
    del state.active[cb], raised KeyError after marking it done, and a
    waiter in another thread slept for ever.)"""
    p = tmp_path / "f"
    p.write_bytes(bytes(range(64)))
    fd = os.open(p, os.O_RDONLY)
    sc = _Gated()
    ctx = AioContext(backend="threads", inline=False, syscalls=sc, deliver=False)
    rt = PosixAio(ctx)
    threads: list[threading.Thread] = []
    try:
        sc.gate(0).set()
        warm = posix.aiocb(fd, 0, bytearray(8))
        rt.aio_read(warm)
        rt.aio_suspend([warm], timeout=10)
        assert rt.aio_return(warm) == 8
        assert not rt._fds
        cb1 = posix.aiocb(fd, 16, bytearray(8), lio_opcode=posix.LIO_READ)
        cb2 = posix.aiocb(fd, 32, bytearray(8))
        fired = _reenter_at_fds_lookup(rt, lambda: rt.aio_read(cb2))
        try:
            rt.lio_listio(posix.LIO_NOWAIT, [cb1])
        finally:
            sys.setprofile(None)
        assert fired[0], "the handler never ran"
        woken = threading.Event()

        def waiter() -> None:  # (not the main thread: no 50 ms slices)
            rt.aio_suspend([cb2])
            woken.set()

        t = threading.Thread(target=waiter, daemon=True)
        threads.append(t)
        with caplog.at_level(logging.ERROR):
            t.start()
            wait_until(lambda: rt._waiting > 0)
            sc.gate(32).set()  # cb2 finishes first, cb1 still in its table
            assert woken.wait(5), "aio_suspend was never woken"
            assert rt.aio_return(cb2) == 8
            assert bytes(cb2.aio_buf) == bytes(range(32, 40))
            sc.gate(16).set()
            rt.aio_suspend([cb1], timeout=10)
            assert rt.aio_return(cb1) == 8
        assert not [r for r in caplog.records if r.exc_info], "a completion raised"
        wait_until(lambda: not rt._fds)
    finally:
        sc.open_all()
        for t in threads:
            t.join(10)
        ctx.close(timeout=10)
        os.close(fd)


@pytest.mark.parametrize(
    "where",
    [
        "_accept",
        pytest.param(
            "_submit_one",
            marks=pytest.mark.skipif(
                posix._quick_syscall is None,
                reason="posix's quick path (raw system calls) is off here: portable mode",
            ),
        ),
    ],
)
def test_a_signal_handlers_aio_read_inside_a_submission_stays_in_its_fd_table(
    tmp_path: Path, where: str
) -> None:
    """A signal handler's aio_read that runs while the main thread's own
    submission holds the lock (re-entered: an RLock) must not be dropped
    from the fd's table: every aiocb in progress is in it."""
    p = tmp_path / "f"
    p.write_bytes(bytes(64))
    fd = os.open(p, os.O_RDONLY)
    sc = _Gated()
    ctx = AioContext(backend="threads", inline=False, syscalls=sc, deliver=False)
    rt = PosixAio(ctx)
    try:
        sc.gate(0).set()
        warm = posix.aiocb(fd, 0, bytearray(8))
        rt.aio_read(warm)
        rt.aio_suspend([warm], timeout=10)
        cb1 = posix.aiocb(fd, 16, bytearray(8), lio_opcode=posix.LIO_READ)
        cb2 = posix.aiocb(fd, 32, bytearray(8))
        fired = _reenter_at_fds_lookup(rt, lambda: rt.aio_read(cb2), where)
        try:
            if where == "_accept":
                rt.lio_listio(posix.LIO_NOWAIT, [cb1])
            else:
                rt.aio_read(cb1)
        finally:
            sys.setprofile(None)
        assert fired[0], "the handler never ran"
        with rt._lock:
            table = rt._fds.get(fd)
            assert table is not None
            assert cb1 in table.active
            assert cb2 in table.active, "the handler's aiocb is not in its fd's table"
    finally:
        sc.open_all()
        ctx.close(timeout=10)
        os.close(fd)


_LEASE_HOLDER = """
import fcntl, os, signal, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
signal.signal(signal.SIGIO, lambda *a: fcntl.fcntl(fd, 1024, fcntl.F_UNLCK))
try:
    fcntl.fcntl(fd, 1024, fcntl.F_RDLCK)  # F_SETLEASE
except OSError as e:
    print("no lease:", e.strerror, flush=True)
    sys.exit(0)
print("leased", flush=True)
sys.stdin.read()  # until the test is done
"""


@pytest.mark.parametrize("text", [False, True])
def test_write_bytes_to_a_leased_file_waits_for_the_lease_as_pathlib(
    tmp_path: Path, text: bool
) -> None:
    """A regular file another process holds a read lease on (as Samba and
    NFS servers do): the open for writing breaks the lease and waits for
    its holder to let go, as pathlib's write_bytes does.  (Before: the
    worker's O_NONBLOCK open -- there for FIFOs -- failed at once with
    BlockingIOError, and nothing was written.)"""
    p = tmp_path / "f"
    p.write_bytes(b"old contents")
    holder = subprocess.Popen(
        [sys.executable, "-c", _LEASE_HOLDER, str(p)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        said = holder.stdout.readline()
        if not said.startswith("leased"):
            pytest.skip(f"no file lease here ({said.strip()})")

        async def main() -> int:
            if text:
                return await threadlets.write_text(p, "new")
            return await threadlets.write_bytes(p, b"new")

        assert asyncio.run(main()) == 3
        assert p.read_bytes() == b"new"
    finally:
        holder.communicate(timeout=10)
