"""``threadlets nbd``: serve a file or block device to NBD clients, on the engine.

* :mod:`threadlets.nbd.proto` -- the protocol, without I/O (tested with bytes).
* :mod:`threadlets.nbd.server` -- the asyncio server: exports, connections,
  graceful shutdown.
"""

from threadlets.nbd.proto import ExportInfo, ProtocolError
from threadlets.nbd.server import DEFAULT_PORT, Export, NBDServer, open_export, parse_bind, serve

__all__ = [
    "DEFAULT_PORT",
    "Export",
    "ExportInfo",
    "NBDServer",
    "ProtocolError",
    "open_export",
    "parse_bind",
    "serve",
]
