"""aiofiles.os on threadlets' engine: the os module's file-system calls,
each one request on a worker (``path`` is :mod:`threadlets.aiofiles.ospath`)."""

from __future__ import annotations

import os

from threadlets.aiofiles import ospath as path
from threadlets.aiofiles.base import close_it, wrap

__all__ = [
    "access",
    "getcwd",
    "link",
    "listdir",
    "makedirs",
    "mkdir",
    "path",
    "readlink",
    "remove",
    "removedirs",
    "rename",
    "renames",
    "replace",
    "rmdir",
    "scandir",
    "sendfile",
    "stat",
    "statvfs",
    "symlink",
    "unlink",
    "wrap",
]

access = wrap(os.access)
getcwd = wrap(os.getcwd)
listdir = wrap(os.listdir)
makedirs = wrap(os.makedirs)
mkdir = wrap(os.mkdir)
readlink = wrap(os.readlink)
remove = wrap(os.remove)
removedirs = wrap(os.removedirs)
rename = wrap(os.rename)
renames = wrap(os.renames)
replace = wrap(os.replace)
rmdir = wrap(os.rmdir)
# (A scandir iterator holds the directory open: a cancelled call closes it.)
scandir = wrap(os.scandir, close_it)
stat = wrap(os.stat)
symlink = wrap(os.symlink)
unlink = wrap(os.unlink)
link = wrap(os.link)
sendfile = wrap(os.sendfile)
statvfs = wrap(os.statvfs)
