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
  through an aligned bounce buffer, at most about 1 MiB at a time.  The
  alignment is probed once per file and never makes a request fail: where
  the file cannot be probed it is the strictest (4096 for both).  Buffer
  lists may hold empty buffers anywhere.
* Flush is fdatasync (fsync if asked).  After a failed flush on a buffered
  file (or an O_DIRECT one that an RMW wrote through the page cache, see
  below), later flushes fail with the same errno without calling the kernel.
* "Not supported" is always ENOTSUP, and is remembered per file and kind.
* A partial transfer followed by an error fails the request (QEMU's rule,
  which the engine keeps); the count that moved is on the exception as
  ``transferred`` (an int > 0; absent when nothing moved), so that POSIX AIO
  can report it as glibc does.
* A file that is neither a regular file nor a block device
  (:attr:`AioFile.stream`: a pipe, socket, terminal or other character
  device) gets one transfer: a positional call where the file takes one,
  else readv/writev.  A short count is the answer; EAGAIN (on an O_NONBLOCK
  file) is raised only when nothing moved, and a request that already moved
  bytes (``done``) returns them without another call.

O_DIRECT writes and the size of the file.  A write whose edges are not
aligned reads the edge blocks, patches them and writes whole blocks
(read-modify-write, RMW).  A whole block written past the end of the file
would take the file past the request's end, and cutting it back (the first
version's way) could undo another request's extension of the file (issue
11 item 13).  So on an O_DIRECT regular file:

* every RMW runs under the file's ``_rmw_lock`` (which keeps two RMWs of one
  block from losing each other's bytes) and reads the file's size there;
  blocks that end within that size are patched and written O_DIRECT; the
  caller's bytes from the last block edge within the size on (``cut``) go
  through a second descriptor of the file without O_DIRECT (the kernel keeps
  its page cache coherent with O_DIRECT), which extends the file exactly to
  the request's end and never shrinks it;
* so no request ever truncates a file it did not mean to, and a write of
  whole blocks runs beside everything else, as the kernel's own pwritev:
  it reads no size and takes no lock (the first version took the lock and
  an fstat per write to learn whether the write extended the file);
* truncate, allocate, write-zeroes and copies into the file run under the
  lock too, so an RMW's edge blocks, read and written back, cannot bring
  back bytes that a truncate of the same :class:`AioFile` removed;
* an O_APPEND write always extends the file: it runs under the lock, at the
  size read there (an RMW at the end goes through descriptors without
  O_APPEND, since pwritev on an O_APPEND descriptor ignores its offset).

Overlapping concurrent writes have no defined order, as with the kernel's own
O_DIRECT (an aligned write to a block that an RMW also patches may lose its
bytes there).  The lock is per :class:`AioFile`: two descriptors of one file
do not exclude each other.  Nothing caches the size: a file truncated or
extended behind the engine's back is seen as it is by the next RMW.
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
    direct_alignment,
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


#: Linux's memory character devices (null, zero, full, random, urandom, ...).
_MEMORY_MAJOR = 1


def _not_supported(what: str) -> OSError:
    return OSError(errno.ENOTSUP, f"{os.strerror(errno.ENOTSUP)}: {what}")


#: The anonymous files whose read(2) answers or waits as a pipe's would, by
#: their /proc/self/fd link.  The others -- epoll, pidfd, io_uring, bpf
#: objects ... -- have no read: the kernel says EINVAL at once, but the ring
#: waits on them through poll, for good.
_RING_READABLE_ANON = frozenset(
    "anon_inode:" + name
    for name in (
        "[eventfd]", "[timerfd]", "[signalfd]", "inotify", "[fanotify]", "[userfaultfd]",
    )
)  # fmt: skip


def _anon_ring_readable(fd: int) -> bool:
    """Whether reads of ``fd``, an anonymous inode, may wait on the ring:
    one of the kinds known to read; if that cannot be told (no /proc),
    no."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}") in _RING_READABLE_ANON
    except OSError:
        return False


class AioFile:
    """What the engine knows about one open file descriptor.

    Created from an fd by the engine (one per fd per context); the fd stays
    the caller's.  ``flags``, ``direct``, ``append`` and ``stream`` are fixed
    at creation; ``positional`` is only ever cleared (by any thread: every
    writer stores the same value); the other state is protected by ``_lock``
    and may be touched by any worker.  ``_rmw_lock`` serialises the
    size-changing requests of an O_DIRECT file (see the module docstring).
    """

    __slots__ = (
        "_alignment",
        "_cached_writes",
        "_flush_error",
        "_lock",
        "_rmw_lock",
        "_sized",
        "_unsupported",
        "append",
        "direct",
        "fd",
        "flags",
        "nowait_reads",
        "nowait_writes",
        "positional",
        "ring_readable",
        "short_nowait",
        "stream",
    )

    def __init__(self, fd: int, flags: int, mode: int = stat.S_IFREG, rdev: int = 0) -> None:
        self.fd = fd
        self.flags = flags
        self.direct = bool(O_DIRECT and flags & O_DIRECT)
        self.append = bool(flags & os.O_APPEND)
        # Not a regular file, a block device or a memory device: one
        # transfer is the answer.  (/dev/zero, /dev/urandom and the other
        # memory devices, major 1, stop short when a signal or the kernel's
        # task work is pending -- a thread that ever submitted to an
        # io_uring gets that -- where reading on gives what one longer read
        # would: they are read to the full count, as files are.)
        memory = stat.S_ISCHR(mode) and os.major(rdev) == _MEMORY_MAJOR
        self.stream = not (stat.S_ISREG(mode) or stat.S_ISBLK(mode) or memory)
        # Whether preadv/pwritev work (FIFOs and sockets never; a character
        # device may, a terminal answers ESPIPE): cleared on ESPIPE.
        self.positional = not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode))
        # A character device other than a terminal (/dev/zero, /dev/urandom,
        # ...): the kernel's non-blocking attempt -- io_uring's first try --
        # may move less than one readv would (/dev/zero stops at a page when
        # the CPU is wanted elsewhere), so only a worker's readv answers.
        self.short_nowait = stat.S_ISCHR(mode) and not os.isatty(fd)
        # Whether io_uring may read it: all but the anonymous inodes without
        # a read (epoll, pidfd, ...), which the ring waits on through poll
        # for good where read(2) answers EINVAL at once.  (Those that read --
        # eventfd, timerfd, signalfd, inotify -- wait on the ring as on a
        # worker, and a read still waiting there can be taken back by
        # cancel(); a worker's cannot.)
        self.ring_readable = stat.S_IFMT(mode) != 0 or _anon_ring_readable(fd)
        # Only a regular file's size changes with writes (a block device's
        # st_size is 0 and cannot be truncated).
        self._sized = stat.S_ISREG(mode)
        # RWF_NOWAIT on an O_DIRECT file would still wait for the device in
        # the submitting thread: only buffered files take the inline path.
        self.nowait_reads = not self.direct and not self.stream
        self.nowait_writes = not self.direct and not self.append and not self.stream
        self._lock = threading.Lock()
        self._rmw_lock = threading.Lock()
        self._alignment: tuple[int, int] | None = None
        self._flush_error = 0
        # An O_DIRECT file written through the page cache (an RMW's bytes
        # past the last block edge within the file): its flush errors stick.
        self._cached_writes = False
        self._unsupported: set[str] = set()

    def __repr__(self) -> str:
        return f"<AioFile fd={self.fd} direct={self.direct} stream={self.stream}>"

    @classmethod
    def from_fd(cls, sc: Syscalls, fd: int) -> AioFile:
        """Look the fd up (F_GETFL, fstat); raises OSError(EBADF) if it is
        not open."""
        flags = sc.getfl(fd)
        st = sc.fstat(fd)
        return cls(fd, flags, st.st_mode, st.st_rdev)

    # -- per-file memory -----------------------------------------------------

    def alignment(self, sc: Syscalls) -> tuple[int, int]:
        """(request alignment, buffer alignment) for O_DIRECT, probed once.

        Never raises: where the file cannot be probed (too short, not
        readable, reads fail) the answer is the strictest alignment, which
        is always correct, only slower.
        """
        found = self._alignment
        if found is not None:
            # Written once, as a whole tuple; a reader that still sees None
            # probes again, which gives the same answer.
            return found
        try:
            st = sc.fstat(self.fd)
        except OSError:
            return (MAX_ALIGNMENT, MAX_ALIGNMENT)  # not remembered: the fd is in trouble
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            found = (1, 1)  # a packet-mode pipe or a device: no blocks to align to
        elif stat.S_ISREG(st.st_mode) and st.st_size < 2 * MAX_ALIGNMENT:
            # Reads past end of file succeed whatever their alignment, so a
            # short file cannot be probed: assume the strictest.
            found = (MAX_ALIGNMENT, MAX_ALIGNMENT)
        else:
            found = direct_alignment(self.fd)
        with self._lock:
            self._alignment = found
        return found

    def _size(self, sc: Syscalls) -> int:
        return sc.fstat(self.fd).st_size

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
# Buffer lists may hold empty buffers anywhere, and any number of buffers.


def _skip(buffers: Sequence[memoryview], done: int) -> list[memoryview]:
    """The buffer list with its first ``done`` bytes (and its empty buffers)
    dropped, at most IOV_MAX entries long."""
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


def _scatter(src: memoryview, buffers: Sequence[memoryview], at: int = 0) -> None:
    """Copy ``src`` into the buffer list from its byte ``at`` on, as far as
    the list goes."""
    pos = 0
    for b in buffers:
        if pos >= len(src):
            break
        n = len(b)
        if at >= n:
            at -= n
            continue
        k = min(n - at, len(src) - pos)
        b[at : at + k] = src[pos : pos + k]
        pos += k
        at = 0


def _gather(buffers: Sequence[memoryview], dst: memoryview, at: int = 0) -> None:
    """Fill ``dst`` from the buffer list's bytes ``at`` on."""
    pos = 0
    for b in buffers:
        if pos >= len(dst):
            break
        n = len(b)
        if at >= n:
            at -= n
            continue
        k = min(n - at, len(dst) - pos)
        dst[pos : pos + k] = b[at : at + k]
        pos += k
        at = 0


def _zero(buffers: Sequence[memoryview], start: int) -> None:
    """Zero-fill the buffers from byte ``start`` of the list to its end."""
    for b in buffers:
        n = len(b)
        if start >= n:
            start -= n
            continue
        b[start:] = bytes(n - start)
        start = 0


def _moved(exc: OSError, n: int) -> OSError:
    """Record on ``exc`` that ``n`` bytes of the request moved before it
    (or that none did)."""
    if n > 0:
        exc.transferred = n  # type: ignore[attr-defined]
    elif hasattr(exc, "transferred"):
        del exc.transferred
    return exc


def _transferred(exc: OSError) -> int:
    n = getattr(exc, "transferred", 0)
    return n if type(n) is int else 0


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
    Returns the count moved, ``done`` included; an OSError raised after
    bytes moved carries that count as ``transferred``.  A file without
    offsets (ESPIPE) gets one transfer (see :func:`_stream_rw`).
    """
    call: Callable[..., int]
    if sc.__class__ is Syscalls:  # skip a Python frame per call on the usual path
        call = os.pwritev if write else os.preadv
    else:
        call = sc.pwritev if write else sc.preadv
    try:
        while done < total:
            iov = buffers if done == 0 and len(buffers) <= IOV_MAX else _skip(buffers, done)
            try:
                n = call(fd, iov, offset + done)
            except InterruptedError:
                continue
            if n == 0:
                if write:
                    raise OSError(errno.ENOSPC, "write made no progress")
                break  # end of file
            done += n
    except OSError as e:
        if e.errno == errno.ESPIPE:
            return _stream_rw(sc, fd, buffers, total, write, done)
        raise _moved(e, done) from None
    return done


def _stream_rw(
    sc: Syscalls, fd: int, buffers: Sequence[memoryview], total: int, write: bool, done: int
) -> int:
    """One readv/writev, as glibc's AIO does for a pipe, socket or terminal:
    a short count is the answer, not a reason to wait for more.  A request
    that already moved bytes (``done``) has had its transfer."""
    if done or not total:
        return done
    iov = buffers if len(buffers) <= IOV_MAX else _skip(buffers, 0)
    while True:
        try:
            return sc.writev(fd, iov) if write else sc.readv(fd, iov)
        except InterruptedError:
            continue


def _stream(
    sc: Syscalls,
    f: AioFile,
    buffers: Sequence[memoryview],
    offset: int,
    total: int,
    write: bool,
    done: int,
) -> int:
    """One transfer on a file that is not a regular file or block device:
    positional where the file takes it (a character device may honour the
    offset), else readv/writev."""
    if f.positional and not done and total:
        iov = buffers if len(buffers) <= IOV_MAX else _skip(buffers, 0)
        while True:
            try:
                return sc.pwritev(f.fd, iov, offset) if write else sc.preadv(f.fd, iov, offset)
            except InterruptedError:
                continue
            except OSError as e:
                if e.errno != errno.ESPIPE:
                    raise
                f.positional = False  # the same value from any thread
                break
    return _stream_rw(sc, f.fd, buffers, total, write, done)


def _no_bytes(
    sc: Syscalls, f: AioFile, buffers: Sequence[memoryview], offset: int, write: bool
) -> int:
    """A transfer of no bytes makes its one system call all the same, as
    os.preadv/os.pwritev do: the kernel says whether the file takes it
    (EBADF on a descriptor not open for it, EISDIR, ...), else 0."""
    iov = list(buffers)[:IOV_MAX]
    while True:
        try:
            if f.positional:
                try:
                    return sc.pwritev(f.fd, iov, offset) if write else sc.preadv(f.fd, iov, offset)
                except OSError as e:
                    if e.errno != errno.ESPIPE:
                        raise
            return sc.writev(f.fd, iov) if write else sc.readv(f.fd, iov)
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
    if not total:
        return _no_bytes(sc, f, buffers, offset, False)
    if f.stream:
        n = _stream(sc, f, buffers, offset, total, False, done)
    elif f.direct:
        n = _direct_read(sc, f, buffers, offset, total, done)
    else:
        n = rw_loop(sc, f.fd, buffers, offset, total, False, done)
    if zero_fill and n < total:
        _zero(buffers, n)
        return total
    return n


def transfer(
    sc: Syscalls,
    f: AioFile,
    buffers: Sequence[memoryview],
    offset: int,
    total: int,
    done: int,
    write_: bool,
    zero_fill: bool,
) -> int:
    """:func:`read` or :func:`write`, in the order of the engine's transfer
    (see engine._Transfer); a read spelled out, its common case (the
    system's own calls, nothing moved yet) with rw_loop's first call made
    here: rw_loop's frame only for the rest of a short transfer, and its
    rules, to the letter, for a first call that fails (see
    :func:`_first_failed`)."""
    if write_:
        return write(sc, f, buffers, offset, total, done)
    if not total:
        return _no_bytes(sc, f, buffers, offset, False)
    if f.stream:
        n = _stream(sc, f, buffers, offset, total, False, done)
    elif not f.direct:
        if done or sc.__class__ is not Syscalls:
            n = rw_loop(sc, f.fd, buffers, offset, total, False, done)
        else:
            fd = f.fd
            try:
                n = _preadv(fd, buffers, offset)
            except OSError as e:
                n = _first_failed(e, sc, fd, buffers, offset, total)
            else:
                if n != total and n:  # (short: the rest in turns; 0: end of file)
                    n = rw_loop(sc, fd, buffers, offset, total, False, n)
    elif done or sc.__class__ is not Syscalls:
        n = _direct_read(sc, f, buffers, offset, total, done)
    else:
        # _direct_read, spelled out, nothing moved yet.  The lengths of a
        # vectored read's buffers are not looked at one by one: a length
        # the kernel refuses (EINVAL, as for the memory's alignment, which
        # is left to it too) goes through the bounce buffer all the same.
        req, mem = f._alignment or f.alignment(sc)
        if offset % req or total % req:
            n = _bounce_read(sc, f, buffers, offset, total, 0, req, mem)
        else:
            fd = f.fd
            try:
                n = _preadv(fd, buffers, offset)
            except OSError as e:
                try:
                    n = _first_failed(e, sc, fd, buffers, offset, total)
                except OSError as e2:
                    if e2.errno != errno.EINVAL:
                        raise
                    n = _bounce_read(sc, f, buffers, offset, total, 0, req, mem)
            else:
                if n != total and n:
                    try:
                        n = rw_loop(sc, fd, buffers, offset, total, False, n)
                    except OSError as e:
                        if e.errno != errno.EINVAL:
                            raise
                        n = _bounce_read(sc, f, buffers, offset, total, 0, req, mem)
    if zero_fill and n < total:
        _zero(buffers, n)
        return total
    return n


_preadv = os.preadv


def _first_failed(
    e: OSError, sc: Syscalls, fd: int, buffers: Sequence[memoryview], offset: int, total: int
) -> int:
    """What rw_loop answers when its first read (nothing moved) raised
    ``e``: EINTR is tried again, and more buffers than one call takes
    (EINVAL) go in turns -- both by rw_loop itself; ESPIPE gets a stream's
    one transfer; any other error is raised, nothing moved."""
    if isinstance(e, InterruptedError) or len(buffers) > IOV_MAX:
        return rw_loop(sc, fd, buffers, offset, total, False, 0)
    if e.errno == errno.ESPIPE:
        return _stream_rw(sc, fd, buffers, total, False, 0)
    raise _moved(e, 0) from None


def write(
    sc: Syscalls,
    f: AioFile,
    buffers: Sequence[memoryview],
    offset: int,
    total: int,
    done: int = 0,
) -> int:
    if not total:
        return _no_bytes(sc, f, buffers, offset, True)
    if f.stream:
        return _stream(sc, f, buffers, offset, total, True, done)
    if f.direct:
        return _direct_write(sc, f, buffers, offset, total, done)
    return rw_loop(sc, f.fd, buffers, offset, total, True, done)


# -- O_DIRECT ------------------------------------------------------------------------


def _aligned(buffers: Sequence[memoryview], offset: int, total: int, req: int) -> bool:
    """Whether offset and lengths suit O_DIRECT.  The memory's alignment is
    left to the kernel, which refuses a misaligned buffer with EINVAL
    (finding a buffer's address from Python costs more than the failed
    call); the caller then bounces."""
    if offset % req or total % req:
        return False
    return len(buffers) == 1 or not any(len(b) % req for b in buffers)


def _span(offset: int, total: int, req: int) -> tuple[int, int]:
    """The aligned range around [offset, offset + total), its end cut at
    the largest file offset (a read there gets end of file, a write EFBIG,
    instead of EINVAL for a range that overflows)."""
    start = offset - offset % req
    end = -(-(offset + total) // req) * req
    return start, min(end, MAX_OFFSET)


def _direct_read(
    sc: Syscalls,
    f: AioFile,
    buffers: Sequence[memoryview],
    offset: int,
    total: int,
    done: int,
) -> int:
    if done >= total:
        return done
    # (Probed once: read without alignment()'s frame after that.)
    req, mem = f._alignment or f.alignment(sc)
    # _aligned, spelled out: this runs once per O_DIRECT read.
    if not (offset % req or total % req) and (
        len(buffers) == 1 or not any(len(b) % req for b in buffers)
    ):
        try:
            return rw_loop(sc, f.fd, buffers, offset, total, False, done)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
    return _bounce_read(sc, f, buffers, offset, total, done, req, mem)


def _bounce_read(
    sc: Syscalls,
    f: AioFile,
    buffers: Sequence[memoryview],
    offset: int,
    total: int,
    done: int,
    req: int,
    mem: int,
) -> int:
    """An O_DIRECT read through an aligned buffer, a chunk at a time."""
    start, end = _span(offset, total, req)
    bounce = aligned_buffer(min(end - start, _chunk(req)), max(mem, req))
    stop = offset + total
    got = 0  # bytes of the caller's range delivered
    pos = start
    while pos < end:
        want = min(len(bounce), end - pos)
        try:
            n = rw_loop(sc, f.fd, [bounce[:want]], pos, want, False)
        except OSError as e:
            n = _transferred(e)  # hand over what did arrive, and say so
            got = max(got, _deliver(bounce, pos, n, buffers, offset, stop))
            raise _moved(e, max(got, done)) from None
        got = max(got, _deliver(bounce, pos, n, buffers, offset, stop))
        if n < want:
            break  # end of file
        pos += n
    return got


def _chunk(req: int) -> int:
    """The bounce buffer's size for long requests: whole blocks."""
    return max(req, _CHUNK - _CHUNK % req)


def _deliver(
    bounce: memoryview, pos: int, n: int, buffers: Sequence[memoryview], offset: int, stop: int
) -> int:
    """Copy the part of file bytes [pos, pos + n) (in ``bounce``) that lies
    in the caller's range [offset, stop) to its buffers; returns how far into
    the range that reaches (0 if not at all)."""
    lo, hi = max(pos, offset), min(pos + n, stop)
    if hi <= lo:
        return 0
    _scatter(bounce[lo - pos : hi - pos], buffers, lo - offset)
    return hi - offset


def _direct_write(
    sc: Syscalls,
    f: AioFile,
    buffers: Sequence[memoryview],
    offset: int,
    total: int,
    done: int,
) -> int:
    if done >= total:
        return done
    req, mem = f._alignment or f.alignment(sc)  # (probed once: see _direct_read)
    if f.append and f._sized:
        with f._rmw_lock:
            return _direct_append(sc, f, buffers, total, req, mem, done)
    start, end = _span(offset, total, req)
    if start == offset and end == offset + total:
        return _whole_blocks(sc, f, buffers, offset, total, req, mem, done)
    with f._rmw_lock:
        return _rmw(sc, f, buffers, offset, total, req, mem, done)


def _direct_append(
    sc: Syscalls,
    f: AioFile,
    buffers: Sequence[memoryview],
    total: int,
    req: int,
    mem: int,
    done: int,
) -> int:
    """O_APPEND, under ``f._rmw_lock``: the write lands at the end of the
    file whatever the offset says, and always extends it.  Whole blocks go
    to the fd; partial ones are an RMW at the end of the file through a
    descriptor without O_APPEND (whose writes land where they are asked)."""
    offset = f._size(sc) - done  # `done` bytes of this request are there already
    if not (offset % req or total % req):
        return _whole_blocks(sc, f, buffers, offset, total, req, mem, done)
    try:
        writer = _reopen(f.fd, os.O_WRONLY | O_DIRECT)
    except OSError as e:
        raise _moved(e, done) from None
    try:
        return _rmw(sc, f, buffers, offset, total, req, mem, done, writer)
    finally:
        os.close(writer)


def _whole_blocks(
    sc: Syscalls,
    f: AioFile,
    buffers: Sequence[memoryview],
    offset: int,
    total: int,
    req: int,
    mem: int,
    done: int,
) -> int:
    """A write of whole blocks: straight through, or from an aligned copy
    of the memory if the kernel refuses the caller's."""
    if _aligned(buffers, offset, total, req):
        try:
            return rw_loop(sc, f.fd, buffers, offset, total, True, done)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            done = max(done, _transferred(e))
    bounce = aligned_buffer(min(total, _chunk(req)), max(mem, req))
    pos = 0
    while pos < total:
        n = min(len(bounce), total - pos)
        _gather(buffers, bounce[:n], pos)
        try:
            rw_loop(sc, f.fd, [bounce[:n]], offset + pos, n, True)
        except OSError as e:
            raise _moved(e, max(done, pos + _transferred(e))) from None
        pos += n
    return total


def _rmw(
    sc: Syscalls,
    f: AioFile,
    buffers: Sequence[memoryview],
    offset: int,
    total: int,
    req: int,
    mem: int,
    done: int,
    writer: int = -1,
) -> int:
    """A write with partial edge blocks, under ``f._rmw_lock``: the blocks
    within the file's size are patched (to ``writer`` if given), the
    caller's bytes from ``cut`` on go through a buffered descriptor (see the
    module docstring)."""
    stop = offset + total
    cut = stop
    if f._sized:
        size = f._size(sc)
        cut = min(stop, max(offset, size - size % req))
    if cut == stop:
        return _patch_blocks(sc, f, buffers, offset, total, req, mem, done, writer)
    # Opened first: a refusal leaves the file as it was.
    sync = f.flags & (os.O_SYNC | os.O_DSYNC)
    try:
        tail = _reopen(f.fd, os.O_WRONLY | sync)
    except OSError as e:
        raise _moved(e, done) from None
    with f._lock:
        f._cached_writes = True
    try:
        if cut > offset:
            _patch_blocks(sc, f, buffers, offset, cut - offset, req, mem, done, writer)
        try:
            return rw_loop(sc, tail, buffers, offset, total, True, cut - offset)
        except OSError as e:
            raise _moved(e, max(done, _transferred(e))) from None
    finally:
        os.close(tail)


def _patch_blocks(
    sc: Syscalls,
    f: AioFile,
    buffers: Sequence[memoryview],
    offset: int,
    total: int,
    req: int,
    mem: int,
    done: int,
    writer: int,
) -> int:
    """Write [offset, offset + total), whose blocks are all within the file,
    a chunk at a time: read the edge blocks, patch them, write whole blocks
    (to ``writer`` if given)."""
    start, end = _span(offset, total, req)
    bounce = aligned_buffer(min(end - start, _chunk(req)), max(mem, req))
    stop = offset + total
    out = f.fd if writer < 0 else writer
    reader = -1
    moved = 0  # bytes written from `start` on

    def moved_of_callers() -> int:
        return max(done, min(moved - (offset - start), total))

    try:
        while start + moved < end:
            pos = start + moved
            n = min(len(bounce), end - pos)
            chunk = bounce[:n]
            if pos < offset or pos + n > stop:
                try:
                    if reader < 0:
                        writable_only = f.flags & os.O_ACCMODE == os.O_WRONLY
                        reader = _reopen(f.fd, os.O_RDONLY) if writable_only else f.fd
                    _read_edges(sc, reader, chunk, pos, offset, stop, req, mem)
                except OSError as e:
                    raise _moved(e, moved_of_callers()) from None
            lo, hi = max(pos, offset), min(pos + n, stop)
            _gather(buffers, chunk[lo - pos : hi - pos], lo - offset)
            try:
                rw_loop(sc, out, [chunk], pos, n, True)
            except OSError as e:
                moved += _transferred(e)
                raise _moved(e, moved_of_callers()) from None
            moved += n
    finally:
        if reader >= 0 and reader != f.fd:
            os.close(reader)
    return total


def _read_edges(
    sc: Syscalls,
    fd: int,
    chunk: memoryview,
    pos: int,
    offset: int,
    stop: int,
    req: int,
    mem: int,
) -> None:
    """Read into ``chunk`` (file bytes [pos, pos + len(chunk))) the blocks
    that the caller's range [offset, stop) covers only in part; past end of
    file they read as zeros."""
    end = pos + len(chunk)
    blocks = []
    if pos < offset:
        blocks.append(pos)
    last = end - 1 - (end - 1) % req
    if end > stop and not (blocks and blocks[0] == last):
        blocks.append(last)
    # Into a block of its own: a block inside the chunk need not meet a
    # buffer alignment stricter than the request alignment.
    scratch = aligned_buffer(req, max(mem, req)) if blocks else chunk
    for b in blocks:
        e = min(b + req, end)
        n = rw_loop(sc, fd, [scratch[: e - b]], b, e - b, False)
        chunk[b - pos : b - pos + n] = scratch[:n]
        chunk[b - pos + n : e - pos] = bytes(e - b - n)


def _reopen(fd: int, flags: int) -> int:
    """Another descriptor of ``fd``'s file (a new open file description):
    a reader for a write-only fd, a writer without O_APPEND."""
    return os.open(f"/proc/self/fd/{fd}", flags | os.O_CLOEXEC)


# -- flush -----------------------------------------------------------------------


def flush(sc: Syscalls, f: AioFile, datasync: bool) -> int:
    check_flush(f)
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
            raise flush_failed(f, e) from None


def check_flush(f: AioFile) -> None:
    """Raise the error of an earlier failed flush of ``f`` (sticky)."""
    with f._lock:
        sticky = f._flush_error
    if sticky:
        raise OSError(sticky, f"{os.strerror(sticky)} (an earlier flush of fd {f.fd} failed)")


def flush_failed(f: AioFile, e: OSError) -> OSError:
    """What a flush that failed with ``e`` reports; remembers it where a
    later flush must fail too.  (The io_uring backend calls this with the
    kernel's errno: one rule for both.)"""
    if e.errno in (errno.EINVAL, errno.EROFS, errno.EBADF):
        return e  # not a lost write-back: the fd cannot be flushed at all
    with f._lock:
        if f.direct and not f._cached_writes:
            return e  # the page cache was not involved
        # The kernel may have dropped the dirty pages: a later "success"
        # would lie, so every later flush fails the same way.
        f._flush_error = e.errno or errno.EIO
    return e


# -- space management ----------------------------------------------------------------


#: The fallocate mode of each space request (write_zeroes: its first try).
FALLOCATE_MODES = {
    "discard": FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
    "allocate": 0,
    "zero_range": FALLOC_FL_ZERO_RANGE,
}


def fallocate_needs_lock(f: AioFile, mode: int) -> bool:
    """A mode without KEEP_SIZE may extend the file: on an O_DIRECT regular
    file it runs under the per-file lock (see the module docstring)."""
    return f.direct and f._sized and not mode & FALLOC_FL_KEEP_SIZE


def _fallocate(sc: Syscalls, f: AioFile, kind: str, mode: int, offset: int, length: int) -> None:
    f.check_supported(kind)
    guard = f._rmw_lock if fallocate_needs_lock(f, mode) else None
    if guard is not None:
        guard.acquire()
    try:
        while True:
            try:
                sc.fallocate(f.fd, mode, offset, length)
                return
            except InterruptedError:
                continue
            except OSError as e:
                raise f.note_error(kind, e) from None
    finally:
        if guard is not None:
            guard.release()


def discard(sc: Syscalls, f: AioFile, offset: int, length: int) -> int:
    _fallocate(sc, f, "discard", FALLOCATE_MODES["discard"], offset, length)
    return 0


def allocate(sc: Syscalls, f: AioFile, offset: int, length: int) -> int:
    _fallocate(sc, f, "allocate", FALLOCATE_MODES["allocate"], offset, length)
    return 0


def write_zeroes(sc: Syscalls, f: AioFile, offset: int, length: int) -> int:
    """Zero a range as a write of zeros would (extending the file): try
    ZERO_RANGE, else punch a hole and allocate, else write zeros."""
    if length == 0:
        return 0
    if not f.is_unsupported("zero_range"):
        try:
            _fallocate(sc, f, "zero_range", FALLOCATE_MODES["zero_range"], offset, length)
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
    if f.append:
        # pwritev on an O_APPEND file appends whatever the offset says.
        raise _not_supported("write_zeroes on an O_APPEND file without fallocate")
    zeros = aligned_buffer(min(length, _CHUNK), MAX_ALIGNMENT)
    pos = 0
    while pos < length:
        n = min(len(zeros), length - pos)
        write(sc, f, [zeros[:n]], offset + pos, n)
        pos += n
    return 0


def truncate(sc: Syscalls, f: AioFile, length: int) -> int:
    guard = f._rmw_lock if f.direct and f._sized else None
    if guard is not None:
        guard.acquire()
    try:
        while True:
            try:
                sc.ftruncate(f.fd, length)
                return 0
            except InterruptedError:
                continue
    finally:
        if guard is not None:
            guard.release()


def copy_range(
    sc: Syscalls, src: AioFile, src_offset: int, dst: AioFile, dst_offset: int, length: int
) -> int:
    """copy_file_range until ``length`` bytes or end of the source file.

    Where the kernel refuses an O_DIRECT file's alignment (EINVAL) the rest
    is copied through memory with :func:`read` and :func:`write`, which
    bounce.  An error after bytes moved carries them as ``transferred``.
    """
    dst.check_supported("copy_range")
    done = 0
    guard = dst._rmw_lock if dst.direct and dst._sized else None
    if guard is not None:
        guard.acquire()  # the copy may extend dst: see the module docstring
    try:
        while done < length:
            try:
                n = sc.copy_file_range(
                    src.fd, dst.fd, length - done, src_offset + done, dst_offset + done
                )
            except InterruptedError:
                continue
            except OSError as e:
                if e.errno == errno.EINVAL and (src.direct or dst.direct):
                    break
                raise _moved(dst.note_error("copy_range", e), done) from None
            if n == 0:
                return done
            done += n
    finally:
        if guard is not None:
            guard.release()
    if done < length:
        done = _copy_through_memory(sc, src, src_offset, dst, dst_offset, length, done)
    return done


def _copy_through_memory(
    sc: Syscalls,
    src: AioFile,
    src_offset: int,
    dst: AioFile,
    dst_offset: int,
    length: int,
    done: int,
) -> int:
    buf = aligned_buffer(min(length - done, _CHUNK), MAX_ALIGNMENT)
    while done < length:
        want = min(len(buf), length - done)
        try:
            got = read(sc, src, [buf[:want]], src_offset + done, want, False)
        except OSError as e:
            raise _moved(e, done) from None
        if got:
            try:
                write(sc, dst, [buf[:got]], dst_offset + done, got)
            except OSError as e:  # what of this chunk landed was copied too
                raise _moved(e, done + _transferred(e)) from None
        done += got
        if got < want:
            break  # end of the source
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
