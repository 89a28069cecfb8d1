"""A drop-in for aiofiles (25.1) on threadlets' engine.

``import threadlets.aiofiles as aiofiles`` and the rest of a program that
uses aiofiles runs unchanged: :func:`open` (and ``threadpool.open``,
``threadpool.wrap``), :mod:`.os` (with ``os.path``), :mod:`.ospath`,
:mod:`.tempfile`, and ``stdin``/``stdout``/``stderr`` with their
``_bytes`` forms, with aiofiles' module layout and names.

The difference: every blocking call is one request on the running loop's
:class:`threadlets.AioContext` (``ctx.call``), not ``run_in_executor``, so
it works on asyncio, uvloop and trio alike (and anyio on either), and a
call cancelled while it runs is waited out before the cancellation is seen.
The file objects wrap Python's own file objects, as aiofiles' do, so they
behave exactly like them.
"""

from __future__ import annotations

from threadlets.aiofiles import os, ospath, tempfile, threadpool
from threadlets.aiofiles.threadpool import (
    open,
    stderr,
    stderr_bytes,
    stdin,
    stdin_bytes,
    stdout,
    stdout_bytes,
)

__all__ = [
    "open",
    "os",
    "ospath",
    "stderr",
    "stderr_bytes",
    "stdin",
    "stdin_bytes",
    "stdout",
    "stdout_bytes",
    "tempfile",
    "threadpool",
]
