"""aiofiles' own test suite, run against threadlets.aiofiles (issue 14).

The suite is the ``tests/`` folder of the aiofiles 25.1.0 sdist: taken from
``$THREADLETS_AIOFILES_SDIST`` (a path to the .tar.gz), else from a cached
copy in ``~/.cache/threadlets-tests``, else fetched there with
``pip download``; skipped with a message where none of that works.  It runs
in a subprocess under pytest, with a conftest that points every
``aiofiles`` module name at its ``threadlets.aiofiles`` namesake before the
tests import, and runs their ``async def`` tests with ``asyncio.run`` (the
part of pytest-asyncio they use), so no extra package is needed.

``python tests/test_aiofiles_suite.py [--real] [pytest args]`` runs the
suite by hand; ``--real`` runs it against the installed aiofiles instead,
for comparison.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest

import threadlets

VERSION = "25.1.0"
SDIST = f"aiofiles-{VERSION}.tar.gz"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "threadlets-tests"

#: Tests of the 211 that cannot pass here, and why.
EXPECTED_FAILURES = {
    # Checks that a file with no permission bits is not accessible: root
    # can access it anyway (real aiofiles fails it as root too).
    "tests/test_os.py::test_access": os.geteuid() == 0,
}

CONFTEST = '''\
"""Written by threadlets' tests/test_aiofiles_suite.py."""

import asyncio
import inspect
import os
import socket
import sys

import pytest

if not os.environ.get("AIOFILES_SUITE_REAL"):
    import importlib

    for sub in (
        "",
        ".base",
        ".os",
        ".ospath",
        ".tempfile",
        ".tempfile.temptypes",
        ".threadpool",
        ".threadpool.binary",
        ".threadpool.text",
        ".threadpool.utils",
    ):
        sys.modules["aiofiles" + sub] = importlib.import_module("threadlets.aiofiles" + sub)


def pytest_configure(config):
    import aiofiles

    mark = os.environ.get("AIOFILES_SUITE_MARK")
    if mark:
        with open(mark, "w") as f:
            f.write(aiofiles.__name__)


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    if not inspect.iscoroutinefunction(pyfuncitem.obj):
        return None
    names = pyfuncitem._fixtureinfo.argnames
    kwargs = {name: pyfuncitem.funcargs[name] for name in names}
    asyncio.run(pyfuncitem.obj(**kwargs))
    return True


@pytest.fixture
def unused_tcp_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
'''

PYTEST_INI = """\
[pytest]
addopts = -p no:cacheprovider -p no:asyncio
"""


def find_sdist() -> Path | None:
    """The aiofiles sdist: given, cached, or downloaded into the cache."""
    given = os.environ.get("THREADLETS_AIOFILES_SDIST")
    if given:
        return Path(given)
    cached = CACHE / SDIST
    if cached.is_file():
        return cached
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        try:
            got = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    "-q",
                    "--no-deps",
                    "--no-binary",
                    ":all:",
                    f"aiofiles=={VERSION}",
                    "-d",
                    tmp,
                ],
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        if got.returncode != 0 or not (Path(tmp) / SDIST).is_file():
            return None
        os.replace(Path(tmp) / SDIST, cached)  # atomic: no half-written cache
    return cached


def unpack(sdist: Path, where: Path) -> Path:
    """The sdist's tests/ folder under ``where``, with our conftest."""
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(f"aiofiles-{VERSION}/tests/")]
        tar.extractall(where, members=members, filter="data")
    root = where / f"aiofiles-{VERSION}"
    (root / "tests" / "conftest.py").write_text(CONFTEST)
    (root / "pytest.ini").write_text(PYTEST_INI)
    return root


def run_suite(root: Path, *args: str, real: bool = False) -> subprocess.CompletedProcess[str]:
    """Run the suite; the module it tested is named in ``root/tested``."""
    env = dict(os.environ)
    env["AIOFILES_SUITE_MARK"] = str(root / "tested")
    src = str(Path(threadlets.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    env.pop("AIOFILES_SUITE_REAL", None)
    if real:
        env["AIOFILES_SUITE_REAL"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:randomly", "tests", *args],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def outcomes(output: str) -> tuple[dict[str, int], set[str]]:
    """The summary counts, and the ids of the tests that failed."""
    counts = {
        word: int(n)
        for n, word in re.findall(r"(\d+) (passed|failed|errors?|skipped)", output.splitlines()[-1])
    }
    failed = set(re.findall(r"^(?:FAILED|ERROR) (\S+?)(?: - .*)?$", output, re.MULTILINE))
    return counts, failed


def test_aiofiles_suite_passes_on_threadlets(tmp_path: Path) -> None:
    sdist = find_sdist()
    if sdist is None:
        pytest.skip(f"aiofiles {VERSION} sdist unavailable (no PyPI, no cached copy in {CACHE})")
    root = unpack(sdist, tmp_path)
    got = run_suite(root)
    out = got.stdout + got.stderr
    assert (root / "tested").read_text() == "threadlets.aiofiles", out
    counts, failed = outcomes(got.stdout)
    expected = {name for name, applies in EXPECTED_FAILURES.items() if applies}
    # Parametrised ids: "test_x[a]" fails as its base name's entry says.
    unexpected = {name for name in failed if name.split("[")[0] not in expected}
    assert not unexpected, out
    # 211 run (8 more are skipped on every Python: 4 for >= 3.12, 4 for < 3.12).
    ran = counts.get("passed", 0) + counts.get("failed", 0)
    assert ran == 211, out
    assert counts.get("passed", 0) == ran - len(failed), out


if __name__ == "__main__":
    argv = sys.argv[1:]
    real = "--real" in argv
    argv = [a for a in argv if a != "--real"]
    found = find_sdist()
    if found is None:
        sys.exit(f"aiofiles {VERSION} sdist unavailable")
    with tempfile.TemporaryDirectory() as tmp:
        result = run_suite(unpack(found, Path(tmp)), *argv, real=real)
        print(result.stdout + result.stderr)
        print("aiofiles under test:", (Path(tmp) / f"aiofiles-{VERSION}" / "tested").read_text())
        sys.exit(result.returncode)
