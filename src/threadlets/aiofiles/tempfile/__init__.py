"""aiofiles.tempfile on threadlets' engine: the tempfile module's files
and directories made on a worker and wrapped in async file objects."""

from __future__ import annotations

import functools
import sys
import tempfile as _tempfile
from io import BufferedRandom, BufferedReader, BufferedWriter, FileIO, TextIOBase
from typing import Any

from threadlets.aiofiles.base import AiofilesContextManager, close_it, run_blocking
from threadlets.aiofiles.tempfile.temptypes import (
    AsyncSpooledTemporaryFile,
    AsyncTemporaryDirectory,
)
from threadlets.aiofiles.threadpool.binary import (
    AsyncBufferedIOBase,
    AsyncBufferedReader,
    AsyncFileIO,
)
from threadlets.aiofiles.threadpool.text import AsyncTextIOWrapper

__all__ = [
    "NamedTemporaryFile",
    "SpooledTemporaryFile",
    "TemporaryDirectory",
    "TemporaryFile",
]


def NamedTemporaryFile(
    mode: str = "w+b",
    buffering: int = -1,
    encoding: str | None = None,
    newline: str | None = None,
    suffix: str | None = None,
    prefix: str | None = None,
    dir: Any = None,
    delete: bool = True,
    delete_on_close: bool = True,
    loop: Any = None,
    executor: Any = None,
) -> AiofilesContextManager[Any]:
    """Async open a named temporary file (``delete_on_close`` needs Python
    3.12, as tempfile's does)."""
    kw: dict[str, Any] = {"delete": delete}
    if sys.version_info >= (3, 12):
        kw["delete_on_close"] = delete_on_close
    elif not delete_on_close:
        raise TypeError("delete_on_close needs Python 3.12")
    return AiofilesContextManager(
        _temporary_file(True, mode, buffering, encoding, newline, suffix, prefix, dir, executor, kw)
    )


def TemporaryFile(
    mode: str = "w+b",
    buffering: int = -1,
    encoding: str | None = None,
    newline: str | None = None,
    suffix: str | None = None,
    prefix: str | None = None,
    dir: Any = None,
    loop: Any = None,
    executor: Any = None,
) -> AiofilesContextManager[Any]:
    """Async open an unnamed temporary file."""
    return AiofilesContextManager(
        _temporary_file(
            False, mode, buffering, encoding, newline, suffix, prefix, dir, executor, {}
        )
    )


def SpooledTemporaryFile(
    max_size: int = 0,
    mode: str = "w+b",
    buffering: int = -1,
    encoding: str | None = None,
    newline: str | None = None,
    suffix: str | None = None,
    prefix: str | None = None,
    dir: Any = None,
    loop: Any = None,
    executor: Any = None,
) -> AiofilesContextManager[AsyncSpooledTemporaryFile]:
    """Async open a spooled temporary file."""
    return AiofilesContextManager(
        _spooled_temporary_file(
            max_size, mode, buffering, encoding, newline, suffix, prefix, dir, executor
        )
    )


def TemporaryDirectory(
    suffix: str | None = None,
    prefix: str | None = None,
    dir: Any = None,
    loop: Any = None,
    executor: Any = None,
) -> AiofilesContextManagerTempDir:
    """Async make a temporary directory; ``async with`` gives its name."""
    return AiofilesContextManagerTempDir(_temporary_directory(suffix, prefix, dir, executor))


async def _temporary_file(
    named: bool,
    mode: str,
    buffering: int,
    encoding: str | None,
    newline: str | None,
    suffix: str | None,
    prefix: str | None,
    dir: Any,
    executor: Any,
    kw: dict[str, Any],
) -> Any:
    make: Any = _tempfile.NamedTemporaryFile if named else _tempfile.TemporaryFile
    cb = functools.partial(
        make,
        mode=mode,
        buffering=buffering,
        encoding=encoding,
        newline=newline,
        suffix=suffix,
        prefix=prefix,
        dir=dir,
        **kw,
    )
    f = await run_blocking(cb, executor, close_it)
    if type(f) is _tempfile._TemporaryFileWrapper:
        # Named: the wrapper deletes the file on close.
        result = wrap(f.file, f, executor=executor)
        if sys.version_info >= (3, 12):
            result._closer = f._closer
        else:
            result.delete = f.delete
        return result
    return wrap(f, f, executor=executor)


async def _spooled_temporary_file(
    max_size: int,
    mode: str,
    buffering: int,
    encoding: str | None,
    newline: str | None,
    suffix: str | None,
    prefix: str | None,
    dir: Any,
    executor: Any,
) -> AsyncSpooledTemporaryFile:
    cb = functools.partial(
        _tempfile.SpooledTemporaryFile,
        max_size=max_size,
        mode=mode,
        buffering=buffering,
        encoding=encoding,
        newline=newline,
        suffix=suffix,
        prefix=prefix,
        dir=dir,
    )
    f = await run_blocking(cb, executor, close_it)
    return AsyncSpooledTemporaryFile(f, executor=executor)


async def _temporary_directory(
    suffix: str | None, prefix: str | None, dir: Any, executor: Any
) -> AsyncTemporaryDirectory:
    cb = functools.partial(_tempfile.TemporaryDirectory, suffix, prefix, dir)
    f = await run_blocking(cb, executor, _tempfile.TemporaryDirectory.cleanup)
    return AsyncTemporaryDirectory(f, executor=executor)


class AiofilesContextManagerTempDir(AiofilesContextManager[AsyncTemporaryDirectory]):
    """``async with`` gives the directory's name (as tempfile's does)."""

    async def __aenter__(self) -> str:  # type: ignore[override]
        self._obj = await self._coro
        return self._obj.name  # type: ignore[no-any-return]


@functools.singledispatch
def wrap(base_io_obj: Any, file: Any, *, loop: Any = None, executor: Any = None) -> Any:
    """Wrap ``file`` by the type of the IO object under it."""
    raise TypeError(f"Unsupported IO type: {base_io_obj}")


@wrap.register(TextIOBase)
def _(base_io_obj: Any, file: Any, *, loop: Any = None, executor: Any = None) -> Any:
    return AsyncTextIOWrapper(file, loop=loop, executor=executor)


@wrap.register(BufferedWriter)
def _(base_io_obj: Any, file: Any, *, loop: Any = None, executor: Any = None) -> Any:
    return AsyncBufferedIOBase(file, loop=loop, executor=executor)


@wrap.register(BufferedReader)
@wrap.register(BufferedRandom)
def _(base_io_obj: Any, file: Any, *, loop: Any = None, executor: Any = None) -> Any:
    return AsyncBufferedReader(file, loop=loop, executor=executor)


@wrap.register(FileIO)
def _(base_io_obj: Any, file: Any, *, loop: Any = None, executor: Any = None) -> Any:
    return AsyncFileIO(file, loop=loop, executor=executor)
