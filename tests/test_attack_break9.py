"""Attacks on what changed in round 9 (hot path, POSIX AIO, oneshot and
the tools): each test here failed before its fix."""

from __future__ import annotations

import asyncio
import gc
import os
import sys
import threading
from pathlib import Path

import pytest

import threadlets
from threadlets import oneshot
from threadlets.awaitable import current

from .conftest import interrupt_at_c_return


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
            loop.call_soon(lambda: (sys.setprofile(None), gc.enable()))
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
