"""Attack round 7 on the front ends and tools: the NBD server (a block
device in use, --bind's port, silent clients at shutdown, option replies a
client never reads), every number on the command line, oneshot's inline
open (a NUL in the path), the aiofiles drop-in (open/tempfile with
``executor=`` and scandir cancelled while they ran), POSIX AIO
(SIGEV_THREAD functions that wait, zero-length transfers on every kind of
fd against glibc) and Ctrl-C while the ``threadlets`` command imports.
Each test failed on the code before its fix, except those marked
non-regression."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import gc
import logging
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import threadlets
import threadlets.posix as px
from threadlets import AioContext, RingUnavailable, aiofiles
from threadlets.nbd import proto
from threadlets.nbd.proto import Cmd
from threadlets.nbd.server import open_export, parse_bind
from threadlets.oneshot import open_cached

from . import glibc_aio
from .test_asyncfile import anyio_backend
from .test_nbd_server import TIMEOUT, Client, ServerThread

__all__ = ["anyio_backend"]  # fixture used by name

ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


# -- 1. nbd serve: a block device in use is refused (O_EXCL) -------------------------------


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[str]:
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        pytest.skip("needs root and losetup")
    backing = tmp_path / "backing.img"
    backing.write_bytes(b"\xab" * (1 << 20))
    made = subprocess.run(
        ["losetup", "-f", "--show", str(backing)], capture_output=True, text=True, check=False
    )
    if made.returncode != 0:
        pytest.skip(f"losetup: {made.stderr.strip()}")
    dev = made.stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


def test_open_export_refuses_a_block_device_in_use(loop_device: str) -> None:
    held = os.open(loop_device, os.O_RDONLY | os.O_EXCL)  # as a mount holds it
    try:
        for read_only in (False, True):
            with pytest.raises(OSError) as e:
                open_export(loop_device, read_only=read_only)
            assert e.value.errno == errno.EBUSY
            assert "in use" in str(e.value)
    finally:
        os.close(held)
    export = open_export(loop_device)
    try:
        assert export.info.size == 1 << 20
        # ... and while served, nobody mounts it under the clients.
        with pytest.raises(OSError) as e:
            os.close(os.open(loop_device, os.O_RDONLY | os.O_EXCL))
        assert e.value.errno == errno.EBUSY
    finally:
        export.close()


def test_nbd_serve_cli_refuses_a_block_device_in_use(loop_device: str, tmp_path: Path) -> None:
    held = os.open(loop_device, os.O_RDONLY | os.O_EXCL)
    try:
        out = subprocess.run(
            [
                *(sys.executable, "-m", "threadlets.cli", "nbd", "serve", loop_device),
                *("--socket", str(tmp_path / "s")),
            ],
            capture_output=True,
            text=True,
            env=ENV,
            check=False,
            timeout=60,
        )
    finally:
        os.close(held)
    assert out.returncode == 1, out.stderr
    assert "Device or resource busy" in out.stderr
    assert "in use" in out.stderr
    assert not (tmp_path / "s").exists()


def test_open_export_of_a_regular_file_still_works_with_o_excl(tmp_path: Path) -> None:
    """Non-regression: O_EXCL without O_CREAT means nothing for a file."""
    p = tmp_path / "img"
    p.write_bytes(bytes(8192))
    a = open_export(p)
    b = open_export(p, read_only=True)  # twice at once: no exclusion
    a.close()
    b.close()


# -- 2. --bind / parse_bind: ASCII decimal ports only ----------------------------------------

BAD_PORTS = ["h:+80", "h:1_000", "h: 80", "h:80 ", "h:٨٠", "[::1]:+80", ":٨٠", "h:", "[::1]:"]
BAD_PORTS += ["h:-0", "h:0x50", "h:65536", "h:\t80", "h:\uff18\uff10"]


@pytest.mark.parametrize("text", BAD_PORTS)
def test_parse_bind_takes_ascii_decimal_ports_only(text: str) -> None:
    with pytest.raises(ValueError, match="port"):
        parse_bind(text)


@pytest.mark.parametrize("text", BAD_PORTS)
def test_bind_option_refuses_odd_ports_as_usage_errors(
    text: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from threadlets import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["nbd", "serve", "/dev/null", "--bind", text])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--bind" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("h:0", ("h", 0)),
        ("h:00080", ("h", 80)),
        ("[::1]", ("::1", 10809)),
        (":65535", ("127.0.0.1", 65535)),
    ],
)
def test_parse_bind_good_ports(text: str, want: tuple[str, int]) -> None:
    assert parse_bind(text) == want


# -- 3. oneshot: a NUL in a path is ValueError, never a truncated path ----------------------


@pytest.mark.parametrize("kind", [str, bytes])
def test_open_cached_refuses_an_embedded_nul(tmp_path: Path, kind: type) -> None:
    (tmp_path / "a").write_bytes(b"the wrong file")
    name = str(tmp_path / "a") + "\0b"
    path = name if kind is str else os.fsencode(name)
    before = open_fds()
    with pytest.raises(ValueError) as want:
        os.open(path, os.O_RDONLY)  # the oracle
    with pytest.raises(ValueError) as got:
        open_cached(path, os.O_RDONLY)
    assert str(got.value) == str(want.value)
    assert open_fds() == before


@pytest.mark.anyio
async def test_whole_file_helpers_refuse_an_embedded_nul(
    tmp_path: Path, anyio_backend: Any
) -> None:
    (tmp_path / "a").write_bytes(b"the wrong file")
    name = str(tmp_path / "a") + "\0b"
    for path in (name, os.fsencode(name), Path(name)):
        with pytest.raises(ValueError, match="embedded null"):
            await threadlets.read_bytes(path)
        with pytest.raises(ValueError, match="embedded null"):
            await threadlets.read_text(path)
        with pytest.raises(ValueError, match="embedded null"):
            await threadlets.write_bytes(path, b"x")
        with pytest.raises(ValueError, match="embedded null"):
            await threadlets.write_text(path, "x")
    with pytest.raises(ValueError, match="embedded null"):
        await threadlets.Path(name).read_bytes()
    assert (tmp_path / "a").read_bytes() == b"the wrong file"
    assert sorted(os.listdir(tmp_path)) == ["a"]


# -- 4. aiofiles: open(executor=...) cancelled while opening closes the file ----------------


@pytest.mark.parametrize("kind", ["open", "tempfile"])
def test_aiofiles_open_on_an_executor_cancelled_while_opening_closes_the_file(
    tmp_path: Path, kind: str
) -> None:
    started, release = threading.Event(), threading.Event()
    opened: list[int] = []

    def opener(path: str, flags: int) -> int:
        started.set()
        release.wait(TIMEOUT)
        fd = os.open(path, flags, 0o666)
        opened.append(fd)
        return fd

    async def main(ex: concurrent.futures.Executor) -> None:
        if kind == "open":
            make = aiofiles.open(tmp_path / "f", "w", opener=opener, executor=ex)
        else:
            # (The tempfile drop-in has no opener=: its call blocks instead.)
            real = __import__("tempfile").TemporaryFile

            def slow(*a: Any, **k: Any) -> Any:
                started.set()
                release.wait(TIMEOUT)
                f = real(*a, **k)
                opened.append(f.fileno())
                return f

            mp = pytest.MonkeyPatch()
            mp.setattr("tempfile.TemporaryFile", slow)
            make = aiofiles.tempfile.TemporaryFile(dir=tmp_path, executor=ex)
        task = asyncio.ensure_future(make)
        await asyncio.get_running_loop().run_in_executor(None, started.wait, TIMEOUT)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        release.set()
        if kind != "open":
            mp.undo()

    gc.collect()
    before = open_fds()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        with concurrent.futures.ThreadPoolExecutor(1) as ex:
            asyncio.run(main(ex))
        # (The executor's thread has run the open and what followed it.)
        gc.collect()
    assert len(opened) == 1
    assert open_fds() == before
    leaks = [w for w in caught if issubclass(w.category, ResourceWarning)]
    assert not leaks, [str(w.message) for w in leaks]


def test_aiofiles_executor_call_cancelled_before_it_starts_never_runs(tmp_path: Path) -> None:
    """Non-regression: queued behind another call, the open never happens."""
    gate = threading.Event()

    async def main(ex: concurrent.futures.Executor) -> None:
        blocker = asyncio.get_running_loop().run_in_executor(ex, gate.wait, TIMEOUT)
        task = asyncio.ensure_future(aiofiles.open(tmp_path / "never", "w", executor=ex))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        gate.set()
        await blocker

    with concurrent.futures.ThreadPoolExecutor(1) as ex:
        asyncio.run(main(ex))
    assert not (tmp_path / "never").exists()


# -- 5. SIGEV_THREAD functions that wait cannot starve each other or the I/O ----------------


@pytest.fixture(params=["threads", "io_uring"])
def rt(request: pytest.FixtureRequest) -> Iterator[px.PosixAio]:
    try:
        ctx = AioContext(deliver=False, backend=request.param)
    except RingUnavailable as e:
        pytest.skip(f"io_uring: {e}")
    yield px.PosixAio(ctx)
    assert ctx.close(timeout=10)


def test_more_waiting_notifications_than_any_pool_has_workers_all_complete(
    rt: px.PosixAio, tmp_path: Path
) -> None:
    """Each SIGEV_THREAD function waits (aio_suspend on another request, and
    a barrier all of them must reach): glibc runs each in its own thread, so
    they all get there.  On the default queue (64 workers) the 65th never
    started: the barrier broke (and with it every wait) after its guard."""
    n = threadlets.default_queue().max_threads + 1
    p = tmp_path / "f"
    p.write_bytes(b"x" * 4096)
    fd = os.open(p, os.O_RDONLY)
    barrier = threading.Barrier(n, timeout=60)  # (a guard: the test fails, never hangs)
    done: list[int] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    all_back = threading.Event()

    def notified(i: int) -> None:
        try:
            other = px.aiocb(fd, i, bytearray(1))
            rt.aio_read(other)
            rt.aio_suspend([other], 60)
            assert rt.aio_return(other) == 1
            barrier.wait()
            with lock:
                done.append(i)
        except BaseException as e:
            with lock:
                errors.append(e)
            all_back.set()
            raise
        with lock:
            if len(done) == n:
                all_back.set()

    try:
        cbs = [
            px.aiocb(fd, i, bytearray(1), sigevent=px.sigevent(px.SIGEV_THREAD, 0, i, notified))
            for i in range(n)
        ]
        for cb in cbs:
            rt.aio_read(cb)
        all_back.wait(120)  # (set by the functions: a guard only)
    finally:
        os.close(fd)
    assert not errors, errors[:3]
    assert sorted(done) == list(range(n))


def test_sigev_thread_functions_do_not_run_on_the_default_or_io_queue(rt: px.PosixAio) -> None:
    r, w = os.pipe()
    names: list[str] = []
    seen = threading.Event()

    def notified(_: object) -> None:
        names.append(threading.current_thread().name)
        seen.set()

    try:
        cb = px.aiocb(w, 0, b"x", sigevent=px.sigevent(px.SIGEV_THREAD, 0, None, notified))
        rt.aio_write(cb)
        assert seen.wait(TIMEOUT)
    finally:
        os.close(r)
        os.close(w)
    assert len(names) == 1
    assert names[0].startswith("threadlets-sigev"), names


# -- 7. zero-length read of a directory, on the quick path too ------------------------------


ZERO_KINDS = ["dir", "eventfd", "eventfd-nonblocking", "pipe", "null", "ro", "wo", "append"]


def _zero_kind(kind: str, tmp_path: Path) -> tuple[int, list[int]]:
    """An fd of ``kind`` and what else to close."""
    if kind == "dir":
        return os.open(tmp_path, os.O_RDONLY), []
    if kind.startswith("eventfd"):
        return os.eventfd(1, os.EFD_NONBLOCK if "non" in kind else 0), []
    if kind == "pipe":
        r, w = os.pipe()
        return r, [w]
    if kind == "null":
        return os.open(os.devnull, os.O_RDWR), []
    p = tmp_path / "f"
    p.write_bytes(b"data")
    flags = {"ro": os.O_RDONLY, "wo": os.O_WRONLY, "append": os.O_WRONLY | os.O_APPEND}[kind]
    return os.open(p, flags), []


@pytest.mark.skipif(not glibc_aio.AVAILABLE, reason="needs glibc on x86_64/aarch64")
@pytest.mark.parametrize("kind", ZERO_KINDS)
@pytest.mark.parametrize("op", ["read", "write"])
def test_zero_length_transfers_match_glibc_on_every_kind_of_fd(
    rt: px.PosixAio, tmp_path: Path, op: str, kind: str
) -> None:
    """glibc's aio makes pread(fd, buf, 0) (read() after ESPIPE), which
    reaches the file: EISDIR for a directory, EINVAL for an eventfd.  The
    engine's zero-length transfer is an empty preadv/readv, which the kernel
    answers 0 without asking the file: posix special-cased the directory
    only, so an eventfd read 0 bytes "successfully".  Three submissions: the
    later ones, of an fd already noted, could take the quick path."""
    outcomes: dict[str, list[tuple[int, int]]] = {"px": [], "glibc": []}
    for name in ("px", "glibc"):
        fd, others = _zero_kind(kind, tmp_path)
        try:
            opcode = px.LIO_READ if op == "read" else px.LIO_WRITE
            for how in ("single", "single", "lio"):
                if name == "px":
                    cb: Any = px.aiocb(fd, 0, bytearray(0), lio_opcode=opcode)
                    impl: Any = rt
                else:
                    cb = glibc_aio.aiocb(fd, 0, b"", lio_opcode=opcode)
                    impl = glibc_aio
                if how == "lio":
                    with contextlib.suppress(OSError):  # (EIO if it failed)
                        impl.lio_listio(px.LIO_WAIT, [cb])
                else:
                    (impl.aio_read if op == "read" else impl.aio_write)(cb)
                impl.aio_suspend([cb], 10)
                outcomes[name].append((impl.aio_error(cb), impl.aio_return(cb)))
        finally:
            os.close(fd)
            for o in others:
                os.close(o)
    assert outcomes["px"] == outcomes["glibc"]


# -- 6. NBD: silent clients hold their slot but never delay shutdown ------------------------


def _silent_clients(st: ServerThread, n: int) -> list[Client]:
    out = []
    for _ in range(n):
        c = Client.connect(st.address)
        c.handshake()
        out.append(c)
    return out


@pytest.mark.parametrize("backend", ["threads", "io_uring"])
def test_silent_clients_keep_their_slots_and_shutdown_is_prompt(
    tmp_path: Path, backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Non-regression for the documented choice (no idle timeout after the
    handshake, as qemu-nbd): silent clients keep their slots, the next one
    is refused when full, and close() ends at once, not at its deadline."""
    caplog.set_level(logging.INFO, logger="threadlets")
    p = tmp_path / "img"
    p.write_bytes(bytes(1 << 20))
    try:
        st = ServerThread(open_export(p), backend=backend, max_connections=4).start()
    except RingUnavailable as e:
        pytest.skip(f"io_uring: {e}")
    clients: list[Client] = []
    try:
        clients = _silent_clients(st, 3)
        half = Client.connect(st.address)
        half.handshake()
        # A request cut off mid-payload, then silence.
        head = struct.pack(">IHHQQI", proto.REQUEST_MAGIC, 0, Cmd.WRITE, 1, 0, 4096)
        half.sock.sendall(head + b"y" * 100)
        clients.append(half)
        full = Client.connect(st.address)
        assert full.at_eof()  # the fifth: refused, the slots are taken
        full.close()
        st.run(st.server.close(3600)).result(TIMEOUT)  # a deadline it must not reach
        assert st.server.closed
        assert not st.server.connections
        for c in clients:
            assert c.at_eof()
    finally:
        for c in clients:
            c.close()
        st.stop()
    text = caplog.text
    assert "timed out" not in text
    assert "still in flight" not in text
    assert p.read_bytes() == bytes(1 << 20)  # the cut-off WRITE wrote nothing


def test_sigterm_stops_the_cli_promptly_with_silent_clients(tmp_path: Path) -> None:
    """The server's close() would wait 30 s at most; the guard here is
    TIMEOUT (10 s), so a shutdown that waited for silent clients fails."""
    from .test_nbd_server import _serve_cli

    image = tmp_path / "img"
    image.write_bytes(bytes(1 << 20))
    sock = tmp_path / "nbd.sock"
    proc = _serve_cli(image, sock)
    clients: list[Any] = []
    try:
        for _ in range(3):
            c = Client.connect(str(sock))
            c.handshake(name="disk")
            clients.append(c)
        mid = socket.socket(socket.AF_UNIX)
        mid.settimeout(TIMEOUT)
        mid.connect(str(sock))
        mid.recv(18)  # the greeting, then silence in the handshake
        clients.append(mid)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(TIMEOUT) == 0
    finally:
        for c in clients:
            c.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()
    assert not sock.exists()


# -- 8. Ctrl-C while the threadlets command imports ------------------------------------------

_INTERRUPT_AT_IMPORT = """
import os, signal, sys
target = os.environ["INTERRUPT_AT"]
class Finder:
    def find_spec(self, name, path=None, target_=None):
        global target
        if name == target:
            target = None
            signal.raise_signal(signal.SIGINT)
        return None
sys.meta_path.insert(0, Finder())
"""


@pytest.mark.parametrize("how", ["-m", "console script"])
@pytest.mark.parametrize("module", ["threadlets.engine", "threadlets.probe", "threadlets.pool"])
def test_ctrl_c_while_the_cli_imports_exits_130_quietly(
    tmp_path: Path, how: str, module: str
) -> None:
    """SIGINT as ``module`` is first imported (a sitecustomize's finder sends
    it): the command exits 130 with one line, no traceback.  Before, the
    package's eager imports ran before main() could catch it."""
    (tmp_path / "sitecustomize.py").write_text(_INTERRUPT_AT_IMPORT)
    env = dict(ENV, INTERRUPT_AT=module, PYTHONPATH=os.pathsep.join([str(tmp_path), *sys.path]))
    if how == "-m":
        argv = [sys.executable, "-m", "threadlets.cli", "info"]
    else:  # what pip's console-script wrapper runs
        wrapper = "import sys\nfrom threadlets.cli import main\nsys.exit(main())\n"
        argv = [sys.executable, "-c", wrapper, "info"]
    out = subprocess.run(
        argv, capture_output=True, text=True, env=env, check=False, timeout=60, cwd=tmp_path
    )
    assert out.returncode == 130, out.stderr
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().endswith("interrupted")


def test_import_threadlets_keeps_its_public_names() -> None:
    """Non-regression for the lazy package: every public name resolves to
    what its module defines, ``from threadlets import *`` works, and the
    submodules an eager import used to load are attributes."""
    code = (
        "import threadlets, sys\n"
        "assert 'threadlets.engine' not in sys.modules\n"
        "from threadlets import *\n"
        "import threadlets.engine, threadlets.asyncfile, threadlets.uring\n"
        "assert AioContext is threadlets.engine.AioContext\n"
        "assert open is threadlets.asyncfile.open\n"
        "assert RingUnavailable is threadlets.uring.RingUnavailable\n"
        "assert all(hasattr(threadlets, n) for n in threadlets.__all__)\n"
        "assert set(threadlets.__all__) <= set(dir(threadlets))\n"
        "print('ok')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=60,
        check=False,
    )
    assert out.stdout.strip() == "ok", out.stderr
    fresh = subprocess.run(
        [sys.executable, "-c", "import threadlets; print(threadlets.ops.__name__)"],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=60,
        check=False,
    )
    assert fresh.stdout.strip() == "threadlets.ops", fresh.stderr
    with pytest.raises(AttributeError):
        threadlets.no_such_name  # noqa: B018


# -- 2b. the same family: every number on the command line -----------------------------------

ODD_NUMBERS = ["+5", " 5", "5 ", "1_0", "\u0665", "\uff15"]
BLANKS = {" 5", "5 "}


@pytest.mark.parametrize("text", ODD_NUMBERS)
@pytest.mark.parametrize(
    ("argv", "blanks_ok"),
    [
        (["nbd", "serve", "img", "--max-connections", "{}"], False),
        (["stress", "f", "--ops", "{}"], False),
        (["stress", "f", "--size", "{}K"], True),  # (the whole is stripped)
        (["stress", "f", "--duration", "{}s"], True),
        (["stress", "f", "--mix", "read={}"], True),
        (["stress", "f", "--cancel-rate", "{}"], False),
        (["bench", "--seconds", "{}"], False),
        (["bench", "--repeats", "{}"], False),
    ],
    ids=lambda a: a[-2] if isinstance(a, list) else "",
)
def test_numbers_on_the_command_line_are_plain_ascii(
    argv: list[str], blanks_ok: bool, text: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Parsing only (nothing runs): int() and float() take "+5", " 5",
    "1_0" and non-ASCII digits; the options take what a person types."""
    from threadlets import cli

    if blanks_ok and text in BLANKS:
        return
    with pytest.raises(SystemExit) as e:
        cli.build_parser().parse_args([a.format(text) for a in argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error: argument" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("text", ["0.5", "1", "0"])
def test_rates_and_plain_numbers_still_parse(text: str) -> None:
    from threadlets import cli

    assert cli._rate(text) == float(text)
    assert cli.parse_size(f"{text}K") == int(float(text) * 1024)
    assert cli.parse_size(" 4K ") == 4096  # (blanks around the whole are fine)
    assert cli.parse_mix("read= 4,write=5") == {"read": 4, "write": 5}


# -- NBD attack: option replies a client never reads -----------------------------------------


def _info_option(name: bytes = b"") -> bytes:
    data = struct.pack(">I", len(name)) + name + struct.pack(">HHH", 2, 1, 2)  # NAME, DESCRIPTION
    return struct.pack(">QII", proto.IHAVEOPT, proto.Opt.INFO, len(data)) + data


def test_handshake_receive_in_turns_answers_exactly_what_one_call_does() -> None:
    info = proto.ExportInfo(name="n" * 4096, size=1 << 20, description="d" * 4096)
    blob = struct.pack(">I", 3) + _info_option() * 50 + _info_option(b"nope") * 3
    whole = proto.Handshake({info.name: info}).receive(blob)
    hs = proto.Handshake({info.name: info})
    parts = [hs.receive(blob, 10_000)]
    while hs.more:
        assert len(parts[-1]) < 10_000 + 9_000  # one option's answer past the budget at most
        parts.append(hs.receive(b"", 10_000))
    assert len(parts) > 10
    assert b"".join(parts) == whole
    assert not hs.done


@pytest.mark.parametrize("backend", ["threads", "io_uring"])
def test_a_client_that_sends_options_and_reads_nothing_costs_bounded_memory(
    tmp_path: Path, backend: str
) -> None:
    """Each 26-byte NBD_OPT_INFO here is answered with 8 KiB: the server
    answered every option of a read at once (256 KiB of them: 37 MB in its
    write buffer).  Now it answers up to its write buffer's limit, waits
    for the client to read, and goes on: nothing is lost."""
    from .conftest import wait_until

    p = tmp_path / "img"
    p.write_bytes(bytes(1 << 20))
    export = open_export(p, name="n" * 4096, description="d" * 4096)
    try:
        st = ServerThread(export, backend=backend).start()
    except RingUnavailable as e:
        export.close()
        pytest.skip(f"io_uring: {e}")
    n = 2000
    c = Client.connect(st.address)
    try:
        c.greet()
        c.sock.sendall(_info_option() * n)
        wait_until(lambda: bool(st.server.connections))
        conn = next(iter(st.server.connections))
        assert conn.transport is not None
        wait_until(lambda: not conn.reading)  # the write buffer is full
        high = conn.transport.get_write_buffer_limits()[1]
        assert conn.transport.get_write_buffer_size() <= high + 64 * 1024 + 9000
        # The client reads: every option gets its full answer, in order.
        acks = 0
        while acks < n:
            magic, opt, rep, length = struct.unpack(">QIII", c.recv(20))
            assert (magic, opt) == (proto.OPT_REPLY_MAGIC, proto.Opt.INFO)
            c.recv(length)
            acks += rep == proto.Rep.ACK
        got = c.option(proto.Opt.GO, struct.pack(">IH", 0, 0))
        assert got[-1][0] == proto.Rep.ACK
        assert c.read(0, 4) == bytes(4)
    finally:
        c.close()
        st.stop()


# -- 4b. the same family: aiofiles.os.scandir cancelled while it ran ------------------------


@pytest.mark.parametrize("on", ["engine", "executor"])
def test_aiofiles_scandir_cancelled_while_running_closes_its_iterator(
    tmp_path: Path, on: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A scandir iterator holds the directory's fd: one nobody gets must be
    closed, not left to the collector (ResourceWarning, an fd until then)."""
    import importlib

    import threadlets.aiofiles.os as aos

    started, release = threading.Event(), threading.Event()
    made: list[Any] = []
    real = os.scandir

    def slow(path: Any) -> Any:
        started.set()
        release.wait(TIMEOUT)
        it = real(path)
        made.append(it)
        return it

    monkeypatch.setattr(os, "scandir", slow)
    importlib.reload(aos)  # (wrap() took os.scandir as the module loaded)
    monkeypatch.undo()

    async def main(ex: concurrent.futures.Executor | None) -> None:
        task = asyncio.ensure_future(aos.scandir(tmp_path, executor=ex))
        await asyncio.get_running_loop().run_in_executor(None, started.wait, TIMEOUT)
        task.cancel()
        if ex is None:
            # The engine waits the running call out before the cancellation.
            release.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        release.set()

    gc.collect()
    before = open_fds()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            if on == "executor":
                with concurrent.futures.ThreadPoolExecutor(1) as ex:
                    asyncio.run(main(ex))
            else:
                asyncio.run(main(None))
            del made[:]
            gc.collect()
    finally:
        importlib.reload(aos)
    assert open_fds() == before
    leaks = [w for w in caught if issubclass(w.category, ResourceWarning)]
    assert not leaks, [str(w.message) for w in leaks]
