"""glibc's own POSIX AIO, called through ctypes, with the same Python
interface as :mod:`threadlets.posix` -- the reference the differential tests
compare against (and the benchmark races).

Only for Linux x86_64/aarch64 glibc, where ``struct aiocb`` is 168 bytes;
:data:`AVAILABLE` says whether it could be bound.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import platform
from collections.abc import Sequence
from typing import Any


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Sigevent(ctypes.Structure):
    _fields_ = [
        ("sigev_value", ctypes.c_void_p),
        ("sigev_signo", ctypes.c_int),
        ("sigev_notify", ctypes.c_int),
        ("_pad", ctypes.c_int * 12),
    ]


class _Aiocb(ctypes.Structure):
    _fields_ = [
        ("aio_fildes", ctypes.c_int),
        ("aio_lio_opcode", ctypes.c_int),
        ("aio_reqprio", ctypes.c_int),
        ("aio_buf", ctypes.c_void_p),
        ("aio_nbytes", ctypes.c_size_t),
        ("aio_sigevent", _Sigevent),
        ("_next_prio", ctypes.c_void_p),
        ("_abs_prio", ctypes.c_int),
        ("_policy", ctypes.c_int),
        ("_error_code", ctypes.c_int),
        ("_return_value", ctypes.c_ssize_t),
        ("aio_offset", ctypes.c_int64),
        ("_reserved", ctypes.c_char * 32),
    ]


SIGEV_NONE = 1

AVAILABLE = (
    platform.system() == "Linux"
    and platform.machine() in ("x86_64", "aarch64")
    and ctypes.sizeof(_Aiocb) == 168
    and platform.libc_ver()[0] == "glibc"
)

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True) if AVAILABLE else None
if _libc is not None:
    for name in ("aio_read", "aio_write", "aio_error", "aio_cancel"):
        getattr(_libc, name).restype = ctypes.c_int
    _libc.aio_return.restype = ctypes.c_ssize_t
    _libc.aio_fsync.argtypes = [ctypes.c_int, ctypes.c_void_p]
    _libc.aio_cancel.argtypes = [ctypes.c_int, ctypes.c_void_p]
    _libc.aio_suspend.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
    _libc.lio_listio.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]


class aiocb:
    """A ctypes aiocb that owns its buffer (so glibc never sees freed memory)."""

    def __init__(
        self,
        fildes: int,
        offset: int = 0,
        buf: Any = None,
        nbytes: int | None = None,
        reqprio: int = 0,
        lio_opcode: int = 2,
    ) -> None:
        self.c = _Aiocb()
        if isinstance(buf, memoryview) and not buf.readonly:
            # Use the caller's memory as it is (an aligned buffer for O_DIRECT).
            self._cbuf: Any = buf
            self.c.aio_buf = ctypes.addressof(ctypes.c_char.from_buffer(buf))
            size = len(buf)
        else:
            data = bytes(buf) if buf is not None else b""
            self._cbuf = ctypes.create_string_buffer(data, max(len(data), 1))
            self.c.aio_buf = ctypes.addressof(self._cbuf)
            size = len(data)
        self.c.aio_fildes = fildes
        self.c.aio_offset = offset
        self.c.aio_nbytes = size if nbytes is None else nbytes
        self.c.aio_reqprio = reqprio
        self.c.aio_lio_opcode = lio_opcode
        self.c.aio_sigevent.sigev_notify = SIGEV_NONE

    @property
    def aio_buf(self) -> bytes:
        if isinstance(self._cbuf, memoryview):
            return bytes(self._cbuf)
        return bytes(self._cbuf.raw)

    @property
    def aio_offset(self) -> int:
        return int(self.c.aio_offset)

    @aio_offset.setter
    def aio_offset(self, value: int) -> None:
        self.c.aio_offset = value

    def ref(self) -> Any:
        return ctypes.byref(self.c)


def _check(ret: int) -> int:
    if ret == -1:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return ret


def aio_read(cb: aiocb) -> None:
    assert _libc is not None
    _check(_libc.aio_read(cb.ref()))


def aio_write(cb: aiocb) -> None:
    assert _libc is not None
    _check(_libc.aio_write(cb.ref()))


def aio_fsync(op: int, cb: aiocb) -> None:
    assert _libc is not None
    _check(_libc.aio_fsync(op, cb.ref()))


def aio_error(cb: aiocb) -> int:
    assert _libc is not None
    return int(_libc.aio_error(cb.ref()))


def aio_return(cb: aiocb) -> int:
    assert _libc is not None
    return int(_libc.aio_return(cb.ref()))


def aio_cancel(fildes: int, cb: aiocb | None = None) -> int:
    assert _libc is not None
    return _check(_libc.aio_cancel(fildes, None if cb is None else cb.ref()))


def _array(cbs: Sequence[aiocb | None]) -> Any:
    arr = (ctypes.POINTER(_Aiocb) * len(cbs))()
    for i, cb in enumerate(cbs):
        arr[i] = ctypes.pointer(cb.c) if cb is not None else None
    return arr


def aio_suspend(cbs: Sequence[aiocb | None], timeout: float | None = None) -> None:
    assert _libc is not None
    ts = None
    if timeout is not None:
        t = _Timespec(int(timeout), int((timeout % 1) * 1e9))
        ts = ctypes.byref(t)
    while True:
        ret = _libc.aio_suspend(_array(cbs), len(cbs), ts)
        if ret == -1 and ctypes.get_errno() == errno.EINTR:
            continue
        _check(ret)
        return


def lio_listio(mode: int, cbs: Sequence[aiocb | None]) -> None:
    assert _libc is not None
    _check(_libc.lio_listio(mode, _array(cbs), len(cbs), None))
