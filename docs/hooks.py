"""MkDocs hook: the docstrings are written with Sphinx roles (:class:`X`); the
rendered page shows just the code, with a leading ``~`` dropped as Sphinx does,
and a paragraph ending in reST's ``::`` (a literal block follows) ends in one colon."""

from __future__ import annotations

import re
from typing import Any

_ROLE = re.compile(r":(?:attr|class|data|exc|func|meth|mod|obj):<code>~?")


def on_page_content(html: str, **kwargs: Any) -> str:
    return _ROLE.sub("<code>", html).replace("::</p>", ":</p>")
