"""What each I/O request does to a file, with QEMU's semantics.

This module owns the per-file state the engine keeps (:class:`AioFile`: open
flags, O_DIRECT alignment, the sticky flush error, which operations the file
does not support) and one function per request kind.  The functions are
plain blocking code over a :class:`~threadlets.syscalls.Syscalls` object:
they know nothing of threads, queues or completion, so tests can drive them
directly, with real files and injected faults (the split h11 makes between
protocol and I/O).

Rules they implement (``../shared/reference/semantics.md`` section 3):

* Reads and writes loop on short transfers, resuming inside the buffer list,
  and retry EINTR.  A read stops at end of file and reports the count, or
  zero-fills the rest when asked.  A write that makes no progress fails with
  ENOSPC.  At most IOV_MAX buffers go to one system call.
* On an O_DIRECT file, a buffer, offset or length that is not aligned goes
  through an aligned bounce buffer.
* Flush is fdatasync (fsync if asked).  After a failed flush on a buffered
  file, later flushes fail with the same errno without calling the kernel.
* "Not supported" is always ENOTSUP, and is remembered per file and kind.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from typing import TYPE_CHECKING

from threadlets.probe import (
    MAX_ALIGNMENT,
    O_DIRECT,
    aligned_buffer,
    probe_alignment,
)
from threadlets.syscalls import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    Syscalls,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

__all__ = ["IOV_MAX", "MAX_OFFSET", "AioFile"]

IOV_MAX: int = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
if IOV_MAX <= 0:
    IOV_MAX = 1024
#: The largest file offset Linux accepts (loff_t is signed 64-bit).
MAX_OFFSET = 2**63 - 1
#: The errnos that mean "this file or kernel cannot do that".
_NOT_SUPPORTED = frozenset(
    {errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENODEV, errno.ENOSYS, errno.ENOTTY}
)
#: Chunk for the write-zeroes and copy fallbacks.
_CHUNK = 1 << 20


def _not_supported(what: str) -> OSError:
    return OSError(errno.ENOTSUP, f"{os.strerror(errno.ENOTSUP)}: {what}")


class AioFile:
    """What the engine knows about one open file descriptor.

    Created from an fd by the engine (one per fd per context); the fd stays
    the caller's.  ``flags`` and ``direct`` are fixed at creation; the other
    state is protected by ``_lock`` and may be touched by any worker.
    """

    __slots__ = (
        "_alignment",
        "_flush_error",
        "_lock",
        "_rmw_lock",
        "_unsupported",
        "append",
        "direct",
        "fd",
        "flags",
        "nowait_reads",
        "nowait_writes",
        "stream",
    )

    def __init__(self, fd: int, flags: int) -> None:
        self.fd = fd
        self.flags = flags
        self.direct = bool(O_DIRECT and flags & O_DIRECT)
        self.append = bool(flags & os.O_APPEND)
        #: A pipe, socket, terminal...: not a regular file or block device.
        #: One transfer is the answer there (see _stream_rw).
        self.stream = False
        # RWF_NOWAIT on an O_DIRECT file would still wait for the device in
        # the submitting thread: only buffered files take the inline path.
        self.nowait_reads = not self.direct
        self.nowait_writes = not self.direct and not self.append
        self._lock = threading.Lock()
        # Serialises read-modify-write of partial blocks on O_DIRECT files.
        self._rmw_lock = threading.Lock()
        self._alignment: tuple[int, int] | None = None
        self._flush_error = 0
        self._unsupported: set[str] = set()

    def __repr__(self) -> str:
        return f"<AioFile fd={self.fd} direct={self.direct}>"

    @classmethod
    def from_fd(cls, sc: Syscalls, fd: int) -> AioFile:
        """Look the fd up (F_GETFL); raises OSError(EBADF) if it is not open."""
        f = cls(fd, sc.getfl(fd))
        mode = sc.fstat(fd).st_mode
        f.stream = not (stat.S_ISREG(mode) or stat.S_ISBLK(mode))
        return f

    # -- per-file memory -----------------------------------------------------

    def alignment(self, sc: Syscalls) -> tuple[int, int]:
        """(request alignment, buffer alignment) for O_DIRECT, probed once."""
        found = self._alignment
        if found is not None:
            # Written once, as a whole tuple; a reader that still sees None
            # probes again, which gives the same answer.
            return found
        st = sc.fstat(self.fd)
        if stat.S_ISREG(st.st_mode) and st.st_size < 2 * MAX_ALIGNMENT:
            # Reads past end of file succeed whatever their alignment, so a
            # short file cannot be probed: assume the strictest.
            found = (MAX_ALIGNMENT, MAX_ALIGNMENT)
        else:
            found = probe_alignment(self.fd)
        with self._lock:
            self._alignment = found
        return found

    def check_supported(self, kind: str) -> None:
        with self._lock:
            if kind in self._unsupported:
                raise _not_supported(f"{kind} (remembered for fd {self.fd})")

    def note_error(self, kind: str, exc: OSError) -> OSError:
        """Map not-supported errnos to ENOTSUP and remember them."""
        if exc.errno in _NOT_SUPPORTED:
            with self._lock:
                self._unsupported.add(kind)
            return _not_supported(kind)
        return exc

    def is_unsupported(self, kind: str) -> bool:
        with self._lock:
            return kind in self._unsupported


# -- buffers ---------------------------------------------------------------------


def _skip(buffers: Sequence[memoryview], done: int) -> list[memoryview]:
    """The buffer list with its first ``done`` bytes dropped, at most IOV_MAX
    entries long."""
    out: list[memoryview] = []
    for b in buffers:
        n = len(b)
        if done >= n:
            done -= n
            continue
        out.append(b[done:] if done else b)
        done = 0
        if len(out) == IOV_MAX:
            break
    return out


def _scatter(src: memoryview, buffers: Sequence[memoryview]) -> None:
    pos = 0
    for b in buffers:
        n = min(len(b), len(src) - pos)
        if n <= 0:
            break
        b[:n] = src[pos : pos + n]
        pos += n


def _gather(buffers: Sequence[memoryview], dst: memoryview, pos: int) -> None:
    for b in buffers:
        dst[pos : pos + len(b)] = b
        pos += len(b)


def _zero(buffers: Sequence[memoryview], start: int) -> None:
    for b in _skip(buffers, start) if start else buffers:
        b[:] = bytes(len(b))


# -- read and write ----------------------------------------------------------------


def rw_loop(
    sc: Syscalls,
    fd: int,
    buffers: Sequence[memoryview],
    offset: int,
    total: int,
    write: bool,
    done: int = 0,
) -> int:
    """Transfer until ``total`` bytes moved, end of file, or an error.

    ``done`` bytes were already transferred (by the inline attempt).
    Returns the count moved, ``done`` included.
    """
    call: Callable[..., int]
    if type(sc) is Syscalls:  # skip a Python frame per call on the usual path
        call = os.pwritev if write else os.preadv
    else:
        call = sc.pwritev if write else sc.preadv
    while done < total:
        iov = buffers if done == 0 and len(buffers) <= IOV_MAX else _skip(buffers, done)
        try:
            n = call(fd, iov, offset + done)
        except InterruptedError:
            continue
        except OSError as e:
            if e.errno != errno.ESPIPE:
                raise
            return done + _stream_rw(sc, fd, iov, write)
        if n == 0:
            if write:
                raise OSError(errno.ENOSPC, "write made no progress")
            break  # end of file
        done += n
    return done


def _stream_rw(sc: Syscalls, fd: int, iov: Sequence[memoryview], write: bool) -> int:
    """A pipe, socket or terminal has no offset (ESPIPE): one readv/writev,
    as glibc's AIO does; a short count is the answer, not a reason to wait
    for more."""
    while True:
        try:
            return sc.writev(fd, iov) if write else sc.readv(fd, iov)
        except InterruptedError:
            continue


def read(
    sc: Syscalls,
    f: AioFile,
    buffers: Sequence[memoryview],
    offset: int,
    total: int,
    zero_fill: bool,
    done: int = 0,
) -> int:
    n = _direct_rw(sc, f, buffers, offset, total, False, done) if f.direct else -1
    if n < 0:
        n = rw_loop(sc, f.fd, buffers, offset, total, False, done)
    if zero_fill and n < total:
        _zero(buffers, n)
        return total
    return n


def write(
    sc: Syscalls,
    f: AioFile,
    buffers: Sequence[memoryview],
    offset: int,
    total: int,
    done: int = 0,
) -> int:
    n = _direct_rw(sc, f, buffers, offset, total, True, done) if f.direct else -1
    if n < 0:
        n = rw_loop(sc, f.fd, buffers, offset, total, True, done)
    return n


def _any_unaligned_length(buffers: Sequence[memoryview], req: int) -> bool:
    if len(buffers) == 1:
        return False  # its length is the total, checked by the caller
    return any(len(b) % req for b in buffers)


def _direct_rw(
    sc: Syscalls,
    f: AioFile,
    buffers: Sequence[memoryview],
    offset: int,
    total: int,
    write: bool,
    done: int,
) -> int:
    """O_DIRECT: returns -1 to go straight through, else the bounced count.

    Offsets and lengths are checked here; the memory's alignment is left to
    the kernel, which refuses a misaligned buffer with EINVAL before moving
    any data (finding a buffer's address from Python costs more than the
    failed call).  Then the request goes through the bounce buffer.
    """
    req, mem = f.alignment(sc)
    if not (offset % req or total % req or _any_unaligned_length(buffers, req)):
        try:
            return rw_loop(sc, f.fd, buffers, offset, total, write, done)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
    if write:
        return _bounce_write(sc, f, buffers, offset, total, req, mem)
    return _bounce_read(sc, f, buffers, offset, total, req, mem)


def _bounce_span(offset: int, total: int, req: int, mem: int) -> tuple[int, int, memoryview]:
    """The aligned range around [offset, offset + total), and a bounce
    buffer for it."""
    start = offset - offset % req
    end = -(-(offset + total) // req) * req
    return start, end, aligned_buffer(end - start, max(mem, req))


def _bounce_read(
    sc: Syscalls,
    f: AioFile,
    buffers: Sequence[memoryview],
    offset: int,
    total: int,
    req: int,
    mem: int,
) -> int:
    start, end, bounce = _bounce_span(offset, total, req, mem)
    n = rw_loop(sc, f.fd, [bounce], start, end - start, False)
    head = offset - start
    got = max(0, min(n - head, total))
    _scatter(bounce[head : head + got], buffers)
    return got


def _bounce_write(
    sc: Syscalls,
    f: AioFile,
    buffers: Sequence[memoryview],
    offset: int,
    total: int,
    req: int,
    mem: int,
) -> int:
    start, end, bounce = _bounce_span(offset, total, req, mem)
    head = offset - start
    if head == 0 and end == offset + total:
        # Only the memory is misaligned: copy and write.
        _gather(buffers, bounce, 0)
        return rw_loop(sc, f.fd, [bounce], start, end - start, True)
    # Partial blocks: read-modify-write the edge blocks, then restore the
    # file size if the aligned write went past the end of the file.
    with f._rmw_lock:
        size = sc.fstat(f.fd).st_size
        if head:
            rw_loop(sc, f.fd, [bounce[:req]], start, req, False)
        if (offset + total) % req and end - req >= start + (req if head else 0):
            rw_loop(sc, f.fd, [bounce[end - start - req :]], end - req, req, False)
        _gather(buffers, bounce, head)
        rw_loop(sc, f.fd, [bounce], start, end - start, True)
        if end > size and end > offset + total:
            sc.ftruncate(f.fd, max(size, offset + total))
    return total


# -- flush -----------------------------------------------------------------------


def flush(sc: Syscalls, f: AioFile, datasync: bool) -> int:
    with f._lock:
        sticky = f._flush_error
    if sticky:
        raise OSError(sticky, f"{os.strerror(sticky)} (an earlier flush of fd {f.fd} failed)")
    while True:
        try:
            if datasync:
                sc.fdatasync(f.fd)
            else:
                sc.fsync(f.fd)
            return 0
        except InterruptedError:
            continue
        except OSError as e:
            if e.errno in (errno.EINVAL, errno.EROFS, errno.EBADF) or f.direct:
                # Not a lost write-back: the fd cannot be flushed at all, or
                # the page cache was not involved.
                raise
            # The kernel may have dropped the dirty pages: a later "success"
            # would lie, so every later flush fails the same way.
            with f._lock:
                f._flush_error = e.errno or errno.EIO
            raise


# -- space management ----------------------------------------------------------------


def _fallocate(sc: Syscalls, f: AioFile, kind: str, mode: int, offset: int, length: int) -> None:
    f.check_supported(kind)
    while True:
        try:
            sc.fallocate(f.fd, mode, offset, length)
            return
        except InterruptedError:
            continue
        except OSError as e:
            raise f.note_error(kind, e) from None


def discard(sc: Syscalls, f: AioFile, offset: int, length: int) -> int:
    _fallocate(sc, f, "discard", FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
    return 0


def allocate(sc: Syscalls, f: AioFile, offset: int, length: int) -> int:
    _fallocate(sc, f, "allocate", 0, offset, length)
    return 0


def write_zeroes(sc: Syscalls, f: AioFile, offset: int, length: int) -> int:
    """Zero a range as a write of zeros would (extending the file): try
    ZERO_RANGE, else punch a hole and allocate, else write zeros."""
    if length == 0:
        return 0
    if not f.is_unsupported("zero_range"):
        try:
            _fallocate(sc, f, "zero_range", FALLOC_FL_ZERO_RANGE, offset, length)
            return 0
        except OSError as e:
            if e.errno != errno.ENOTSUP:
                raise
    if not f.is_unsupported("discard") and not f.is_unsupported("allocate"):
        try:
            discard(sc, f, offset, length)
            allocate(sc, f, offset, length)
            return 0
        except OSError as e:
            if e.errno != errno.ENOTSUP:
                raise
    zeros = aligned_buffer(min(length, _CHUNK), MAX_ALIGNMENT)
    pos = 0
    while pos < length:
        n = min(len(zeros), length - pos)
        write(sc, f, [zeros[:n]], offset + pos, n)
        pos += n
    return 0


def truncate(sc: Syscalls, f: AioFile, length: int) -> int:
    while True:
        try:
            sc.ftruncate(f.fd, length)
            return 0
        except InterruptedError:
            continue


def copy_range(
    sc: Syscalls, src: AioFile, src_offset: int, dst: AioFile, dst_offset: int, length: int
) -> int:
    """copy_file_range until ``length`` bytes or end of the source file."""
    dst.check_supported("copy_range")
    done = 0
    while done < length:
        try:
            n = sc.copy_file_range(
                src.fd, dst.fd, length - done, src_offset + done, dst_offset + done
            )
        except InterruptedError:
            continue
        except OSError as e:
            raise dst.note_error("copy_range", e) from None
        if n == 0:
            break
        done += n
    return done


def ioctl(sc: Syscalls, f: AioFile, request: int, arg: int | bytearray) -> int:
    try:
        result = sc.ioctl(f.fd, request, arg)
    except OSError as e:
        if e.errno in _NOT_SUPPORTED:
            raise _not_supported(f"ioctl {request:#x}") from None
        raise
    assert isinstance(result, int)
    return result
