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

from typing import TYPE_CHECKING

# The names below are imported on first use (PEP 562): ``import threadlets``
# itself does no work, so the ``threadlets`` command (whose module is
# inside this package) can catch a Ctrl-C during its imports and exit
# quietly, and starts faster.  ``from threadlets import open`` and
# ``threadlets.AioContext`` behave as before; mypy sees the imports.
if TYPE_CHECKING:
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

#: Where each public name lives.
_HOME = {
    "AsyncBinaryFile": "asyncfile",
    "AsyncFile": "asyncfile",
    "AsyncTextFile": "asyncfile",
    "open": "asyncfile",
    "wrap": "asyncfile",
    "AioContext": "engine",
    "AioRequest": "engine",
    "ContextStats": "engine",
    "read_bytes": "oneshot",
    "read_text": "oneshot",
    "write_bytes": "oneshot",
    "write_text": "oneshot",
    "Path": "path",
    "CancelledError": "pool",
    "CancelResult": "pool",
    "QueueStats": "pool",
    "Threadlet": "pool",
    "ThreadletQueue": "pool",
    "ThreadletState": "pool",
    "default_queue": "pool",
    "submit": "pool",
    "aligned_buffer": "probe",
    "FaultInjector": "syscalls",
    "Syscalls": "syscalls",
    "RingUnavailable": "uring",
}
#: The submodules an eager ``import threadlets`` used to load, reachable as
#: attributes (``threadlets.engine``) without an import of their own.
_SUBMODULES = frozenset(
    {
        "asyncfile",
        "awaitable",
        "engine",
        "oneshot",
        "ops",
        "path",
        "pool",
        "probe",
        "syscalls",
        "textio",
        "uring",
    }
)

if not TYPE_CHECKING:

    def __getattr__(name: str) -> object:
        import importlib

        home = _HOME.get(name)
        if home is not None:
            value = getattr(importlib.import_module(f"threadlets.{home}"), name)
            globals()[name] = value  # (next time: no call)
            return value
        if name in _SUBMODULES:
            return importlib.import_module(f"threadlets.{name}")
        raise AttributeError(f"module 'threadlets' has no attribute {name!r}")

    def __dir__() -> list[str]:
        # (The submodules too: an eager import listed them, and a REPL
        # completes ``threadlets.eng`` from here.)
        return sorted(set(globals()) | set(__all__) | _SUBMODULES)
