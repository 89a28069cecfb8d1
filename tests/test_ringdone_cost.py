"""The ring's fused completion (issue 13): AioRequest._ring_rw_done finishes a
request of _start_rw's fast path that the kernel completed with its full
count without Threadlet._finish's, _finished's and
_CompletionQueue.complete's frames -- the outcome before the state under
the queue's lock, then (no waiter, no done-callback) complete's steps
spelled out: delivered at once in the thread reaping inside
process_completions, else queued.  (Its claim is the ring's record of it,
which ends with the reap's batch: see tests/test_ring_path_cost.py.)
Each promise of the long way must hold: exactly-once delivery under a
Ctrl-C at every C return, waiters and done-callbacks, a fork as the state
changed."""

from __future__ import annotations

import gc
import os
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from threadlets import AioContext, AioRequest, aligned_buffer
from threadlets import pool as pool_mod
from threadlets.engine import _CompletionQueue

from .conftest import HAVE_RING, interrupt_at_c_return, wait_until

pytestmark = pytest.mark.skipif(not HAVE_RING, reason="no io_uring here")


def _warm(ctx: AioContext, fd: int) -> None:
    """Until the file is one _start_rw sends to the ring itself."""
    assert ctx.read(fd, 0, bytearray(4096)).result(timeout=10) == 4096
    assert ctx.read(fd, 4096, bytearray(4096)).result(timeout=10) == 4096
    assert ctx._files[fd] in ctx._ring_plain


def _settled(ctx: AioContext, where: object) -> None:
    assert ctx.drain(timeout=10), where
    assert ctx.stats().outstanding == 0, where
    assert not ctx.queue._claimed, where


@pytest.fixture
def data_fd(tmp_path: Path) -> Any:
    p = tmp_path / "f"
    data = os.urandom(4 * 4096)
    p.write_bytes(data)
    fd = os.open(p, os.O_RDWR)
    try:
        yield fd, data
    finally:
        os.close(fd)


def test_the_fused_path_is_taken(data_fd: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full read, reaped inside poll(): no _finish, no complete() frame;
    the callback ran once, in this thread, with the real count."""
    fd, data = data_fd
    ctx = AioContext(backend="io_uring", inline=False)
    try:
        _warm(ctx, fd)
        calls: list[str] = []
        monkeypatch.setattr(pool_mod.Threadlet, "_finish", lambda *a: calls.append("finish"))
        monkeypatch.setattr(_CompletionQueue, "complete", lambda *a: calls.append("complete"))
        got: list[tuple[AioRequest, int]] = []
        buf = bytearray(4096)
        req = ctx.read(fd, 8192, buf, callback=lambda r: got.append((r, threading.get_ident())))
        while not got:
            ctx.poll(10)
        assert got == [(req, threading.get_ident())]
        assert calls == []
        assert req.result() == 4096
        assert bytes(buf) == data[8192:12288]
        monkeypatch.undo()
        _settled(ctx, "end")
    finally:
        ctx.close(timeout=10)


@pytest.mark.parametrize("reap", ["poll", "wait", "result"])
@pytest.mark.parametrize("watched", [False, True])
def test_ctrl_c_at_every_c_return_of_the_completion(data_fd: Any, reap: str, watched: bool) -> None:
    """Ctrl-C at the n-th C return from the reap on -- inside poll() (the
    delivery at once), ctx.wait() or result() (queued for delivery), with
    a done-callback or not -- for every n: the request completes with its
    full count (or EINTR carrying what moved), its callback runs exactly
    once, a done-callback exactly once, nothing stays outstanding or
    claimed."""
    fd, data = data_fd
    n = 0
    while True:
        n += 1
        assert n < 500, "never ran to its end"
        ctx = AioContext(backend="io_uring", inline=False)
        try:
            _warm(ctx, fd)
            calls: list[AioRequest] = []
            done_cbs: list[object] = []
            buf = aligned_buffer(4096)
            req = ctx.read(fd, 4096, buf, callback=calls.append)
            if watched:
                req.add_done_callback(done_cbs.append)
            seen = interrupt_at_c_return(n)
            try:
                if reap == "poll":
                    while not req.done():
                        ctx.poll(10)
                elif reap == "wait":
                    ctx.wait(req, timeout=10)
                else:
                    req.result(timeout=10)
            except KeyboardInterrupt:
                pass
            finally:
                sys.setprofile(None)
                gc.enable()
            _settled(ctx, f"C return {n}")
            assert req.done(), n
            assert calls == [req], (n, calls)
            assert done_cbs == ([req] if watched else []), (n, done_cbs)
            exc = req.exception()
            if exc is None:
                assert req.result() == 4096, n
                assert bytes(buf) == data[4096:8192], n
            else:
                assert isinstance(exc, InterruptedError), (n, exc)
        finally:
            ctx.close(timeout=10)
        if seen[0] < n:
            break  # the interrupt no longer lands: every point was tried
    assert n > 5, f"only {n} C returns: nothing reached the completion"


def test_a_waiter_from_another_thread_is_woken(data_fd: Any) -> None:
    """A thread waiting on the request (the pool's wait: it does not reap)
    when this thread reaps it inside poll(): woken.  (Guard: the fused
    path's look at ``_waiters``.)"""
    fd, _ = data_fd
    ctx = AioContext(backend="io_uring", inline=False)
    try:
        _warm(ctx, fd)
        for _ in range(5):
            req = ctx.read(fd, 4096, aligned_buffer(4096))
            woke: list[bool] = []
            t = threading.Thread(
                target=lambda r=req, w=woke: w.append(pool_mod.Threadlet.wait(r)), daemon=True
            )
            t.start()
            wait_until(lambda r=req: bool(r._waiters) or r.done())
            while not req.done():
                ctx.poll(10)
            t.join(10)
            if t.is_alive():  # never woken: let it go, and fail
                for w in req._waiters or ():
                    w.release()
                t.join(10)
                pytest.fail("a waiter was not woken by the completion")
            assert woke == [True]
        _settled(ctx, "end")
    finally:
        ctx.close(timeout=10)


def test_a_fork_as_the_state_changed_does_not_deliver_in_the_child(data_fd: Any) -> None:
    """A fork at the lock's release in the fused path (a signal handler's
    fork lands there): in the child the request is the parent's (counted
    as delivered by _reset_after_fork), so the thread that goes on there
    runs no callback; the parent delivers it once.  (Guard: the fused
    path's look at ``_processed``.)"""
    fd, _ = data_fd
    ctx = AioContext(backend="io_uring", inline=False)
    try:
        _warm(ctx, fd)
        calls: list[AioRequest] = []
        req = ctx.read(fd, 4096, aligned_buffer(4096), callback=calls.append)
        ring_done = AioRequest._ring_rw_done.__code__
        pid = [-1]

        def prof(frame: Any, event: str, arg: Any) -> None:
            if event == "c_return" and frame.f_code is ring_done and arg.__name__ == "__exit__":
                sys.setprofile(None)
                pid[0] = os.fork()

        sys.setprofile(prof)
        try:
            while not req.done():
                ctx.poll(10)
        finally:
            sys.setprofile(None)
        if pid[0] == 0:  # the child
            code = 3
            try:
                code = 0 if calls == [] and ctx.stats().outstanding == 0 else 1
            finally:
                os._exit(code)
        assert pid[0] > 0, "the fused path's lock was never let go"
        _, status = os.waitpid(pid[0], 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert calls == [req]
        _settled(ctx, "end")
    finally:
        ctx.close(timeout=10)
