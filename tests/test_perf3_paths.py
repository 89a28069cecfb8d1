"""The completion side's quick paths: a request of a context that delivers
nothing (threadlets.posix), with done-callbacks and no waiter, finished in
one spelled-out step (AioRequest._finished's first branch).  Its callbacks
run exactly once, the request counts as delivered once, and a drain() or
close() from a callback does not wait for itself -- whatever C return a
Ctrl-C lands on."""

from __future__ import annotations

import sys
import threading
from typing import Any

import pytest

from threadlets import AioContext
from threadlets.engine import AioRequest, _finishing
from threadlets.pool import ThreadletState

from .conftest import interrupt_at_c_return, wait_until


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
