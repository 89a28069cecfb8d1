"""Attacks on the batch-claimed completion delivery (engine, uring), the
unlocked ring claim, Ring._collect, the eventfd anti-spin rules and the
character-device rule.  Breaks are xfail(strict=True): each documents a
defect found, with the fix proposed in the report."""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from threadlets import AioContext, AioRequest
from threadlets.probe import pin_buffer, probe_io_uring
from threadlets.uring import OP_READ, Ring

from .conftest import wait_until

BACKENDS = ["threads", "io_uring"]
HAVE_RING = probe_io_uring().supported and os.uname().machine == "x86_64"


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    if request.param == "io_uring" and not HAVE_RING:
        pytest.skip("no io_uring here")
    return str(request.param)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    p = tmp_path / "data"
    p.write_bytes(bytes(range(256)) * 16)
    return p


@pytest.fixture
def switchy() -> Iterator[None]:
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(old)


def _ready_batch(ctx: AioContext, fd: int, n: int, cb: Any) -> list[AioRequest]:
    """n reads, all finished and queued for delivery (one batch)."""
    reqs = [ctx.read(fd, 0, bytearray(16), callback=cb) for _ in range(n)]
    for r in reqs:
        assert r.wait(timeout=10)
    return reqs


# -- 1: nested waits inside a callback --------------------------------------------------


@pytest.mark.xfail(
    strict=True,
    reason="ctx.wait(B) inside A's callback cannot deliver B: the outer "
    "process() holds B claimed (_taken) while A's callback runs",
)
def test_wait_for_a_later_request_of_the_same_batch_inside_a_callback(
    backend: str, path: Path
) -> None:
    fd = os.open(path, os.O_RDONLY)
    ctx = AioContext(backend=backend, inline=False)
    ran: list[AioRequest] = []
    answers: list[bool] = []
    try:
        reqs: list[AioRequest] = []

        def cb(r: AioRequest) -> None:
            ran.append(r)
            if r is reqs[0]:
                # B is finished and on the ready queue: processing
                # completions (timeout=0 still processes once) delivers it.
                answers.append(ctx.wait(reqs[1], timeout=0))

        reqs.extend(_ready_batch(ctx, fd, 2, cb))
        ctx.process_completions()
        assert answers == [True], f"wait(B) inside A's callback: {answers}, ran {ran}"
    finally:
        ctx.drain(timeout=10)
        ctx.close(timeout=10)
        os.close(fd)


@pytest.mark.xfail(
    strict=True,
    reason="drain() inside a callback spins at full CPU until its timeout: "
    "the rest of the outer batch is claimed by the outer process()",
)
def test_drain_inside_a_callback_does_not_spin(backend: str, path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    ctx = AioContext(backend=backend, inline=False)
    answers: list[tuple[bool, float]] = []
    try:
        reqs: list[AioRequest] = []

        def cb(r: AioRequest) -> None:
            if r is reqs[0]:
                cpu = time.process_time()
                ok = ctx.drain(timeout=0.5)
                answers.append((ok, time.process_time() - cpu))

        reqs.extend(_ready_batch(ctx, fd, 3, cb))
        ctx.process_completions()
        ok, cpu = answers[0]
        assert ok, f"drain() inside a callback timed out, {cpu:.2f} s of CPU"
    finally:
        ctx.drain(timeout=10)
        ctx.close(timeout=10)
        os.close(fd)


@pytest.mark.xfail(
    strict=True,
    reason="Ring.reap claims the whole batch (state 1): a done-callback that "
    "waits for a later completion of the same batch sleeps its timeout out",
)
def test_ring_done_callback_waits_for_a_later_completion_of_the_same_reap(path: Path) -> None:
    if not HAVE_RING:
        pytest.skip("no io_uring here")
    fd = os.open(path, os.O_RDONLY)
    ctx = AioContext(backend="io_uring", inline=False)
    ring = ctx._ring
    assert ring is not None and ring.owner_mode
    answers: list[bool] = []
    try:
        x = ctx.read(fd, 0, bytearray(16))
        y = ctx.read(fd, 16, bytearray(16))
        assert ring._pending  # both on the ring
        wait_until(lambda: ring._cq_tail.value - ring._cq_head.value == 2)
        x.add_done_callback(lambda _: answers.append(y.wait(timeout=1)))
        ctx.process_completions()  # one reap: [x, y]
        assert answers == [True]
    finally:
        ctx.drain(timeout=10)
        ctx.close(timeout=10)
        os.close(fd)
