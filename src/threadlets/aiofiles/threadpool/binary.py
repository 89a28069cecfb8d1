"""Async wrappers of Python's binary file objects (BufferedReader/Writer/
Random and FileIO), as aiofiles.threadpool.binary has them: reads give
``bytes``."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from typing import TYPE_CHECKING, Any

from threadlets.aiofiles.base import AsyncIndirectBase
from threadlets.aiofiles.threadpool.utils import FileMethods

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

__all__ = [
    "AsyncBufferedIOBase",
    "AsyncBufferedReader",
    "AsyncFileIO",
    "AsyncIndirectBufferedIOBase",
    "AsyncIndirectBufferedReader",
    "AsyncIndirectFileIO",
]


class _Binary(FileMethods):
    """What every binary wrapper has."""

    async def readinto(self, buffer: WriteableBuffer) -> int | None:
        return await self._call("readinto", buffer)  # type: ignore[no-any-return]

    def readable(self) -> bool:
        return self._file.readable()  # type: ignore[no-any-return]

    if TYPE_CHECKING:

        async def read(self, size: int | None = -1) -> bytes: ...
        async def readline(self, size: int | None = -1) -> bytes: ...
        async def readlines(self, hint: int | None = -1) -> list[bytes]: ...
        async def write(self, data: ReadableBuffer) -> int: ...
        async def writelines(self, lines: Iterable[ReadableBuffer]) -> None: ...
        def __aiter__(self) -> AsyncIterator[bytes]: ...
        async def __anext__(self) -> bytes: ...


class AsyncBufferedIOBase(_Binary):
    """The async version of io.BufferedWriter and BufferedIOBase."""

    async def read1(self, size: int = -1) -> bytes:
        return await self._call("read1", size)  # type: ignore[no-any-return]

    def detach(self) -> Any:
        return self._file.detach()

    @property
    def raw(self) -> Any:
        return self._file.raw


class AsyncBufferedReader(AsyncBufferedIOBase):
    """The async version of io.BufferedReader and BufferedRandom."""

    async def peek(self, size: int = 0) -> bytes:
        return await self._call("peek", size)  # type: ignore[no-any-return]


class AsyncFileIO(_Binary):
    """The async version of io.FileIO (``buffering=0``)."""

    async def readall(self) -> bytes:
        return await self._call("readall")  # type: ignore[no-any-return]


class AsyncIndirectBufferedIOBase(AsyncIndirectBase, AsyncBufferedIOBase):
    """AsyncBufferedIOBase over a file object looked up on each call."""


class AsyncIndirectBufferedReader(AsyncIndirectBase, AsyncBufferedReader):
    """AsyncBufferedReader over a file object looked up on each call."""


class AsyncIndirectFileIO(AsyncIndirectBase, AsyncFileIO):
    """AsyncFileIO over a file object looked up on each call."""
