"""The completion side's quick paths: a request of a context that delivers
nothing (threadlets.posix), with done-callbacks and no waiter, finished in
one spelled-out step (AioRequest._finished's first branch).  Its callbacks
run exactly once, the request counts as delivered once, and a drain() or
close() from a callback does not wait for itself -- whatever C return a
Ctrl-C lands on."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from threadlets import AioContext
from threadlets.engine import AioRequest, _finishing
from threadlets.pool import ThreadletState

from .conftest import HAVE_RING, interrupt_at_c_return, wait_until


def _claimed_request(ctx: AioContext, callbacks: list[Any]) -> AioRequest:
    """A request as a backend holds it: admitted, its done-callbacks given
    before publication, claimed unpublished (what the ring does)."""
    req = AioRequest(ctx, "read", None, (), None)
    req._callbacks = callbacks
    cq = ctx._cq
    with cq.lock:
        cq.admitted += 1
        req._admitted = True
    req._claim_unpublished()
    return req


@pytest.mark.parametrize("how", ["append", "two", "raises"])
def test_ctrl_c_at_every_c_return_of_a_quiet_finish_runs_callbacks_once(how: str) -> None:
    """Ctrl-C at the n-th C return of _finish, for every n, on a context
    that delivers nothing: each done-callback ran once, the request is DONE
    with its result, delivered once (nothing outstanding; close() returns),
    not claimed, and this thread no longer counts it as its own."""
    n = 0
    while True:
        n += 1
        assert n < 500, "never ran to its end"
        ctx = AioContext(backend="threads", inline=False, deliver=False)
        try:
            calls: list[Any] = []
            second: list[Any] = []

            def raising(r: Any, calls: list[Any] = calls) -> None:
                calls.append(r)
                raise ValueError("logged, not raised")

            cbs: list[Any]
            if how == "append":
                cbs = [calls.append]
            elif how == "two":
                cbs = [calls.append, second.append]
            else:
                cbs = [raising]
            req = _claimed_request(ctx, cbs)
            seen = interrupt_at_c_return(n)
            try:
                assert req._finish(7, None)
            except KeyboardInterrupt:
                pass
            finally:
                sys.setprofile(None)
            assert calls == [req], f"C return {n}"
            if how == "two":
                assert second == [req], f"C return {n}"
            assert req._state is ThreadletState.DONE
            assert req.result() == 7
            assert req._processed, f"C return {n}"
            assert ctx.stats().outstanding == 0, f"C return {n}"
            assert not ctx.queue._claimed, f"C return {n}"
            assert not _finishing.requests, f"C return {n}"
            assert ctx.close(timeout=10), f"C return {n}"
        finally:
            ctx.close(timeout=10)
        if seen[0] < n:
            break
    assert n > 3, f"only {n} C returns"


def test_a_quiet_finish_counts_its_request_as_the_callbacks_own() -> None:
    """Inside the quick path's callback the request is this thread's own: a
    close() there does not wait for it (it would wait for itself) and a
    drain-like count sees one; after, nothing is left counted."""
    ctx = AioContext(backend="threads", inline=False, deliver=False)
    seen: list[object] = []

    def cb(r: Any) -> None:
        seen.append(ctx._own_finishing())
        seen.append(ctx.close(timeout=5))

    req = _claimed_request(ctx, [cb])
    assert req._finish(3, None)
    assert seen == [1, True]
    assert ctx.closed
    assert ctx.stats().outstanding == 0
    assert not _finishing.requests


def test_a_finished_request_with_a_waiter_takes_the_long_way() -> None:
    """A waiter (aio_suspend's, result()'s) is woken and the callbacks run:
    the quick path is only for a request with none."""
    ctx = AioContext(backend="threads", inline=False, deliver=False)
    try:
        calls: list[Any] = []
        req = _claimed_request(ctx, [calls.append])
        woke: list[bool] = []
        t = threading.Thread(target=lambda: woke.append(req.wait(10)))
        t.start()
        wait_until(lambda: bool(req._waiters))
        assert req._finish(5, None)
        t.join(10)
        assert woke == [True]
        assert calls == [req]
        assert ctx.stats().outstanding == 0
    finally:
        assert ctx.close(timeout=10)


@pytest.mark.parametrize("sleeper", [False, True], ids=["alone", "sleeper"])
def test_ctrl_c_at_every_c_return_of_a_reap_leaves_nothing_held_back(
    tmp_path: Path, sleeper: bool
) -> None:
    """The end of a reap holds the ring's lock once for the queue's
    clean-up, the plug's release, what was held back and the NOP for
    sleepers, then kicks once.  Ctrl-C at every C return of a reap (a
    req.wait() in the owner) whose done-callback submits another read
    (held back by the reap's plug), with a thread counted asleep in wait()
    or not: after it the ring is not plugged and nothing is left held back
    -- the second read reaches the kernel without anyone kicking again --
    and the done-callback ran once."""
    if not HAVE_RING:
        pytest.skip("no io_uring here")
    path = tmp_path / "f"
    path.write_bytes(b"x" * 4096)
    fd = os.open(path, os.O_RDONLY)
    n = 0
    try:
        while True:
            n += 1
            assert n < 500, "never ran to its end"
            if _reap_interrupted_at(n, fd, sleeper) < n:
                break  # the interrupt no longer lands: every point was tried
        assert n > 5, f"only {n} C returns"
    finally:
        os.close(fd)


def _reap_interrupted_at(n: int, fd: int, sleeper: bool) -> int:
    ctx = AioContext(backend="io_uring", inline=False)
    ring = ctx._ring
    assert ring is not None
    assert ring.owner_mode
    try:
        second: list[Any] = []
        ran: list[Any] = []

        def resubmit(r: Any) -> None:
            ran.append(r)
            second.append(ctx.read(fd, 0, bytearray(8)))

        req = ctx.read(fd, 0, bytearray(8))
        req.add_done_callback(resubmit)
        wait_until(lambda: ring._cq_tail.value - ring._cq_head.value >= 1)
        if sleeper:
            with ring._lock:
                ring._sleepers += 1  # (as Ring.wait counts a sleeper)
        seen = interrupt_at_c_return(n)
        try:
            req.wait(10)
        except KeyboardInterrupt:
            pass
        finally:
            sys.setprofile(None)
        if sleeper:
            with ring._lock:
                ring._sleepers -= 1
        assert ring._plugged_by is None, f"C return {n}: left plugged"
        if second:
            # Sent by the reap that ran the callback: it completes with no
            # other kick (nothing of ours is held back).
            assert ring._unsubmitted == 0, f"C return {n}: held back"
            wait_until(lambda: ring._cq_tail.value != ring._cq_head.value)
        assert req.wait(10)
        assert ran == [req], f"C return {n}"
        assert ctx.drain(timeout=10), f"C return {n}"
        if second:
            assert second[0].result() == 8
        return seen[0]
    finally:
        ctx.close(timeout=10)
