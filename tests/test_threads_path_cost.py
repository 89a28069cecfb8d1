"""The threads backend's read and write, cheaper (issue 11's last row): a
read or write that nothing moved yet reaches the pool without
AioContext._start's and AioRequest.__init__'s frames (read() and write()
go through _start_new, which spells out both), and a worker hands a finished request to its
context without _CompletionQueue.complete()'s and _enqueue's (its
_finish_quiet spells out the ready-queue branch, appending without the
lock).  Each spelled-out copy is kept in step with its original here, and
each promise of the long way is tried: exactly-once delivery, a Ctrl-C at
every C return, close() racing, many workers delivering at once."""

from __future__ import annotations

import gc
import os
import select
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from threadlets import AioContext, AioRequest, ThreadletQueue
from threadlets.engine import _CompletionQueue, _Transfer
from threadlets.probe import aligned_buffer

from .conftest import interrupt_at_c_return


def _fields(obj: object) -> dict[str, Any]:
    """Every slot ``obj`` has set, with its value (a transfer's too; its
    buffers as what they view)."""
    out: dict[str, Any] = {}
    for cls in type(obj).__mro__:
        for name in getattr(cls, "__slots__", ()):
            if name == "__weakref__" or not hasattr(obj, name):
                continue
            value = getattr(obj, name)
            if name == "_transfer" and value is not None:
                value = _fields(value)
            elif name == "buffers":
                value = [(type(b).__name__, id(b.obj), b.nbytes) for b in value]
            out[name] = value
    return out


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


# -- the spelled-out copies, in step with their originals ----------------------------------


def test_read_and_write_set_what_start_of_a_made_request_sets(data_fd: Any) -> None:
    """What read() and write() hand the pool (their own stores) against what
    _start(AioRequest(..., _Transfer(...))) hands it for the same request:
    the same slots, with the same values, and admitted once each."""
    fd, _ = data_fd
    q = ThreadletQueue(max_threads=2)
    ctx = AioContext(q, backend="threads", inline=False)
    f = ctx._file(fd)
    assert not isinstance(f, OSError)
    submitted: list[dict[str, Any]] = []
    submit = q._submit

    def seen(item: Any) -> None:
        submitted.append(_fields(item))
        submit(item)

    q._submit = seen  # type: ignore[method-assign]

    def cb(_: object) -> None:
        pass

    ba, mv, by = bytearray(512), memoryview(bytearray(512)), bytes(512)
    cases: list[tuple[Callable[[], AioRequest], str, list[memoryview], bool, Any]] = [
        (lambda: ctx.read(fd, 0, ba), "read", [memoryview(ba)], False, None),
        (lambda: ctx.read(fd, 8, mv, callback=cb), "read", [mv], False, cb),
        (lambda: ctx.read(fd, 0, ba, zero_fill=True), "read", [memoryview(ba)], True, None),
        (lambda: ctx.write(fd, 0, by), "write", [memoryview(by)], False, None),
        (lambda: ctx.write(fd, 4, mv, callback=cb), "write", [mv], False, cb),
    ]
    try:
        for make, kind, views, zero_fill, callback in cases:
            write = kind == "write"
            before = ctx._cq.admitted
            made = make()
            assert ctx._cq.admitted == before + 1
            offset = made._transfer.offset  # type: ignore[union-attr]
            ours = submitted.pop()
            xfer = _Transfer(ctx._sc, f, views, offset, 512, 0, write, zero_fill)
            ref = ctx._start(AioRequest(ctx, kind, None, (), callback, xfer))
            assert ctx._cq.admitted == before + 2
            assert ours == submitted.pop(), kind
            assert ours["_admitted"] is True
            assert ours["_transfer"]["done"] == 0
            for r in (made, ref):
                assert ctx.wait(r, 10)
        assert ctx.drain(10)
        assert ctx.stats().outstanding == 0
    finally:
        del q._submit
        assert ctx.close(10)
        assert q.close(10)


def test_the_threads_read_and_write_take_none_of_the_long_way(
    data_fd: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No _start, AioRequest.__init__, complete() or _enqueue frame on the way of a read or write with a callback; each
    callback runs once, with the real count."""
    fd, data = data_fd
    ctx = AioContext(backend="threads", inline=False)
    try:
        assert ctx.read(fd, 0, bytearray(1)).result(timeout=10) == 1  # learns the file
        ctx.drain(10)
        calls: list[str] = []

        def spy(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
            def called(*args: Any, **kwargs: Any) -> Any:
                calls.append(name)
                return original(*args, **kwargs)

            return called

        monkeypatch.setattr(AioContext, "_start", spy("_start", AioContext._start))
        monkeypatch.setattr(AioRequest, "__init__", spy("init", AioRequest.__init__))
        monkeypatch.setattr(_Transfer, "__init__", spy("transfer", _Transfer.__init__))
        monkeypatch.setattr(
            _CompletionQueue, "complete", spy("complete", _CompletionQueue.complete)
        )
        monkeypatch.setattr(_CompletionQueue, "_enqueue", spy("enqueue", _CompletionQueue._enqueue))
        got: list[int] = []
        buf = aligned_buffer(4096)
        ctx.read(fd, 4096, buf, callback=lambda r: got.append(r.result()))
        while not got:
            ctx.poll(10)
        assert got == [4096]
        assert bytes(buf) == data[4096:8192]
        assert calls == ["transfer"]  # (the _Transfer: one frame)
        calls.clear()
        ctx.write(fd, 0, b"w" * 10, callback=lambda r: got.append(r.result()))
        while len(got) < 2:
            ctx.poll(10)
        assert got == [4096, 10]
        assert calls == ["transfer"]
        monkeypatch.undo()
        assert ctx.drain(10)
        assert ctx.stats().outstanding == 0
    finally:
        ctx.close(timeout=10)


def _quiet_case(
    deliver: bool, signalled: bool, closed: bool, hand: Callable[[AioRequest], None]
) -> tuple[object, ...]:
    """A finished, admitted request handed to its context by ``hand``:
    what the completion queue holds after (and after a process())."""
    ctx = AioContext(backend="threads", inline=False, deliver=deliver)
    cq = ctx._cq
    ran: list[AioRequest] = []
    try:
        req = AioRequest(ctx, "read", None, (), ran.append if deliver else None)
        req._born_finished(1, None)
        cq.admitted += 1
        req._admitted = True
        if signalled:
            cq.resignal()
        if closed:
            with cq.lock:
                cq.notifier.close()
        wakeups = cq.wakeups
        hand(req)
        readable = bool(
            not cq.notifier.closed and select.select([cq.notifier.fileno()], [], [], 0)[0]
        )
        state = (
            list(cq.ready) == [req],
            cq.signalled,
            cq.wakeups - wakeups,
            readable,
            cq.admitted - cq.delivered,
            req._processed,
            len(ran),
        )
        processed = cq.process()
        return (*state, processed, len(ran), cq.admitted - cq.delivered)
    finally:
        if not closed:
            ctx.close(timeout=10)


@pytest.mark.parametrize(
    ("deliver", "signalled", "closed"),
    [(True, False, False), (True, True, False), (False, False, False), (True, False, True)],
)
def test_finish_quiet_does_what_complete_does(deliver: bool, signalled: bool, closed: bool) -> None:
    """AioRequest._finish_quiet against _CompletionQueue.complete(), for each
    of its branches: queued and signalled once, queued behind a signal
    already sent, delivered at once (a context that delivers nothing; one
    whose eventfd closed)."""
    ours = _quiet_case(deliver, signalled, closed, lambda r: r._finish_quiet())
    ref = _quiet_case(deliver, signalled, closed, lambda r: r._ctx._cq.complete(r))
    assert ours == ref


def test_finish_quiet_lets_go_of_the_buffers(data_fd: Any) -> None:
    fd, _ = data_fd
    ctx = AioContext(backend="threads", inline=False)
    try:
        req = ctx.read(fd, 0, bytearray(16))
        assert ctx.wait(req, 10)
        assert req._transfer is None
    finally:
        ctx.close(timeout=10)


# -- the promises --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["read", "write"])
def test_ctrl_c_at_every_c_return_of_a_threads_submission(data_fd: Any, kind: str) -> None:
    """A KeyboardInterrupt as each C call returns inside read() or write()
    on the threads backend: a request returned completes once, with its
    callback run once; one not returned is not counted; the context
    drains and closes with nothing outstanding."""
    fd, _ = data_fd
    n = 0
    while True:
        n += 1
        assert n < 300, "never ran to its end"
        ctx = AioContext(backend="threads", inline=False)
        ran: list[AioRequest] = []
        try:
            assert ctx.read(fd, 0, bytearray(1)).result(timeout=10) == 1  # learns the file
            assert ctx.drain(10)
            buf = bytearray(64)
            got: list[AioRequest] = []
            seen = interrupt_at_c_return(n)
            try:
                if kind == "read":
                    got.append(ctx.read(fd, 0, buf, callback=ran.append))
                else:
                    got.append(ctx.write(fd, 0, b"x" * 64, callback=ran.append))
            except KeyboardInterrupt:
                pass
            finally:
                sys.setprofile(None)
                gc.enable()
            assert ctx.drain(timeout=10), (n, ctx.stats())
            s = ctx.stats()
            assert s.outstanding == 0, (n, s)
            assert s.processed == s.submitted, (n, s)
            # Its callback once -- or, interrupted, once if the pool took
            # it (it runs and is delivered, as the README says), else never.
            assert len(ran) <= 1, n
            assert ran == got or not got, n
            assert s.submitted == 1 + len(ran), (n, s)
            for r in got:
                assert r.result(timeout=0) == 64
        finally:
            assert ctx.close(timeout=10)
        if seen[0] < n:
            break
    assert n > 3


def test_many_workers_finishing_at_once_deliver_each_once(data_fd: Any) -> None:
    """Eight workers hand requests over (the lock-free append) while this
    thread processes batches, with threads switching as often as they can:
    every callback runs once, no wakeup is lost (poll() would sleep for
    good: bounded here), the counters balance."""
    fd, _ = data_fd
    q = ThreadletQueue(max_threads=8)
    ctx = AioContext(q, backend="threads", inline=False)
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        total, depth = 2000, 32
        ran: list[int] = []
        submitted = [0]

        def cb(r: AioRequest) -> None:
            assert r.result() == 16
            ran.append(id(r))
            if submitted[0] < total:
                submitted[0] += 1
                ctx.read(fd, 16 * (submitted[0] % 64), bytearray(16), callback=cb)

        for _ in range(depth):
            submitted[0] += 1
            ctx.read(fd, 0, bytearray(16), callback=cb)
        rounds = 0
        while len(ran) < total:
            rounds += 1
            assert rounds < 100_000, (len(ran), ctx.stats())
            # A lost wakeup: poll() sleeps its whole timeout with requests
            # ready (a hang without one), then finds them.
            t0 = time.monotonic()
            if not ctx.poll(20):
                assert time.monotonic() - t0 < 10, ("lost wakeup", len(ran), ctx.stats())
        assert ctx.drain(10)
        assert len(ran) == total
        s = ctx.stats()
        assert s.outstanding == 0, s
        assert s.processed == s.submitted == total, s
        assert not ctx._cq.ready
    finally:
        sys.setswitchinterval(old)
        assert ctx.close(10)
        assert q.close(10)


def test_close_racing_threads_submissions_from_another_thread(data_fd: Any) -> None:
    """close() in one thread while another submits reads as fast as it can:
    each read is refused (RuntimeError) or completes once; close() returns
    with nothing outstanding."""
    fd, _ = data_fd
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for _ in range(20):
            ctx = AioContext(backend="threads", inline=False)
            assert ctx.read(fd, 0, bytearray(1)).result(timeout=10) == 1
            made: list[AioRequest] = []
            started = threading.Event()

            def submitter(
                ctx: AioContext = ctx,
                made: list[AioRequest] = made,
                started: threading.Event = started,
            ) -> None:
                try:
                    while True:
                        made.append(ctx.read(fd, 0, bytearray(8)))
                        started.set()
                except RuntimeError:
                    started.set()

            t = threading.Thread(target=submitter)
            t.start()
            assert started.wait(10)
            assert ctx.close(timeout=10)
            t.join(10)
            assert not t.is_alive()
            s = ctx.stats()
            assert s.outstanding == 0, s
            assert s.processed == s.submitted, s
            for r in made:
                assert r.done()
                assert r.result(timeout=0) == 8
    finally:
        sys.setswitchinterval(old)
