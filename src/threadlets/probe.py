"""What this kernel and file system support, found by trying.

This module owns the capability probes that the engine and the tools rely
on: reads with ``RWF_NOWAIT`` (the inline fast path), ``O_DIRECT`` and its
alignment on a given file, whether io_uring can be set up, and page-aligned
buffers.  Every probe tries the real operation and reports what happened; none
guesses from version numbers, because seccomp filters, containers and sysctls
disable features that the kernel version says exist.

It also owns the *capabilities*: which Linux-only features threadlets may
use at all (:func:`capabilities`), decided once, at import, here and nowhere
else.  Each has a portable fallback that the other modules take when it is
off: a pipe for the completion eventfd, no inline (``RWF_NOWAIT``) path, the
threads backend for io_uring, ``F_NOCACHE`` (macOS) or an OSError(ENOTSUP)
for O_DIRECT, no ``openat2`` for the one-call helpers' inline opens.

Linux is the target.  Elsewhere each probe answers "not supported" with the
reason instead of raising.  ``THREADLETS_PORTABLE=1`` in the environment
when threadlets is imported (*portable mode*, :func:`portable`) turns every
Linux-only capability off, so the code and tests of the fallbacks run on
Linux as they would on macOS or a BSD.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import stat
import sys
import tempfile
from dataclasses import dataclass

__all__ = [
    "Capabilities",
    "DirectIOSupport",
    "IoUringSupport",
    "aligned_buffer",
    "buffer_address",
    "capabilities",
    "capability_note",
    "direct_alignment",
    "pin_buffer",
    "portable",
    "probe_alignment",
    "probe_direct_io",
    "probe_io_uring",
    "probe_nowait",
]

IS_LINUX = sys.platform.startswith("linux")
PAGE_SIZE = mmap.PAGESIZE
#: The largest alignment any Linux block device asks of O_DIRECT.
MAX_ALIGNMENT = 4096


@dataclass(frozen=True)
class Capabilities:
    """The Linux-only features threadlets may use here, and their fallbacks.

    True means "use it where the kernel takes it" (the probes below say
    whether it does); False means the fallback, always.
    """

    #: THREADLETS_PORTABLE=1 was set at import: every Linux-only one is off.
    portable: bool
    #: The completion notifier is an eventfd; else a non-blocking pipe.
    eventfd: bool
    #: Reads (and writes) try ``RWF_NOWAIT`` in the caller; else no inline path.
    rwf_nowait: bool
    #: backend "auto" tries io_uring and "io_uring" is allowed; else the
    #: threads, and an explicit "io_uring" raises RingUnavailable.
    io_uring: bool
    #: ``direct=True`` opens with O_DIRECT; else F_NOCACHE, else ENOTSUP.
    o_direct: bool
    #: ``openat2(RESOLVE_CACHED)``: the one-call helpers' non-blocking open.
    openat2: bool
    #: ``fcntl(F_NOCACHE)`` (macOS): the page cache bypass without O_DIRECT.
    f_nocache: bool


def _from_environment() -> Capabilities:
    forced = os.environ.get("THREADLETS_PORTABLE", "") not in ("", "0")
    linux = IS_LINUX and not forced
    return Capabilities(
        portable=forced,
        eventfd=linux and hasattr(os, "eventfd"),
        rwf_nowait=linux and hasattr(os, "RWF_NOWAIT") and hasattr(os, "preadv"),
        io_uring=linux,
        o_direct=not forced and hasattr(os, "O_DIRECT"),
        openat2=linux,
        f_nocache=hasattr(fcntl, "F_NOCACHE"),
    )


_CAPABILITIES = _from_environment()


def capabilities() -> Capabilities:
    """What this process may use (fixed at import; see :class:`Capabilities`)."""
    return _CAPABILITIES


def portable() -> bool:
    """Whether portable mode is on: ``THREADLETS_PORTABLE=1`` (any value but
    empty or "0") was in the environment when threadlets was imported."""
    return _CAPABILITIES.portable


_DISPLAY = {"rwf_nowait": "RWF_NOWAIT", "o_direct": "O_DIRECT", "f_nocache": "F_NOCACHE"}


def capability_note(name: str) -> str:
    """Why capability ``name`` (a field of :class:`Capabilities`) is off."""
    name = _DISPLAY.get(name, name)
    if _CAPABILITIES.portable:
        return f"{name} is turned off by THREADLETS_PORTABLE=1 (portable mode)"
    return f"{name} is not available on this platform"


#: 0 where O_DIRECT is off: no descriptor is then treated as O_DIRECT.
O_DIRECT: int = getattr(os, "O_DIRECT", 0) if _CAPABILITIES.o_direct else 0
#: 0 where the inline path is off.
RWF_NOWAIT: int = getattr(os, "RWF_NOWAIT", 0) if _CAPABILITIES.rwf_nowait else 0
#: 0 where there is no F_NOCACHE.
F_NOCACHE: int = getattr(fcntl, "F_NOCACHE", 0)


def aligned_buffer(size: int, alignment: int | None = None) -> memoryview:
    """A zero-filled writable buffer of ``size`` bytes whose address is a
    multiple of ``alignment`` (default: the page size).

    The memory comes from an anonymous ``mmap``, so it is page-aligned; an
    alignment above the page size must be a power of two and is met by
    over-allocating.  Suitable for ``O_DIRECT`` I/O of any alignment the
    kernel asks for.
    """
    if isinstance(size, bool) or not isinstance(size, int):
        raise TypeError(f"size must be an int, not {type(size).__name__}")
    if size < 0:
        raise ValueError(f"size must be >= 0, not {size}")
    if alignment is None:
        alignment = PAGE_SIZE
    if isinstance(alignment, bool) or not isinstance(alignment, int):
        raise TypeError(f"alignment must be an int, not {type(alignment).__name__}")
    if alignment < 1 or alignment & (alignment - 1):
        raise ValueError(f"alignment must be a power of two, not {alignment}")
    extra = alignment - PAGE_SIZE if alignment > PAGE_SIZE else 0
    m = mmap.mmap(-1, max(size + extra, 1))
    view = memoryview(m)
    if extra:
        addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
        start = (-addr) % alignment
        view = view[start : start + size]
    else:
        view = view[:size]
    return view


def buffer_address(buf: memoryview) -> int | None:
    """The address of a writable buffer's first byte; None if read-only
    (such memory is copied to an aligned buffer before O_DIRECT I/O)."""
    if buf.readonly:
        return None
    if len(buf) == 0:
        return 0
    pinned = pin_buffer(buf)
    return None if pinned is None else pinned[0]


def _bytes_data_offset() -> int | None:
    """Where a bytes object's data starts, from the object's address: a
    constant on CPython (``id`` is the address; ob_sval follows the
    header).  Checked on two objects of different sizes; None elsewhere
    (pin_buffer then asks ctypes each time)."""
    if sys.implementation.name != "cpython":  # pragma: no cover
        return None
    probes = (b"threadlets", b"pin_buffer: the address of bytes")
    offsets = {
        (ctypes.cast(ctypes.c_char_p(b), ctypes.c_void_p).value or 0) - id(b) for b in probes
    }
    return offsets.pop() if len(offsets) == 1 else None


_BYTES_DATA = _bytes_data_offset()
_c_char_from_buffer = ctypes.c_char.from_buffer
_addressof = ctypes.addressof


def pin_buffer(view: object) -> tuple[int, object] | None:
    """The address of a buffer's first byte for the kernel to use, and an
    object that keeps that memory in place while it is held: an export of
    the buffer (a bytearray cannot resize, an mmap cannot close, a
    memoryview cannot be released under it), or the bytes object itself.
    None where Python cannot give an address (read-only memory other than
    whole bytes, or an empty buffer)."""
    if type(view) is memoryview and view.readonly:
        obj = view.obj
        if type(obj) is bytes and len(view) == len(obj):
            if _BYTES_DATA:  # (never 0: the header comes first)
                return id(obj) + _BYTES_DATA, obj
            return ctypes.cast(ctypes.c_char_p(obj), ctypes.c_void_p).value or 0, obj
        return None
    try:
        export = _c_char_from_buffer(view)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return _addressof(export), export


def probe_alignment(fd: int) -> tuple[int, int]:
    """The (request alignment, buffer alignment) that O_DIRECT I/O on ``fd``
    needs, found as QEMU's raw_probe_alignment does: the smallest length and
    buffer offset for which a read is not refused with EINVAL.

    A file not opened with O_DIRECT answers (1, 1).  Raises the OSError of a read
    that fails otherwise (a write-only fd: EBADF).

    The reads go where the file has data: a read of a hole or of an
    unwritten extent (ext4, XFS: also a block written a moment ago whose
    conversion has not finished) is answered with zeros whatever its
    alignment.  So, as QEMU's raw_probe_alignment, an O_DIRECT fd whose
    1-byte read (or read into 1-aligned memory) passes is not believed:
    it gets the strictest answer, correct everywhere, only slower where
    the file system really takes any alignment.  (It answered (1, 1) for a
    sparse image's first blocks, and every unaligned write failed EINVAL.)
    """
    offset = _data_offset(fd)
    direct = _is_direct(fd)
    buf = aligned_buffer(3 * MAX_ALIGNMENT)
    request = MAX_ALIGNMENT
    for size in (1, 512, 1024, 2048, 4096):
        if _reads(fd, buf[:size], offset):
            request = size
            break
    if request == 1 and direct:
        return MAX_ALIGNMENT, MAX_ALIGNMENT
    # The memory probe reads across a page boundary: the kernel splits a
    # buffer into per-page segments, and a misaligned buffer inside one page
    # can pass where the same misalignment across pages fails.
    memory = MAX_ALIGNMENT
    span = 2 * MAX_ALIGNMENT
    for align in (1, 512, 1024, 2048, 4096):
        if _reads(fd, buf[align : align + span], offset):
            memory = align
            break
    if memory == 1 and direct:
        memory = MAX_ALIGNMENT
    return request, memory


def _is_direct(fd: int) -> bool:
    try:
        return bool(O_DIRECT and fcntl.fcntl(fd, fcntl.F_GETFL) & O_DIRECT)
    except OSError:
        return False


def _data_offset(fd: int) -> int:
    """An offset aligned to MAX_ALIGNMENT where the file has data (0 if
    none is found).  SEEK_DATA runs on a new open file description of the
    file (``/proc/self/fd/N``): ``fd``'s position, which another thread may
    be reading at, is never moved."""
    seek_data = getattr(os, "SEEK_DATA", None)
    if seek_data is None:
        return 0
    opened: list[int] = []
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return 0  # a block device: all data
        _open_into(opened, f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
        pos = 0
        for _ in range(16):
            found = os.lseek(opened[0], pos, seek_data)
            if found == pos and pos % MAX_ALIGNMENT == 0:
                return pos
            pos = -(-found // MAX_ALIGNMENT) * MAX_ALIGNMENT
    except OSError:  # the reopening refused; ENXIO: no data past pos
        pass
    finally:
        if opened:
            os.close(opened[0])
    return 0


def _open_into(opened: list[int], path: str, flags: int) -> None:
    """os.open, the descriptor appended to ``opened`` by the call that
    makes it: the open runs from C (map, inside the list's extend), and
    CPython raises a pending Ctrl-C only as a call made by Python code
    returns -- before the extend or after it, never between the open and
    the store, where the descriptor leaked.  (The caller closes what is in
    the list, in a finally.)"""
    opened.extend(map(os.open, (path,), (flags,)))


def _reads(fd: int, view: memoryview, offset: int = 0) -> bool:
    """Whether a read into ``view`` at ``offset`` is accepted (False for
    EINVAL; any other error is raised; EINTR is retried)."""
    while True:
        try:
            os.preadv(fd, [view], offset)
            return True
        except InterruptedError:
            continue
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            return False


def direct_alignment(fd: int) -> tuple[int, int]:
    """:func:`probe_alignment` of an O_DIRECT ``fd`` that never raises.

    A write-only fd, or one whose reads fail (EBADF, EACCES, EIO...), is
    probed through a read-only O_DIRECT open of ``/proc/self/fd/N`` (a new
    open file description of the same file); where that is not possible
    either, the answer is the strictest alignment, (MAX_ALIGNMENT,
    MAX_ALIGNMENT), which every device accepts.
    """
    try:
        return probe_alignment(fd)
    except OSError:
        pass
    opened: list[int] = []
    try:
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            return MAX_ALIGNMENT, MAX_ALIGNMENT  # reopening a pipe would read its data
        _open_into(opened, f"/proc/self/fd/{fd}", os.O_RDONLY | O_DIRECT | os.O_CLOEXEC)
        return probe_alignment(opened[0])
    except OSError:
        return MAX_ALIGNMENT, MAX_ALIGNMENT
    finally:
        if opened:
            os.close(opened[0])


@dataclass(frozen=True)
class DirectIOSupport:
    """Whether O_DIRECT works in a directory, and with what alignment."""

    supported: bool
    request_alignment: int = 0
    buffer_alignment: int = 0
    reason: str = ""


def probe_direct_io(directory: str = ".") -> DirectIOSupport:
    """Open a scratch file with O_DIRECT in ``directory`` and probe it."""
    if not O_DIRECT:
        return DirectIOSupport(False, reason=capability_note("o_direct"))
    with tempfile.NamedTemporaryFile(dir=directory, prefix=".threadlets-probe-") as f:
        f.write(b"\0" * 4 * MAX_ALIGNMENT)
        f.flush()
        os.fsync(f.fileno())
        opened: list[int] = []
        try:
            try:
                _open_into(opened, f.name, os.O_RDONLY | O_DIRECT | os.O_CLOEXEC)
            except OSError as e:
                return DirectIOSupport(False, reason=f"open(O_DIRECT): {e.strerror}")
            try:
                request, memory = probe_alignment(opened[0])
            except OSError as e:
                return DirectIOSupport(False, reason=f"read: {e.strerror}")
        finally:
            if opened:
                os.close(opened[0])
    return DirectIOSupport(True, request, memory)


def probe_nowait(directory: str = ".") -> tuple[bool, str]:
    """Whether a cached read with ``preadv(..., RWF_NOWAIT)`` completes."""
    if not RWF_NOWAIT:
        return False, capability_note("rwf_nowait")
    with tempfile.NamedTemporaryFile(dir=directory, prefix=".threadlets-probe-") as f:
        f.write(b"x" * PAGE_SIZE)
        f.flush()
        buf = bytearray(PAGE_SIZE)
        try:
            n = os.preadv(f.fileno(), [buf], 0, RWF_NOWAIT)
        except BlockingIOError:
            return True, "supported (the probe's page was not cached)"
        except OSError as e:
            return False, f"preadv(RWF_NOWAIT): {e.strerror}"
        if n != PAGE_SIZE or buf != b"x" * PAGE_SIZE:
            return False, f"preadv(RWF_NOWAIT) returned {n} bytes"
    return True, "supported"


@dataclass(frozen=True)
class IoUringSupport:
    supported: bool
    reason: str


_SYS_IO_URING_SETUP = {"x86_64": 425, "aarch64": 425, "riscv64": 425, "ppc64le": 425}


def probe_io_uring() -> IoUringSupport:
    """Try io_uring_setup(2) for a one-entry ring, then close it."""
    if not IS_LINUX:
        return IoUringSupport(False, "io_uring is Linux-only")
    if not _CAPABILITIES.io_uring:
        return IoUringSupport(False, capability_note("io_uring"))
    nr = _SYS_IO_URING_SETUP.get(os.uname().machine)
    if nr is None:
        return IoUringSupport(False, f"unknown syscall number on {os.uname().machine}")
    try:
        with open("/proc/sys/kernel/io_uring_disabled") as f:
            disabled = f.read().strip()
    except OSError:
        disabled = "0"
    libc = ctypes.CDLL(None, use_errno=True)
    params = ctypes.create_string_buffer(120)  # struct io_uring_params, zeroed
    libc.syscall.restype = ctypes.c_long
    # The ring's descriptor stored by the call that makes it (see _open_into).
    made: list[int] = []
    try:
        made.extend(
            map(libc.syscall, (ctypes.c_long(nr),), (ctypes.c_uint(1),), (params,))
        )  # typed: see uring._syscalls
        if made[0] < 0:
            err = ctypes.get_errno()
            note = f" (kernel.io_uring_disabled={disabled})" if disabled != "0" else ""
            return IoUringSupport(False, f"io_uring_setup: {os.strerror(err)}{note}")
        return IoUringSupport(True, "supported")
    finally:
        if made and made[0] >= 0:
            os.close(made[0])
