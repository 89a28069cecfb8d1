"""The system-call seam: every system call the engine makes goes through a
:class:`Syscalls` object, so that tests and ``threadlets stress`` can make
calls fail or come up short without monkeypatching the ``os`` module.

This module owns the real calls (:class:`Syscalls`, a thin layer over ``os``,
``fcntl`` and, for ``fallocate(2)``, ``ctypes``) and the deterministic fault
injector (:class:`FaultInjector`).  It knows nothing of requests or threads.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import platform
import sys
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from threadlets.probe import MAX_ALIGNMENT, O_DIRECT, capabilities

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

__all__ = [
    "FALLOC_FL_KEEP_SIZE",
    "FALLOC_FL_PUNCH_HOLE",
    "FALLOC_FL_ZERO_RANGE",
    "FaultInjector",
    "FaultStats",
    "Syscalls",
]

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10


def _load_fallocate() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.fallocate64 if hasattr(libc, "fallocate64") else libc.fallocate
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fn.restype = ctypes.c_int
    return fn


_fallocate = _load_fallocate()


class _SyscallHoldingTheGil(ctypes._CFuncPtr):  # type: ignore[misc,name-defined]
    # libc's syscall(2), called without letting go of the GIL (ctypes'
    # "pythonapi" calling convention), with errno kept for ctypes.get_errno().
    _flags_ = (
        ctypes._FUNCFLAG_CDECL  # type: ignore[attr-defined]
        | ctypes._FUNCFLAG_PYTHONAPI  # type: ignore[attr-defined]
        | ctypes._FUNCFLAG_USE_ERRNO  # type: ignore[attr-defined]
    )
    _restype_ = ctypes.c_long
    _argtypes_ = (ctypes.c_long,) * 7


class _QuickSyscall(ctypes._CFuncPtr):  # type: ignore[misc,name-defined]
    # As _SyscallHoldingTheGil, without prototype and without errno: each
    # of those costs about a microsecond per call in ctypes.
    _flags_ = ctypes._FUNCFLAG_CDECL | ctypes._FUNCFLAG_PYTHONAPI  # type: ignore[attr-defined]
    _restype_ = ctypes.c_long


def _load_syscall_holding_the_gil() -> _SyscallHoldingTheGil | None:
    if not sys.platform.startswith("linux") or platform.machine() != "x86_64":
        return None  # (the syscall numbers below are x86-64's)
    if capabilities().portable:
        return None  # as elsewhere: the os module's calls
    try:
        return _SyscallHoldingTheGil(("syscall", ctypes.CDLL(None, use_errno=True)))
    except (OSError, AttributeError):  # pragma: no cover
        return None


def _load_quick_syscall() -> _QuickSyscall | None:
    if _load_syscall_holding_the_gil() is None:
        return None
    try:
        return _QuickSyscall(("syscall", ctypes.CDLL(None)))
    except (OSError, AttributeError):  # pragma: no cover
        return None


#: ``syscall_holding_the_gil(nr, a1, ..., a6)``: a raw system call that
#: keeps the GIL, for calls that return at once and are made on hot paths
#: (F_GETFL, fstat, an eventfd write, an io_uring submission).  Letting the
#: GIL go there hands it to whichever thread wants it -- the ring's reaper,
#: a worker that finished a read -- and the caller then waits to get it back:
#: one context switch per call, and completions reaped one at a time instead
#: of in batches.  Returns -1 with ctypes' errno set on failure.  None where
#: the numbers are not known (only x86-64 Linux).
syscall_holding_the_gil = _load_syscall_holding_the_gil()
#: ``quick_syscall(nr, a1, a2)``: syscall_holding_the_gil for a call that
#: needs only C ints (fds, commands) and ctypes objects (passed by
#: reference), and whose errno is not wanted: -1 on failure.  Unprototyped
#: arguments are C ints, so nothing wider may be passed as a Python int.
quick_syscall = _load_quick_syscall()
NR_READ = 0
NR_WRITE = 1
NR_FSTAT = 5
NR_FCNTL = 72
NR_IO_URING_ENTER = 426


class Syscalls:
    """The real system calls.  Each raises OSError as the ``os`` module does.

    One instance may be shared by any number of threads.
    """

    def preadv(
        self, fd: int, buffers: Sequence[WriteableBuffer], offset: int, flags: int = 0
    ) -> int:
        return os.preadv(fd, buffers, offset, flags)

    def pwritev(
        self, fd: int, buffers: Sequence[ReadableBuffer], offset: int, flags: int = 0
    ) -> int:
        return os.pwritev(fd, buffers, offset, flags)

    def readv(self, fd: int, buffers: Sequence[WriteableBuffer]) -> int:
        return os.readv(fd, buffers)

    def writev(self, fd: int, buffers: Sequence[ReadableBuffer]) -> int:
        return os.writev(fd, buffers)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def fdatasync(self, fd: int) -> None:
        os.fdatasync(fd)

    def fallocate(self, fd: int, mode: int, offset: int, length: int) -> None:
        if _fallocate is None:
            raise OSError(errno.ENOTSUP, "fallocate is not available on this platform")
        if _fallocate(fd, mode, offset, length) != 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))

    def ftruncate(self, fd: int, length: int) -> None:
        os.ftruncate(fd, length)

    def copy_file_range(
        self, src: int, dst: int, count: int, offset_src: int, offset_dst: int
    ) -> int:
        if not hasattr(os, "copy_file_range"):
            raise OSError(errno.ENOTSUP, "copy_file_range is not available on this platform")
        return os.copy_file_range(src, dst, count, offset_src, offset_dst)

    def ioctl(self, fd: int, request: int, arg: int | bytearray) -> int:
        return (
            fcntl.ioctl(fd, request, arg, True)
            if isinstance(arg, bytearray)
            else fcntl.ioctl(fd, request, arg)
        )

    def fstat(self, fd: int) -> os.stat_result:
        return os.fstat(fd)

    def getfl(self, fd: int) -> int:
        return fcntl.fcntl(fd, fcntl.F_GETFL)


@dataclass
class FaultStats:
    """What a :class:`FaultInjector` did, by kind."""

    calls: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    short: int = 0


_KINDS = {"preadv": 1, "pwritev": 2, "fsync": 3, "fdatasync": 4, "fallocate": 5, "ftruncate": 6}
_MASK = 2**64 - 1


def _mix(x: int) -> int:
    """The next of a splitmix64 sequence: 64 well-mixed bits from ``x``."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


class FaultInjector(Syscalls):
    """System calls that fail or come up short at a given rate.

    Whether a call is faulted, and how, is a function of the seed and of the
    call itself (its kind, offset and length, and how many times that same
    call was made recently), never of thread timing: the same seed and the
    same sequence of calls give the same faults.  The history behind "how
    many times" is bounded: it remembers the last ``HISTORY`` distinct calls
    (least recently made forgotten first), and nothing at rate 0.  EINTR is
    injected at most twice in a row for one call, so retries always make
    progress.

    Only faults the kernel can produce are injected.  ``errors`` are the
    errnos to choose from: EIO anywhere; ENOSPC only where space is
    allocated (writes, and fallocate modes other than punching a hole);
    EINTR anywhere (each of these calls may be interrupted on some file
    system).  ``short`` makes reads and writes transfer only part of what
    was asked: at least one byte, and on an O_DIRECT descriptor a multiple
    of ``MAX_ALIGNMENT`` (4096, the strictest alignment), never a cut the
    device could not make -- so a call of at most 4096 bytes there is never
    short.  Flags such as RWF_NOWAIT pass through.
    """

    #: How many distinct calls the injector remembers.
    HISTORY = 1024

    def __init__(
        self,
        rate: float,
        seed: int = 0,
        errors: Sequence[int] = (errno.EIO, errno.ENOSPC, errno.EINTR),
        short: bool = True,
    ) -> None:
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"fault rate must be between 0 and 1, not {rate}")
        self.rate = rate
        self.seed = seed
        self.errors = tuple(errors)
        self.short = short
        self.stats = FaultStats()
        self._lock = threading.Lock()
        # Least recently made call first.
        self._seen: OrderedDict[tuple[str, int, int, int], int] = OrderedDict()

    def _decide(
        self, kind: str, fd: int, offset: int, length: int, allocates: bool = False
    ) -> tuple[int, int]:
        """Returns (errno to raise or 0, bytes to transfer or -1 for all)."""
        if self.rate == 0.0:
            with self._lock:
                self.stats.calls += 1
            return 0, -1
        key = (kind, fd, offset, length)
        with self._lock:
            seen = self._seen
            nth = seen.get(key, 0)
            seen[key] = nth + 1
            seen.move_to_end(key)
            if len(seen) > self.HISTORY:
                seen.popitem(last=False)
            self.stats.calls += 1
        # Uniform numbers from the call itself.  A tuple of ints hashes the
        # same in every process (str hashes do not); a Random per call
        # would cost twenty times as much.
        x = hash((self.seed, _KINDS[kind], offset, length, nth)) & _MASK
        x = _mix(x)
        if x / 2**64 >= self.rate:
            return 0, -1
        allowed = [
            e
            for e in self.errors
            if not (e == errno.ENOSPC and not allocates) and not (e == errno.EINTR and nth % 3 == 2)
        ]
        unit = 0
        if self.short and kind in ("preadv", "pwritev"):
            unit = MAX_ALIGNMENT if self._direct(fd) else 1
            if length > unit:
                allowed.append(0)  # 0 stands for "short transfer"
        if not allowed:
            return 0, -1
        x = _mix(x)
        choice = allowed[x % len(allowed)]
        with self._lock:
            if choice == 0:
                self.stats.short += 1
            else:
                name = errno.errorcode.get(choice, str(choice))
                self.stats.errors[name] = self.stats.errors.get(name, 0) + 1
        if choice == 0:
            # Whole units, at least one, fewer than asked for.
            most = (length - 1) // unit
            return 0, unit * (1 + _mix(x) % most)
        return choice, -1

    def _direct(self, fd: int) -> bool:
        try:
            return bool(O_DIRECT and self.getfl(fd) & O_DIRECT)
        except OSError:
            return True  # the call itself will fail; cut nothing risky

    @staticmethod
    def _raise(e: int, what: str) -> None:
        raise OSError(e, f"{os.strerror(e)} (injected into {what})")

    def _rw(
        self, kind: str, fd: int, buffers: Sequence[ReadableBuffer], offset: int, flags: int
    ) -> int:
        views = [memoryview(b).cast("B") for b in buffers]
        total = sum(len(v) for v in views)
        e, keep = self._decide(kind, fd, offset, total, allocates=kind == "pwritev")
        if e:
            self._raise(e, kind)
        if keep >= 0:
            cut: list[memoryview] = []
            for v in views:
                if keep <= 0:
                    break
                cut.append(v[:keep])
                keep -= len(v)
            views = cut
        if kind == "preadv":
            return super().preadv(fd, views, offset, flags)
        return super().pwritev(fd, views, offset, flags)

    def preadv(
        self, fd: int, buffers: Sequence[WriteableBuffer], offset: int, flags: int = 0
    ) -> int:
        return self._rw("preadv", fd, buffers, offset, flags)

    def pwritev(
        self, fd: int, buffers: Sequence[ReadableBuffer], offset: int, flags: int = 0
    ) -> int:
        return self._rw("pwritev", fd, buffers, offset, flags)

    def fsync(self, fd: int) -> None:
        e, _ = self._decide("fsync", fd, 0, 0)
        if e:
            self._raise(e, "fsync")
        super().fsync(fd)

    def fdatasync(self, fd: int) -> None:
        e, _ = self._decide("fdatasync", fd, 0, 0)
        if e:
            self._raise(e, "fdatasync")
        super().fdatasync(fd)

    def fallocate(self, fd: int, mode: int, offset: int, length: int) -> None:
        allocates = not mode & FALLOC_FL_PUNCH_HOLE
        e, _ = self._decide("fallocate", fd, offset, length, allocates=allocates)
        if e:
            self._raise(e, "fallocate")
        super().fallocate(fd, mode, offset, length)

    def ftruncate(self, fd: int, length: int) -> None:
        e, _ = self._decide("ftruncate", fd, length, 0)
        if e:
            self._raise(e, "ftruncate")
        super().ftruncate(fd, length)
