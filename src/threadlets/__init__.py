"""threadlets: fast, correct asynchronous file and block I/O for Python.

Layers, each in its own module, each depending only on those before it:

* :mod:`threadlets.pool` -- threadlet queues: elastic worker pools.
* :mod:`threadlets.probe` -- what this machine supports; aligned buffers.
* :mod:`threadlets.syscalls` -- the system-call seam and fault injection.
* :mod:`threadlets.ops` -- what each I/O request does to a file (QEMU's rules).
* :mod:`threadlets.uring` -- the io_uring backend: a kernel ring via ctypes.
* :mod:`threadlets.engine` -- the paio engine: requests and completion contexts.
* :mod:`threadlets.posix` -- POSIX AIO (aio_read ... lio_listio) on the engine.
* :mod:`threadlets.awaitable` -- awaiting requests from asyncio, trio, anyio.
* :mod:`threadlets.asyncfile` -- ``threadlets.open``: async file objects.
* :mod:`threadlets.oneshot` -- ``read_bytes``/``write_text``...: a whole file in one request.
* :mod:`threadlets.path` -- ``threadlets.Path``: an async pathlib path.
* :mod:`threadlets.aiofiles` -- a drop-in for aiofiles on the engine.

The command-line tools live in :mod:`threadlets.cli`.
"""

from threadlets.asyncfile import AsyncBinaryFile, AsyncFile, AsyncTextFile, open, wrap
from threadlets.engine import AioContext, AioRequest, ContextStats
from threadlets.oneshot import read_bytes, read_text, write_bytes, write_text
from threadlets.path import Path
from threadlets.pool import (
    CancelledError,
    CancelResult,
    QueueStats,
    Threadlet,
    ThreadletQueue,
    ThreadletState,
    default_queue,
    submit,
)
from threadlets.probe import aligned_buffer
from threadlets.syscalls import FaultInjector, Syscalls
from threadlets.uring import RingUnavailable

__version__ = "0.1.0"

__all__ = [
    "AioContext",
    "AioRequest",
    "AsyncBinaryFile",
    "AsyncFile",
    "AsyncTextFile",
    "CancelResult",
    "CancelledError",
    "ContextStats",
    "FaultInjector",
    "Path",
    "QueueStats",
    "RingUnavailable",
    "Syscalls",
    "Threadlet",
    "ThreadletQueue",
    "ThreadletState",
    "__version__",
    "aligned_buffer",
    "default_queue",
    "open",
    "read_bytes",
    "read_text",
    "submit",
    "wrap",
    "write_bytes",
    "write_text",
]
