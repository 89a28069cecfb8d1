"""Attacks on the day's core changes (posix's quick path handing its
callback to the engine, _start's clean-up after an interrupt): Ctrl-C at
every C return, the answers checked against what moved.  Both backends."""

from __future__ import annotations

import contextlib
import errno
import gc
import os
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

import threadlets.posix as px
from threadlets import AioContext

from .conftest import interrupt_at_c_return

SIZE = 16384
PATTERN = bytes((i * 7 + 3) % 251 + 1 for i in range(SIZE))


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    p = tmp_path / "f"
    p.write_bytes(PATTERN)
    return p


def _cold(ctx: AioContext) -> None:
    """The inline attempt (RWF_NOWAIT) finds nothing cached, as for a file
    not in the page cache: the read goes to a backend."""

    def preadv(fd: int, views: Any, offset: int, flags: int = 0) -> int:
        if flags:
            raise BlockingIOError(errno.EAGAIN, "cold")
        return os.preadv(fd, views, offset)

    ctx._preadv = preadv  # type: ignore[method-assign]


def test_ctrl_c_in_a_quick_aio_read_of_a_cold_file_never_reports_ecanceled_while_it_reads(
    backend: str, data_file: Path
) -> None:
    """A context that tries reads inline (the default): the quick path's
    _read_checked handed a file with nowait reads to read(), which has no
    `taken` list -- Ctrl-C after a backend took the request finished the
    aiocb ECANCELED, and the request then filled the buffer the caller got
    back (and finished nothing: the aiocb was DONE)."""
    fd = os.open(data_file, os.O_RDONLY)
    try:
        n = 0
        while True:
            n += 1
            assert n < 3000, "never ran to its end"
            ctx = AioContext(backend=backend, deliver=False)
            rt = px.PosixAio(ctx)
            try:
                warm = px.aiocb(fd, 0, bytearray(4096))
                rt.aio_read(warm)  # notes the fd: the next takes the quick path
                rt.aio_suspend([warm], 10.0)
                assert rt.aio_return(warm) == 4096
                _cold(ctx)
                buf = bytearray(4096)
                cb = px.aiocb(fd, 4096, buf)
                seen = interrupt_at_c_return(n)
                try:
                    rt.aio_read(cb)
                except KeyboardInterrupt:
                    pass
                finally:
                    sys.setprofile(None)
                    gc.enable()
                if cb._status is px._IDLE:
                    continue
                # close() waits for every request: whatever was to move has.
                assert ctx.close(timeout=10), f"C return {n}"
                assert ctx.stats().outstanding == 0
                got = (rt.aio_error(cb), rt.aio_return(cb))
                if got == (errno.ECANCELED, -1):
                    assert bytes(buf) == bytes(4096), f"C return {n}: filled after ECANCELED"
                else:
                    assert got == (0, 4096), f"C return {n}: {got}"
                    assert bytes(buf) == PATTERN[4096:8192], f"C return {n}"
                assert not rt._fds, f"C return {n}"
            finally:
                ctx.close(timeout=10)
            if seen[0] < n:
                break
        assert n > 5, f"only {n} C returns"
    finally:
        os.close(fd)


def _cold_writes(ctx: AioContext) -> None:
    """The inline write attempt (RWF_NOWAIT) would block: the write goes to
    a backend."""
    sc = ctx._sc

    def pwritev(fd: int, views: Any, offset: int, flags: int = 0) -> int:
        if flags:
            raise BlockingIOError(errno.EAGAIN, "would block")
        return os.pwritev(fd, views, offset)

    sc.pwritev = pwritev  # type: ignore[method-assign]


def _warm_writes(ctx: AioContext) -> None:
    """The inline write attempt (RWF_NOWAIT) succeeds, as it does where the
    file system takes buffered RWF_NOWAIT writes of cached pages."""
    sc = ctx._sc

    def pwritev(fd: int, views: Any, offset: int, flags: int = 0) -> int:
        return os.pwritev(fd, views, offset)

    sc.pwritev = pwritev  # type: ignore[method-assign]


@pytest.mark.parametrize("cold", [False, True], ids=["inline", "cold"])
def test_ctrl_c_in_a_quick_aio_write_reports_what_was_written(
    backend: str, data_file: Path, cold: bool
) -> None:
    """aio_write's quick path on a context that tries writes inline: Ctrl-C
    at each C return.  Once a backend took the request (cold) it finished
    the aiocb ECANCELED and wrote afterwards; a write finished inline and
    interrupted in _start was ECANCELED too, its bytes in the file.  Now
    ECANCELED only where the file did not change after the call, and a
    write reported done is in the file; ECANCELED with the bytes written
    only where Ctrl-C lands as the inline pwritev itself returns (the count
    lost with its return value: one C return)."""
    fd = os.open(data_file, os.O_RDWR)
    new = bytes(255 - b for b in PATTERN[4096:8192])
    lies = []
    try:
        n = 0
        while True:
            n += 1
            assert n < 3000, "never ran to its end"
            os.pwrite(fd, PATTERN[4096:8192], 4096)
            ctx = AioContext(backend=backend, deliver=False)
            rt = px.PosixAio(ctx)
            try:
                warm = px.aiocb(fd, 0, bytearray(16))
                rt.aio_read(warm)  # notes the fd: the next takes the quick path
                rt.aio_suspend([warm], 10.0)
                if cold:
                    _cold_writes(ctx)
                else:
                    _warm_writes(ctx)
                cb = px.aiocb(fd, 4096, new)
                seen = interrupt_at_c_return(n)
                try:
                    rt.aio_write(cb)
                except KeyboardInterrupt:
                    pass
                finally:
                    sys.setprofile(None)
                    gc.enable()
                if cb._status is px._IDLE:
                    continue
                at_return = os.pread(fd, 4096, 4096)
                assert ctx.close(timeout=10), f"C return {n}"
                assert ctx.stats().outstanding == 0
                got = (rt.aio_error(cb), rt.aio_return(cb))
                now = os.pread(fd, 4096, 4096)
                if got == (errno.ECANCELED, -1):
                    assert now == at_return, f"C return {n}: written after ECANCELED"
                    if cold:
                        assert now == PATTERN[4096:8192], f"C return {n}"
                    elif now == new:
                        lies.append(n)
                else:
                    assert got == (0, 4096), f"C return {n}: {got}"
                    assert now == new, f"C return {n}"
                assert not rt._fds, f"C return {n}"
            finally:
                ctx.close(timeout=10)
            if seen[0] < n:
                break
        assert n > 5, f"only {n} C returns"
        assert len(lies) <= 1, f"ECANCELED, yet written, at C returns {lies}"
    finally:
        os.close(fd)


@pytest.mark.parametrize(
    "call",
    ["aio_read", "aio_write", "aio_fsync", "lio_listio", "quick aio_read", "quick aio_write"],
)
def test_ctrl_c_at_every_c_return_of_a_first_submission_leaves_no_table(
    backend: str, data_file: Path, call: str
) -> None:
    """The first submission on an fd makes its ordering table: Ctrl-C at
    each C return of it, then everything waited for -- no table is left
    behind (an interrupt as setdefault returned left an empty one, for
    good), every aiocb finished, nothing outstanding."""
    fd = os.open(data_file, os.O_RDWR)
    try:
        n = 0
        while True:
            n += 1
            assert n < 3000, "never ran to its end"
            ctx = AioContext(backend=backend, deliver=False)
            rt = px.PosixAio(ctx)
            try:
                if call.startswith("quick"):
                    # The fd's identity noted (its table gone with the
                    # request): the next goes the quick path.
                    warm = px.aiocb(fd, 0, bytearray(16))
                    rt.aio_read(warm)
                    rt.aio_suspend([warm], 10.0)
                    assert not rt._fds
                cb = px.aiocb(fd, 0, bytearray(PATTERN[:512]), lio_opcode=px.LIO_WRITE)
                args: tuple[Any, ...] = {
                    "aio_read": (cb,),
                    "aio_write": (cb,),
                    "aio_fsync": (os.O_SYNC, cb),
                    "lio_listio": (px.LIO_NOWAIT, [cb]),
                }[call.rsplit(maxsplit=1)[-1]]
                seen = interrupt_at_c_return(n)
                try:
                    getattr(rt, call.rsplit(maxsplit=1)[-1])(*args)
                except KeyboardInterrupt:
                    pass
                finally:
                    sys.setprofile(None)
                    gc.enable()
                if cb._status is not px._IDLE:
                    rt.aio_suspend([cb], 10.0)
                    assert rt.aio_error(cb) in (0, errno.ECANCELED), f"C return {n}"
                assert ctx.close(timeout=10), f"C return {n}"
                assert ctx.stats().outstanding == 0, f"C return {n}"
                assert not rt._fds, f"C return {n}: {rt._fds}"
            finally:
                ctx.close(timeout=10)
            if seen[0] < n:
                break
        assert n > 5, f"only {n} C returns"
    finally:
        os.close(fd)


def test_aio_cancel_racing_a_quick_aio_read_answers_what_happened(backend: str) -> None:
    """aio_cancel in a loop while another thread's aio_read of an empty pipe
    goes through the quick path (its callback with the request, _req not
    yet stored): AIO_CANCELED only where the aiocb ends ECANCELED having
    consumed nothing (the pipe's bytes still there, the buffer untouched);
    otherwise the read gets the bytes.  stats() exact after each."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    ctx = AioContext(backend=backend, deliver=False)
    rt = px.PosixAio(ctx)
    try:
        for i in range(150):
            r, w = os.pipe()
            try:
                os.write(w, b"x")
                warm = px.aiocb(r, 0, bytearray(1))
                rt.aio_read(warm)  # notes the fd: the next takes the quick path
                rt.aio_suspend([warm], 10.0)
                assert rt.aio_return(warm) == 1
                buf = bytearray(4)
                cb = px.aiocb(r, 0, buf)
                go = threading.Barrier(2)

                def submit(go: threading.Barrier, cb: px.aiocb) -> None:
                    go.wait()
                    rt.aio_read(cb)

                t = threading.Thread(target=submit, args=(go, cb))
                t.start()
                go.wait()
                answers = []
                while True:
                    idle = cb._status is px._IDLE
                    answers.append(rt.aio_cancel(r, cb))
                    if not idle:
                        break
                t.join()
                os.write(w, b"abcd")
                rt.aio_suspend([cb], 10.0)
                err, ret = rt.aio_error(cb), rt.aio_return(cb)
                if px.AIO_CANCELED in answers:
                    assert (err, ret) == (errno.ECANCELED, -1), (i, answers, err)
                if err == errno.ECANCELED:
                    assert px.AIO_CANCELED in answers, (i, answers)
                    assert bytes(buf) == bytes(4), i
                    assert os.read(r, 16) == b"abcd", i
                else:
                    assert (err, ret) == (0, 4), (i, answers, err, ret)
                    assert bytes(buf) == b"abcd", i
                assert not rt._fds, i
            finally:
                os.close(r)
                os.close(w)
        assert ctx.close(timeout=10)
        st = ctx.stats()
        assert st.outstanding == 0, st
    finally:
        sys.setswitchinterval(old)
        ctx.close(timeout=10)


# -- trio/anyio: cancellation at every checkpoint of preadinto/pwrite --------------------


@pytest.fixture(params=["threads", "io_uring"])
def loop_backend(request: pytest.FixtureRequest) -> Any:
    import threadlets.awaitable as aw

    aw.configure(backend=request.param)
    try:
        yield request.param
    finally:
        aw.configure()


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
@pytest.mark.parametrize("call", ["preadinto", "pwrite"])
def test_cancel_at_every_checkpoint_of_preadinto_and_pwrite(
    tmp_path: Path, loop_backend: str, anyio_backend: str, call: str
) -> None:
    """The task is cancelled after k checkpoints of another task, for each
    k: a cancelled preadinto's buffer is not written after the task saw the
    cancellation; a cancelled pwrite does not land after it; an uncancelled
    one has its whole effect.  (File closed after each: nothing left.)"""
    import anyio
    import anyio.lowlevel

    import threadlets

    p = tmp_path / "f"

    async def attempt(k: int) -> bool:
        p.write_bytes(PATTERN)
        f = await threadlets.open(p, "r+b")
        buf = bytearray(SIZE)
        new = bytes(255 - b for b in PATTERN)
        out: list[object] = []
        snap: list[bytes] = []
        try:
            async with anyio.create_task_group() as tg:

                async def victim() -> None:
                    try:
                        if call == "preadinto":
                            out.append(await f.preadinto(buf, 0))
                        else:
                            out.append(await f.pwrite(new, 0))
                    except anyio.get_cancelled_exc_class():
                        snap.append(bytes(buf) if call == "preadinto" else p.read_bytes())
                        out.append("cancelled")
                        raise

                async def killer() -> None:
                    for _ in range(k):
                        await anyio.lowlevel.checkpoint()
                    tg.cancel_scope.cancel()

                tg.start_soon(victim)
                tg.start_soon(killer)
        finally:
            await f.close()
        after = bytes(buf) if call == "preadinto" else p.read_bytes()
        if out == ["cancelled"]:
            assert after == snap[0], f"k={k}: changed after the task saw the cancellation"
            return False
        assert out == [SIZE], (k, out)
        assert after == (PATTERN if call == "preadinto" else new), k
        return True

    async def main() -> None:
        done = 0
        for k in range(60):
            if await attempt(k):
                done += 1
                if done >= 3:
                    return
        raise AssertionError("never ran to its end")

    anyio.run(main, backend=anyio_backend)


def test_fork_with_a_quick_path_read_in_flight(backend: str) -> None:
    """A quick-path aio_read waits on an empty pipe (on the ring, or on a
    worker); fork.  The child sees it ECANCELED, its tables empty, and reads
    with a context of its own; the parent's completes with the bytes."""
    from .test_attack_fork8 import _in_child

    ctx = AioContext(backend=backend, deliver=False)
    rt = px.PosixAio(ctx)
    r, w = os.pipe()
    try:
        os.write(w, b"x")
        warm = px.aiocb(r, 0, bytearray(1))
        rt.aio_read(warm)
        rt.aio_suspend([warm], 10.0)
        buf = bytearray(4)
        cb = px.aiocb(r, 0, buf)
        rt.aio_read(cb)
        assert cb._req is not None  # (the quick path stored it)

        def child() -> object:
            out: list[object] = [rt.aio_error(cb), rt.aio_return(cb), bool(rt._fds)]
            rt.aio_suspend([cb], 5.0)
            own = AioContext(backend=backend, deliver=False)
            rt.set_context(own)
            r2, w2 = os.pipe()  # (the parent's read waits on the first one)
            os.write(w2, b"yz")
            again = px.aiocb(r2, 0, bytearray(2))
            rt.aio_read(again)
            rt.aio_suspend([again], 5.0)
            out += [rt.aio_error(again), bytes(again.aio_buf).decode(), own.close(5)]
            return out

        got = _in_child(child)
        assert got == [errno.ECANCELED, -1, False, 0, "yz", True]
        os.write(w, b"abcd")
        rt.aio_suspend([cb], 10.0)
        assert (rt.aio_error(cb), rt.aio_return(cb)) == (0, 4)
        assert bytes(buf) == b"abcd"
        assert ctx.close(timeout=10)
        assert ctx.stats().outstanding == 0
    finally:
        os.close(r)
        os.close(w)
        ctx.close(timeout=10)


def _handler_at_c_return(n: int, handler: Any) -> list[int]:
    """Run ``handler()`` once, as the n-th C call of threadlets returns (where
    CPython runs a signal handler), as a signal handler would run there."""
    seen = [0]

    def prof(frame: Any, event: str, arg: object) -> None:
        if event == "c_return" and "threadlets" in frame.f_code.co_filename:
            seen[0] += 1
            if seen[0] == n:
                sys.setprofile(None)
                handler()

    sys.setprofile(prof)
    return seen


@pytest.mark.parametrize("call", ["aio_read", "aio_write", "aio_suspend", "lio_listio"])
def test_a_handler_submitting_at_every_c_return_of_a_posix_call(
    backend: str, data_file: Path, call: str
) -> None:
    """A signal handler's aio_read on the same fd, and aio_error/aio_return
    of the aiocb the interrupted call works on, run at the n-th C return of
    aio_read/aio_write (the quick path: the fd noted), aio_suspend or
    lio_listio, for each n: both aiocbs finish with their own data, nothing
    is left in the tables, nothing outstanding."""
    fd = os.open(data_file, os.O_RDWR)
    try:
        n = 0
        while True:
            n += 1
            assert n < 3000, "never ran to its end"
            ctx = AioContext(backend=backend, deliver=False)
            rt = px.PosixAio(ctx)
            try:
                warm = px.aiocb(fd, 0, bytearray(16))
                rt.aio_read(warm)
                rt.aio_suspend([warm], 10.0)
                mine = px.aiocb(fd, 4096, bytearray(512), lio_opcode=px.LIO_READ)
                if call == "aio_write":
                    mine.aio_buf = bytearray(PATTERN[4096 : 4096 + 512])
                theirs = px.aiocb(fd, 8192, bytearray(256))
                peeks: list[object] = []

                def handler(
                    mine: px.aiocb = mine,
                    theirs: px.aiocb = theirs,
                    rt: px.PosixAio = rt,
                    peeks: list[object] = peeks,
                ) -> None:
                    for f in (rt.aio_error, rt.aio_return):
                        try:
                            peeks.append(f(mine))
                        except OSError as e:
                            peeks.append(e.errno)
                    rt.aio_read(theirs)

                if call == "aio_suspend":
                    rt.aio_read(mine)
                seen = _handler_at_c_return(n, handler)
                try:
                    if call == "aio_read":
                        rt.aio_read(mine)
                    elif call == "aio_write":
                        rt.aio_write(mine)
                    elif call == "aio_suspend":
                        rt.aio_suspend([mine], 10.0)
                    else:
                        rt.lio_listio(px.LIO_WAIT, [mine])
                finally:
                    sys.setprofile(None)
                rt.aio_suspend([mine], 10.0)
                assert (rt.aio_error(mine), rt.aio_return(mine)) == (0, 512), f"C return {n}"
                # What the handler saw: never submitted, in progress, or done.
                assert set(peeks) <= {errno.EINVAL, errno.EINPROGRESS, 0, 512}, peeks
                assert bytes(mine.aio_buf) == PATTERN[4096 : 4096 + 512], f"C return {n}"
                if theirs._status is not px._IDLE:
                    rt.aio_suspend([theirs], 10.0)
                    got = (rt.aio_error(theirs), rt.aio_return(theirs))
                    assert got == (0, 256), f"C return {n}: {got}"
                    assert bytes(theirs.aio_buf) == PATTERN[8192 : 8192 + 256]
                assert ctx.close(timeout=10), f"C return {n}"
                assert ctx.stats().outstanding == 0
                assert not rt._fds, f"C return {n}: {rt._fds}"
            finally:
                ctx.close(timeout=10)
            if seen[0] < n:
                break
        assert n > 5, f"only {n} C returns"
    finally:
        os.close(fd)


@pytest.mark.linux_only("rwf_nowait")  # (no inline attempt without it)
def test_a_quick_aio_write_written_inline_as_close_begins_is_not_ecanceled(
    backend: str, data_file: Path
) -> None:
    """close() of the context runs (another thread) between the inline
    write's pwritev and the engine's admission: the bytes are in the file,
    so the aiocb reports them -- it reported ECANCELED (a refused
    submission) for a write that landed."""
    fd = os.open(data_file, os.O_RDWR)
    ctx = AioContext(backend=backend, deliver=False)
    rt = px.PosixAio(ctx)
    try:
        warm = px.aiocb(fd, 0, bytearray(16))
        rt.aio_read(warm)
        rt.aio_suspend([warm], 10.0)
        sc = ctx._sc
        real = sc.pwritev

        def pwritev(fd: int, views: Any, offset: int, flags: int = 0) -> int:
            n = real(fd, views, offset)  # (the inline attempt succeeds)
            if flags:
                closer = threading.Thread(target=ctx.close, args=(10,))
                closer.start()
                closer.join()
            return n

        sc.pwritev = pwritev  # type: ignore[method-assign]
        new = bytes(255 - b for b in PATTERN[:512])
        cb = px.aiocb(fd, 0, new)
        rt.aio_write(cb)
        assert os.pread(fd, 512, 0) == new
        assert (rt.aio_error(cb), rt.aio_return(cb)) == (0, 512)
        assert not rt._fds
    finally:
        ctx.close(timeout=10)
        os.close(fd)


def test_one_aiocb_submitted_by_two_threads_and_resubmitted_at_once(backend: str) -> None:
    """Two threads aio_read the same aiocb of an empty pipe at once (the
    quick path): one wins, the other gets EINVAL (in progress).  A third
    thread resubmits it the moment it is done, into another buffer: each
    submission gets its own bytes -- the first request's completion never
    finishes the second."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    ctx = AioContext(backend=backend, deliver=False)
    rt = px.PosixAio(ctx)
    try:
        for i in range(60):
            r, w = os.pipe()
            try:
                os.write(w, b"x")
                warm = px.aiocb(r, 0, bytearray(1))
                rt.aio_read(warm)
                rt.aio_suspend([warm], 10.0)
                cb = px.aiocb(r, 0, bytearray(4))
                go = threading.Barrier(2)
                answers: list[object] = []

                def submit(
                    cb: px.aiocb = cb, go: threading.Barrier = go, out: list[object] = answers
                ) -> None:
                    go.wait()
                    try:
                        rt.aio_read(cb)
                        out.append("ok")
                    except OSError as e:
                        out.append(e.errno)

                ts = [threading.Thread(target=submit) for _ in range(2)]
                for t in ts:
                    t.start()
                for t in ts:
                    t.join(10)
                assert sorted(map(str, answers)) == sorted(["ok", str(errno.EINVAL)]), i
                firsts: list[object] = []

                def resubmit(cb: px.aiocb = cb, firsts: list[object] = firsts) -> None:
                    rt.aio_suspend([cb], 10.0)
                    firsts.append((rt.aio_error(cb), rt.aio_return(cb), bytes(cb.aio_buf)))
                    cb.aio_buf = bytearray(2)
                    rt.aio_read(cb)

                t = threading.Thread(target=resubmit)
                t.start()
                os.write(w, b"abcd")
                t.join(10)
                assert firsts == [(0, 4, b"abcd")], i
                os.write(w, b"ef")
                rt.aio_suspend([cb], 10.0)
                assert (rt.aio_error(cb), rt.aio_return(cb)) == (0, 2), i
                assert bytes(cb.aio_buf) == b"ef", i
                assert not rt._fds, i
            finally:
                os.close(r)
                os.close(w)
        assert ctx.close(timeout=10)
        assert ctx.stats().outstanding == 0
    finally:
        sys.setswitchinterval(old)
        ctx.close(timeout=10)


def test_ctrl_c_at_every_c_return_of_aio_cancel_of_a_held_quick_read(
    backend: str, data_file: Path
) -> None:
    """A quick-path aio_read held back -- QUEUED behind the one busy worker
    (threads), or waiting in the ring for an empty pipe (io_uring) -- and
    Ctrl-C at the n-th C return of aio_cancel, for each n.  Then it is let
    go: an answer AIO_CANCELED means ECANCELED, and ECANCELED means nothing
    moved (the buffer untouched, the pipe's bytes unread); otherwise the
    read has its data.  Nothing outstanding, no table left."""
    from threadlets import ThreadletQueue

    n = 0
    while True:
        n += 1
        assert n < 3000, "never ran to its end"
        queue = ThreadletQueue(max_threads=1)
        ctx = AioContext(queue, backend=backend, deliver=False, inline=False)
        rt = px.PosixAio(ctx)
        go = threading.Event()
        r, w = os.pipe()
        fd = os.open(data_file, os.O_RDONLY)
        try:
            target = fd if backend == "threads" else r
            if backend == "io_uring":
                os.write(w, b"x")
            warm = px.aiocb(target, 0, bytearray(1))
            rt.aio_read(warm)
            rt.aio_suspend([warm], 10.0)
            busy = threading.Event()
            blocker = ctx.call(lambda busy=busy, go=go: (busy.set(), go.wait(10)))
            assert busy.wait(10)
            buf = bytearray(4)
            cb = px.aiocb(target, 0, buf)
            rt.aio_read(cb)
            answer = None
            seen = interrupt_at_c_return(n)
            try:
                answer = rt.aio_cancel(target, cb)
            except KeyboardInterrupt:
                pass
            finally:
                sys.setprofile(None)
                gc.enable()
            go.set()
            os.write(w, b"abcd")
            rt.aio_suspend([cb], 10.0)
            got = (rt.aio_error(cb), rt.aio_return(cb))
            if answer == px.AIO_CANCELED:
                assert got == (errno.ECANCELED, -1), f"C return {n}"
            if got[0] == errno.ECANCELED:
                assert answer in (None, px.AIO_CANCELED), f"C return {n}: {answer}"
                assert bytes(buf) == bytes(4), f"C return {n}"
                if backend == "io_uring":
                    assert os.read(r, 8) == b"abcd", f"C return {n}"
            else:
                assert answer in (None, px.AIO_NOTCANCELED), f"C return {n}: {answer}"
                assert got == (0, 4), f"C return {n}: {got}"
                want = b"abcd" if backend == "io_uring" else PATTERN[:4]
                assert bytes(buf) == want, f"C return {n}"
            assert blocker.wait(10)
            assert ctx.close(timeout=10), f"C return {n}"
            assert ctx.stats().outstanding == 0, f"C return {n}"
            assert not rt._fds, f"C return {n}"
        finally:
            go.set()
            ctx.close(timeout=10)
            queue.close(timeout=10)
            os.close(fd)
            os.close(r)
            os.close(w)
        if seen[0] < n:
            break
    assert n > 3, f"only {n} C returns"


@pytest.mark.parametrize("cold", [False, True], ids=["inline", "cold"])
def test_close_while_quick_submissions_race_in(backend: str, data_file: Path, cold: bool) -> None:
    """Threads aio_read through the quick path while the context is closed
    under them: every aiocb finishes (none in progress for ever), an
    ECANCELED one's buffer is untouched after close() returned, a done one
    has its data; nothing outstanding, no table left."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    fd = os.open(data_file, os.O_RDONLY)
    try:
        for round_ in range(8):
            ctx = AioContext(backend=backend, deliver=False)
            rt = px.PosixAio(ctx)
            warm = px.aiocb(fd, 0, bytearray(16))
            rt.aio_read(warm)
            rt.aio_suspend([warm], 10.0)
            if cold:
                _cold(ctx)
            start = threading.Barrier(4)
            cbs: list[list[px.aiocb]] = [[], [], []]

            def run(mine: list[px.aiocb], start: threading.Barrier = start, rt: Any = rt) -> None:
                start.wait()
                for i in range(40):
                    cb = px.aiocb(fd, (i % 16) * 512, bytearray(512))
                    with contextlib.suppress(RuntimeError):  # (refused: ECANCELED)
                        rt.aio_read(cb)
                    mine.append(cb)

            ts = [threading.Thread(target=run, args=(m,)) for m in cbs]
            for t in ts:
                t.start()
            start.wait()
            assert ctx.close(timeout=10)
            for t in ts:
                t.join(10)
            assert ctx.close(timeout=10)
            every = [cb for m in cbs for cb in m]
            assert len(every) == 120
            snapshot = [bytes(cb.aio_buf) for cb in every]
            for cb, seen in zip(every, snapshot, strict=True):
                rt.aio_suspend([cb], 10.0)
                got = (rt.aio_error(cb), rt.aio_return(cb))
                if got[0] == errno.ECANCELED:
                    assert bytes(cb.aio_buf) == seen, round_
                else:
                    assert got == (0, 512), (round_, got)
                    off = cb.aio_offset
                    assert bytes(cb.aio_buf) == PATTERN[off : off + 512], round_
            assert ctx.stats().outstanding == 0
            assert not rt._fds, round_
    finally:
        sys.setswitchinterval(old)
        os.close(fd)
