"""``threadlets.Path``: an async pathlib path, in the shape of anyio.Path
and trio.Path.

Everything pathlib computes without touching the file system (``name``,
``parent``, ``/``, ``with_suffix``, ``relative_to``...) is a plain method or
property, as on :class:`pathlib.Path`, and gives ``threadlets.Path``
objects.  Everything that does I/O is awaited, and is one request on the
running loop's engine (``ctx.call``; ``stat`` and ``lstat``: ``ctx.stat``,
STATX on the io_uring backend), on asyncio, uvloop and trio alike:
``exists``, ``stat``, ``mkdir``, ``unlink``, ``rename``... ``read_bytes``
and the other whole-file calls are :mod:`threadlets.oneshot`'s (a cached
file is read inline).  ``iterdir``, ``glob`` and ``rglob`` are async
iterators that fetch entries in batches (one request per batch, not per
entry).  ``open`` is :func:`threadlets.open` (await it, or ``async with``).
"""

from __future__ import annotations

import functools
import itertools
import os
import pathlib
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, overload

from threadlets import oneshot
from threadlets.asyncfile import AsyncBinaryFile, AsyncFile, AsyncTextFile, _no_nul, _Opener
from threadlets.asyncfile import open as _open
from threadlets.awaitable import current

if TYPE_CHECKING:
    from _typeshed import OpenBinaryMode, OpenTextMode, ReadableBuffer, StrPath

__all__ = ["Path"]

T = TypeVar("T")

#: Directory entries fetched per request by iterdir/glob/rglob.
BATCH = 128


async def _run(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    io_ = current()
    await io_.checkpoint()
    req = io_.ctx.call(functools.partial(fn, *args, **kwargs))
    await io_._wait(req)
    result: Any = req.result()
    return result  # type: ignore[no-any-return]


async def _stat(path: pathlib.Path, follow_symlinks: bool) -> os.stat_result:
    """os.stat as the engine's stat request (STATX on the io_uring backend)."""
    io_ = current()
    await io_.checkpoint()
    req = io_.ctx.stat(path, follow_symlinks=follow_symlinks)
    await io_._wait(req)
    result: os.stat_result = req.result()  # type: ignore[assignment]
    return result


def _batch(it: Iterator[pathlib.Path]) -> list[pathlib.Path]:
    return list(itertools.islice(it, BATCH))


class Path:
    """An async :class:`pathlib.Path` (see the module docstring)."""

    __slots__ = ("__weakref__", "_path")

    def __init__(self, *args: StrPath) -> None:
        self._path = pathlib.Path(*args)

    @classmethod
    def _wrap(cls, p: pathlib.PurePath) -> Path:
        new = cls.__new__(cls)
        new._path = pathlib.Path(p)
        return new

    # -- pure paths: no I/O ---------------------------------------------------------------

    def __fspath__(self) -> str:
        return os.fspath(self._path)

    def __str__(self) -> str:
        return str(self._path)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self._path)!r})"

    def __bytes__(self) -> bytes:
        return bytes(self._path)

    def __hash__(self) -> int:
        return hash(self._path)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Path):
            return self._path == other._path
        return NotImplemented

    def __lt__(self, other: Path) -> bool:
        if not isinstance(other, Path):
            return NotImplemented  # TypeError, as pathlib's (not AttributeError)
        return self._path < other._path

    def __le__(self, other: Path) -> bool:
        if not isinstance(other, Path):
            return NotImplemented  # TypeError, as pathlib's (not AttributeError)
        return self._path <= other._path

    def __gt__(self, other: Path) -> bool:
        if not isinstance(other, Path):
            return NotImplemented  # TypeError, as pathlib's (not AttributeError)
        return self._path > other._path

    def __ge__(self, other: Path) -> bool:
        if not isinstance(other, Path):
            return NotImplemented  # TypeError, as pathlib's (not AttributeError)
        return self._path >= other._path

    def __truediv__(self, other: StrPath) -> Path:
        return self._wrap(self._path / other)

    def __rtruediv__(self, other: StrPath) -> Path:
        return self._wrap(other / self._path)

    @property
    def parts(self) -> tuple[str, ...]:
        return self._path.parts

    @property
    def drive(self) -> str:
        return self._path.drive

    @property
    def root(self) -> str:
        return self._path.root

    @property
    def anchor(self) -> str:
        return self._path.anchor

    @property
    def parents(self) -> Sequence[Path]:
        return tuple(self._wrap(p) for p in self._path.parents)

    @property
    def parent(self) -> Path:
        return self._wrap(self._path.parent)

    @property
    def name(self) -> str:
        return self._path.name

    @property
    def suffix(self) -> str:
        return self._path.suffix

    @property
    def suffixes(self) -> list[str]:
        return self._path.suffixes

    @property
    def stem(self) -> str:
        return self._path.stem

    def as_posix(self) -> str:
        return self._path.as_posix()

    def as_uri(self) -> str:
        return self._path.as_uri()

    def is_absolute(self) -> bool:
        return self._path.is_absolute()

    def is_relative_to(self, other: StrPath) -> bool:
        return self._path.is_relative_to(other)

    def is_reserved(self) -> bool:
        return self._path.is_reserved()

    def joinpath(self, *args: StrPath) -> Path:
        return self._wrap(self._path.joinpath(*args))

    def match(self, pattern: str) -> bool:
        return self._path.match(pattern)

    def relative_to(self, *other: StrPath) -> Path:
        return self._wrap(self._path.relative_to(*other))

    def with_name(self, name: str) -> Path:
        return self._wrap(self._path.with_name(name))

    def with_stem(self, stem: str) -> Path:
        return self._wrap(self._path.with_stem(stem))

    def with_suffix(self, suffix: str) -> Path:
        return self._wrap(self._path.with_suffix(suffix))

    def as_pathlib(self) -> pathlib.Path:
        """The synchronous pathlib.Path (anyio spells it ``Path(p)._path``)."""
        return self._path

    # -- I/O, each call one request ----------------------------------------------------------

    @classmethod
    async def cwd(cls) -> Path:
        return cls._wrap(await _run(pathlib.Path.cwd))

    @classmethod
    async def home(cls) -> Path:
        return cls._wrap(await _run(pathlib.Path.home))

    async def absolute(self) -> Path:
        return self._wrap(await _run(self._path.absolute))

    async def resolve(self, strict: bool = False) -> Path:
        return self._wrap(await _run(self._path.resolve, strict))

    async def expanduser(self) -> Path:
        return self._wrap(await _run(self._path.expanduser))

    async def readlink(self) -> Path:
        return self._wrap(await _run(self._path.readlink))

    async def stat(self, *, follow_symlinks: bool = True) -> os.stat_result:
        return await _stat(self._path, follow_symlinks)

    async def lstat(self) -> os.stat_result:
        return await _stat(self._path, False)

    async def chmod(self, mode: int, *, follow_symlinks: bool = True) -> None:
        await _run(os.chmod, self._path, mode, follow_symlinks=follow_symlinks)

    async def lchmod(self, mode: int) -> None:
        await _run(self._path.lchmod, mode)

    async def exists(self) -> bool:
        return await _run(self._path.exists)

    async def is_dir(self) -> bool:
        return await _run(self._path.is_dir)

    async def is_file(self) -> bool:
        return await _run(self._path.is_file)

    async def is_symlink(self) -> bool:
        return await _run(self._path.is_symlink)

    async def is_mount(self) -> bool:
        return await _run(self._path.is_mount)

    async def is_fifo(self) -> bool:
        return await _run(self._path.is_fifo)

    async def is_socket(self) -> bool:
        return await _run(self._path.is_socket)

    async def is_block_device(self) -> bool:
        return await _run(self._path.is_block_device)

    async def is_char_device(self) -> bool:
        return await _run(self._path.is_char_device)

    async def samefile(self, other: StrPath) -> bool:
        return await _run(self._path.samefile, os.fspath(other))

    async def owner(self) -> str:
        return await _run(self._path.owner)

    async def group(self) -> str:
        return await _run(self._path.group)

    async def mkdir(self, mode: int = 0o777, parents: bool = False, exist_ok: bool = False) -> None:
        await _run(self._path.mkdir, mode, parents, exist_ok)

    async def rmdir(self) -> None:
        await _run(self._path.rmdir)

    async def touch(self, mode: int = 0o666, exist_ok: bool = True) -> None:
        await _run(self._path.touch, mode, exist_ok)

    async def unlink(self, missing_ok: bool = False) -> None:
        await _run(self._path.unlink, missing_ok)

    async def rename(self, target: StrPath) -> Path:
        return self._wrap(await _run(self._path.rename, os.fspath(target)))

    async def replace(self, target: StrPath) -> Path:
        return self._wrap(await _run(self._path.replace, os.fspath(target)))

    async def symlink_to(self, target: StrPath, target_is_directory: bool = False) -> None:
        await _run(self._path.symlink_to, os.fspath(target), target_is_directory)

    async def hardlink_to(self, target: StrPath) -> None:
        await _run(self._path.hardlink_to, os.fspath(target))

    # -- whole files: threadlets.oneshot --------------------------------------------------

    async def read_bytes(self) -> bytes:
        return await oneshot.read_bytes(_no_nul(os.fspath(self._path)))

    async def read_text(self, encoding: str | None = None, errors: str | None = None) -> str:
        return await oneshot.read_text(_no_nul(os.fspath(self._path)), encoding, errors)

    async def write_bytes(self, data: ReadableBuffer) -> int:
        return await oneshot.write_bytes(self._path, data)

    async def write_text(
        self,
        data: str,
        encoding: str | None = None,
        errors: str | None = None,
        newline: str | None = None,
    ) -> int:
        return await oneshot.write_text(self._path, data, encoding, errors, newline)

    @overload
    def open(
        self,
        mode: OpenTextMode = "r",
        buffering: int = -1,
        encoding: str | None = None,
        errors: str | None = None,
        newline: str | None = None,
    ) -> _Opener[AsyncTextFile]: ...
    @overload
    def open(
        self,
        mode: OpenBinaryMode,
        buffering: int = -1,
        encoding: None = None,
        errors: None = None,
        newline: None = None,
    ) -> _Opener[AsyncBinaryFile]: ...
    @overload
    def open(
        self,
        mode: str,
        buffering: int = -1,
        encoding: str | None = None,
        errors: str | None = None,
        newline: str | None = None,
    ) -> _Opener[AsyncFile]: ...
    def open(
        self,
        mode: str = "r",
        buffering: int = -1,
        encoding: str | None = None,
        errors: str | None = None,
        newline: str | None = None,
    ) -> _Opener[Any]:
        """:func:`threadlets.open` of this path: ``await`` it or ``async with``."""
        return _open(self._path, mode, buffering, encoding, errors, newline)

    # -- directories, in batches --------------------------------------------------------------

    async def _each(self, it: Iterator[pathlib.Path]) -> AsyncIterator[Path]:
        try:
            while True:
                batch = await _run(_batch, it)
                for p in batch:
                    yield self._wrap(p)
                if len(batch) < BATCH:
                    return
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()  # (a generator's close runs no I/O of note)

    async def iterdir(self) -> AsyncIterator[Path]:
        """The directory's entries (the listing starts on a worker)."""
        it = await _run(self._path.iterdir)
        async for p in self._each(it):
            yield p

    async def glob(self, pattern: str) -> AsyncIterator[Path]:
        it = await _run(self._path.glob, pattern)
        async for p in self._each(it):
            yield p

    async def rglob(self, pattern: str) -> AsyncIterator[Path]:
        it = await _run(self._path.rglob, pattern)
        async for p in self._each(it):
            yield p
