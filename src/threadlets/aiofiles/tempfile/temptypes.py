"""Async wrappers of tempfile.SpooledTemporaryFile and TemporaryDirectory,
as aiofiles.tempfile.temptypes has them."""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

from threadlets.aiofiles.base import AsyncBase, run_blocking

__all__ = ["AsyncSpooledTemporaryFile", "AsyncTemporaryDirectory"]


class AsyncSpooledTemporaryFile(AsyncBase):
    """A SpooledTemporaryFile: its calls run on a worker only once it has
    rolled over to a real file (before that the data is in memory)."""

    async def _cond(self, name: str, *args: Any) -> Any:
        if self._file._rolled:
            return await self._call(name, *args)
        return getattr(self._file, name)(*args)

    async def _check(self) -> None:
        if self._file._rolled:
            return
        max_size = self._file._max_size
        if max_size and self._file.tell() > max_size:
            await self.rollover()

    async def fileno(self) -> int:
        return await self._call("fileno")  # type: ignore[no-any-return]

    async def rollover(self) -> None:
        await self._call("rollover")

    async def close(self) -> None:
        if self._file._rolled:
            await self._close()
        else:
            self._file.close()

    async def flush(self) -> None:
        await self._cond("flush")

    async def isatty(self) -> bool:
        return await self._cond("isatty")  # type: ignore[no-any-return]

    async def read(self, *args: Any) -> Any:
        return await self._cond("read", *args)

    async def readline(self, *args: Any) -> Any:
        return await self._cond("readline", *args)

    async def readlines(self, *args: Any) -> list[Any]:
        return await self._cond("readlines", *args)  # type: ignore[no-any-return]

    async def seek(self, *args: Any) -> int:
        return await self._cond("seek", *args)  # type: ignore[no-any-return]

    async def tell(self) -> int:
        return await self._cond("tell")  # type: ignore[no-any-return]

    async def truncate(self, size: int | None = None) -> None:
        await self._cond("truncate", size)

    async def write(self, s: Any) -> int:
        """Write, rolling over to a real file once past ``max_size``."""
        if self._file._rolled:
            return await self._call("write", s)  # type: ignore[no-any-return]
        rv: int = self._file._file.write(s)  # the in-memory file
        await self._check()
        return rv

    async def writelines(self, iterable: Iterable[Any]) -> None:
        if self._file._rolled:
            await self._call("writelines", iterable)
            return
        self._file._file.writelines(iterable)
        await self._check()

    @property
    def closed(self) -> bool:
        return self._file.closed  # type: ignore[no-any-return]

    @property
    def encoding(self) -> str:
        return self._file.encoding  # type: ignore[no-any-return]

    @property
    def mode(self) -> str:
        return self._file.mode  # type: ignore[no-any-return]

    @property
    def name(self) -> Any:
        return self._file.name

    @property
    def newlines(self) -> Any:
        return self._file.newlines


class AsyncTemporaryDirectory:
    """A TemporaryDirectory: ``name``, and ``cleanup``/``close`` on a worker."""

    def __init__(self, file: Any, loop: Any = None, executor: Any = None) -> None:
        self._file = file
        self._loop = loop
        self._executor = executor

    @property
    def name(self) -> str:
        return self._file.name  # type: ignore[no-any-return]

    async def cleanup(self) -> None:
        await run_blocking(functools.partial(self._file.cleanup), self._executor, shield=True)

    async def close(self) -> None:
        await self.cleanup()
