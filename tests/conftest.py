from __future__ import annotations

import dis
import gc
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import CodeType, FrameType
from typing import Any

import pytest

from threadlets import ThreadletQueue
from threadlets.probe import capability_note, portable, probe_io_uring

# A suite started in the background of a shell script (`pytest &`, or under
# a CI runner that does so) inherits SIGINT ignored: Python then installs no
# KeyboardInterrupt handler, here or in any child, and every test of Ctrl-C
# waits for an interrupt that never comes.  The tests are about what the
# library does with Ctrl-C, so they get Python's default: children then
# start with SIGINT at its default and install their own handler.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait for a condition that another thread makes true (not for time).

    Used only where the library offers nothing to block on (a worker
    retiring); fails the test if it does not happen within ``timeout``.
    """
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition did not become true in time")
        time.sleep(0.001)


class Gate:
    """Work that blocks until released, and tells when it started."""

    def __init__(self, value: object = None) -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        self.value = value
        self.runs = 0

    def __call__(self) -> object:
        self.runs += 1
        self.started.set()
        if not self.release.wait(timeout=30):
            raise AssertionError("gate was never released")
        return self.value


#: Whether the io_uring backend runs here (its syscall numbers are x86-64's).
HAVE_RING = probe_io_uring().supported and os.uname().machine == "x86_64"


@pytest.fixture(params=["threads", "io_uring"])
def backend(request: pytest.FixtureRequest) -> str:
    """The engine's backends, each test once per backend (io_uring skipped
    where it does not run).  Modules with other backends override it."""
    if request.param == "io_uring" and not HAVE_RING:
        pytest.skip("no io_uring here")
    return str(request.param)


@pytest.fixture
def switchy() -> Iterator[None]:
    """Widen races: switch threads as often as the interpreter can."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(old)


@pytest.fixture
def queue() -> Iterator[ThreadletQueue]:
    q = ThreadletQueue(max_threads=4, name="test")
    yield q
    assert q.close(timeout=10)


#: The contents of the ``path`` fixture's file: 16 KiB of a known pattern.
PATTERN = bytes(range(256)) * 64


@pytest.fixture
def path(tmp_path: Path) -> Path:
    """A file holding PATTERN (a module may override it with other data)."""
    p = tmp_path / "data"
    p.write_bytes(PATTERN)
    return p


@pytest.fixture
def fd(path: Path) -> Iterator[int]:
    """``path`` opened read-write; closed after the test."""
    fd = os.open(path, os.O_RDWR)
    yield fd
    os.close(fd)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "linux_only(capability): the test needs a Linux-only capability (a field of "
        "threadlets.probe.Capabilities: io_uring, rwf_nowait, o_direct, eventfd, openat2); "
        "skipped in portable mode (THREADLETS_PORTABLE=1)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """THREADLETS_SHUFFLE_SEED=N runs the tests in a random order (seeded):
    tools/soak-tests uses it to find tests that depend on each other.
    In portable mode the tests of Linux-only capabilities are skipped."""
    if portable():
        for item in items:
            reason = _needs_linux(item)
            if reason:  # first: the test's own skipif would give a vaguer reason
                item.add_marker(pytest.mark.skipif(True, reason=reason), append=False)
    seed = os.environ.get("THREADLETS_SHUFFLE_SEED")
    if seed:
        import random

        random.Random(int(seed)).shuffle(items)


#: Tests of a Linux-only capability that do not skip themselves where it is
#: off, by file::test (every parametrisation), file::test[id] or file (the
#: module).  Prefer ``@pytest.mark.linux_only("capability")`` in new tests.
_LINUX_ONLY = {
    "io_uring": ("test_uring.py", "test_uring_model.py"),
    "rwf_nowait": (
        "test_engine.py::test_read_write_roundtrip[True]",
        "test_engine.py::test_inline_read_completes_at_submit_but_calls_back_later",
        "test_engine.py::test_cancel_inline_completed_is_alldone",
        "test_engine.py::test_a_short_inline_attempt_is_resumed_by_a_worker",
        "test_lifecycle.py::test_a_failed_close_keeps_what_the_context_knows",
        "test_posix.py::test_ctrl_c_in_the_submission_leaves_nothing_in_progress",
    ),
    "o_direct": (
        "test_attack_direct.py::test_regular_file_reads_and_writes_equal_preadv_pwritev"
        "[threads-direct]",
        "test_bench.py::test_quick_bench_harness",  # expects the O_DIRECT workload's rows
        "test_nbd_server.py::test_direct_export_advertises_its_alignment_and_serves_unaligned_io",
        "test_nbd_interop.py::test_direct_export_says_its_alignment",
        "test_nbd_interop.py::test_direct_unaligned_qemu_io_reads_and_writes",
        "test_nbd_interop.py::test_direct_qemu_img_convert_and_compare",
        "test_nbd_libnbd.py::test_direct_unaligned_requests_work",
        "test_ops.py::test_packet_mode_pipe_is_a_stream",  # pipe2(os.O_DIRECT)
        "test_stress.py::test_short_run_of_each_mode[direct]",
        "test_stress.py::test_short_run_of_each_mode[io_uring-direct]",
        "test_stress.py::test_block_device[direct-threads]",
        "test_stress.py::test_block_device[direct-auto]",
    ),
}


def _needs_linux(item: pytest.Item) -> str:
    """Why ``item`` cannot run in portable mode, or "" if it can: it is
    marked ``linux_only``, listed in _LINUX_ONLY, run with the io_uring
    backend (a parameter -- of a fixture or of the test -- "io_uring"), or
    parametrised ``direct=True``."""
    marker = item.get_closest_marker("linux_only")
    if marker is not None:
        return capability_note(str(marker.args[0]))
    callspec = getattr(item, "callspec", None)
    if callspec is not None and "io_uring" in [
        v for v in callspec.params.values() if isinstance(v, str)
    ]:
        return capability_note("io_uring")
    if callspec is not None and callspec.params.get("direct") is True:
        return capability_note("o_direct")  # (a test parametrised direct=True)
    module = item.path.name
    name = f"{module}::{item.name}"
    for capability, listed in _LINUX_ONLY.items():
        for entry in listed:
            if entry in (module, name) or name.startswith(entry + "["):
                return capability_note(capability)
    return ""


def interrupt_cli_at(
    args: list[str],
    marker: str,
    cwd: Path,
    env: dict[str, str] | None = None,
    timeout: float = 120,
    sig: int = 2,  # SIGINT
) -> tuple[int, str, str]:
    """Run ``python -m threadlets.cli ARGS``; send ``sig`` (SIGINT) once a
    line of its stderr holds ``marker`` (waiting for that line, never for
    time).  Returns (exit status, stdout, stderr)."""
    import queue
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryFile("w+") as stdout:
        proc = subprocess.Popen(
            [sys.executable, "-m", "threadlets.cli", *args],
            cwd=cwd,
            env=env,
            stdout=stdout,
            stderr=subprocess.PIPE,
            text=True,
        )
        lines: queue.Queue[str | None] = queue.Queue()
        err: list[str] = []

        def read() -> None:
            assert proc.stderr is not None
            for line in proc.stderr:
                err.append(line)
                lines.put(line)
            lines.put(None)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            while True:
                line = lines.get(timeout=timeout)  # a safety net only
                assert line is not None, f"ended before {marker!r}:\n{''.join(err)}"
                if marker in line:
                    break
            proc.send_signal(sig)
            status = proc.wait(timeout=timeout)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        reader.join(timeout=60)
        stdout.seek(0)
        return status, stdout.read(), "".join(err)


def interrupt_at_c_return(n: int, only: str | None = None) -> list[int]:
    """Raise KeyboardInterrupt once, as the n-th C call returns from now on:
    where CPython 3.11's eval loop raises a pending SIGINT (besides function
    entry, the residual window the engine documents).  Counts the calls
    made by threadlets' code, or with ``only`` by that one file's."""
    seen = [0]
    # The garbage collector is off while armed: a finalizer it would run
    # meanwhile (an abandoned AioContext's, a WeakSet's callback) is
    # threadlets code too, and what the profiler raised there would only be
    # printed -- the finalizer cut short, the interrupt never reaching the
    # code under test.  On again when it fires, or after the test
    # (_collector_back_on).
    _collector_off[0] = True
    gc.disable()

    def prof(frame: Any, event: str, arg: object) -> None:
        name = frame.f_code.co_filename
        if event == "c_return" and (name == only if only else "threadlets" in name):
            seen[0] += 1
            if seen[0] == n:
                sys.setprofile(None)
                _collector_off[0] = False
                gc.enable()
                raise KeyboardInterrupt

    sys.setprofile(prof)
    return seen


_collector_off = [False]


def call_interrupted_at(n: int, fn: Callable[..., object], *args: Any, **kwargs: Any) -> list[int]:
    """``fn(*args, **kwargs)`` with a KeyboardInterrupt armed at the n-th C
    return (see interrupt_at_c_return), swallowed if it lands; the profiler
    and the collector are back on after.  Returns interrupt_at_c_return's
    count of C returns seen."""
    seen = interrupt_at_c_return(n)
    try:
        fn(*args, **kwargs)
    except KeyboardInterrupt:
        pass
    finally:
        sys.setprofile(None)
        gc.enable()
    return seen


@pytest.fixture(autouse=True)
def _collector_back_on() -> Iterator[None]:
    """After a test that armed interrupt_at_c_return and never let it fire."""
    yield
    if _collector_off[0]:
        sys.setprofile(None)
        _collector_off[0] = False
        gc.enable()


@pytest.fixture
def young_gc() -> Iterator[None]:
    """For a test that collects garbage at each of hundreds of points: what
    was alive before it is frozen (gc.freeze), so a collection walks only
    what the test made.  Late in the whole suite a full collection walks
    everything earlier tests left to the interpreter, and such sweeps ran
    ten times slower than alone (53 s against 5 s).  Nothing the test makes
    escapes collection, and a leak still shows: freezing only makes the
    collector do less, never release more."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def renew_notifier(ctx: object) -> None:
    """Put a working notifier back under a context whose descriptor was
    closed behind its back (the tests of a double close elsewhere): a new
    eventfd on its number, or in portable mode a new pipe on both of its
    numbers -- the context then signals, waits and closes as before."""
    n = ctx._cq.notifier  # type: ignore[attr-defined]
    if n._rfd == n._wfd:
        fresh = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)]
        targets = [n._rfd]
    else:
        fresh = list(os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC))
        targets = [n._rfd, n._wfd]
    for new, number in zip(fresh, targets, strict=True):
        if new != number:  # (the closed number is the first free one: it may be new's)
            os.dup2(new, number, inheritable=False)
            os.close(new)


def stray_write(ctx: object) -> None:
    """Write into a context's notifier as a stray writer would (code
    writing to an fd number it had closed): an eventfd's write end is its
    fileno(); a pipe's (portable mode) is the other end."""
    notifier = ctx._cq.notifier  # type: ignore[attr-defined]
    os.write(notifier._wfd, (1).to_bytes(8, sys.byteorder))


# -- rings for the SQPOLL tests (tests/test_attack_brk6.py, test_attack_brk7.py, test_sqpoll.py) --


def ring_or_skip(entries: int, sqpoll: bool, eventfd: int | None = None) -> Any:
    """A ``uring.Ring`` (owner mode with ``eventfd``), skipping the test
    where there is no ring or the kernel refused the SQPOLL asked for."""
    from threadlets import uring

    if not HAVE_RING:
        pytest.skip("no io_uring here")
    ring = uring.Ring(entries, eventfd=eventfd, sqpoll=sqpoll)
    if sqpoll and not ring.sqpoll:
        ring.close()
        pytest.skip("the kernel refused IORING_SETUP_SQPOLL here")
    return ring


def sq_thread_asleep(ring: Any) -> bool:
    """An SQPOLL ring's kernel thread went to sleep (IORING_SQ_NEED_WAKEUP)."""
    from threadlets import uring

    return bool(ring._sq_flags.value & uring._SQ_NEED_WAKEUP)


@pytest.fixture
def pipe_fds() -> Iterator[tuple[int, int]]:
    """A pipe (read end, write end), closed after the test."""
    r, w = os.pipe()
    try:
        yield r, w
    finally:
        os.close(r)
        os.close(w)


def interrupt_after_call(
    n: int, codes: set[CodeType], fn: Callable[[], object], at_entry: bool = False
) -> int:
    """``fn()``, raising KeyboardInterrupt once, at the n-th instruction
    that follows a call -- of anything: a Python function, a builtin, a
    ctypes function -- in a frame running one of ``codes`` (with
    ``at_entry``, also at the entry of one: its RESUME), where CPython
    3.11 raises a pending SIGINT (interrupt_at_c_return's profiler sees
    builtins only, not ctypes' calls).  Returns how many such points there
    were (n or more: it fired).  The collector is off meanwhile: no
    finalizer of an earlier round runs traced."""
    seen = [0]
    last: dict[int, str] = {}
    raw = {code: code.co_code for code in codes}
    before_entry = "CALL" if at_entry else None

    def local(frame: FrameType, event: str, arg: object) -> object:
        if event == "opcode":
            op = dis.opname[raw[frame.f_code][frame.f_lasti]]
            if last.get(id(frame), before_entry) == "CALL":
                seen[0] += 1
                if seen[0] == n:
                    sys.settrace(None)
                    frame.f_trace = None
                    raise KeyboardInterrupt
            last[id(frame)] = op
        return local

    def tracer(frame: FrameType, event: str, arg: object) -> object:
        if frame.f_code in raw:
            frame.f_trace_opcodes = True
            last.pop(id(frame), None)  # (a new frame: an old one's id may be reused)
            return local
        return None

    gc.disable()
    sys.settrace(tracer)
    try:
        fn()
    except KeyboardInterrupt:
        pass
    finally:
        sys.settrace(None)
        gc.enable()
    return seen[0]
