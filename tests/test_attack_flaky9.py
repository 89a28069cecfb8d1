"""Ninth session, flaky: the Ctrl-C that lost a callback (or counted one
twice) once in some 25 runs of test_attack_direct's
test_ctrl_c_at_every_c_return_of_a_direct_delivery[threads-submit], and an
inline open's descriptor leaked by a Ctrl-C.

The flake: a callback submits a read; Ctrl-C lands as the pool's _submit
lets its lock go, the request already queued (C return 14 there).
AioContext._start's clean-up then decided whether the submission had
happened from two looks at shared state, racing the worker that had just
been woken (or started) for the request:

* it read QUEUED, then asked the pool whether its queue still held the
  request; a worker taking it in between made the answer "never
  submitted": the admission was taken back from a request that ran (the
  context's counts went negative, and a drain() could return before the
  callback ran);
* or it read DONE (the worker had run it and was finishing it) and
  completed the request itself, as for one finished inline: the worker
  completed it too, so it sat twice in the ready queue (delivered once,
  counted twice).

Found on the way: a refused request (the context closed as it was
submitted) that had failed at once still had its callback run; and a
Ctrl-C as a completion was appended to the ready queue left the eventfd
unwritten.

Each test below forces its interleaving with events (or traces); each
failed on the old code every time."""

from __future__ import annotations

import errno
import os
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

from threadlets import AioContext, AioRequest, ThreadletQueue, asyncfile, oneshot

from .test_attack_left9 import _sweep

SUBMIT = ThreadletQueue._submit.__code__
HOLDS = ThreadletQueue._holds.__code__
START = AioContext._start.__code__


def _interrupt_as_submit_lets_go(got: list[Any]) -> None:
    """Profile this thread: KeyboardInterrupt at the first C return in the
    pool's _submit (its lock let go, the item queued), the item kept in
    ``got``."""

    def prof(frame: FrameType, event: str, arg: object) -> None:
        if event == "c_return" and frame.f_code is SUBMIT:
            sys.setprofile(None)
            got.append(frame.f_locals["item"])
            raise KeyboardInterrupt

    sys.setprofile(prof)


def _balanced(ctx: AioContext) -> None:
    s = ctx.stats()
    assert s.outstanding == 0, s
    assert s.processed == s.submitted, s


def test_a_worker_taking_the_request_between_the_clean_ups_two_looks(backend: str) -> None:
    """The one worker is busy; Ctrl-C as _submit lets its lock go (the
    request queued); the clean-up reads QUEUED, and as it asks the pool
    whether the request is still queued, the worker takes it.  Before: the
    pool said no (not in its queue any more), the admission was taken back
    from a request that then ran -- outstanding -1, and drain() could
    return before its callback ran."""
    queue = ThreadletQueue(max_threads=1)
    ctx = AioContext(queue, backend=backend, inline=False)
    go, started, release = threading.Event(), threading.Event(), threading.Event()
    try:
        busy = threading.Event()
        # The one worker holds the blocker: nothing else is taken until go.
        blocker = ctx.call(lambda: (busy.set(), go.wait(10)))
        assert busy.wait(10)

        def target() -> int:
            started.set()
            release.wait(10)
            return 7

        def trace(frame: FrameType, event: str, arg: object) -> None:
            if event == "call" and frame.f_code is HOLDS:
                sys.settrace(None)
                go.set()  # the worker finishes the blocker and takes ours now
                assert started.wait(10)

        ran: list[AioRequest] = []
        got: list[Any] = []
        _interrupt_as_submit_lets_go(got)
        sys.settrace(trace)  # type: ignore[arg-type]
        try:
            with pytest.raises(KeyboardInterrupt):
                ctx.call(target, callback=ran.append)
        finally:
            sys.setprofile(None)
            sys.settrace(None)
        assert started.is_set(), "the clean-up never asked the pool"
        (req,) = got
        assert ctx.stats().outstanding == 2, "the running request is outstanding"
        release.set()
        assert req.wait(10)
        assert ctx.drain(timeout=10)
        assert ran == [req]
        assert req.result() == 7
        assert blocker.done()
        _balanced(ctx)
    finally:
        go.set()
        release.set()
        ctx.close(timeout=10)
        queue.close(timeout=10)


def test_a_worker_finishing_the_request_before_the_clean_up_looks(backend: str) -> None:
    """Ctrl-C as _submit lets its lock go; the worker started for the
    request runs it and is finishing it (in a done-callback) when the
    clean-up looks: DONE.  Before, the clean-up completed it as it does a
    request finished inline, and the worker completed it too: it sat twice
    in the ready queue -- its callback ran once, but it was counted
    delivered twice (outstanding -1)."""
    queue = ThreadletQueue(max_threads=1)  # (no worker yet: one is started for it)
    ctx = AioContext(queue, backend=backend, inline=False)
    in_dc, release = threading.Event(), threading.Event()
    try:
        ran: list[AioRequest] = []
        req = AioRequest(ctx, "call", lambda: 7, (), ran.append)
        req.add_done_callback(lambda _: (in_dc.set(), release.wait(10)))

        def local(frame: FrameType, event: str, arg: object) -> Any:
            if event == "exception":
                sys.settrace(None)
                frame.f_trace = None
                assert in_dc.wait(10)  # DONE, its completion under way
                return None
            return local

        def trace(frame: FrameType, event: str, arg: object) -> Any:
            if event == "call" and frame.f_code is START:
                return local
            return None

        got: list[Any] = []
        _interrupt_as_submit_lets_go(got)
        sys.settrace(trace)
        try:
            with pytest.raises(KeyboardInterrupt):
                ctx._start(req)
        finally:
            sys.setprofile(None)
            sys.settrace(None)
        assert got == [req]
        assert in_dc.is_set()
        release.set()
        assert queue.drain(timeout=10)  # (the worker's delivery included)
        assert ctx.drain(timeout=10)
        assert ran == [req]
        assert list(ctx._cq.ready) == []
        _balanced(ctx)
    finally:
        release.set()
        ctx.close(timeout=10)
        queue.close(timeout=10)


def test_a_request_failed_at_once_as_another_thread_closes_runs_no_callback(
    backend: str,
) -> None:
    """A read of a bad descriptor fails at once (a request born finished);
    the context is closed just as it is submitted (close() from another
    thread, here from a trace): read() raises RuntimeError("the AioContext
    is closed") as for any request refused.  Before, the clean-up then
    completed the refused request all the same: its callback ran, counted
    delivered though never admitted (outstanding -1)."""
    ctx = AioContext(backend=backend, inline=False)
    ran: list[AioRequest] = []
    r, w = os.pipe()
    os.close(w)
    os.close(r)  # (a descriptor number closed: EBADF)

    def trace(frame: FrameType, event: str, arg: object) -> None:
        if event == "call" and frame.f_code is START:
            sys.settrace(None)
            assert ctx.close(timeout=10)

    sys.settrace(trace)  # type: ignore[arg-type]
    try:
        with pytest.raises(RuntimeError, match="closed"):
            ctx.read(r, 0, bytearray(4), callback=ran.append)
    finally:
        sys.settrace(None)
    assert ctx.closed
    assert ran == []
    _balanced(ctx)


def test_the_bad_descriptor_read_is_delivered_when_not_closed(backend: str) -> None:
    """(The same read, the context open: its callback runs once, EBADF.)"""
    ctx = AioContext(backend=backend, inline=False)
    r, w = os.pipe()
    os.close(w)
    os.close(r)
    ran: list[AioRequest] = []
    try:
        req = ctx.read(r, 0, bytearray(4), callback=ran.append)
        assert ctx.drain(timeout=10)
        assert ran == [req]
        assert req.error == errno.EBADF
        _balanced(ctx)
    finally:
        ctx.close(timeout=10)


def test_ctrl_c_as_a_completion_is_queued_still_signals(backend: str, path: Path) -> None:
    """A read finished inline (a callback: it is queued for delivery);
    Ctrl-C as the ready queue's append returns.  The request is queued, so
    the clean-up does not queue it again -- and before, nothing wrote the
    eventfd for it: an event loop waiting on fileno() slept on (until some
    other completion came).  Now it is readable at once."""
    import select

    from threadlets.engine import _CompletionQueue

    code = _CompletionQueue._enqueue.__code__
    fd = os.open(path, os.O_RDONLY)
    ctx = AioContext(backend=backend)
    try:
        if not ctx.inline:
            pytest.skip("no inline reads here (RWF_NOWAIT)")
        warm = ctx.read(fd, 0, bytearray(16), callback=lambda _: None)
        assert ctx.wait(warm, timeout=10)
        fired: list[object] = []

        def prof(frame: FrameType, event: str, arg: object) -> None:
            if event == "c_return" and frame.f_code is code:
                sys.setprofile(None)
                fired.append(arg)
                raise KeyboardInterrupt

        ran: list[AioRequest] = []
        sys.setprofile(prof)
        try:
            with pytest.raises(KeyboardInterrupt):
                ctx.read(fd, 0, bytearray(16), callback=ran.append)
        finally:
            sys.setprofile(None)
        assert len(fired) == 1
        assert getattr(fired[0], "__name__", "") == "append", fired
        assert len(ctx._cq.ready) == 1
        readable, _, _ = select.select([ctx.fileno()], [], [], 0)
        assert readable, "queued, but the eventfd was never written"
        assert ctx.on_readable() == 1
        assert len(ran) == 1
        assert ran[0].result() == 16
        _balanced(ctx)
    finally:
        ctx.close(timeout=10)
        os.close(fd)


# -- the inline open (asyncfile._open_inline) -----------------------------------------------


needs_openat2 = pytest.mark.skipif(
    oneshot._openat2 is None, reason="no inline open here (openat2 RESOLVE_CACHED)"
)


@needs_openat2
@pytest.mark.parametrize("kind", ["cached", "nonblocking", "directory", "missing"])
def test_ctrl_c_anywhere_in_the_inline_open_leaks_nothing(tmp_path: Path, kind: str) -> None:
    """threadlets.open's inline open, a KeyboardInterrupt after each call
    inside it in turn (and inside oneshot's open): no descriptor is left
    open.  Before, it called open_cached, and a Ctrl-C as that returned
    the descriptor (a Python call's return) left it open for good."""
    p = tmp_path / "f"
    if kind == "directory":
        p.mkdir()
    elif kind != "missing":
        p.write_bytes(b"x" * 100)
    flags = os.O_RDONLY | os.O_CLOEXEC | (os.O_NONBLOCK if kind == "nonblocking" else 0)

    def caller() -> None:
        try:
            got = asyncfile._open_inline(str(p), flags)
        except IsADirectoryError:
            assert kind == "directory"
            return
        if got is not None:  # (what the caller is given is its own to close)
            os.close(got[0])
        assert (got is None) == (kind == "missing")

    codes = {
        asyncfile._open_inline.__code__,
        oneshot.open_cached_into.__code__,
        oneshot.open_cached.__code__,
        oneshot._openat2.__code__,  # type: ignore[union-attr]
    }
    _sweep(codes, caller)


@needs_openat2
def test_the_inline_open_gives_what_io_open_gives(tmp_path: Path) -> None:
    """(Its answers: the blocking mode as asked, the size, EISDIR.)"""
    p = tmp_path / "f"
    p.write_bytes(b"y" * 123)
    got = asyncfile._open_inline(str(p), os.O_RDONLY | os.O_CLOEXEC)
    assert got is not None
    fd, st = got
    try:
        assert os.get_blocking(fd)
        assert st.st_size == 123
        assert os.pread(fd, 200, 0) == p.read_bytes()
    finally:
        os.close(fd)
    with pytest.raises(IsADirectoryError):
        asyncfile._open_inline(str(tmp_path), os.O_RDONLY)
    assert asyncfile._open_inline(str(tmp_path / "missing"), os.O_RDONLY) is None
