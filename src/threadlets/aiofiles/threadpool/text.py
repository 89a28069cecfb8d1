"""Async wrappers of Python's text file objects (io.TextIOWrapper), as
aiofiles.threadpool.text has them: reads give ``str``."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from typing import TYPE_CHECKING, Any

from threadlets.aiofiles.base import AsyncIndirectBase
from threadlets.aiofiles.threadpool.utils import FileMethods

__all__ = ["AsyncTextIOWrapper", "AsyncTextIndirectIOWrapper"]


class AsyncTextIOWrapper(FileMethods):
    """The async version of io.TextIOWrapper."""

    async def readable(self) -> bool:
        return await self._call("readable")  # type: ignore[no-any-return]

    def detach(self) -> Any:
        return self._file.detach()

    @property
    def buffer(self) -> Any:
        return self._file.buffer

    @property
    def encoding(self) -> str:
        return self._file.encoding  # type: ignore[no-any-return]

    @property
    def errors(self) -> str | None:
        return self._file.errors  # type: ignore[no-any-return]

    @property
    def line_buffering(self) -> bool:
        return self._file.line_buffering  # type: ignore[no-any-return]

    @property
    def newlines(self) -> str | tuple[str, ...] | None:
        return self._file.newlines  # type: ignore[no-any-return]

    if TYPE_CHECKING:

        async def read(self, size: int | None = -1) -> str: ...
        async def readline(self, size: int | None = -1) -> str: ...
        async def readlines(self, hint: int | None = -1) -> list[str]: ...
        async def write(self, data: str) -> int: ...
        async def writelines(self, lines: Iterable[str]) -> None: ...
        def __aiter__(self) -> AsyncIterator[str]: ...
        async def __anext__(self) -> str: ...


class AsyncTextIndirectIOWrapper(AsyncIndirectBase, AsyncTextIOWrapper):
    """AsyncTextIOWrapper over a file object looked up on each call."""
