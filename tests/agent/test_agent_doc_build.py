"""docs/agent.md, 'The zipapp': 'The build refuses to vendor a distribution with compiled files,
or one that needs a distribution not vendored.' The build (tools/build_agent.py, what ``make
agent`` runs) is run as a process with one more distribution to vendor than it has: it must exit 1
with a one-line error naming the distribution, and leave no archive behind."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from .conftest import BUILD, ROOT

# Runs tools/build_agent.py's main() with VENDORED extended by argv[1]; the rest of argv is its own.
_RUN = """\
import sys
sys.path.insert(0, {tools!r})
import build_agent
build_agent.VENDORED = (*build_agent.VENDORED, sys.argv[1])
sys.exit(build_agent.main(sys.argv[2:]))
"""


def _build_with(extra: str, out: Path) -> subprocess.CompletedProcess[str]:
    code = _RUN.format(tools=str(BUILD.parent))
    return subprocess.run(
        [sys.executable, "-c", code, extra, "--out", str(out), "--what", "pyz"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


def test_the_build_refuses_a_distribution_with_compiled_files(tmp_path: Path) -> None:
    """orjson is compiled (installed in the venv: make setup): no zipapp may carry it."""
    done = _build_with("orjson", tmp_path)
    assert done.returncode == 1, (done.stdout, done.stderr)
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr  # one line, no traceback
    assert lines[0].startswith("error: orjson ships compiled files (")
    assert lines[0].endswith("): it cannot go in a zipapp")
    assert not list(tmp_path.iterdir())  # neither the archive nor a partial one


def test_the_build_refuses_a_distribution_that_needs_one_not_vendored(tmp_path: Path) -> None:
    """anyio (pure Python, installed with the edge) needs idna, which the zipapp does not carry;
    its requirements behind a marker (typing_extensions, exceptiongroup, trio) are not asked."""
    done = _build_with("anyio", tmp_path)
    assert done.returncode == 1, (done.stdout, done.stderr)
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: anyio needs idna")
    assert lines[0].endswith(", which is not vendored")
    assert not list(tmp_path.iterdir())
