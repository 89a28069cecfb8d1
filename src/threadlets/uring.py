"""The io_uring backend: one kernel submission/completion ring, driven
through ctypes.

This module owns :class:`Ring`: the ring's memory, the submission of single
reads, writes and fsyncs, and the reaping of their completions, each handed
to the callback it was submitted with.  What a completion means for a
request (finish it, or hand the rest to the thread pool) is
:mod:`threadlets.engine`'s business; this module knows nothing of requests.

Who reaps.  In *owner mode* (``eventfd=`` given) the kernel signals that
eventfd for every completion and the owner -- the thread that processes the
engine context's completions, an event loop say -- calls :meth:`Ring.reap`
itself: a completion costs no thread hop at all, as in QEMU's AioContext.
Without an eventfd the ring runs a *reaper* thread that sleeps in
``io_uring_enter(GETEVENTS)``; the engine uses that for contexts that
deliver nothing (:mod:`threadlets.posix`), whose requests must finish with
nobody polling.

Fewer system calls.  A submission normally calls ``io_uring_enter`` at
once.  It is held back instead while this thread holds the ring's plug: a
burst (the engine plugs while completion callbacks run) or, with
:meth:`Ring.hold`, for good, with a flush scheduled once per batch (an
event loop's ``call_soon``: one call per loop iteration); a burst
of :data:`KICK_AT` made while the kernel has nothing in hand goes at once,
so the device is not idle while the rest is made.  In reaper mode it
is also held back while the reaper is busy handing out completions or, with
:data:`DEFER_AT` or more operations in the kernel (counting those whose
completions its last pass handed out: a front end that keeps a depth sends
them straight back), in a sleep of at most :data:`HOLD_MAX`; the reaper
submits everything held back at the end of either (there too a burst of
KICK_AT with nothing in the kernel goes at once).  Every wait is bounded by Python work under way or by HOLD_MAX,
never by how long the kernel takes.  On O_DIRECT each ``io_uring_enter`` is
also a doorbell to the device -- on a VM an exit to the hypervisor -- so
this matters more than the Python it saves.  A thread about to block on an
operation calls :meth:`Ring.flush` first, so nothing held back waits on its
own submitter.

Memory ordering.  A submitter writes an SQE and the SQ tail under the
ring's lock; ``io_uring_enter`` is then called (no SQPOLL) by a thread that
took the lock after those stores, so the lock orders them before the kernel
reads the ring.  With SQPOLL (opt-in: ``Ring(sqpoll=True)``) a kernel
thread reads the ring as the stores are made: x86-64 keeps stores in
order, so it sees an SQE's bytes once it sees the tail past it; a kick
only wakes that thread if it sleeps, and reads the flag that says so
after a full barrier (see ``Ring._wake``).  A reaper reads the CQ tail
and then the CQEs the kernel published before it; x86-64 keeps loads in
order, which is why :class:`Ring` refuses other machines (Python
cannot issue the acquire barrier that weaker memory models would need).

Ownership: fields marked "under _lock" are touched only with the ring's
lock held, and so is the CQ head.  After ``fork()`` a ring is dead in the
child -- its memory is shared with the parent, whose operations are in it --
so the child neither submits nor reaps: :attr:`Ring.usable` turns false and
the engine uses its threads.

Dropped without close().  No module-level structure holds a ring: one
with operations in flight is garbage only together with everything its
callbacks hold (the engine's requests and their context).  Its finalizer
then gives up on them -- cancels them in the kernel, keeps the ring and
what the callbacks pin until the kernel has given every one back, calls
none of the callbacks, closes the fd an OPENAT came back with -- and
releases it (see ``Ring._abandon``).  A reaper thread holds its ring only
weakly while it sleeps; a reaper-mode ring's finalizer hands the ring back
to it, to finish as after close().  The fd is closed by the last kick or
wait under way, never under one.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import itertools
import logging
import mmap
import operator
import os
import struct
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from threading import get_ident as _get_ident
from typing import Any

from threadlets.pool import block_async_signals

__all__ = [
    "ABANDON_WAIT",
    "AT_EMPTY_PATH",
    "AT_FDCWD",
    "AT_SYMLINK_NOFOLLOW",
    "DEFER_AT",
    "FSYNC_DATASYNC",
    "HOLD_MAX",
    "KICK_AT",
    "OP_ASYNC_CANCEL",
    "OP_CLOSE",
    "OP_FALLOCATE",
    "OP_FSYNC",
    "OP_NOP",
    "OP_OPENAT",
    "OP_READ",
    "OP_READV",
    "OP_STATX",
    "OP_WRITE",
    "OP_WRITEV",
    "REAPED",
    "SQPOLL_IDLE_MS",
    "STATX_BASIC_STATS",
    "STATX_FIELDS",
    "STATX_SIZE",
    "Ring",
    "RingUnavailable",
    "call_after_batch",
]

log = logging.getLogger("threadlets.uring")

# io_uring_setup / io_uring_enter: one syscall number on every architecture
# since Linux 5.1's unified table (alpha aside).
_NR_SETUP, _NR_ENTER, _NR_REGISTER = 425, 426, 427
_ENTER_GETEVENTS, _ENTER_SQ_WAKEUP, _ENTER_SQ_WAIT, _ENTER_EXT_ARG = 1, 2, 4, 8
#: io_uring_params.flags: a kernel thread polls the SQ (IORING_SETUP_SQPOLL);
#: the SQ ring's flags word: that thread went to sleep (IORING_SQ_NEED_WAKEUP).
_SETUP_SQPOLL, _SQ_NEED_WAKEUP = 2, 1
_REGISTER_EVENTFD, _REGISTER_PROBE = 4, 8
_PROBE_OPS = 256  # struct io_uring_probe: 16 bytes, then ops_len 8-byte io_uring_probe_op
_OP_SUPPORTED = 1
_FEAT_SINGLE_MMAP, _FEAT_NODROP, _FEAT_EXT_ARG = 1, 2, 256
#: NODROP: no completion is ever lost; EXT_ARG: waits with a timeout (5.11).
_FEAT_NEEDED = _FEAT_NODROP | _FEAT_EXT_ARG
_OFF_SQ_RING, _OFF_CQ_RING, _OFF_SQES = 0, 0x8000000, 0x10000000

OP_NOP, OP_READV, OP_WRITEV, OP_FSYNC = 0, 1, 2, 3
OP_ASYNC_CANCEL, OP_FALLOCATE, OP_READ, OP_WRITE = 14, 17, 22, 23
OP_OPENAT, OP_CLOSE, OP_STATX = 18, 19, 21
FSYNC_DATASYNC = 1

#: openat/statx: the directory fd that means "the current directory", and
#: statx's flags and the fields to ask for (all that stat(2) gives).
AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW, AT_EMPTY_PATH = 0x100, 0x1000
STATX_BASIC_STATS = 0x7FF
#: struct statx: the kernel writes STATX_SIZE bytes; STATX_FIELDS reads the
#: ones stat(2) has -- mask, blksize, attributes, nlink, uid, gid, mode,
#: (spare), ino, size, blocks, attributes_mask, the atime, btime, ctime and
#: mtime as (sec, nsec, reserved), rdev major/minor, dev major/minor.
STATX_SIZE = 256
STATX_FIELDS = struct.Struct("=IIQIIIHHQQQQ" + "qIi" * 4 + "IIII")

# struct io_uring_sqe: opcode, flags, ioprio, fd, off, addr, len, op flags,
# user_data, buf_index, personality, splice_fd_in, addr3, pad.
_SQE = struct.Struct("<BBHiQQIIQHHiQQ")
_CQE = struct.Struct("<QiI")  # user_data, res, flags
_CQE_IDENT_RES = struct.Struct("<Qi4x")  # (the flags left out: _collect)
# (_collect's C-level steps: see there.)
_repeat = itertools.repeat
_callback_of = operator.itemgetter(0)
assert _SQE.size == 64
#: The same SQE with every field the ring sets to zero as padding (flags,
#: ioprio, buf_index, personality, splice_fd_in, addr3, pad; struct packs
#: pad bytes as zeros): opcode, fd, off, addr, len, op flags, user_data.
_pack_sqe = struct.Struct("<B3xiQQIIQ24x").pack_into
assert struct.calcsize("<B3xiQQIIQ24x") == 64
assert _CQE.size == 16


def stat_result(buf: Any) -> os.stat_result:
    """The os.stat_result that stat(2) would give, from a struct statx
    filled for STATX_BASIC_STATS: the same fields, nanosecond times, float
    times computed as CPython does, and st_dev/st_rdev encoded by makedev."""
    (
        _, blksize, _, nlink, uid, gid, mode, _, ino, size, blocks, _,
        a_s, a_ns, _, _, _, _, c_s, c_ns, _, m_s, m_ns, _,
        rdev_major, rdev_minor, dev_major, dev_minor,
    ) = STATX_FIELDS.unpack_from(buf)  # fmt: skip
    billion = 1_000_000_000
    fields = (
        mode, ino, os.makedev(dev_major, dev_minor), nlink, uid, gid, size,
        a_s, m_s, c_s,
        a_s + a_ns * 1e-9, m_s + m_ns * 1e-9, c_s + c_ns * 1e-9,
        a_s * billion + a_ns, m_s * billion + m_ns, c_s * billion + c_ns,
        blksize, blocks, os.makedev(rdev_major, rdev_minor),
    )  # fmt: skip
    return os.stat_result(fields)


_STOP = 0  # user_data of the NOP that tells the reaper to finish
_KICK = 1 << 63  # user_data of the NOPs that wake sleepers (see Ring.wait)
#: What Ring.ident_of answers for an operation whose completion was reaped:
#: an id no operation has (ids count up from 1), which cancels nothing.
REAPED = _KICK - 1

#: Reaper mode: with this many operations in the kernel, the reaper sleeps at
#: most HOLD_MAX seconds at a time (one of them will complete soon anyway),
#: and meanwhile submissions are held back for it: one io_uring_enter -- and
#: for O_DIRECT one doorbell to the device -- per batch instead of each.
#: A short sleep that saw nothing makes the next one long, so operations
#: that never complete (a pipe) cost one extra wakeup, not a stream of them.
DEFER_AT = 8
HOLD_MAX = 0.001

#: SQPOLL (``Ring(sqpoll=True)``): how long, in milliseconds, the kernel's
#: SQ thread keeps polling with nothing to take before it goes to sleep
#: (io_uring_params.sq_thread_idle).  Asleep, the next kick wakes it with a
#: system call; awake, a submission costs none -- and a CPU busy polling.
SQPOLL_IDLE_MS = 20

#: A plugged thread's burst (or one held for the reaper) is sent at this
#: many held back if the kernel has nothing of the ring's in hand.  All of a batch held for one
#: ``io_uring_enter`` would move in lockstep: a device that completes a
#: doorbell's requests together (a virtio disk finishes them as one) sits
#: idle while Python handles the whole batch and makes the next.  Sent in
#: parts, the first part is on the device while the rest is made.  Only
#: while the kernel holds nothing: with requests in hand the device is busy
#: anyway, and a buffered write done inside io_uring_enter gains nothing from
#: more calls.  At depth 32 on this project's VM: O_DIRECT reads through the
#: async front end 33k -> 50k a second; page-cache writes unchanged.
KICK_AT = 16

_generation = 0  # bumped in a forked child: rings made before are dead there

#: Rings whose owner let go of them with operations in flight (collected,
#: or closed without reaping them): kept here -- the kernel may still write
#: into the buffers their callbacks pin -- until every one of those came
#: back, cancelled or done; then released.  None of their callbacks is
#: called: nobody can see those operations any more.  (A ring in use is
#: not here: what holds a request holds its context, which holds the ring,
#: so a ring becomes garbage only with every request in it.)
_abandoned: set[Ring] = set()

#: Every ring made in this process, held weakly (see _after_fork_in_child).
_rings: weakref.WeakSet[Ring] = weakref.WeakSet()

#: How long a ring being abandoned waits for what the kernel could not
#: cancel at once (a transfer a device is doing); what is still out after
#: that is reaped without waiting by the next ring made, or the next ring
#: abandoned.  Cancelled reads of pipes and sockets, and what the kernel
#: had not started, come back at once.
ABANDON_WAIT = 0.01


class _Timespec(ctypes.Structure):
    _fields_ = (("tv_sec", ctypes.c_int64), ("tv_nsec", ctypes.c_int64))


class _GeteventsArg(ctypes.Structure):  # struct io_uring_getevents_arg
    _fields_ = (
        ("sigmask", ctypes.c_uint64),
        ("sigmask_sz", ctypes.c_uint32),
        ("min_wait_usec", ctypes.c_uint32),
        ("ts", ctypes.c_uint64),
    )


def _after_fork_in_child() -> None:
    global _generation
    _generation += 1
    for ring in list(_rings):
        ring._room = 0  # (the parent's: nothing is submitted to it here)
        for item in ring._ready:
            # Handed out, as far as this process goes: a reap under way in
            # the thread that forked (a callback forked) hands out no more
            # of the parent's completions here.
            item[2] = True
    for ring in list(_abandoned):  # the parent's operations: only our copies go
        ring.abandon_in_child()
    _abandoned.clear()


def _sweep_abandoned() -> None:
    """Release the abandoned rings whose operations all came back (not
    waiting for the others)."""
    for ring in list(_abandoned):
        ring._reap_abandoned(0)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


_batch = threading.local()  # .after: what to run when this thread's reap is done


def call_after_batch(fn: Callable[[], object]) -> bool:
    """From a completion callback: if this thread is handing out a batch
    of completions (in :meth:`Ring.reap`), run ``fn`` once when the whole
    batch is done, and return True; otherwise return False (run it now)."""
    after: list[Callable[[], object]] | None = getattr(_batch, "after", None)
    if after is None:
        return False
    if fn not in after:
        after.append(fn)
    return True


class RingUnavailable(OSError):
    """io_uring cannot be used here (not Linux, not x86-64, or refused by
    the kernel, a seccomp filter or ``kernel.io_uring_disabled``)."""


@functools.cache
def _syscalls() -> tuple[Any, Any, Any]:
    """io_uring_setup, io_uring_enter and io_uring_register through libc's
    syscall(), each with its full prototype: unprototyped ctypes arguments
    are C ints, and the upper half of a 64-bit argument (a size_t, a
    pointer) would then be whatever the register held.  Made once: made
    per ring, each ring left a CDLL and a class of its own to the cyclic
    collector."""
    libc = ctypes.CDLL(None, use_errno=True)
    c_long, c_uint, c_void_p = ctypes.c_long, ctypes.c_uint, ctypes.c_void_p
    setup = ctypes.CFUNCTYPE(c_long, c_long, c_uint, c_void_p, use_errno=True)
    enter = ctypes.CFUNCTYPE(
        c_long, c_long, c_uint, c_uint, c_uint, c_uint, c_void_p, ctypes.c_size_t, use_errno=True
    )
    register = ctypes.CFUNCTYPE(c_long, c_long, c_uint, c_uint, c_void_p, c_uint, use_errno=True)
    return (
        setup(("syscall", libc)),
        enter(("syscall", libc)),
        register(("syscall", libc)),
    )


def _wait_for_one(enter: Any, fd: int, timeout: float | None) -> int:
    """io_uring_enter(GETEVENTS) for one completion, with a timeout."""
    if timeout is None:
        return int(enter(_NR_ENTER, fd, 0, 1, _ENTER_GETEVENTS, None, 0))
    ts = _Timespec(int(timeout), int((timeout % 1) * 1e9))
    arg = _GeteventsArg(0, 0, 0, ctypes.addressof(ts))
    return int(
        enter(
            _NR_ENTER, fd, 0, 1, _ENTER_GETEVENTS | _ENTER_EXT_ARG,
            ctypes.addressof(arg), ctypes.sizeof(arg),
        )
    )  # fmt: skip


def _reap_loop(
    ref: weakref.ref[Ring], box: list[Ring], boxed: threading.Event, enter: Any, fd: int
) -> None:
    """A ring's reaper thread (reaper mode): sleep until completions arrive,
    hand them out, repeat until close()'s NOP came back with nothing else
    in flight; then release the ring.

    It holds the ring only while it works, weakly while it sleeps: a ring
    dropped without close() is collected then, and its finalizer puts it
    in ``box`` -- held again, until this thread releases it -- and closes
    it, which wakes this thread.  (The collector clears the weak reference
    before it runs the finalizer, and may let other threads run in
    between: this thread then waits for ``boxed``.)"""
    block_async_signals()  # (see there: Ctrl-C belongs to the main thread)
    quiet = False  # the last short sleep saw nothing: sleep long now
    handed = 0  # completions the last pass handed out
    while True:
        ring = _reaper_ring(ref, box, boxed)
        with ring._lock:
            # Ordering: what was held back is taken in the same critical
            # section that decides whether submitters may hold back
            # during the sleep, so nothing waits on a long sleep.
            n = ring._take()
            # The completions just handed out count as soon back in the
            # kernel: a front end that keeps a depth resubmits them
            # right after the pass (if it does not, the short sleep
            # runs out once and the next is long).
            short = ring._in_kernel + handed >= DEFER_AT and not quiet
            ring._reaper_holds = short
            finished = ring._stopped and not ring._pending
            # A forked child, this thread the one that forked (in a
            # callback): the ring is the parent's, its fd is closed here
            # (or another file's by now).  It waits no more.
            forked = ring._generation != _generation
        ring._kick(n)
        if finished or forked:
            break
        del ring  # (asleep, the thread holds the ring weakly)
        got = _wait_for_one(enter, fd, HOLD_MAX if short else None)
        err = ctypes.get_errno() if got < 0 else 0
        ring = _reaper_ring(ref, box, boxed)
        if got < 0:
            if err == errno.ETIME:  # the short sleep ran out
                quiet = not ring._unsubmitted
                continue
            if err in (errno.EINTR, errno.EAGAIN):
                continue
            log.error("io_uring_enter(wait): %s", os.strerror(err))  # pragma: no cover
            break  # pragma: no cover
        quiet = False
        with ring._lock:
            ring._reaper_holds = True  # busy: submissions wait for this pass
        handed = 0
        try:
            handed = ring.reap()
        except BaseException:
            # A callback's KeyboardInterrupt or SystemExit must not end
            # the thread that finishes every request of this ring: the
            # rest of the batch stays queued for the next pass.
            log.exception("exception in an io_uring completion callback")
    with ring._lock:
        ring._release()  # (under the lock: _take reads the SQ head)
    box.clear()


def _close_opened(keep: object, res: int) -> None:
    """What an abandoned ring's OPENAT came back with: the fd, closed (nobody
    takes it).  ``keep``, its callback, was held until now."""
    if res >= 0:
        os.close(res)


def _reaper_ring(ref: weakref.ref[Ring], box: list[Ring], boxed: threading.Event) -> Ring:
    ring = ref()
    if ring is not None:
        return ring
    boxed.wait()  # being collected: its finalizer puts it in the box
    return box[0]


def _probe_opcodes(register: Any, fd: int) -> frozenset[int]:
    """IORING_REGISTER_PROBE: the opcodes the kernel supports.  A kernel
    without the probe (before 5.6) is assumed to take the oldest few."""
    buf = (ctypes.c_uint8 * (16 + 8 * _PROBE_OPS))()
    if register(_NR_REGISTER, fd, _REGISTER_PROBE, ctypes.addressof(buf), _PROBE_OPS) < 0:
        return frozenset({OP_NOP, OP_FSYNC})  # pragma: no cover - old kernels
    last = buf[0]
    return frozenset(
        op for op in range(min(last + 1, _PROBE_OPS)) if buf[16 + 8 * op + 2] & _OP_SUPPORTED
    )


class Ring:
    """One io_uring instance: owner-reaped if given an ``eventfd``, else
    with a reaper thread of its own.

    :meth:`submit` queues one operation and returns False (nothing queued)
    when the ring is full, closed or dead after a fork; the caller then does
    the work another way.  ``on_done(res)`` runs once per submitted
    operation, in the thread that reaps it, with the kernel's result (a
    count, or ``-errno``); it must be true, as any function or bound method
    is (see _collect).  The memory at ``addr`` must stay valid and unmoved
    until then.

    ``sqpoll=True`` asks for IORING_SETUP_SQPOLL: a kernel thread polls the
    SQ and takes submissions without a system call (one only to wake it
    after :data:`SQPOLL_IDLE_MS` without work), at the cost of a CPU busy
    polling meanwhile.  Refused by the kernel, the ring is made without it;
    :attr:`sqpoll` says which.
    """

    def __init__(
        self,
        entries: int = 256,
        eventfd: int | None = None,
        made: list[Ring] | None = None,
        sqpoll: bool = False,
    ) -> None:
        if not sys.platform.startswith("linux"):
            raise RingUnavailable(errno.ENOSYS, "io_uring is Linux-only")
        if os.uname().machine != "x86_64":
            raise RingUnavailable(
                errno.ENOSYS, f"the io_uring backend needs x86-64, not {os.uname().machine}"
            )
        if _abandoned:
            _sweep_abandoned()
        setup, enter, register = _syscalls()
        params = (ctypes.c_uint32 * 30)()  # struct io_uring_params, 120 bytes
        if sqpoll:
            params[2] = _SETUP_SQPOLL  # flags
            params[4] = SQPOLL_IDLE_MS  # sq_thread_idle
        # The ring's fd, made by a call from C (map, inside the list's
        # extend): CPython raises a pending Ctrl-C only as a call made by
        # Python code returns, so it lands before io_uring_setup or after
        # the fd is in the list, which __del__ looks at until the fd is
        # stored (it used to leak the fd).
        self._made_fd: list[int] = []
        self._made_fd.extend(map(setup, (_NR_SETUP,), (entries,), (ctypes.addressof(params),)))
        fd = self._made_fd[0]
        if fd < 0 and sqpoll:
            # SQPOLL refused (EPERM, EINVAL, ENOMEM, a seccomp filter...):
            # a ring without it, made the same way.  (A -1 in the list is
            # nothing __del__ closes; cleared first all the same.)
            sqpoll = False
            params = (ctypes.c_uint32 * 30)()
            self._made_fd.clear()
            self._made_fd.extend(map(setup, (_NR_SETUP,), (entries,), (ctypes.addressof(params),)))
            fd = self._made_fd[0]
        if fd < 0:
            err = ctypes.get_errno()
            raise RingUnavailable(err, f"io_uring_setup: {os.strerror(err)}")
        p = list(params)
        sq_entries, cq_entries, features = p[0], p[1], p[5]
        if features & _FEAT_NEEDED != _FEAT_NEEDED:
            del self._made_fd[0]  # (closed here, not again in __del__)
            os.close(fd)
            raise RingUnavailable(
                errno.ENOSYS, "io_uring here lacks NODROP or EXT_ARG (Linux 5.11 or newer needed)"
            )
        # (Plain stores from the list to _fd_closed: no interrupt between.)
        self._fd = fd
        #: A kernel thread polls the SQ (IORING_SETUP_SQPOLL): see _kick.
        self.sqpoll = sqpoll
        self._released = False
        self._fd_closed = False
        self._given_up = False  # abandoned (see _abandon): its callbacks are never called
        #: Given up on: the operations no cancel was pushed for yet (under _lock).
        self._to_cancel: list[int] = []
        self._kicking = 0  # kicks (and waits) under way (see _kick)
        self._close_after_kick = False  # released under them: the last one closes the fd
        # Offsets into the ring mappings (the masks are read from there).
        sq_head, sq_tail, sq_mask_at, _, sq_flags, _, sq_array = p[10:17]
        cq_head, cq_tail, cq_mask_at, _, _, cqes = p[20:26]
        sq_size = sq_array + 4 * sq_entries
        cq_size = cqes + _CQE.size * cq_entries
        prot = mmap.PROT_READ | mmap.PROT_WRITE
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        try:
            if features & _FEAT_SINGLE_MMAP:
                self._sq_mm = self._cq_mm = mmap.mmap(
                    fd, max(sq_size, cq_size), flags, prot, offset=_OFF_SQ_RING
                )
            else:  # pragma: no cover - kernels before 5.4
                self._sq_mm = mmap.mmap(fd, sq_size, flags, prot, offset=_OFF_SQ_RING)
                self._cq_mm = mmap.mmap(fd, cq_size, flags, prot, offset=_OFF_CQ_RING)
            self._sqes = mmap.mmap(fd, _SQE.size * sq_entries, flags, prot, offset=_OFF_SQES)
        except OSError:
            self._fd_closed = True  # (not again in __del__)
            os.close(fd)
            raise
        u32 = ctypes.c_uint32
        self._sq_head = u32.from_buffer(self._sq_mm, sq_head)  # written by the kernel
        self._sq_tail = u32.from_buffer(self._sq_mm, sq_tail)
        self._sq_flags = u32.from_buffer(self._sq_mm, sq_flags)  # written by the kernel
        self._cq_head = u32.from_buffer(self._cq_mm, cq_head)
        self._cq_tail = u32.from_buffer(self._cq_mm, cq_tail)  # written by the kernel
        array = (u32 * sq_entries).from_buffer(self._sq_mm, sq_array)
        for i in range(sq_entries):
            array[i] = i  # SQE i is always slot i: the tail alone says what is new
        del array
        self._sq_mask = u32.from_buffer_copy(self._sq_mm, sq_mask_at).value
        self._cq_mask = u32.from_buffer_copy(self._cq_mm, cq_mask_at).value
        self._cqes = cqes
        self.entries = sq_entries
        self._enter = enter
        self._lock = threading.Lock()
        # Under _lock:
        #: The SQ tail, unwrapped (its c_uint32 keeps the low bits): also
        #: where submit's ids come from (one more than the tail at its SQE:
        #: never 0, never repeated, never near _KICK).
        self._tail = self._sq_tail.value
        #: The tail at the last _take: past it, the published SQEs no
        #: io_uring_enter took yet (see _unsubmitted).
        self._taken = self._tail
        self._in_kernel = 0  # SQEs given to the kernel whose CQEs were not reaped
        # (With SQPOLL the SQ thread takes an SQE held back before _take
        # counts it, and its CQE may be reaped first: then _in_kernel dips
        # below 0 until that _take.  It only tunes the holding back, which
        # with SQPOLL decides no more than when the thread is woken.)
        self._plugged_by: int | None = None  # the thread holding the plug
        self._schedule: Callable[[], object] | None = None  # hold()'s, for good
        self._flush_scheduled = False  # hold(): schedule() called since the last take
        self._closing = False
        #: How many operations may be in flight: ``entries``, 0 once
        #: closing or in a forked child (see _room).
        self._cap: int = sq_entries
        #: Submit's one test: ``_cap`` less the SQEs published whose CQEs
        #: were not taken off the CQ yet -- operations in flight, and the
        #: NOPs and cancels _push adds.  Above 0, the SQ has a free slot
        #: (what the kernel has not consumed is among those: a sleepers'
        #: NOP could fill the last one while a kick was under way, and an
        #: SQE written there went over the oldest one not consumed yet),
        #: fewer than ``entries`` operations are in flight (the CQ, twice
        #: as large, never overflows), the ring is not closing and this is
        #: not a forked child.
        self._free: int = sq_entries
        self._stopped = False  # reaper mode: close()'s NOP came back
        self._reaper_holds = False  # reaper mode: busy, or in a short sleep (see submit)
        self._pending: dict[int, Callable[[int], None]] = {}
        #: The ids of the OPENATs in flight: given up on, the fd one of them
        #: comes back with is closed (see _abandon).
        self._opens: set[int] = set()
        #: Completions taken off the CQ and not yet handed out, oldest first,
        #: as [callback, result, handed].  They are handed out one at a
        #: time, so an exception of any kind in one callback (Ctrl-C
        #: included) leaves the rest for the next reap.
        self._ready: deque[list[Any]] = deque()
        #: While _collect moves a batch: every callback of it (None for a
        #: CQE with none), each in _pending or on _ready too -- but not at
        #: every point, for a collection inside the move runs Python code
        #: (a gc callback, a finalizer) that can let another thread fork:
        #: see callbacks().
        self._moving: list[Any] | tuple[()] = ()
        #: Threads asleep in wait(): a reap that hands out completions wakes
        #: them with a NOP, since one of those may be what they wait for.
        self._sleepers = 0
        self._generation = _generation
        _rings.add(self)  # (a forked child closes it to submissions: _after_fork_in_child)
        self.reaped = 0
        self.wakeups = 0
        self._reaper: threading.Thread | None = None
        #: Reaper mode: where the ring's finalizer puts the ring for its
        #: reaper thread to finish and release (the thread holds it weakly).
        self._reaper_box: list[Ring] = []
        self._boxed = threading.Event()  # set once it is there
        #: The opcodes this kernel takes (IORING_REGISTER_PROBE): the engine
        #: sends the others to its threads.
        self.supported = _probe_opcodes(register, self._fd)
        if made is not None:
            # (The caller can close it even if Ctrl-C lands from here on,
            # as Ring() returns included; before, __del__ releases it.)
            made.append(self)
        if eventfd is not None:
            # Owner mode: the kernel signals the owner's eventfd for every
            # completion, and the owner reaps.  No thread of ours.
            arg = ctypes.c_int32(eventfd)
            if register(_NR_REGISTER, self._fd, _REGISTER_EVENTFD, ctypes.addressof(arg), 1) < 0:
                err = ctypes.get_errno()
                self._release()
                raise RingUnavailable(err, f"IORING_REGISTER_EVENTFD: {os.strerror(err)}")
        else:
            # The thread holds the ring weakly (but while it hands out
            # completions): a ring dropped without close() is collected,
            # and its finalizer hands it to the thread to finish (see
            # __del__).
            self._reaper = threading.Thread(
                target=_reap_loop,
                args=(weakref.ref(self), self._reaper_box, self._boxed, self._enter, self._fd),
                name=f"threadlets-uring-{self._fd}",
                daemon=True,
            )
            self._reaper.start()

    def __repr__(self) -> str:
        sqpoll = " sqpoll" if self.sqpoll else ""
        return f"<Ring fd={self._fd} entries={self.entries}{sqpoll} inflight={self._inflight}>"

    @property
    def _unsubmitted(self) -> int:
        """Published SQEs no io_uring_enter took yet (under _lock)."""
        return self._tail - self._taken

    @property
    def _inflight(self) -> int:
        """Operations queued and not reaped yet (under _lock)."""
        return len(self._pending)

    @property
    def _room(self) -> int:
        """How many may be in flight: ``entries``, 0 once closing."""
        return self._cap

    @_room.setter
    def _room(self, room: int) -> None:
        # (Plain bytecodes: the two change together.)
        self._free += room - self._cap
        self._cap = room

    @property
    def submitted(self) -> int:
        """Operations queued so far (those reaped, and those in flight)."""
        return self.reaped + self._inflight

    @property
    def usable(self) -> bool:
        """False once closing, and in a child process after fork."""
        return not self._closing and self._generation == _generation

    # -- submission (any thread) ---------------------------------------------------------

    def submit(
        self,
        opcode: int,
        fd: int,
        offset: int,
        addr: int,
        length: int,
        op_flags: int,
        on_done: Callable[[int], None],
    ) -> int:
        """Queue one operation and tell the kernel (at :meth:`unplug` if
        this thread plugged the ring).  Returns its id (for :meth:`cancel`),
        or 0: not queued.  A caller interrupted (Ctrl-C) before this
        returns learns from :meth:`ident_of` whether ``on_done`` will run."""
        me = _get_ident()
        with self._lock:
            # At most `entries` in flight, none once closing, none in a
            # forked child, none into a full SQ: see _free.
            free = self._free  # (only under the lock: a local copy)
            if free <= 0:
                return 0
            # _push, spelled out (this runs once per request).  The SQE goes
            # past the tail first, where the kernel does not look; from the
            # pending entry to the tail's store everything is plain
            # bytecodes (Ctrl-C lands only as a C call returns): queued and
            # published together, or neither.
            tail = self._tail
            ident = tail + 1
            _pack_sqe(
                self._sqes, (tail & self._sq_mask) * 64, opcode, fd, offset, addr, length, op_flags, ident
            )  # fmt: skip
            if opcode == OP_OPENAT:
                self._opens.add(ident)  # (see _abandon; before it is published)
            self._pending[ident] = on_done
            # (_tail is not wrapped at 32 bits: its c_uint32 keeps the low
            # bits, the slot's mask and _take's difference look at no more.)
            self._tail = ident
            self._sq_tail.value = ident
            self._free = free - 1
            if self._plugged_by == me and (self._in_kernel or ident - self._taken < KICK_AT):
                # Held back by this thread's plug.  A permanent one (hold())
                # has a flush scheduled by the first submission it holds.
                # (The flag first: under hold() it is set but for one
                # submission a batch.)
                if self._flush_scheduled:
                    return ident
                schedule = self._schedule
                if schedule is None:
                    return ident
                self._flush_scheduled = True
            elif self._reaper_holds and (self._in_kernel or ident - self._taken < KICK_AT):
                # Held back for the reaper, which sends everything held back
                # at the end of its current pass or short sleep.  Not past
                # KICK_AT with nothing in the kernel (as under a plug): the
                # reaper, having handed out the whole depth, would sleep out
                # its HOLD_MAX with nothing to wake it, and the device would
                # sit idle until the submitter blocks (aio_suspend's flush):
                # lockstep batches of the whole depth.
                return ident
            else:
                schedule = None
                n = self._take()
        if schedule is not None:
            schedule()
            return ident
        self._kick(n)
        return ident

    def ident_of(self, on_done: Callable[[int], None]) -> int:
        """For a caller whose :meth:`submit` was interrupted (Ctrl-C): the
        id of the operation queued with ``on_done`` (a callback equal to
        it) that is still in the kernel, :data:`REAPED` if its completion
        was taken off the ring but not all handed out yet, or 0: not queued
        -- or queued, and its callback already called and its batch over
        (the caller tells that apart by what the callback did)."""
        with self._lock:
            for ident, cb in self._pending.items():
                if cb == on_done:
                    return ident
            for item in self._ready:
                if item[0] == on_done:
                    return REAPED
            return 0

    def callbacks(self) -> list[Callable[[int], None]]:
        """The callbacks of the operations queued and not yet handed out in
        full (in the kernel, or reaped in a batch not over): in a forked
        child, where nothing else runs, what its owner held there."""
        return (
            list(self._pending.values())
            + [item[0] for item in self._ready]
            + [cb for cb in self._moving if cb is not None]
        )

    def cancel(self, ident: int, on_done: Callable[[int], None]) -> bool:
        """Ask the kernel to cancel the operation ``ident`` (IORING_OP_ASYNC_CANCEL),
        at once even if this thread holds the plug.  ``on_done(res)`` gets
        0 (cancelled: the operation completes with -ECANCELED, having moved
        nothing), -EALREADY (running: it completes normally) or -ENOENT (it
        had completed).  False if the ring cannot take the request.

        A ring at its cap (``entries`` operations in flight: reads of an
        empty pipe, say, or completions not reaped yet) still takes a
        cancel, past the cap (the CQ, twice as large, has room for its
        CQE): refused there, a request the kernel would have taken back
        answered "running" -- and, nothing ever coming for it, waited for
        good.  With SQPOLL that was the common case: the thread takes the
        SQEs, and posts the CQEs that give slots back, after the kick
        returns.  An SQ full of SQEs not consumed yet is sent first (with
        SQPOLL: the SQ thread woken, and waited for until it took one)."""
        again = False
        while not self.submit(OP_ASYNC_CANCEL, -1, 0, ident, 0, 0, on_done):
            over = self._cancel_past_cap(ident, on_done)
            if over is None:
                return False
            if over is True:
                break
            if over == "room":
                continue  # (a slot came back: submit takes it, or another thread did)
            if over == "limit":
                # As many cancels past the cap as the CQ holds: refused, a
                # request the kernel would take back was answered "running"
                # (and a read of a pipe waited for good).  Theirs come back
                # at once; each collected gives a slot back.
                self._await_cancels()
                continue
            if again and not self.sqpoll:
                return False  # (the kick failed: the SQ stays full)
            again = True
            # The SQ full of SQEs not consumed: a plain ring's kick consumes
            # them; SQPOLL's wakes its thread, which may not have taken any.
            self.flush()
            if self.sqpoll and not self._wait_sq_room():
                return False  # pragma: no cover  (refused)
        self.flush()
        return True

    def _cancel_past_cap(self, ident: int, on_done: Callable[[int], None]) -> bool | str | None:
        """cancel(), the ring at its cap: the cancel published past it
        (True), not now ("room": the cap came back, submit takes it;
        "limit": the cancels past the cap at their own limit, until theirs
        come back; False: no SQ slot free), or never (None: closing, a
        forked child)."""
        with self._lock:
            if self._cap <= 0 or self._released or self._generation != _generation:
                return None
            free = self._free
            if free > 0:
                return "room"
            if free <= -(self.entries // 2):
                return "limit"  # (the CQ's room for them)
            tail = self._tail
            if (tail - self._sq_head.value) & 0xFFFFFFFF >= self.entries:
                return False
            # As submit does: the SQE past the tail, then (plain bytecodes)
            # pending and published together.
            mine = tail + 1
            _pack_sqe(
                self._sqes, (tail & self._sq_mask) * 64, OP_ASYNC_CANCEL, -1, 0, ident, 0, 0, mine
            )  # fmt: skip
            self._pending[mine] = on_done
            self._tail = mine
            self._sq_tail.value = mine
            self._free = free - 1  # (its CQE gives it back: see _collect)
            return True

    def _await_cancels(self) -> None:
        """cancel(), the cancels past the cap at their limit: wait until a
        CQE of theirs was collected (a slot given back), reaping in this
        thread if nobody else does (owner mode, or the reaper itself in a
        callback), or the ring closed."""
        limit = -(self.entries // 2)

        def ready() -> bool:
            return self._free > limit or self._cap <= 0 or self._released

        if self.owner_mode or self.is_reaper():
            self.reap()
            if not ready():
                self.wait(None, ready)  # (what it posts, the next round reaps)
        elif not ready():
            self.wait(HOLD_MAX, ready)
            if not ready():
                # The reaper busy in a callback: their CQEs posted but not
                # collected, wait() returns at once -- polled, not spun.
                time.sleep(HOLD_MAX)

    def _take(self) -> int:
        # Under _lock: the published SQEs the caller will now submit.  None
        # in a forked child: the ring's memory is shared with the parent,
        # whose SQEs (and buffers) these are.
        if self._generation != _generation or self._released:
            return 0
        self._flush_scheduled = False
        tail = self._tail
        n = tail - self._taken
        self._taken = tail
        self._in_kernel += n
        # Every published SQE the kernel has not consumed, not only these n:
        # a kick cut short by an interrupt (Ctrl-C at the first instruction
        # of _kick) left its SQEs in the ring, and as each kick submits only
        # its count, oldest first, the newest SQE would then wait for good.
        # (More than n only after such a loss, or beside a concurrent kick,
        # which then finds nothing left.)
        return (tail - self._sq_head.value) & 0xFFFFFFFF  # (tail: _tail, under the lock)

    def plug(self) -> bool:
        """Hold back this thread's submissions until :meth:`unplug`, so that
        a burst costs one ``io_uring_enter`` (one doorbell for the device)
        instead of one each.  Other threads' submissions go at once.  False
        (and nothing to unplug) if another thread holds the plug."""
        return self._plug(None)

    def hold(self, schedule: Callable[[], object]) -> bool:
        """Plug the ring for this thread for good: its submissions are held
        back until :meth:`flush`, and the first one held after each flush
        calls ``schedule()``, which must arrange for a flush soon (an event
        loop's ``call_soon``: everything one loop iteration submits then
        costs one ``io_uring_enter``).  False if another plug is held."""
        return self._plug(schedule)

    def _plug(self, schedule: Callable[[], object] | None) -> bool:
        took = False
        try:
            with self._lock:
                if self._plugged_by is not None:
                    return False
                self._plugged_by = _get_ident()
                took = True
                self._schedule = schedule
                return True
        except BaseException:
            # Ctrl-C as the lock was let go: the caller never learns that it
            # holds the plug, and would never release it.
            if took:
                self.unplug()
            raise

    def unplug(self) -> None:
        """Release the plug and submit what is held back."""
        n = 0
        try:
            with self._lock:
                self._plugged_by = None
                n = self._take()
        finally:  # (even if Ctrl-C lands as the lock is let go: taken, so ours to send)
            self._kick(n)

    def flush(self) -> None:
        """Submit what is held back now.  A thread about to block on a
        request calls this first: a held-back request would never start."""
        n = 0
        try:
            with self._lock:
                n = self._take()
        finally:  # (as in unplug)
            self._kick(n)

    def _push(
        self, opcode: int, fd: int, offset: int, addr: int, length: int, op_flags: int, ident: int
    ) -> None:
        # Under _lock.  The SQE, then the tail; the kernel reads them when
        # someone calls io_uring_enter (see _kick) -- with SQPOLL, its SQ
        # thread as soon as the tail is stored (x86-64 keeps the two stores
        # in that order; see _wake).
        tail = self._tail
        _SQE.pack_into(
            self._sqes,
            (tail & self._sq_mask) * 64,
            opcode, 0, 0, fd, offset, addr, length, op_flags, ident, 0, 0, 0, 0, 0,
        )  # fmt: skip
        self._tail = tail = tail + 1  # (not wrapped: see __init__)
        self._sq_tail.value = tail
        self._free -= 1  # (its CQE gives it back: see _collect)

    def _kick(self, n: int) -> None:
        """Submit ``n`` published SQEs.  Outside the lock: the syscall
        starts the I/O and can take a while.  Concurrent kicks are fine:
        each submits what is there, and together they cover every SQE.

        So one kick can send what another thread took (``_take`` counts
        every published SQE): close()'s STOP, say, which the reaper then
        reaps, releasing the ring, while close() is on its way to kick it.
        The fd is therefore closed by the last kick under way, not under
        it (it was: EBADF, or another file's number by then).  The test
        and the count are plain bytecodes (no other thread comes between),
        as are _release's.

        With SQPOLL the kernel's SQ thread takes published SQEs by itself:
        no system call, unless it went to sleep -- see _wake."""
        if n <= 0 or self._released:
            return
        if self.sqpoll:
            self._wake(n)
            return
        self._kicking += 1
        try:
            while n > 0:
                got = self._enter(_NR_ENTER, self._fd, n, 0, 0, None, 0)
                if got >= 0:
                    n -= got
                    if got == 0:  # pragma: no cover - a concurrent kick took them
                        return
                    continue
                err = ctypes.get_errno()
                if err not in (errno.EINTR, errno.EAGAIN, errno.EBUSY):  # pragma: no cover
                    # The SQEs stay in the ring: the next kick submits them.
                    log.error("io_uring_enter(submit): %s", os.strerror(err))
                    return
        finally:
            self._kicking -= 1
            if self._close_after_kick and not self._kicking:
                self._close_after_kick = False
                os.close(self._fd)

    def _wake(self, n: int) -> None:
        """_kick with SQPOLL: ``n`` (more than 0) SQEs are published and
        not consumed; wake the SQ thread if it sleeps (liburing's
        ``sq_ring_needs_enter``).  Called as _kick is: after a release of
        ``_lock`` that followed the tail's stores.  From the test of
        ``_released`` to the count of this kick, plain bytecodes (the
        flags' ``value`` is a C getter, no call): no other thread releases
        the ring between, and a release after leaves the fd to close to us.

        Ordering.  The SQ thread, going to sleep, sets NEED_WAKEUP, then a
        full barrier, then looks at the SQ tail once more; this side stores
        the tail, then must have a full barrier, then reads the flags:
        either the thread sees the new tail, or this side sees the flag.
        x86-64 (TSO) lets a later load pass an earlier store, so the
        barrier is needed; it is the locked instruction of the lock's
        release between the two -- every caller took the SQEs it kicks
        (``_take``) under ``_lock`` and let it go before calling here, and
        every tail store was made under ``_lock`` by a thread that let it
        go before that ``_take`` (CPython's ``threading.Lock`` release is
        glibc's ``sem_post``: a ``lock cmpxchg``; the pthread-mutex build's
        unlock and 3.13's PyMutex are locked instructions too).  A locked
        instruction is a full barrier on x86-64: the flags' load below is
        not performed before the tail's store is visible to every CPU.
        (The SQE's bytes are stored before the tail, and x86-64 keeps
        stores in order: a thread that sees the tail sees the SQE.)

        ``io_uring_enter`` with SQPOLL only wakes the thread and returns
        ``n``: nothing is submitted by the call, so nothing to count.  A
        Ctrl-C anywhere here leaves the SQEs published, unconsumed while
        the thread sleeps: the next kick finds them (``_take`` counts every
        SQE the kernel did not consume) and wakes it, as a kick cut short
        without SQPOLL leaves them for the next kick to submit."""
        if self._released or not self._sq_flags.value & _SQ_NEED_WAKEUP:
            return  # (awake: it takes them itself)
        self._kicking += 1
        try:
            while True:
                got = self._enter(_NR_ENTER, self._fd, n, 0, _ENTER_SQ_WAKEUP, None, 0)
                if got >= 0:
                    return
                err = ctypes.get_errno()
                if err not in (errno.EINTR, errno.EAGAIN, errno.EBUSY):  # pragma: no cover
                    # (EOWNERDEAD: the SQ thread is gone.)  The SQEs stay
                    # in the ring: the next kick tries again.
                    log.error("io_uring_enter(SQ wakeup): %s", os.strerror(err))
                    return
        finally:
            self._kicking -= 1
            if self._close_after_kick and not self._kicking:
                self._close_after_kick = False
                os.close(self._fd)

    def _wait_sq_room(self) -> bool:
        """SQPOLL, the SQ full: wake the SQ thread and wait until it took
        an SQE (IORING_ENTER_SQ_WAIT).  False if the kernel refused.  A fd
        user as a kick is (see _kick)."""
        if self._released:
            return False
        self._kicking += 1
        try:
            flags = _ENTER_SQ_WAKEUP | _ENTER_SQ_WAIT
            if self._enter(_NR_ENTER, self._fd, 0, 0, flags, None, 0) >= 0:
                return True
            err = ctypes.get_errno()
            if err in (errno.EINTR, errno.EAGAIN, errno.EBUSY):  # pragma: no cover
                return True  # (the caller looks again)
            log.error("io_uring_enter(SQ wait): %s", os.strerror(err))  # pragma: no cover
            return False  # pragma: no cover
        finally:
            self._kicking -= 1
            if self._close_after_kick and not self._kicking:
                self._close_after_kick = False
                os.close(self._fd)

    # -- the reaper ----------------------------------------------------------------------

    def reap(self) -> int:
        """Hand every completion the kernel has posted to its callback, in
        this thread.  Non-blocking; any thread.  Returns how many.

        Completions are handed out in order, each exactly once: if a
        callback raises (any exception, Ctrl-C included), the rest stay
        queued for the next reap.  May be called again from inside a
        callback."""
        plugged = False
        try:
            with self._lock:
                if self._generation != _generation or self._released or self._given_up:
                    return 0  # a forked child (the completions are the parent's), or gone
                self._collect()
                if not self._ready or self._generation != _generation:
                    # (Forked inside _collect -- a collection there ran a
                    # gc callback or a finalizer that forked: what it put on
                    # the ready queue after the fork is the parent's.)
                    return 0
                batch = list(self._ready)
                self.wakeups += 1
                holder = self._plugged_by
                me = _get_ident()
                if holder is None:
                    self._plugged_by = me  # callbacks that submit: one kick for all
                    plugged = True
        except BaseException:  # (Ctrl-C as the lock was let go: the plug is ours)
            if plugged:
                self.unplug()
            raise
        outer: Any = False  # (not looked at yet: nothing to undo)
        after: list[Callable[[], object]] = []
        # How many this reap handed out: -1 (some, maybe: the sleepers get
        # their NOP) until the loop ran to its end.
        handed = -1
        skipped = 0  # (counted instead of those handed: the rare case)
        ready, lock = self._ready, self._lock
        # Each completion is [on_done, res, handed]: `handed` turns True just
        # before its callback is called, in a test-and-set of plain bytecodes
        # (no other thread and no interrupt comes between the test and the
        # store), so each is handed out once, by whichever reap gets to it
        # first: this one, a nested one (a callback that waits), another
        # thread's.  An exception leaves the rest to the next reap, with
        # nothing to give back.
        try:
            outer = getattr(_batch, "after", None)  # a reap inside a callback's wait
            if outer is not None:
                after = outer
            _batch.after = after
            for item in batch:
                # (A callback that forked: in the child, the rest is the
                # parent's, marked handed out there: _after_fork_in_child.)
                on_done, res, was_handed = item
                if was_handed is None:
                    item[2] = True
                    on_done(res)
                else:
                    skipped += 1  # (by a nested reap, or another thread's)
            handed = len(batch) - skipped
        finally:
            # (Each step even if Ctrl-C lands in the one before.)
            try:
                if outer is None:
                    _batch.after = None
                    # Even if a callback raised: what the callbacks that ran
                    # asked for (a front end's waiters woken, once per
                    # batch) is owed all the same.  Each is taken before it
                    # is called: called once.
                    while after:
                        fn = after.pop(0)
                        try:
                            fn()
                        except Exception:
                            log.exception("exception in after-batch call %r", fn)
            finally:
                # One hold of the lock for the queue's clean-up, the plug's
                # release (unplug), what was held back (flush) and the NOP
                # for sleepers (_nop_for_sleepers), then one kick for all.
                n = 0
                try:
                    with lock:
                        try:
                            # The handed-out completions are always a prefix
                            # of the queue (each reap hands out in order, one
                            # only once all before it were), so where the
                            # last is handed out, all are.  (A callback that
                            # raised was called: handed out.)
                            if ready and ready[-1][2] is True:
                                ready.clear()
                            else:
                                while ready and ready[0][2] is True:
                                    ready.popleft()
                        finally:
                            # Whoever reaps submits what was held back (see
                            # submit), unless this thread's own plug will do
                            # it when released.
                            take = plugged or holder != me
                            if plugged:
                                self._plugged_by = None
                            try:
                                if handed and self._sleepers and self._nop_for_sleepers():
                                    take = True
                            finally:  # (what is held back, even if Ctrl-C lands in the NOP)
                                if take:
                                    n = self._take()
                finally:  # (even if Ctrl-C lands as the lock is let go: ours to send)
                    self._kick(n)
        return handed

    def _collect(self) -> None:
        # Under _lock: move the posted CQEs to _ready and give the slots back.
        head = self._cq_head.value
        tail = self._cq_tail.value
        if head == tail:
            return
        count = (tail - head) & 0xFFFFFFFF
        mm, mask, base = self._cq_mm, self._cq_mask, self._cqes
        # The posted CQEs: one run of the array, or two where it wraps.
        first = head & mask
        end = first + count
        if end <= mask + 1:
            raw = mm[base + first * 16 : base + end * 16]
        else:
            raw = (
                mm[base + first * 16 : base + (mask + 1) * 16]
                + mm[base : base + (end - mask - 1) * 16]
            )
        idents, results = zip(*_CQE_IDENT_RES.iter_unpack(raw), strict=True)
        pending = self._pending
        # The batch's callbacks, for a fork during the move below (see
        # _moving), made before anything leaves _pending; those with none
        # (the STOP, a kick's NOP, an abandoned ring's cancels) counted
        # before anything changes.
        self._moving = moving = list(map(pending.get, idents))
        skipped = moving.count(None)
        # Each CQE's callback out of _pending and onto the ready queue as
        # [callback, result, None] (one with no callback left out: a
        # callback is always true), all in one C call, which no interrupt
        # (Ctrl-C) and no other thread comes into -- one lands only as a
        # call returns -- so a callback is in _pending or on the ready
        # queue at every point another thread (a fork) or an interrupt
        # can see -- or, if a collection inside it lets another thread run
        # (Python code: a gc callback, a finalizer), in ``_moving``.  The
        # counters and the head change after it, together, in plain
        # bytecodes.  (No Python step per CQE: a burst costs the same few
        # as one.)
        try:
            self._ready.extend(
                filter(
                    _callback_of,
                    map(
                        list,
                        zip(
                            map(pending.pop, idents, _repeat(None)),
                            results,
                            _repeat(None),
                            strict=False,
                        ),
                    ),
                )
            )
        finally:
            self._moving = ()  # (each one on _ready now)
            if skipped and _STOP in idents:
                self._stopped = True
            self._in_kernel -= count
            self._free += count
            self.reaped += count - skipped
            self._cq_head.value = tail  # the kernel may reuse those CQEs now
        opens = self._opens
        if opens:
            opens.difference_update(idents)  # (see _abandon)

    def _nop_for_sleepers(self) -> bool:
        """Under _lock, after handing out completions: threads asleep in
        wait() may have been waiting for one of them, and the CQE that
        would have woken them is gone.  A NOP posts another (unless what is
        held back wakes them).  True if there are sleepers: the caller then
        takes and kicks."""
        if not self._sleepers or self._closing or self._generation != _generation:
            return False
        # Only into room in the SQ: its fill, not the count nobody took --
        # a submitter between its take and its kick (a burst held for the
        # reaper goes at KICK_AT) leaves the SQ full with nothing untaken,
        # and the NOP went over the oldest SQE (that request never ran).
        # Full, what is in it wakes them once sent, as does what is held.
        if (self._tail - self._sq_head.value) & 0xFFFFFFFF < self.entries:
            self._push(OP_NOP, -1, 0, 0, 0, 0, _KICK)
        return True

    def wait(self, timeout: float | None = None, ready: Callable[[], bool] | None = None) -> None:
        """Block until ``ready()`` may have become true: a completion was
        posted (it may be reaped by another thread first; that thread then
        wakes us), or ``timeout`` seconds passed.  Call :meth:`reap` after.

        Any thread may wait, the reaper thread too (from a callback): a
        waiter counts as a sleeper from before it checks ``ready()`` until
        it returns, and every reap that hands out completions while there
        are sleepers posts a NOP, so no wakeup is lost between the check and
        the sleep."""
        self.flush()
        if self._generation != _generation or self._released:
            return
        me_reaper = self._reaper is not None and self._reaper.ident == _get_ident()
        counted = False
        held = False
        n = 0
        try:
            # (Counted and uncounted in one try: a Ctrl-C as the lock is let
            # go left a sleeper counted for good, and every later reap
            # posted a NOP -- a system call and a wakeup -- for nobody.)
            with self._lock:
                self._sleepers += 1
                counted = True
                if me_reaper:
                    # Asleep inside a callback: submissions must not wait for
                    # the end of this pass, which waits for them.
                    held, self._reaper_holds = self._reaper_holds, False
                    n = self._take()
            self._kick(n)
            with self._lock:
                if self._released:
                    return
                posted = self._cq_head.value != self._cq_tail.value
            if (ready is not None and ready()) or posted or self._released:
                return
            # Counted as a user of the fd, as a kick is (see _kick): a
            # release meanwhile leaves its close to us.
            self._kicking += 1
            try:
                self._wait(timeout)
            finally:
                self._kicking -= 1
                if self._close_after_kick and not self._kicking:
                    self._close_after_kick = False
                    os.close(self._fd)
        finally:
            if counted:
                with self._lock:
                    self._sleepers -= 1
                    if me_reaper:
                        self._reaper_holds = held

    def abandon_in_child(self) -> None:
        """In a forked child: let go of this process's copies of the ring
        (mappings, fd) without touching the kernel state the parent uses.
        The lock may have been held at the fork by a thread that does not
        exist here: it is replaced first."""
        self._lock = threading.Lock()
        self._closing = True
        self._room = 0  # (submit's one test: see __init__)
        self._release()

    def is_reaper(self) -> bool:
        """True in this ring's reaper thread (reaper mode only)."""
        return self._reaper is not None and self._reaper.ident == _get_ident()

    def _wait(self, timeout: float | None) -> int:
        """io_uring_enter(GETEVENTS) for one completion, with a timeout."""
        return _wait_for_one(self._enter, self._fd, timeout)

    @property
    def owner_mode(self) -> bool:
        """True if the owner reaps (no reaper thread)."""
        return self._reaper is None

    # -- shutdown ------------------------------------------------------------------------

    def close(self) -> None:
        """Stop taking submissions.  The reaper finishes what is in flight,
        then releases the ring; :meth:`join` waits for that.  In owner mode
        the ring is released at once -- unless operations are still in
        flight (the owner did not reap them): those are given up on (see
        :meth:`_abandon`), and it is released once they came back."""
        if self._given_up:
            # (A close cut short by Ctrl-C while giving up: finished here.)
            self._abandon()
            return
        n = 0
        try:
            with self._lock:
                if self._given_up:
                    return  # (released once what it gave up on came back)
                if (
                    self._reaper is not None
                    and not self._closing
                    and self._generation == _generation
                    and (self._tail - self._sq_head.value) & 0xFFFFFFFF >= self.entries
                ):
                    # The SQ is full of SQEs not sent yet (held back by a
                    # plug, or for the reaper): the STOP would go over the
                    # oldest (that operation never runs, and the reaper
                    # never finishes).  Sent first, then the STOP below.
                    n = self._take()
            if n:
                n, m = 0, n
                self._kick(m)  # (consumed once it returns; with SQPOLL, see below)
            forced = False
            while True:
                with self._lock:
                    if self._given_up:
                        return
                    if self._reaper is None or self._generation != _generation:
                        # Owner mode, or a forked child (no reaper here): nothing
                        # will use the ring again.  (Also what finishes a close
                        # that a Ctrl-C cut short.)
                        self._closing = True
                        self._room = 0  # (submit's one test: see __init__)
                        if not self._pending or self._generation != _generation:
                            self._release()
                            return
                        break  # (given up on, below: outside the lock)
                    elif self._closing:
                        # A close cut short (Ctrl-C as _take was entered, say)
                        # left its STOP published but not sent, and the reaper
                        # asleep for good: send what is published.
                        n = self._take()
                        return
                    elif not (
                        self.sqpoll
                        and not forced
                        and (self._tail - self._sq_head.value) & 0xFFFFFFFF >= self.entries
                    ):
                        self._push(OP_NOP, -1, 0, 0, 0, 0, _STOP)
                        # Closing only once the STOP is published (a Ctrl-C
                        # before leaves it open, for the next close to
                        # finish), ...
                        self._closing = True
                        self._room = 0  # (submit's one test: see __init__)
                        n = self._take()
                        return
                # SQPOLL, the SQ still full: the kick above only woke the SQ
                # thread, which may not have taken any yet (or it filled
                # again since), and the STOP would go over the oldest SQE
                # not consumed.  Room first.  (Refused: pushed as before.)
                forced = not self._wait_sq_room()
        finally:
            self._kick(n)  # ... and sent even if Ctrl-C lands as the lock is let go
        self._abandon()

    def join(self, timeout: float | None = None) -> bool:
        """Wait until the reaper released the ring; False on timeout."""
        reaper = self._reaper
        if reaper is None or reaper is threading.current_thread():
            return True
        reaper.join(timeout)
        return not reaper.is_alive()

    def __del__(self) -> None:
        # Collected unreleased: its construction was cut short (by an
        # interrupt), or its owner was collected without closing it.  In
        # owner mode with operations in flight only together with every
        # request in it, as a request holds its context, which holds the
        # ring: nobody can see them, so they are given up on.  In reaper
        # mode the thread gets it back, to finish as after close().
        if "_fd_closed" not in self.__dict__:
            # Cut short between io_uring_setup and the store of its fd.
            made = self.__dict__.get("_made_fd")
            if made and made[0] >= 0:
                fd = made.pop()
                os.close(fd)
            return
        if self._fd_closed:
            return
        reaper = self.__dict__.get("_reaper")
        if reaper is not None and reaper.is_alive() and self._generation == _generation:
            self._reaper_box.append(self)  # (kept: the thread releases it as it ends)
            self._boxed.set()
            self.close()
            return
        if self.__dict__.get("_pending") and self._generation == _generation:
            self._abandon()  # (keeps it, and what its callbacks pin, for now)
            return
        try:
            self._release()
        except AttributeError:  # (cut short before its mappings were made)
            self._fd_closed = True
            os.close(self._fd)

    def _abandon(self) -> None:
        """Give up on the operations in flight, whose owner let go of them
        (collected, or closed the ring without reaping them): ask the kernel
        to cancel each, keep the ring -- and the buffers its callbacks pin --
        in :data:`_abandoned`, and release it once they all came back: at
        once for what the kernel cancels at once (a read waiting on a pipe
        or socket, an operation not started), after at most
        :data:`ABANDON_WAIT` for a transfer under way, or else at a later
        sweep.  Their callbacks are never called: a finalizer runs in
        whatever thread the collector happens to run in, and nobody can see
        those requests any more.  Any thread, once."""
        _abandoned.add(self)  # (first: from here on the ring and its pins stay)
        n = 0
        try:
            with self._lock:
                if self._released:
                    self._release()  # (one cut short by Ctrl-C: finished)
                    return
                if not self._given_up:
                    # (Given up on last: a Ctrl-C before leaves it all for
                    # the next close, or the finalizer, to do again; one
                    # after, the cancels not pushed yet -- see _to_cancel.)
                    self._to_cancel = list(self._pending)
                    self._closing = True  # (nothing is submitted from now on)
                    self._room = 0  # (submit's one test: see __init__)
                    self._ready.clear()  # (completed: the kernel is done with their memory)
                    for ident in self._opens:
                        # An fd the kernel opens for nobody from now on is closed.
                        # (The callback kept: it pins what the kernel may read.)
                        on_done = self._pending.get(ident)
                        if on_done is not None and not (
                            type(on_done) is functools.partial and on_done.func is _close_opened
                        ):
                            self._pending[ident] = functools.partial(_close_opened, on_done)
                    self._given_up = True
                self._push_cancels()
                n = self._take()
        finally:
            self._kick(n)
        # The SQ had no room for every cancel: SQEs not consumed yet filled
        # it (held back by a plug, or -- SQPOLL -- published while the SQ
        # thread slept: the kick only woke it).  Those left without one
        # waited for good (a read on a pipe: the ring, its fd, its SQ
        # thread and what its callbacks pin, never released).  The rest
        # once there is room: at once after a plain ring's kick (it
        # consumed the SQ), once the SQ thread took some with SQPOLL.
        #
        # A Ctrl-C anywhere here leaves the rest in _to_cancel: the next
        # close() pushes them (lost, they waited for good, and a second
        # close() returned at once).
        pushed = 0
        while self._to_cancel:
            if self.sqpoll and not self._wait_sq_room():
                break  # pragma: no cover  (refused: as before)
            n = 0
            try:
                with self._lock:
                    if self._released:
                        break
                    pushed = self._push_cancels()
                    n = self._take()
            finally:
                self._kick(n)
            if not pushed and not self.sqpoll:
                break  # (the kick failed: the SQ stays full)
        self._reap_abandoned(ABANDON_WAIT)

    def _push_cancels(self) -> int:
        """Under _lock: an ASYNC_CANCEL for each of ``_to_cancel`` still
        in flight, as many as the SQ has room for (see _nop_for_sleepers),
        each taken off the list once pushed (a Ctrl-C between: pushed
        twice, the second finds nothing); how many it pushed."""
        room: int = max(self.entries - ((self._tail - self._sq_head.value) & 0xFFFFFFFF), 0)
        left, pending = self._to_cancel, self._pending
        pushed = 0
        while left and pushed < room:
            ident = left[0]
            if ident in pending:
                self._push(OP_ASYNC_CANCEL, -1, 0, ident, 0, 0, _KICK)
                pushed += 1
            del left[0]
        return pushed

    def _reap_abandoned(self, timeout: float) -> None:
        """An abandoned ring: drop what came back, and release the ring once
        nothing is out; wait at most ``timeout`` seconds for that."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if self._released:
                    return
                self._collect()
                ready = self._ready
                while ready:
                    on_done, res, _ = ready.popleft()
                    if type(on_done) is functools.partial and on_done.func is _close_opened:
                        on_done(res)  # (the rest are never called: see _abandon)
                if not self._pending:
                    self._release()
                    return
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._wait(left)

    def _release(self) -> None:
        # Every step may be repeated but the fd's close, which is marked
        # done before it is called: a second call finishes what a Ctrl-C
        # (as a call returned) cut short, and never closes a number twice.
        _abandoned.discard(self)
        if self._fd_closed:
            return
        self._released = True
        # ctypes views into the mappings must go before the mappings can close.
        for name in ("_sq_head", "_sq_tail", "_sq_flags", "_cq_head", "_cq_tail"):
            self.__dict__.pop(name, None)
        for mm in (self._sqes, self._cq_mm, self._sq_mm):  # (the CQ's may be the SQ's)
            # BufferError: a view of it is still alive -- one in the frame of
            # a construction cut short by Ctrl-C, freed after the ring (its
            # `self`).  The mapping goes with that view; the fd below must
            # not stay open for it (it did).
            with contextlib.suppress(BufferError):
                mm.close()
        self._fd_closed = True
        if self._kicking:
            self._close_after_kick = True  # (see _kick)
            return
        os.close(self._fd)
