"""threadlets: fast, correct asynchronous file and block I/O for Python.

Layers, each in its own module, each depending only on those before it:

* :mod:`threadlets.pool` -- threadlet queues: elastic worker pools.
* :mod:`threadlets.info` -- what this machine supports (probes, no I/O engine).

The command-line tools live in :mod:`threadlets.cli`.
"""

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

__version__ = "0.1.0"

__all__ = [
    "CancelResult",
    "CancelledError",
    "QueueStats",
    "Threadlet",
    "ThreadletQueue",
    "ThreadletState",
    "__version__",
    "default_queue",
    "submit",
]
