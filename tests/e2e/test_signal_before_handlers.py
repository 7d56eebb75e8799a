"""Signals that reach ``tunneld serve`` before its own handlers are in never kill it.

The program starts in tunneld/entry.py (the console script ``tunneld`` that pyproject.toml's
``[project.scripts]`` makes, and ``python -m tunneld``), which takes SIGTERM, SIGINT and SIGHUP
before it imports tunneld/cli.py and, with it, everything else:

- SIGTERM exits 0 and SIGINT 130, each with exactly one line
  (``tunneld: SIGTERM during start-up: stopped before serving``), no traceback, nothing left;
- SIGHUP (``systemctl reload``, deploy/tunneld.service's ``ExecReload``) is deferred: the start
  goes on, and once the reload handler is installed the configuration is read again, so a file
  rewritten before the SIGHUP is in effect when tunneld serves (deferred, not ignored:
  docs/operations.md).

No timing: a ``sitecustomize`` on ``PYTHONPATH`` (tests/signal_hooks.py) sends the signal the
moment a chosen module starts to be imported (a meta-path finder) or a chosen function is
entered (``sys.setprofile``), and each case fails if its point is never reached. The tree under
test (ROOT, also a copy of it) comes first on ``PYTHONPATH`` and the console script is written
from its pyproject.toml, as pip writes it. The ``--workers`` cases (the supervisor and its
workers) are in test_sighup_during_startup_workers.py and, for SIGTERM and SIGINT reaching a
worker still starting, test_stop_signal_during_startup_workers.py.

Before tunneld/entry.py (the script ran ``tunneld.cli:main``; no tunneld/__main__.py), 10 of
the 16 stop-signal cases failed: at the import of tunneld.cli, before cli.py's own handlers, the
console script died by SIGTERM's default action (status -15) and printed a KeyboardInterrupt
traceback on SIGINT; ``python -m tunneld`` was "No module named tunneld.__main__". The 6 others
(the console script at later imports) check that the handlers stay in. Before SIGHUP was
deferred, each SIGHUP case here killed the process (status -1).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.signal_hooks import ROOT, RUN_TIMEOUT, StartRun, console_script

OLD_TOKEN, NEW_TOKEN = "old-admin-token", "new-admin-token"

# Points of a single `tunneld serve` (sqlite store). The first came before any handler when
# the console script ran tunneld.cli:main; the others check that the handlers stay in through
# the imports.
IMPORT_POINTS = ["import:tunneld.cli", "import:argparse", "import:asyncio", "import:tunneld.config"]
# SIGHUP before _serve's reload handler: during the imports, before the configuration is read,
# and once it was read (then only a reload after the start brings the rewritten file in).
HUP_POINTS = [
    "import:tunneld.cli",
    "import:argparse",
    "call:tunneld/config.py:load_config",
    "call:tunneld/edge.py:EdgeServer.start",
]


class Run(StartRun):
    """One ``tunneld serve`` in a session of its own, with the hook of tests/signal_hooks.py
    installed; the tree under test first on ``PYTHONPATH``, and only it."""

    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp, "tunneld-early-")
        self.script = console_script(tmp, "tunneld")
        self.token_file = tmp / "admin-token"
        self.token_file.write_text(OLD_TOKEN)

    def start(
        self,
        program: str,
        point: str,
        how: str,
        *args: str,
        where: str = "main",
        rewrite_token: bool = False,
        loop: str = "uvloop",
    ) -> None:
        env = self.environment(
            point,
            how,
            where,
            TUNNELD_ADMIN_TOKEN_FILE=str(self.token_file),
            TUNNEL_LOOP=loop,
            PYTHONPATH=os.pathsep.join([str(self.hook), str(ROOT)]),
            STARTUP_SIGNAL_ONCE="1",
            STARTUP_SIGNAL_TREE_ONLY="1",
        )
        if rewrite_token:
            env["STARTUP_SIGNAL_REWRITE"] = f"{self.token_file}={NEW_TOKEN}"
        run = [str(self.script)] if program == "script" else ["-m", "tunneld"]
        self.serve([sys.executable, *run], env, *args, cwd=self.tmp)

    def wait_serving(self) -> dict[str, int]:
        """The ports, once the ports file is there (written when it serves); fails if the process
        ends first or it takes RUN_TIMEOUT (polled every 50 ms, bounded)."""
        assert self.proc is not None
        for _ in range(int(RUN_TIMEOUT / 0.05)):
            if self.ports.exists():
                return dict(json.loads(self.ports.read_text()))
            try:
                status = self.proc.wait(0.05)
            except subprocess.TimeoutExpired:
                continue
            pytest.fail(f"exited {status} before serving:\n{self.output()[-3000:]}")
        pytest.fail(f"not serving {RUN_TIMEOUT:g}s after its start:\n{self.output()[-3000:]}")

    def stop(self) -> tuple[int, str]:
        """SIGTERM, as systemd's stop, once it serves: its normal stop."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.wait()


@pytest.fixture
def run(tmp_path: Path) -> Iterator[Run]:
    with Run(tmp_path) as r:
        yield r


def admin_status(port: int, token: str) -> int:
    """The status of ``GET /v1/sandboxes`` on the admin API with ``token``."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/sandboxes", headers={"Authorization": f"Bearer {token}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


PROGRAMS = ["script", "python -m tunneld"]
STOPS = {"SIGTERM": ("TERM", 0), "SIGINT": ("INT", 130)}


@pytest.mark.parametrize("sig", list(STOPS))
@pytest.mark.parametrize("point", IMPORT_POINTS)
@pytest.mark.parametrize("program", PROGRAMS)
def test_a_stop_signal_during_the_imports_ends_it_with_one_line(
    run: Run, program: str, point: str, sig: str
) -> None:
    how, expected = STOPS[sig]
    run.start(program, point, how)
    status, text = run.wait()
    run.check_clean_end(point, text)
    assert status == expected, (status, text[-3000:])
    assert text == f"tunneld: {sig} during start-up: stopped before serving\n", text[-3000:]
    assert not run.state.exists() and not run.ports.exists()


@pytest.mark.parametrize(
    ("program", "point", "loop"),
    [("script", point, "uvloop") for point in HUP_POINTS]
    + [
        ("python -m tunneld", "import:tunneld.cli", "uvloop"),
        ("script", "call:tunneld/edge.py:EdgeServer.start", "asyncio"),
    ],
)
def test_a_sighup_while_it_starts_is_a_reload_once_it_serves(
    run: Run, program: str, point: str, loop: str
) -> None:
    # The admin token file is rewritten just before the SIGHUP: the token in effect once it
    # serves is the new one, also where the configuration had been read before the SIGHUP.
    run.start(program, point, "HUP", rewrite_token=True, loop=loop)
    ports = run.wait_serving()
    assert admin_status(ports["admin"], NEW_TOKEN) == 200, run.output()[-3000:]
    assert admin_status(ports["admin"], OLD_TOKEN) == 401, run.output()[-3000:]
    status, text = run.stop()
    run.check_clean_end(point, text)
    assert status == 0, (status, text[-3000:])
    assert "SIGHUP during start-up: reloading now" in text, text[-3000:]
    assert text.count("SIGHUP: configuration reloaded") == 1, text[-3000:]
    assert "tunneld: stopped" in text, text[-3000:]
