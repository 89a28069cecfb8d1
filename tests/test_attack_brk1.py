"""Attacks on the merged speed changes (h-thr, h-ring3, h-cached): the
promises each one broke, pinned.

* A fork from another thread while the reaping thread is inside
  Ring._collect's C call -- a garbage collection there runs Python code
  (a gc callback, a finalizer), so the thread can switch: a request whose
  callback _collect took off _pending and had not put on the ready queue
  yet is on neither, and the child's reset must still find it (it reads
  CANCELLED there).
"""

from __future__ import annotations

import gc
import os
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from threadlets import AioContext

from .conftest import HAVE_RING, wait_until

ring_only = pytest.mark.skipif(not HAVE_RING, reason="no io_uring here")


@pytest.fixture
def data_fd(tmp_path: Path) -> Any:
    p = tmp_path / "f"
    data = os.urandom(8 * 4096)
    p.write_bytes(data)
    fd = os.open(p, os.O_RDWR)
    try:
        yield fd, data
    finally:
        os.close(fd)


def _held(ring: Any, cb: Any) -> bool:
    return any(c == cb for c in ring._pending.values()) or any(it[0] == cb for it in ring._ready)


@ring_only
@pytest.mark.parametrize("path", ["fast", "start"])
def test_a_fork_while_collect_moves_a_batch_finds_every_request(data_fd: Any, path: str) -> None:
    """Four reads complete; the reaping thread's _collect is interrupted by
    a garbage collection whose callback lets another thread fork (as any
    Python code a collection runs may: a finalizer, a gc callback) at the
    point a request's callback is off _pending and not on the ready queue:
    in the child every one of the four reads CANCELLED and a wait returns;
    in the parent all four complete with their data, once each."""
    fd, data = data_fd
    ctx = AioContext(backend="io_uring", inline=False)
    ring = ctx._ring
    assert ring is not None
    try:
        if path == "fast":
            assert ctx.read(fd, 0, bytearray(4096)).result(timeout=10) == 4096
        else:
            ctx.forget(fd)  # (start(): a file the context does not know yet)
        bufs = [bytearray(4096) for _ in range(4)]
        reqs = []
        for i, b in enumerate(bufs):
            reqs.append(ctx.read(fd, 4096 * i, b))
            if path == "start":
                ctx.forget(fd)
        assert all(r._on_ring for r in reqs)
        cbs = [r._ring_rw_done if r._transfer is None else r._ring_done for r in reqs]
        wait_until(lambda: ring._cq_tail.value - ring._cq_head.value >= 4)

        go, forked = threading.Event(), threading.Event()
        status: list[int] = []
        fired = [False]

        def forker() -> None:
            go.wait()
            pid = os.fork()
            if pid == 0:
                code = 3
                try:
                    ok = all(r.cancelled() and r.wait(0) for r in reqs)
                    code = 0 if ok else 1
                finally:
                    os._exit(code)
            _, st = os.waitpid(pid, 0)
            status.append(os.waitstatus_to_exitcode(st))
            forked.set()

        def on_gc(phase: str, info: object) -> None:
            if fired[0] or phase != "start":
                return
            frame = sys._getframe(1)
            if frame.f_code.co_name != "_collect":
                return
            if all(_held(ring, cb) for cb in cbs):
                return  # (nothing in transit yet)
            fired[0] = True
            go.set()
            forked.wait(10)

        t = threading.Thread(target=forker)
        t.start()
        threshold = gc.get_threshold()
        gc.callbacks.append(on_gc)
        gc.set_threshold(1)
        try:
            with ring._lock:
                ring._collect()
        finally:
            gc.set_threshold(*threshold)
            gc.callbacks.remove(on_gc)
            go.set()
            t.join(10)
        assert fired[0], "no collection inside _collect's move"
        assert status == [0], "a request on neither _pending nor the ready queue at the fork"
        for r in reqs:
            assert ctx.wait(r, timeout=10)
            assert r.result() == 4096
        for i, b in enumerate(bufs):
            assert bytes(b) == data[4096 * i : 4096 * (i + 1)]
        assert ctx.drain(timeout=10)
    finally:
        ctx.close(timeout=10)


@ring_only
def test_a_fork_inside_collect_in_the_reaping_thread_hands_out_nothing_in_the_child() -> None:
    """The reaping thread itself forks inside _collect's move (a gc
    callback, a finalizer): in the child the reap goes on, with the rest of
    the batch put on the ready queue after the fork's hook marked what was
    there handed out -- none of the parent's completions may be handed out
    in the child; in the parent each is, once."""
    from threadlets.uring import OP_NOP, Ring

    efd = os.eventfd(0, os.EFD_CLOEXEC)
    ring = Ring(8, eventfd=efd)
    ran: list[int] = []
    child_pid = [-1]
    cbs = [lambda res, i=i: ran.append(i) for i in range(4)]

    def on_gc(phase: str, info: object) -> None:
        if child_pid[0] != -1 or phase != "start":
            return
        if sys._getframe(1).f_code.co_name != "_collect":
            return
        if all(_held(ring, cb) for cb in cbs):
            return
        child_pid[0] = os.fork()

    try:
        for cb in cbs:
            assert ring.submit(OP_NOP, -1, 0, 0, 0, 0, cb)
        wait_until(lambda: ring._cq_tail.value - ring._cq_head.value == 4)
        threshold = gc.get_threshold()
        gc.callbacks.append(on_gc)
        gc.set_threshold(1)
        handed = -1
        try:
            handed = ring.reap()
        finally:
            if child_pid[0] == 0:
                os._exit(0 if ran == [] and handed == 0 else 1)
            gc.set_threshold(*threshold)
            gc.callbacks.remove(on_gc)
        assert child_pid[0] > 0, "no collection inside _collect's move"
        _, status = os.waitpid(child_pid[0], 0)
        assert os.waitstatus_to_exitcode(status) == 0, "the child handed out the parent's"
        assert ran == [0, 1, 2, 3]
        assert handed == 4
    finally:
        ring.close()
        os.close(efd)


@pytest.mark.parametrize("ctx_backend", ["threads", pytest.param("io_uring", marks=ring_only)])
def test_a_reader_made_before_a_fork_answers_none_once_the_child_closes(
    data_fd: Any, ctx_backend: str
) -> None:
    """inline_bytes_reader is valid until close(), after which it always
    answers None: in a forked child too, where the context forgot its files
    at the fork (their locks may have been held) -- so close() there never
    reached the reader's file, which went on reading."""
    fd, data = data_fd
    ctx = AioContext(backend=ctx_backend)
    try:
        reader = ctx.inline_bytes_reader(fd, 4096)
        if reader is None:
            pytest.skip("no inline reads here")
        assert reader(16, 0) == data[:16]
        pid = os.fork()
        if pid == 0:
            code = 3
            try:
                first = reader(16, 16)
                ctx.close(timeout=5)
                after = reader(16, 32)
                code = 0 if first in (None, data[16:32]) and after is None else 1
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, "the reader read after the child's close"
        assert reader(16, 48) == data[48:64]
    finally:
        ctx.close(timeout=10)
    assert reader(16, 64) is None


@ring_only
def test_close_with_a_full_sq_held_back_by_a_plug_runs_every_operation() -> None:
    """Reaper mode: a thread's plug holds back as many operations as the SQ
    has slots; another thread closes the ring.  The STOP must not go over
    the oldest SQE not sent yet: every operation runs (its callback once),
    and the reaper finishes and releases the ring."""
    from threadlets.uring import OP_NOP, Ring

    ring = Ring(4)
    ran: list[int] = []
    try:
        assert ring._reaper is not None
        assert ring.plug()
        for i in range(ring.entries):
            assert ring.submit(OP_NOP, -1, 0, 0, 0, 0, lambda res, i=i: ran.append(i))
        t = threading.Thread(target=ring.close)
        t.start()
        t.join(10)
        ring.unplug()
        assert ring.join(10), "the reaper never finished: an operation was lost"
        assert sorted(ran) == list(range(4))
    finally:
        ring.close()
        ring.join(1)


@pytest.mark.parametrize("ctx_backend", ["threads", pytest.param("io_uring", marks=ring_only)])
def test_readers_stop_at_forget_before_the_number_is_reused(
    tmp_path: Path, ctx_backend: str
) -> None:
    """forget(fd) is what a caller does before the number is reused for
    another file: readers of ``fd`` handed out before it must stop there
    (they kept reading the number, so another file's bytes, once reused)."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"A" * 4096)
    b.write_bytes(b"B" * 4096)
    ctx = AioContext(backend=ctx_backend)
    fd = os.open(a, os.O_RDONLY)
    try:
        reader = ctx.inline_bytes_reader(fd, 4096)
        old = ctx.inline_reader(fd)
        if reader is None or old is None:
            pytest.skip("no inline reads here")
        assert reader(16, 0) == b"A" * 16
        ctx.forget(fd)
        os.close(fd)
        fd = os.open(b, os.O_RDONLY)  # (the lowest free number: the same one)
        assert reader(16, 0) is None
        assert old(bytearray(16), 0) == -1
        assert ctx.read(fd, 0, bytearray(16)).result(timeout=10) == 16  # (the new file's)
    finally:
        os.close(fd)
        ctx.close(timeout=10)
