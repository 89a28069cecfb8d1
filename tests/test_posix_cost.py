"""threadlets.posix's per-request cost (issue 13) and the promises its
cheaper paths keep: the quick aio_read/aio_write (field types read in one
call, the context read under the lock, every fallback checked again), the
completion written out for a quick submission, aio_error/aio_return's
lock-free answers (``_RUNNING`` while in progress).  The quick path is
compared with the general one (an aiocb subclass always takes it, and the
general path is itself compared with glibc elsewhere); Ctrl-C lands at
every C return of the new paths; both backends."""

from __future__ import annotations

import collections
import errno
import os
import sys
import threading
from array import array
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

import threadlets.posix as px
from threadlets import AioContext, ThreadletQueue
from threadlets.ops import MAX_OFFSET

from .conftest import interrupt_at_c_return, wait_until

DATA = bytes((i * 7 + 3) % 251 + 1 for i in range(8192))
SENTINEL = 0xEE  # (not in DATA)


class Sub(px.aiocb):
    """An aiocb that always takes the general path (not the exact class)."""

    __slots__ = ()


@pytest.fixture
def fd(tmp_path: Path) -> Iterator[int]:
    p = tmp_path / "data"
    p.write_bytes(DATA)
    fd = os.open(p, os.O_RDWR)
    yield fd
    os.close(fd)


def _context(backend: str, **kwargs: Any) -> AioContext:
    return AioContext(deliver=False, backend=backend, **kwargs)


def _quiet(ctx: AioContext) -> bool:
    return ctx.stats().outstanding == 0


def _done(rt: px.PosixAio, cb: px.aiocb) -> tuple[int, int]:
    rt.aio_suspend([cb], 10)
    return rt.aio_error(cb), rt.aio_return(cb)


def _answer(rt: px.PosixAio, cb: px.aiocb, submit: Callable[[px.aiocb], None]) -> object:
    """What a submission answers: the exception it raised (type, errno),
    or the aiocb's (error, return value)."""
    try:
        submit(cb)
    except Exception as e:
        return type(e).__name__, getattr(e, "errno", None)
    return _done(rt, cb)


# -- the quick path answers as the general one -------------------------------------------


def _variants(fd: int, closed: int, write: bool) -> list[tuple[str, dict[str, Any]]]:
    def buf() -> Any:
        return bytearray(DATA[:64]) if write else bytearray(64)

    good: dict[str, Any] = {"aio_fildes": fd, "aio_offset": 128, "aio_buf": buf()}
    changes: list[tuple[str, dict[str, Any]]] = [("good", {})]
    for prio in (1, 20, 21, -1, True, 1.0, None):
        changes.append((f"reqprio {prio!r}", {"aio_reqprio": prio}))
    for f in (-1, closed, 2**31, 2**32 + fd, 2**40, True, float(fd), None):
        changes.append((f"fildes {f!r}", {"aio_fildes": f}))
    for off in (0, -1, 8100, MAX_OFFSET, MAX_OFFSET - 64, MAX_OFFSET - 63, 2**63, True, 1.0):
        changes.append((f"offset {off!r}", {"aio_offset": off}))
    for n in (0, 1, 64, 65, -1, True, 1.5):
        changes.append((f"nbytes {n!r}", {"aio_nbytes": n}))
    bufs: list[tuple[str, Any]] = [
        ("bytes", bytes(64)),
        ("empty", bytearray()),
        ("strided", memoryview(bytearray(128))[::2]),
        ("2-D", memoryview(bytearray(64)).cast("B", (8, 8))),
        ("array of int", array("i", range(16))),
        ("None", None),
        ("str", "x" * 64),
    ]
    for name, b in bufs:
        changes.append((f"buf {name}", {"aio_buf": b}))
    changes.append(("sigevent none", {"aio_sigevent": px.sigevent(px.SIGEV_NONE)}))
    changes.append(("sigevent other", {"aio_sigevent": object()}))
    out = []
    for name, change in changes:
        fields = dict(good, aio_buf=buf())
        fields.update(change)
        out.append((name, fields))
    return out


def _not_open() -> int:
    """An fd number no file has (not the lowest free one: the next open
    would take it)."""
    for n in range(900, 2000):
        try:
            os.fstat(n)
        except OSError:
            return n
    raise AssertionError("no free fd number")  # pragma: no cover


@pytest.mark.parametrize("op", ["read", "write"])
def test_the_quick_path_answers_as_the_general_path(backend: str, op: str, tmp_path: Path) -> None:
    """Every field the quick path looks at, one bad (or unusual) value at a
    time: a plain aiocb (the quick path, its fd already known) and an
    aiocb subclass (always the general path) get the same answer -- the
    same exception, or the same status, return value and bytes moved."""
    ctx = _context(backend)
    closed = _not_open()
    submit_of = {"read": "aio_read", "write": "aio_write"}
    try:
        rt = px.PosixAio(ctx)
        count = len(_variants(0, closed, op == "write"))
        for i in range(count):
            results = []
            name = ""
            for cls in (px.aiocb, Sub):
                p = tmp_path / cls.__name__
                p.write_bytes(DATA)
                fd = os.open(p, os.O_RDWR)
                try:
                    warm = px.aiocb(fd, 0, bytearray(8))
                    rt.aio_read(warm)  # (the runtime now knows the fd)
                    assert _done(rt, warm) == (0, 8)
                    name, fields = _variants(fd, closed, op == "write")[i]
                    cb = cls(fd)
                    for k, v in fields.items():
                        setattr(cb, k, v)
                    answer = _answer(rt, cb, getattr(rt, submit_of[op]))
                    buf = cb.aio_buf
                    moved = bytes(buf) if isinstance(buf, (bytearray, array)) else None
                    results.append((answer, moved, p.read_bytes()))
                finally:
                    os.close(fd)
            assert results[0] == results[1], name
        wait_until(lambda: _quiet(ctx))
        assert not rt._fds
    finally:
        ctx.close()


def test_aio_error_and_aio_return_in_every_state(fd: int) -> None:
    """Never submitted: EINVAL from both; in progress: EINPROGRESS (from
    aio_return, raised); finished: the pair -- for a plain aiocb (read
    lock-free) and a subclass (the long way) alike.  Not an aiocb:
    TypeError."""
    queue = ThreadletQueue(max_threads=1)
    gate = threading.Event()
    ctx = AioContext(queue, deliver=False, inline=False)
    try:
        rt = px.PosixAio(ctx)
        for cls in (px.aiocb, Sub):
            cb = cls(fd, 0, bytearray(16))
            for call in (rt.aio_error, rt.aio_return):
                with pytest.raises(OSError) as e:
                    call(cb)
                assert e.value.errno == errno.EINVAL
            gate.clear()
            queue.submit(gate.wait, 10)  # holds the only worker
            rt.aio_read(cb)
            assert cb._outcome is px._RUNNING
            assert rt.aio_error(cb) == errno.EINPROGRESS
            with pytest.raises(OSError) as e:
                rt.aio_return(cb)
            assert e.value.errno == errno.EINPROGRESS
            gate.set()
            assert _done(rt, cb) == (0, 16)
        for bad in (None, 3, "aiocb", object()):
            for call in (rt.aio_error, rt.aio_return):
                with pytest.raises(TypeError):
                    call(bad)  # type: ignore[arg-type]
    finally:
        gate.set()
        ctx.close(timeout=10)
        queue.close(timeout=10)


def test_a_quick_read_of_a_file_reused_with_another_mode_is_not_forgotten(fd: int) -> None:
    """The identity holds the file type, not the whole st_mode: a chmod
    between two submissions keeps the context's memory of the fd (its
    sticky flush errors among it); another file on the number does not."""
    ctx = _context("threads")
    forgotten: list[int] = []
    real = ctx.forget
    ctx.forget = lambda n: (forgotten.append(n), real(n))[-1]  # type: ignore[method-assign]
    try:
        rt = px.PosixAio(ctx)
        cb = px.aiocb(fd, 0, bytearray(8))
        rt.aio_read(cb)
        assert _done(rt, cb) == (0, 8)
        os.fchmod(fd, 0o600)
        rt.aio_read(cb)
        os.fchmod(fd, 0o644)
        assert _done(rt, cb) == (0, 8)
        rt.aio_read(cb)
        assert _done(rt, cb) == (0, 8)
        assert forgotten == []
        r, w = os.pipe()
        try:
            saved = os.dup(fd)
            try:
                os.dup2(r, fd)  # a pipe, same number, O_RDONLY vs O_RDWR
                os.write(w, b"abc")
                cb.aio_nbytes = 3
                rt.aio_read(cb)
                assert _done(rt, cb) == (0, 3)
                assert forgotten == [fd]
            finally:
                os.dup2(saved, fd)
                os.close(saved)
        finally:
            os.close(r)
            os.close(w)
    finally:
        ctx.close()


@pytest.mark.parametrize("order", ["ring then threads", "threads then ring"])
def test_a_waiter_is_woken_by_a_completion_on_a_context_no_longer_in_use(
    order: str, tmp_path: Path
) -> None:
    """The completion wakes aio_suspend's waiters through the context in
    use (the finished aiocb's is cleared): after set_context() to a
    context of the other backend -- or to none, none made -- a waiter in
    another thread is still woken."""
    ring_first = order == "ring then threads"
    try:
        ring = _context("io_uring")
    except Exception as e:  # pragma: no cover - no io_uring here
        pytest.skip(f"io_uring: {e}")
    threads = _context("threads", inline=False)
    first, second = (ring, threads) if ring_first else (threads, ring)
    r, w = os.pipe()
    try:
        for then in (second, None):
            rt = px.PosixAio(first)
            cb = px.aiocb(r, 0, bytearray(1))
            os.write(w, b"x")
            rt.aio_read(cb)
            assert _done(rt, cb) == (0, 1)
            rt.aio_read(cb)  # (quick: the pipe is empty, it waits)
            woken = threading.Event()

            def waiter(
                rt: px.PosixAio = rt, cb: px.aiocb = cb, woken: threading.Event = woken
            ) -> None:
                rt.aio_suspend([cb])
                woken.set()

            t = threading.Thread(target=waiter, daemon=True)
            t.start()
            wait_until(lambda rt=rt: rt._waiting > 0)  # type: ignore[misc]
            rt.set_context(then)
            os.write(w, b"y")
            assert woken.wait(10), "the waiter was never woken"
            t.join(10)
            assert _done(rt, cb) == (0, 1)
            assert bytes(cb.aio_buf) == b"y"
    finally:
        os.close(r)
        os.close(w)
        ring.close()
        threads.close()


# -- Ctrl-C ------------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["read", "write"])
@pytest.mark.parametrize("inline", [True, False])
def test_ctrl_c_at_every_c_return_of_a_quick_submission_reports_what_happened(
    backend: str, op: str, inline: bool, tmp_path: Path
) -> None:
    """For n = 1, 2, ...: Ctrl-C as the n-th C call of threadlets (posix,
    the engine, the pool, the ring) returns in a quick aio_read/aio_write
    -- its completion included where it runs in the caller's thread (a
    read or write finished inline).  The aiocb finishes once, and an
    aiocb reported ECANCELED moved nothing, even after every request of
    the context finished: its buffer (its file range) is untouched.
    Nothing is left on the fd's tables, and the aiocb goes again."""
    p = tmp_path / "f"
    n = 0
    while True:
        n += 1
        assert n < 400, "the submission never ran to its end"
        p.write_bytes(bytes(len(DATA)))
        fd = os.open(p, os.O_RDWR)
        os.pwrite(fd, DATA[:64], 256) if op == "read" else None
        ctx = _context(backend, inline=inline)
        try:
            rt = px.PosixAio(ctx)
            warm = px.aiocb(fd, 0, bytearray(8))
            rt.aio_read(warm)  # (the quick path next)
            assert _done(rt, warm) == (0, 8)
            buf = bytearray(DATA[:64]) if op == "write" else bytearray([SENTINEL]) * 64
            cb = px.aiocb(fd, 256 if op == "read" else 512, buf)
            submit = rt.aio_read if op == "read" else rt.aio_write
            interrupted = False
            seen = interrupt_at_c_return(n)
            try:
                submit(cb)
            except KeyboardInterrupt:
                interrupted = True
            finally:
                sys.setprofile(None)
            # What had moved when the caller got the aiocb back.
            then = bytes(buf) if op == "read" else os.pread(fd, 64, 512)
            outcome: object
            try:
                outcome = _done(rt, cb)
            except OSError as e:  # (interrupted before it was accepted)
                outcome = "never submitted" if e.errno == errno.EINVAL else e
            wait_until(lambda ctx=ctx: _quiet(ctx))  # type: ignore[misc]
            if outcome in ((errno.ECANCELED, -1), "never submitted"):
                # Nothing moves after it: no request of it runs.  (What an
                # inline attempt moved before the interrupt -- a read then
                # reported ECANCELED, the engine's residual window -- may
                # be there.)
                assert interrupted, f"C return {n}"
                now = bytes(buf) if op == "read" else os.pread(fd, 64, 512)
                assert now == then, f"C return {n}: moved after it was cancelled"
                if not inline:  # (then nothing moves before a backend has it)
                    assert now == (bytes([SENTINEL]) * 64 if op == "read" else bytes(64))
            else:
                assert outcome == (0, 64), f"C return {n}: {outcome}"
                if op == "read":
                    assert bytes(buf) == DATA[:64], f"C return {n}"
                else:
                    assert os.pread(fd, 64, 512) == DATA[:64], f"C return {n}"
            assert not rt._fds, f"C return {n}: {rt._fds}"
            submit(cb)
            assert _done(rt, cb) == (0, 64), f"C return {n}"
        finally:
            ctx.close()
            os.close(fd)
        if not interrupted and seen[0] < n:
            break  # it ran to its end before the n-th C return


@pytest.mark.parametrize("with_fsync", [False, True])
def test_ctrl_c_at_every_c_return_of_aio_cancel_of_a_queued_quick_read(
    with_fsync: bool, fd: int
) -> None:
    """aio_cancel runs the cancelled request's completion -- a quick
    submission's, known by its view -- in the caller's thread.  Ctrl-C at
    each C return of threadlets in that call: the read finishes once,
    ECANCELED with its buffer untouched or with the file's data, and an
    fsync queued behind it (the completion's long way) finishes too."""
    n = 0
    while True:
        n += 1
        assert n < 400, "aio_cancel never ran to its end"
        queue = ThreadletQueue(max_threads=1)
        gate = threading.Event()
        ctx = AioContext(queue, deliver=False, inline=False)
        try:
            rt = px.PosixAio(ctx)
            warm = px.aiocb(fd, 0, bytearray(8))
            rt.aio_read(warm)
            assert _done(rt, warm) == (0, 8)
            queue.submit(gate.wait, 10)  # holds the only worker
            buf = bytearray([SENTINEL]) * 32
            read = px.aiocb(fd, 64, buf)
            rt.aio_read(read)  # (quick, queued behind the gate)
            assert read._req is not None
            sync = px.aiocb(fd)
            if with_fsync:
                rt.aio_fsync(os.O_SYNC, sync)
            interrupted = False
            seen = interrupt_at_c_return(n)
            try:
                rt.aio_cancel(fd, read)
            except KeyboardInterrupt:
                interrupted = True
            finally:
                sys.setprofile(None)
            gate.set()
            outcome = _done(rt, read)
            wait_until(lambda ctx=ctx: _quiet(ctx))  # type: ignore[misc]
            if outcome == (errno.ECANCELED, -1):
                assert buf == bytearray([SENTINEL]) * 32, f"C return {n}: filled"
            else:
                assert outcome == (0, 32), f"C return {n}: {outcome}"
                assert bytes(buf) == DATA[64:96]
            if with_fsync:
                # (ECANCELED: the interrupt landed as this thread launched
                # it -- the general launch's rule.  Before, it waited for
                # good where Ctrl-C cut the claims of _finish short.)
                allowed = [(0, 0), (errno.ECANCELED, -1)] if interrupted else [(0, 0)]
                assert _done(rt, sync) in allowed, f"C return {n}"
            assert not rt._fds, f"C return {n}: {rt._fds}"
        finally:
            gate.set()
            ctx.close(timeout=10)
            queue.close(timeout=10)
        if not interrupted and seen[0] < n:
            break


def test_ctrl_c_at_every_c_return_of_aio_error_and_aio_return_changes_nothing(fd: int) -> None:
    """aio_error/aio_return's long way takes the lock (never submitted, a
    subclass): an interrupt anywhere in it leaves the answers as they were."""
    ctx = _context("threads")
    try:
        rt = px.PosixAio(ctx)
        for cls in (px.aiocb, Sub):
            done = cls(fd, 0, bytearray(8))
            rt.aio_read(done)
            assert _done(rt, done) == (0, 8)
            for cb, expected in ((cls(fd), "EINVAL"), (done, (0, 8))):
                for call in (rt.aio_error, rt.aio_return):
                    n = 0
                    while True:
                        n += 1
                        assert n < 50
                        seen = interrupt_at_c_return(n)
                        try:
                            call(cb)
                        except (KeyboardInterrupt, OSError):
                            pass
                        finally:
                            sys.setprofile(None)
                        if seen[0] < n:
                            break
                    got: object
                    try:
                        got = (rt.aio_error(cb), rt.aio_return(cb))
                    except OSError as e:
                        got = errno.errorcode[e.errno or 0]
                    assert got == expected
    finally:
        ctx.close()


# -- cost --------------------------------------------------------------------------------


@pytest.mark.linux_only("rwf_nowait")  # (portable mode: the general path, see _identity)
def test_a_quick_read_costs_few_bytecodes_of_posix_on_each_side(backend: str, fd: int) -> None:
    """Issue 13: bytecodes of posix.py per aio_read + aio_error +
    aio_return in the submitting thread, and per completion in the thread
    that completes the request (a worker, the ring's reaper; started
    while traced).  Nobody waits (the loop polls the status untraced), so
    the counts do not depend on timing: 290-296 and 92 here (the fd's
    table made and dropped each time included); 347 and 110 before."""
    posix_file = px.__file__
    counts: collections.Counter[bool] = collections.Counter()
    main = threading.get_ident()

    def tracer(frame: FrameType, event: str, arg: Any) -> Any:
        if frame.f_code.co_filename != posix_file:
            return None
        frame.f_trace_opcodes = True
        if event == "opcode":
            counts[threading.get_ident() == main] += 1
        return tracer

    threading.settrace(tracer)
    queue = ThreadletQueue(max_threads=2)
    try:
        ctx = AioContext(queue, deliver=False, backend=backend, inline=False)
        try:
            rt = px.PosixAio(ctx)
            cb = px.aiocb(fd, 0, bytearray(512))
            rt.aio_read(cb)
            assert _done(rt, cb) == (0, 512)
            counts.clear()
            n = 32
            for k in range(n):
                cb.aio_offset = 512 * (k % 8)
                sys.settrace(tracer)
                rt.aio_read(cb)
                sys.settrace(None)
                wait_until(lambda: cb._status is px._DONE)
                sys.settrace(tracer)
                rt.aio_error(cb)
                rt.aio_return(cb)
                sys.settrace(None)
            assert _done(rt, cb) == (0, 512)
        finally:
            sys.settrace(None)
            threading.settrace(None)  # type: ignore[arg-type]
            ctx.close()
    finally:
        threading.settrace(None)  # type: ignore[arg-type]
        queue.close(timeout=10)
    submitting, completing = counts[True] / n, counts[False] / n
    assert submitting < 310, f"{submitting:.0f} bytecodes of posix.py per read, submitting"
    assert completing < 98, f"{completing:.0f} bytecodes of posix.py per read, completing"


def test_ctrl_c_at_every_c_return_of_aio_cancel_of_an_o_append_write_starts_the_next(
    tmp_path: Path,
) -> None:
    """Cancelling the O_APPEND write that runs claims the one queued behind
    it (the completion's long way, in the caller's thread).  Ctrl-C at each
    C return of threadlets in that call: both finish, the file holds what
    each says it wrote, in call order -- never a write reported ECANCELED
    that went on to write.  (Before: an interrupt as the next write was
    claimed left it claimed and never launched, for good; one in the
    engine's submit after it took the write reported it ECANCELED, and it
    wrote.)"""
    p = tmp_path / "log"
    n = 0
    while True:
        n += 1
        assert n < 400, "aio_cancel never ran to its end"
        p.write_bytes(b"start")
        fd = os.open(p, os.O_RDWR | os.O_APPEND)
        queue = ThreadletQueue(max_threads=1)
        gate = threading.Event()
        ctx = AioContext(queue, deliver=False, inline=False)
        try:
            rt = px.PosixAio(ctx)
            queue.submit(gate.wait, 10)  # holds the only worker
            first = px.aiocb(fd, 0, b"A" * 16)
            second = px.aiocb(fd, 0, b"B" * 16)
            rt.aio_write(first)  # queued behind the gate
            rt.aio_write(second)  # waits for the first
            interrupted = False
            seen = interrupt_at_c_return(n)
            try:
                rt.aio_cancel(fd, first)
            except KeyboardInterrupt:
                interrupted = True
            finally:
                sys.setprofile(None)
            gate.set()
            one, two = _done(rt, first), _done(rt, second)
            assert one in ((0, 16), (errno.ECANCELED, -1)), f"C return {n}: {one}"
            allowed = [(0, 16), (errno.ECANCELED, -1)] if interrupted else [(0, 16)]
            assert two in allowed, f"C return {n}: {two}"
            wait_until(lambda ctx=ctx: _quiet(ctx))  # type: ignore[misc]
            expected = (
                b"start" + (b"A" * 16 if one[0] == 0 else b"") + (b"B" * 16 if two[0] == 0 else b"")
            )
            assert p.read_bytes() == expected, f"C return {n}"
            assert not rt._fds, f"C return {n}: {rt._fds}"
        finally:
            gate.set()
            ctx.close(timeout=10)
            queue.close(timeout=10)
            os.close(fd)
        if not interrupted and seen[0] < n:
            break


def test_ctrl_c_at_every_c_return_of_aio_cancel_in_a_list_sends_each_notification_once(
    fd: int,
) -> None:
    """Cancelling an entry of a lio_listio(LIO_NOWAIT) list that has its
    own SIGEV_THREAD notification, Ctrl-C at each C return: the list's
    notification comes once, the entry's at most once.  (Before: an
    interrupt as the entry's was queued skipped counting the entry in its
    list, whose notification then never came.)"""
    n = 0
    while True:
        n += 1
        assert n < 400, "aio_cancel never ran to its end"
        queue = ThreadletQueue(max_threads=1)
        gate = threading.Event()
        ctx = AioContext(queue, deliver=False, inline=False)
        sent: list[str] = []
        both = threading.Semaphore(0)

        def note(what: object, sent: list[str] = sent, both: threading.Semaphore = both) -> None:
            sent.append(str(what))
            both.release()

        try:
            rt = px.PosixAio(ctx)
            queue.submit(gate.wait, 10)  # holds the only worker
            own = px.sigevent(px.SIGEV_THREAD, value="entry", function=note)
            first = px.aiocb(fd, 0, bytearray(8), sigevent=own, lio_opcode=px.LIO_READ)
            second = px.aiocb(fd, 8, bytearray(8), lio_opcode=px.LIO_READ)
            group = px.sigevent(px.SIGEV_THREAD, value="list", function=note)
            rt.lio_listio(px.LIO_NOWAIT, [first, second], group)
            interrupted = False
            seen = interrupt_at_c_return(n)
            try:
                rt.aio_cancel(fd, first)
            except KeyboardInterrupt:
                interrupted = True
            finally:
                sys.setprofile(None)
            gate.set()
            assert _done(rt, first)[0] in (0, errno.ECANCELED), f"C return {n}"
            assert _done(rt, second) == (0, 8), f"C return {n}"
            if interrupted:
                wait_until(lambda sent=sent: "list" in sent)  # type: ignore[misc]
            else:
                for _ in range(2):
                    assert both.acquire(timeout=10), f"C return {n}: {sent}"
            wait_until(lambda ctx=ctx: _quiet(ctx))  # type: ignore[misc]
            # (The entry's own may be lost to an interrupt inside its
            # sending: sent at most once, it cannot be sent again.)
            expected = [["entry", "list"], ["list"]] if interrupted else [["entry", "list"]]
            assert sorted(sent) in expected, f"C return {n}: {sent}"
            assert not rt._fds, f"C return {n}: {rt._fds}"
        finally:
            gate.set()
            ctx.close(timeout=10)
            queue.close(timeout=10)
        if not interrupted and seen[0] < n:
            break
