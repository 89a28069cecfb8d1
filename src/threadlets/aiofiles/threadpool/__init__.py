"""``open`` and ``wrap``: aiofiles.threadpool on threadlets' engine.

The file is opened by Python's own ``open()`` (looked up here as
``sync_open`` at each call) on a worker, and wrapped by type: text files in
:class:`AsyncTextIOWrapper`, buffered readers in
:class:`AsyncBufferedReader`, other buffered files in
:class:`AsyncBufferedIOBase`, raw ones (``buffering=0``) in
:class:`AsyncFileIO` -- so everything a Python file object does, these do.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from io import (
    BufferedIOBase,
    BufferedRandom,
    BufferedReader,
    BufferedWriter,
    FileIO,
    TextIOBase,
)
from typing import TYPE_CHECKING, Any, Literal, overload

from threadlets.aiofiles.base import AiofilesContextManager, close_it, run_blocking
from threadlets.aiofiles.threadpool.binary import (
    AsyncBufferedIOBase,
    AsyncBufferedReader,
    AsyncFileIO,
    AsyncIndirectBufferedIOBase,
)
from threadlets.aiofiles.threadpool.text import (
    AsyncTextIndirectIOWrapper,
    AsyncTextIOWrapper,
)

if TYPE_CHECKING:
    from _typeshed import (
        FileDescriptorOrPath,
        OpenBinaryMode,
        OpenBinaryModeReading,
        OpenBinaryModeUpdating,
        OpenBinaryModeWriting,
        OpenTextMode,
    )

sync_open = open

__all__ = (
    "open",
    "stderr",
    "stderr_bytes",
    "stdin",
    "stdin_bytes",
    "stdout",
    "stdout_bytes",
    "wrap",
)

_Opener = Callable[[str, int], int] | None


@overload
def open(
    file: FileDescriptorOrPath,
    mode: OpenTextMode = "r",
    buffering: int = -1,
    encoding: str | None = None,
    errors: str | None = None,
    newline: str | None = None,
    closefd: bool = True,
    opener: _Opener = None,
    *,
    loop: Any = None,
    executor: Any = None,
) -> AiofilesContextManager[AsyncTextIOWrapper]: ...
@overload
def open(  # type: ignore[overload-overlap]
    file: FileDescriptorOrPath,
    mode: OpenBinaryMode,
    buffering: Literal[0],
    encoding: None = None,
    errors: None = None,
    newline: None = None,
    closefd: bool = True,
    opener: _Opener = None,
    *,
    loop: Any = None,
    executor: Any = None,
) -> AiofilesContextManager[AsyncFileIO]: ...
@overload
def open(
    file: FileDescriptorOrPath,
    mode: OpenBinaryModeReading | OpenBinaryModeUpdating,
    buffering: Literal[-1, 1] = -1,
    encoding: None = None,
    errors: None = None,
    newline: None = None,
    closefd: bool = True,
    opener: _Opener = None,
    *,
    loop: Any = None,
    executor: Any = None,
) -> AiofilesContextManager[AsyncBufferedReader]: ...
@overload
def open(
    file: FileDescriptorOrPath,
    mode: OpenBinaryModeWriting,
    buffering: Literal[-1, 1] = -1,
    encoding: None = None,
    errors: None = None,
    newline: None = None,
    closefd: bool = True,
    opener: _Opener = None,
    *,
    loop: Any = None,
    executor: Any = None,
) -> AiofilesContextManager[AsyncBufferedIOBase]: ...
@overload
def open(
    file: FileDescriptorOrPath,
    mode: OpenBinaryMode,
    buffering: int = -1,
    encoding: None = None,
    errors: None = None,
    newline: None = None,
    closefd: bool = True,
    opener: _Opener = None,
    *,
    loop: Any = None,
    executor: Any = None,
) -> AiofilesContextManager[AsyncBufferedIOBase]: ...
@overload
def open(
    file: FileDescriptorOrPath,
    mode: str,
    buffering: int = -1,
    encoding: str | None = None,
    errors: str | None = None,
    newline: str | None = None,
    closefd: bool = True,
    opener: _Opener = None,
    *,
    loop: Any = None,
    executor: Any = None,
) -> AiofilesContextManager[Any]: ...
def open(
    file: FileDescriptorOrPath,
    mode: str = "r",
    buffering: int = -1,
    encoding: str | None = None,
    errors: str | None = None,
    newline: str | None = None,
    closefd: bool = True,
    opener: _Opener = None,
    *,
    loop: Any = None,
    executor: Any = None,
) -> AiofilesContextManager[Any]:
    """Open a file as the built-in open() does, on a worker; await it or
    use ``async with``."""
    return AiofilesContextManager(
        _open(
            file,
            mode=mode,
            buffering=buffering,
            encoding=encoding,
            errors=errors,
            newline=newline,
            closefd=closefd,
            opener=opener,
            loop=loop,
            executor=executor,
        )
    )


async def _open(
    file: Any,
    mode: str = "r",
    buffering: int = -1,
    encoding: str | None = None,
    errors: str | None = None,
    newline: str | None = None,
    closefd: bool = True,
    opener: _Opener = None,
    *,
    loop: Any = None,
    executor: Any = None,
) -> Any:
    cb = functools.partial(
        sync_open,
        file,
        mode=mode,
        buffering=buffering,
        encoding=encoding,
        errors=errors,
        newline=newline,
        closefd=closefd,
        opener=opener,
    )
    f = await run_blocking(cb, executor, close_it)
    return wrap(f, loop=loop, executor=executor)


@functools.singledispatch
def wrap(file: Any, *, loop: Any = None, executor: Any = None) -> Any:
    """Wrap a Python file object in the async wrapper for its type."""
    raise TypeError(f"Unsupported io type: {file}.")


@wrap.register(TextIOBase)
def _(file: Any, *, loop: Any = None, executor: Any = None) -> Any:
    return AsyncTextIOWrapper(file, loop=loop, executor=executor)


@wrap.register(BufferedWriter)
@wrap.register(BufferedIOBase)
def _(file: Any, *, loop: Any = None, executor: Any = None) -> Any:
    return AsyncBufferedIOBase(file, loop=loop, executor=executor)


@wrap.register(BufferedReader)
@wrap.register(BufferedRandom)
def _(file: Any, *, loop: Any = None, executor: Any = None) -> Any:
    return AsyncBufferedReader(file, loop=loop, executor=executor)


@wrap.register(FileIO)
def _(file: Any, *, loop: Any = None, executor: Any = None) -> Any:
    return AsyncFileIO(file, loop=loop, executor=executor)


stdin = AsyncTextIndirectIOWrapper("sys.stdin", None, None, indirect=lambda: sys.stdin)
stdout = AsyncTextIndirectIOWrapper("sys.stdout", None, None, indirect=lambda: sys.stdout)
stderr = AsyncTextIndirectIOWrapper("sys.stderr", None, None, indirect=lambda: sys.stderr)
stdin_bytes = AsyncIndirectBufferedIOBase(
    "sys.stdin.buffer", None, None, indirect=lambda: sys.stdin.buffer
)
stdout_bytes = AsyncIndirectBufferedIOBase(
    "sys.stdout.buffer", None, None, indirect=lambda: sys.stdout.buffer
)
stderr_bytes = AsyncIndirectBufferedIOBase(
    "sys.stderr.buffer", None, None, indirect=lambda: sys.stderr.buffer
)
