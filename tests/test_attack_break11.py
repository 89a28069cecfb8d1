"""Attacks on the completion side's quick paths (AioRequest._finished's
quiet step, Ring.reap's one-lock end): several completions in one reap,
callbacks that close, raise or submit; waiters added as a request
finishes."""

from __future__ import annotations

import gc
import os
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from threadlets import AioContext

from .conftest import HAVE_RING, interrupt_at_c_return, wait_until


def _file(tmp_path: Path) -> int:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 4096)
    return os.open(path, os.O_RDONLY)


@pytest.mark.parametrize("deliver", [True, False], ids=["deliver", "quiet"])
def test_close_from_a_callback_in_a_batch_waits_for_the_others(
    tmp_path: Path, deliver: bool
) -> None:
    """Several ring completions handed out in one reap; the first one's
    done-callback closes the context: close() does not wait for its own
    request, waits for the rest of the batch (which the same reap hands
    out), and returns True with nothing outstanding; each callback once."""
    if not HAVE_RING:
        pytest.skip("no io_uring here")
    fd = _file(tmp_path)
    ctx = AioContext(backend="io_uring", inline=False, deliver=deliver)
    ring = ctx._ring
    assert ring is not None
    try:
        ran: list[Any] = []
        closed: list[bool] = []
        gate, entered = threading.Event(), threading.Event()
        if not deliver:
            # Hold the reaper thread back (in a done-callback) until all
            # four completed: one reap hands them out.
            main = threading.current_thread()

            def block(r: Any) -> None:
                if threading.current_thread() is not main:  # (not inline)
                    entered.set()
                    gate.wait(10)

            for _ in range(100):
                blocker = ctx.read(fd, 0, bytearray(8))
                blocker.add_done_callback(block)
                blocker.wait(10)
                if entered.wait(0.5):
                    break
            assert entered.is_set()
        reqs = [ctx.read(fd, 0, bytearray(8)) for _ in range(4)]
        ring.flush()  # (what the busy reaper holds back)

        def closing(r: Any) -> None:
            ran.append(r)
            closed.append(ctx.close(timeout=5))

        reqs[0].add_done_callback(closing)
        for r in reqs[1:]:
            r.add_done_callback(ran.append)
        wait_until(lambda: ring._cq_tail.value - ring._cq_head.value >= 4)
        gate.set()
        for r in reqs:
            assert r.wait(10)
        wait_until(lambda: len(ran) == 4)
        wait_until(lambda: bool(closed))
        assert closed == [True]
        assert sorted(map(id, ran)) == sorted(map(id, reqs))
        assert ctx.stats().outstanding == 0
    finally:
        gate.set()
        ctx.close(timeout=10)
        os.close(fd)


@pytest.mark.parametrize("deliver", [True, False], ids=["deliver", "quiet"])
def test_waiters_added_while_the_done_callbacks_run_are_not_lost(
    tmp_path: Path, backend: str, deliver: bool
) -> None:
    """While a request's done-callback blocks (it finished: DONE), another
    thread's wait(), add_done_callback() and cancel() answer at once and
    exactly once; the request is delivered (stats exact) only once its
    callbacks returned."""
    if backend == "io_uring" and not HAVE_RING:
        pytest.skip("no io_uring here")
    fd = _file(tmp_path)
    ctx = AioContext(backend=backend, inline=False, deliver=deliver)
    gate, entered = threading.Event(), threading.Event()
    main = threading.current_thread()
    try:
        ran: list[Any] = []

        def block(r: Any) -> None:
            ran.append(r)
            if threading.current_thread() is not main:
                entered.set()
                gate.wait(10)

        req = None
        for _ in range(100):
            req = ctx.read(fd, 0, bytearray(8))
            req.add_done_callback(block)
            if deliver:
                t = threading.Thread(target=ctx.drain, args=(10,))
                t.start()
            else:
                t = None
            if entered.wait(0.5):
                break
            if t is not None:
                t.join(10)
            ran.clear()
        assert entered.is_set()
        assert req is not None
        late: list[Any] = []
        assert req.wait(5)
        req.add_done_callback(late.append)
        assert late == [req]
        assert req.cancel().name == "ALLDONE"
        assert req.result() == 8
        assert ctx.stats().outstanding == 1
        gate.set()
        wait_until(lambda: ctx.stats().outstanding == 0)
        assert ran == [req]
        assert late == [req]
        if t is not None:
            t.join(10)
        assert ctx.close(timeout=10)
        assert ctx.stats().outstanding == 0
    finally:
        gate.set()
        ctx.close(timeout=10)
        os.close(fd)


def _batch_interrupted_at(n: int, fd: int, close_in: bool) -> int:
    ctx = AioContext(backend="io_uring", inline=False)
    ring = ctx._ring
    assert ring is not None
    assert ring.owner_mode
    try:
        counts = [0, 0, 0, 0]
        new: list[Any] = []
        closed: list[bool] = []

        def a(r: Any) -> None:
            counts[0] += 1
            raise ValueError("logged")

        def b(r: Any) -> None:
            counts[1] += 1
            raise KeyboardInterrupt

        def c(r: Any) -> None:
            counts[2] += 1
            new.append(ctx.read(fd, 0, bytearray(8)))

        def d(r: Any) -> None:
            counts[3] += 1
            if close_in:
                closed.append(ctx.close(timeout=10))

        reqs = [ctx.read(fd, 0, bytearray(8)) for _ in range(4)]
        for r, cb in zip(reqs, (a, b, c, d), strict=True):
            r.add_done_callback(cb)
        wait_until(lambda: ring._cq_tail.value - ring._cq_head.value >= 4)
        seen = interrupt_at_c_return(n)
        try:
            reqs[-1].wait(10)
        except KeyboardInterrupt:
            pass
        finally:
            sys.setprofile(None)
            gc.enable()
        for r in reqs:
            for _ in range(5):
                try:
                    assert r.wait(10)
                    break
                except KeyboardInterrupt:
                    pass  # (b's, raised by whichever reap ran it)
        assert counts == [1, 1, 1, 1], f"C return {n}: {counts}"
        assert ring._plugged_by is None, f"C return {n}"
        if close_in:
            assert closed == [True], f"C return {n}"
        else:
            assert ctx.drain(timeout=10), f"C return {n}"
        assert new, f"C return {n}"
        assert new[0].wait(10), f"C return {n}"
        assert new[0].result() == 8, f"C return {n}"
        assert ctx.stats().outstanding == 0, f"C return {n}"
        return seen[0]
    finally:
        ctx.close(timeout=10)


@pytest.mark.parametrize("close_in", [False, True], ids=["open", "closing"])
def test_ctrl_c_at_every_c_return_of_a_reap_of_a_mixed_batch(
    tmp_path: Path, close_in: bool
) -> None:
    """Four completions handed out in one reap: done-callbacks that raise
    ValueError, raise KeyboardInterrupt, submit a read, close the context.
    Ctrl-C at every C return of the reap: each callback once, the read
    submitted reaches the kernel, nothing outstanding, close() True."""
    if not HAVE_RING:
        pytest.skip("no io_uring here")
    fd = _file(tmp_path)
    try:
        n = 0
        while True:
            n += 1
            assert n < 800, "never ran to its end"
            if _batch_interrupted_at(n, fd, close_in) < n:
                break
        assert n > 15, n
    finally:
        os.close(fd)


@pytest.mark.parametrize("deliver", [True, False], ids=["deliver", "quiet"])
def test_a_ring_cancel_racing_the_completion_answers_what_moved(
    backend: str, deliver: bool, switchy: None
) -> None:
    """A read of a pipe, cancelled as another thread writes the byte it
    waits for: CANCELED and the byte still in the pipe, or NOTCANCELED /
    ALLDONE and the byte read -- never both, never neither; its
    done-callback runs once and nothing is left outstanding."""
    if backend == "io_uring" and not HAVE_RING:
        pytest.skip("no io_uring here")
    ctx = AioContext(backend=backend, inline=False, deliver=deliver)
    try:
        for i in range(30):
            rfd, wfd = os.pipe()
            try:
                ran: list[Any] = []
                buf = bytearray(1)
                req = ctx.read(rfd, 0, buf)
                req.add_done_callback(ran.append)
                go = threading.Barrier(2)

                def writer(wfd: int = wfd, go: threading.Barrier = go) -> None:
                    go.wait(10)
                    os.write(wfd, b"z")

                t = threading.Thread(target=writer)
                t.start()
                go.wait(10)
                answer = req.cancel()
                t.join(10)
                if answer.name == "CANCELED":
                    assert req.cancelled()
                    assert os.read(rfd, 1) == b"z", i
                else:
                    assert answer.name in ("NOTCANCELED", "ALLDONE")
                    assert req.wait(10)
                    assert req.result() == 1, i
                    assert buf == b"z", i
                    os.set_blocking(rfd, False)
                    with pytest.raises(BlockingIOError):
                        os.read(rfd, 1)
                if deliver:
                    assert ctx.drain(timeout=10)
                wait_until(lambda: ctx.stats().outstanding == 0)
                assert ran == [req], i
            finally:
                os.close(rfd)
                os.close(wfd)
        assert ctx.close(timeout=10)
    finally:
        ctx.close(timeout=10)


def test_close_from_the_reapers_callback_waits_for_a_later_completion(tmp_path: Path) -> None:
    """A context that delivers nothing: a done-callback in its reaper thread
    closes it while another request (a pipe read) is still in the kernel;
    the byte arrives later.  close() reaps it (nobody else will) and
    returns True, the other request finished, nothing outstanding."""
    if not HAVE_RING:
        pytest.skip("no io_uring here")
    fd = _file(tmp_path)
    rfd, wfd = os.pipe()
    ctx = AioContext(backend="io_uring", inline=False, deliver=False)
    main = threading.current_thread()
    entered = threading.Event()
    try:
        closed: list[bool] = []
        other = ctx.read(rfd, 0, bytearray(1))

        def closing(r: Any) -> None:
            if threading.current_thread() is not main:
                entered.set()
                closed.append(ctx.close(timeout=10))

        for _ in range(100):
            req = ctx.read(fd, 0, bytearray(8))
            req.add_done_callback(closing)
            if entered.wait(0.5):
                break
        assert entered.is_set()
        os.write(wfd, b"z")
        assert other.wait(10)
        assert other.result() == 1
        wait_until(lambda: bool(closed))
        assert closed == [True]
        assert ctx.closed
        assert ctx.stats().outstanding == 0
    finally:
        ctx.close(timeout=10)
        os.close(fd)
        os.close(rfd)
        os.close(wfd)
