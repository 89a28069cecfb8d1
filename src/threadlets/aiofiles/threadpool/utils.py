"""The methods every aiofiles file object has, and aiofiles' class
decorators that add more (for code that builds its own wrappers)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from threadlets.aiofiles.base import AsyncBase, run_blocking

__all__ = [
    "FileMethods",
    "cond_delegate_to_executor",
    "delegate_to_executor",
    "proxy_method_directly",
    "proxy_property_directly",
]

C = TypeVar("C", bound=type)


class FileMethods(AsyncBase):
    """The calls common to the binary and text wrappers: each blocking one
    is one request; ``fileno``, ``closed``, ``name`` and ``mode`` are read
    directly, as aiofiles does."""

    async def close(self) -> None:
        await self._close()

    async def flush(self) -> None:
        await self._call("flush")

    async def isatty(self) -> bool:
        return await self._call("isatty")  # type: ignore[no-any-return]

    async def read(self, size: int | None = -1) -> Any:
        return await self._call("read", size)

    async def readline(self, size: int | None = -1) -> Any:
        return await self._call("readline", size)

    async def readlines(self, hint: int | None = -1) -> list[Any]:
        return await self._call("readlines", hint)  # type: ignore[no-any-return]

    async def seek(self, offset: int, whence: int = 0) -> int:
        return await self._call("seek", offset, whence)  # type: ignore[no-any-return]

    async def seekable(self) -> bool:
        return await self._call("seekable")  # type: ignore[no-any-return]

    async def tell(self) -> int:
        return await self._call("tell")  # type: ignore[no-any-return]

    async def truncate(self, size: int | None = None) -> int:
        return await self._call("truncate", size)  # type: ignore[no-any-return]

    async def writable(self) -> bool:
        return await self._call("writable")  # type: ignore[no-any-return]

    async def write(self, data: Any) -> int:
        return await self._call("write", data)  # type: ignore[no-any-return]

    async def writelines(self, lines: Iterable[Any]) -> None:
        await self._call("writelines", lines)

    def fileno(self) -> int:
        return self._file.fileno()  # type: ignore[no-any-return]

    @property
    def closed(self) -> bool:
        return self._file.closed  # type: ignore[no-any-return]

    @property
    def name(self) -> Any:
        return self._file.name

    @property
    def mode(self) -> str:
        return self._file.mode  # type: ignore[no-any-return]


def delegate_to_executor(*attrs: str) -> Callable[[C], C]:
    """Add async methods that call the file object's namesakes on a worker."""

    def cls_builder(cls: C) -> C:
        for attr_name in attrs:
            setattr(cls, attr_name, _make_delegate_method(attr_name))
        return cls

    return cls_builder


def proxy_method_directly(*attrs: str) -> Callable[[C], C]:
    """Add plain methods that call the file object's namesakes."""

    def cls_builder(cls: C) -> C:
        for attr_name in attrs:
            setattr(cls, attr_name, _make_proxy_method(attr_name))
        return cls

    return cls_builder


def proxy_property_directly(*attrs: str) -> Callable[[C], C]:
    """Add properties that read the file object's namesakes."""

    def cls_builder(cls: C) -> C:
        for attr_name in attrs:
            setattr(cls, attr_name, _make_proxy_property(attr_name))
        return cls

    return cls_builder


def cond_delegate_to_executor(*attrs: str) -> Callable[[C], C]:
    """For spooled temporary files: on a worker only once rolled over to a
    real file (before that the data is in memory)."""

    def cls_builder(cls: C) -> C:
        for attr_name in attrs:
            setattr(cls, attr_name, _make_cond_delegate_method(attr_name))
        return cls

    return cls_builder


def _make_delegate_method(attr_name: str) -> Callable[..., Any]:
    async def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        cb = functools.partial(getattr(self._file, attr_name), *args, **kwargs)
        return await run_blocking(cb, self._executor)

    method.__name__ = attr_name
    return method


def _make_proxy_method(attr_name: str) -> Callable[..., Any]:
    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        return getattr(self._file, attr_name)(*args, **kwargs)

    method.__name__ = attr_name
    return method


def _make_proxy_property(attr_name: str) -> property:
    def proxy_property(self: Any) -> Any:
        return getattr(self._file, attr_name)

    return property(proxy_property)


def _make_cond_delegate_method(attr_name: str) -> Callable[..., Any]:
    async def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        if self._file._rolled:
            cb = functools.partial(getattr(self._file, attr_name), *args, **kwargs)
            return await run_blocking(cb, self._executor)
        return getattr(self._file, attr_name)(*args, **kwargs)

    method.__name__ = attr_name
    return method
