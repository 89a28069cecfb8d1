"""h-break14: the engine's admission and inline paths (read()/write(),
_read_checked/_write_checked) attacked from outside: Ctrl-C at every C
return while close() waits, and a short inline transfer cut short before a
backend took the rest."""

from __future__ import annotations

import errno
import gc
import os
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import threadlets.posix as px
from threadlets import AioContext
from threadlets.engine import RWF_NOWAIT
from threadlets.uring import RingUnavailable

from .conftest import interrupt_at_c_return, wait_until

BACKENDS = ["threads", "io_uring"]
DATA = bytes(range(256)) * 16  # 4 KiB


def _context(backend: str, **kwargs: Any) -> AioContext:
    try:
        return AioContext(backend=backend, **kwargs)
    except RingUnavailable as e:  # pragma: no cover - no io_uring here
        pytest.skip(f"io_uring: {e}")


@pytest.fixture
def fd() -> Iterator[int]:
    """A file of DATA on ext4 (/var/tmp)."""
    fd, name = tempfile.mkstemp(prefix="threadlets-break14-", dir="/var/tmp")
    try:
        os.unlink(name)
        os.write(fd, DATA)
        yield fd
    finally:
        os.close(fd)


def _inline_syscalls(ctx: AioContext, short: bool) -> None:
    """Inline attempts that move bytes (writes too, as a file system that
    takes RWF_NOWAIT for them would), half of them if ``short``."""
    real_w, real_r = ctx._sc.pwritev, ctx._preadv

    def wrap(real: Callable[..., int]) -> Callable[..., int]:
        def call(fd: int, views: Any, offset: int, flags: int = 0) -> int:
            if flags & RWF_NOWAIT:
                if short:
                    v = memoryview(views[0])
                    views = [v[: len(v) // 2]]
                return real(fd, views, offset, flags & ~RWF_NOWAIT)
            return real(fd, views, offset, flags)

        return call

    ctx._sc.pwritev = wrap(real_w)  # type: ignore[method-assign]
    ctx._preadv = wrap(real_r)


# -- the admission given back while close() waits -------------------------------------


@pytest.mark.parametrize("checked", [False, True], ids=["public", "checked"])
@pytest.mark.parametrize("op", ["read", "write"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_ctrl_c_as_the_admission_is_given_back_to_a_closing_context(
    backend: str, fd: int, op: str, checked: bool
) -> None:
    """close() waits for a request in another thread; read()/write() (and
    posix's entries) refuse, giving back the admission taken before the
    inline attempt -- through a stand-in request made by a call: Ctrl-C as
    that call returned left the admission counted, and close() waited for
    it for good (returned False at its timeout)."""
    ctx = _context(backend, deliver=not checked)
    release = threading.Event()
    started = threading.Event()

    def block() -> None:
        started.set()
        release.wait(10)

    try:
        ctx.read(fd, 0, bytearray(1)).wait(10)
        blocker = ctx.call(block)
        assert started.wait(10)
        result: list[bool] = []
        closer = threading.Thread(target=lambda: result.append(ctx.close(timeout=10)))
        closer.start()
        wait_until(lambda: ctx._cq.closing)
        view = memoryview(bytearray(DATA))
        taken: list[Any] = []
        if checked:
            fn: Callable[[], object] = (
                (lambda: ctx._read_checked(fd, 0, view, lambda r: None, taken))
                if op == "read"
                else (lambda: ctx._write_checked(fd, 0, view, lambda r: None, taken))
            )
        else:
            fn = (lambda: ctx.read(fd, 0, view)) if op == "read" else lambda: ctx.write(fd, 0, view)
        for n in range(1, 100):
            count = interrupt_at_c_return(n)
            try:
                fn()
            except (KeyboardInterrupt, RuntimeError):
                pass
            finally:
                sys.setprofile(None)
                gc.enable()
            assert ctx._cq.admitted - ctx._cq.delivered == 1, n  # (the blocker's)
            if count[0] < n:
                break
        else:  # pragma: no cover
            raise AssertionError("the interrupt never ran out of C returns")
        assert not taken
        release.set()
        closer.join(10)
        assert result == [True]
        assert blocker.done()
    finally:
        release.set()
        ctx.close(timeout=10)
