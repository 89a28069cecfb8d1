"""Attacks on the direct delivery of io_uring completions (commit a7ec1ae):
the owner's reap delivering at once (``_CompletionQueue.direct``), the
ring's test-and-set hand-out, Ring._collect's wrapping runs and
_RingBackend.start's fast path.  Each test here failed on a7ec1ae; the
fixes landed with them (see each test's docstring)."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from threadlets import AioContext, AioRequest
from threadlets.engine import _RingBackend
from threadlets.pool import Threadlet

from .conftest import HAVE_RING


def _ring_context(**kwargs: Any) -> AioContext:
    if not HAVE_RING:
        pytest.skip("no io_uring here")
    return AioContext(backend="io_uring", **kwargs)


def test_a_workers_done_callback_leaves_no_direct_delivery_behind(path: Path) -> None:
    """A worker finishes a request that has a done-callback while the owner
    reaps the ring (cq.direct is the owner's): the worker's _finished saved
    the owner's ident and stored it back after the owner had left
    process_completions, so from then on a request finished inline ran its
    callback inside ctx.read() itself, in the submitting call (and any
    completion this thread reaped in a wait or a cancel ran its callback
    there).  Fixed: only the thread that holds ``direct`` clears and
    restores it around done-callbacks."""
    ctx = _ring_context()
    fd = os.open(path, os.O_RDONLY)
    r, w = os.pipe()
    go, in_dc, release = threading.Event(), threading.Event(), threading.Event()
    code = _RingBackend._done.__code__

    def trace(frame: Any, event: str, arg: object) -> None:
        # In the owner, reaping with cq.direct set: let the worker finish now.
        if event == "call" and frame.f_code is code:
            sys.settrace(None)
            go.set()
            assert in_dc.wait(10)

    try:
        on_ring = ctx.read(r, 0, bytearray(16), callback=lambda r: None)
        assert on_ring._on_ring
        os.write(w, b"x")
        worked = ctx.call(lambda: go.wait(10))
        worked.add_done_callback(lambda _: (in_dc.set(), release.wait(10)))
        sys.settrace(trace)
        try:
            assert ctx.wait(on_ring, timeout=10)
        finally:
            sys.settrace(None)
        assert go.is_set()
        release.set()
        assert ctx.wait(worked, timeout=10)
        # Cached now: a read finishes inline; its callback must wait for
        # process_completions.
        inside: list[bool] = []
        reading = [True]
        req = ctx.read(fd, 0, bytearray(16), callback=lambda r: inside.append(reading[0]))
        reading[0] = False
        assert ctx.wait(req, timeout=10)
        assert inside == [False], "the callback ran inside ctx.read()"
        assert ctx.drain(timeout=10)
        assert ctx.stats().outstanding == 0
    finally:
        release.set()
        go.set()
        ctx.close(timeout=10)
        os.close(fd)
        os.close(r)
        os.close(w)


_ = Threadlet, AioRequest
