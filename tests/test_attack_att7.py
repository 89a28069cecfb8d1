"""Attack round 7 (h-att) on today's changes: the lazy ``threadlets``
package (PEP 562) against what the eager one offered."""

from __future__ import annotations

import subprocess
import sys

import pytest

import threadlets


def _fresh(code: str) -> str:
    """Run ``code`` in a new interpreter (threadlets not yet imported)."""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    return out.stdout


def test_dir_lists_the_submodules_an_attribute_reaches() -> None:
    # An eager import listed them; ``threadlets.engine`` works without an
    # import of its own, so a REPL's completion (dir) must offer it.
    names = _fresh("import threadlets; print(' '.join(dir(threadlets)))").split()
    for sub in ("engine", "pool", "uring", "ops", "asyncfile"):
        assert sub in names
    assert set(threadlets.__all__) <= set(names)


def test_every_name_in_dir_and_all_resolves_and_unknown_names_raise() -> None:
    for name in set(dir(threadlets)) | set(threadlets.__all__):
        getattr(threadlets, name)
    with pytest.raises(
        AttributeError, match=r"^module 'threadlets' has no attribute 'no_such_name'$"
    ):
        threadlets.no_such_name  # type: ignore[attr-defined]  # noqa: B018


def test_star_import_and_concurrent_first_use_in_a_fresh_interpreter() -> None:
    code = """
import sys, threading
sys.setswitchinterval(1e-6)
import threadlets
names = list(threadlets.__all__) + sorted(threadlets._SUBMODULES)
barrier = threading.Barrier(len(names))
errors = []
def use(name):
    barrier.wait()
    try:
        assert getattr(threadlets, name) is not None
    except BaseException as e:
        errors.append((name, repr(e)))
threads = [threading.Thread(target=use, args=(n,)) for n in names]
for t in threads: t.start()
for t in threads: t.join()
ns = {}
exec("from threadlets import *", ns)
assert set(threadlets.__all__) <= set(ns), set(threadlets.__all__) - set(ns)
print("errors", errors)
"""
    assert _fresh(code).strip() == "errors []"
