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

No timing: a ``sitecustomize`` on ``PYTHONPATH`` sends the signal the moment a chosen module
starts to be imported (a meta-path finder) or a chosen function is entered (``sys.setprofile``),
and each case fails if its point is never reached. The tree under test (ROOT, also a copy of
it) comes first on ``PYTHONPATH`` and the console script is written from its pyproject.toml,
as pip writes it. The ``--workers`` cases (the supervisor and its workers) are in
test_sighup_during_startup_workers.py.

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
import shutil
import signal
import subprocess
import sys
import tempfile
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]  # the tree under test (also in a copy of it)
RUN_TIMEOUT = 60.0  # a start and its stop take a second or two; this only bounds a hang
OLD_TOKEN, NEW_TOKEN = "old-admin-token", "new-admin-token"

# Installed at start by Python (site imports sitecustomize). EARLY_SIGNAL_AT names the point:
#   import:MODULE           MODULE starts to be imported
#   call:FILE:QUALNAME      that function is entered (FILE: the last two parts of its path)
# in the process EARLY_SIGNAL_IN names: "main" (the one started) or "w0" (worker 0 of
# --workers). EARLY_SIGNAL_HOW:
#   TERM    SIGTERM raised in the process
#   INT     SIGINT sent to the process's group, as a terminal's Ctrl-C
#   HUP     SIGHUP raised in the process
#   HUP-up  (a worker) SIGHUP sent to the supervisor, as systemctl reload does; the worker holds
#           its own SIGHUP blocked until the supervisor passed it on (at most PASS_ON_WAIT s),
#           so that it arrives at that point
# EARLY_SIGNAL_REWRITE=PATH=TEXT is written to PATH first (a configuration changed, then the
# reload asked for). The marker file gets "fired POINT"; a point fires once per test.
PASS_ON_WAIT = 10.0
_SITECUSTOMIZE = r"""
import json, os, signal, sys, time

_point = os.environ.get("EARLY_SIGNAL_AT", "")
_how = os.environ.get("EARLY_SIGNAL_HOW", "")
_where = os.environ.get("EARLY_SIGNAL_IN", "main")
_marker = os.environ.get("EARLY_SIGNAL_MARKER", "")
_rewrite = os.environ.get("EARLY_SIGNAL_REWRITE", "")
_overrides = os.environ.get("TUNNELD_WORKER_OVERRIDES")
_me = "main"
if _overrides is not None:
    _me = "w" + json.loads(_overrides).get("node_id", "").rsplit("-w", 1)[-1]


def _fire():
    sys.setprofile(None)
    if _rewrite:
        path, _, text = _rewrite.partition("=")
        with open(path + ".new", "w") as f:
            f.write(text)
        os.replace(path + ".new", path)
    with open(_marker, "a") as f:
        f.write("fired " + _point + "\n")
    if _how == "TERM":
        signal.raise_signal(signal.SIGTERM)
    elif _how == "INT":
        os.killpg(os.getpgrp(), signal.SIGINT)
    elif _how == "HUP":
        signal.raise_signal(signal.SIGHUP)
    elif _how == "HUP-up":
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
        os.kill(os.getppid(), signal.SIGHUP)
        deadline = time.monotonic() + PASS_ON_WAIT
        while signal.SIGHUP not in signal.sigpending() and time.monotonic() < deadline:
            time.sleep(0.01)
        with open(_marker, "a") as f:
            passed = signal.SIGHUP in signal.sigpending()
            f.write("passed on\n" if passed else "not passed on\n")
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})


# The tree on PYTHONPATH only: an editable install's finder (appended by its .pth) would supply
# from another tree what this one lacks (tunneld/__main__.py, tunneld/entry.py in a copy).
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]

if _point and _where == _me and not os.path.exists(_marker):
    kind, _, spec = _point.partition(":")
    if kind == "import":

        class _OnImport:
            @classmethod
            def find_spec(cls, name, path=None, target=None):
                if name == spec:
                    sys.meta_path.remove(cls)
                    _fire()
                return None

        if spec in sys.modules:
            with open(_marker, "a") as f:
                f.write("imported before sitecustomize: " + spec + "\n")
        else:
            sys.meta_path.insert(0, _OnImport)
    else:

        def _profile(frame, event, arg):
            if event != "call":
                return
            code = frame.f_code
            name = code.co_filename.replace(os.sep, "/").rsplit("/", 2)
            if "/".join(name[-2:]) + ":" + code.co_qualname == spec:
                _fire()

        sys.setprofile(_profile)
""".replace("PASS_ON_WAIT", repr(PASS_ON_WAIT))

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


def session_members(sid: int) -> list[str]:
    """Processes of session ``sid`` still running (not zombies), as "pid command"."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        head, _, rest = stat.rpartition(")")
        fields = rest.split()
        if fields[0] != "Z" and int(fields[3]) == sid:
            found.append(f"{entry.name} {head.partition('(')[2]}")
    return found


def console_script(directory: Path) -> Path:
    """The ``tunneld`` script as pip writes it for this tree's ``[project.scripts]``."""
    with open(ROOT / "pyproject.toml", "rb") as f:
        entry = tomllib.load(f)["project"]["scripts"]["tunneld"]
    module, func = entry.split(":")
    script = directory / "tunneld"
    script.write_text(
        f"#!{sys.executable}\n"
        "import sys\n"
        f"from {module} import {func}\n"
        "if __name__ == '__main__':\n"
        "    sys.argv[0] = sys.argv[0].removesuffix('.exe')\n"
        f"    sys.exit({func}())\n"
    )
    return script


class Run:
    """One ``tunneld serve`` in a session of its own, with the hook installed."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.hook = tmp / "hook"
        self.hook.mkdir()
        (self.hook / "sitecustomize.py").write_text(_SITECUSTOMIZE)
        self.script = console_script(tmp)
        self.state = tmp / "state"
        # the private redis-server's socket directory goes here (--workers): short, as a
        # socket path must be
        self.tmpdir = Path(tempfile.mkdtemp(prefix="tunneld-early-", dir="/tmp"))
        self.marker = tmp / "fired"
        self.ports = tmp / "ports.json"
        self.token_file = tmp / "admin-token"
        self.token_file.write_text(OLD_TOKEN)
        self.log = tmp / "tunneld.log"
        self.proc: subprocess.Popen[bytes] | None = None

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
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TUNNELD_", "EARLY_"))}
        env.update(
            TUNNELD_ADMIN_TOKEN_FILE=str(self.token_file),
            TUNNELD_SECRET="s3cret",
            TUNNELD_NODE_PORT="0",
            TUNNEL_LOOP=loop,
            TMPDIR=str(self.tmpdir),
            PYTHONPATH=os.pathsep.join([str(self.hook), str(ROOT)]),
            PYTHONUNBUFFERED="1",
            EARLY_SIGNAL_AT=point,
            EARLY_SIGNAL_HOW=how,
            EARLY_SIGNAL_IN=where,
            EARLY_SIGNAL_MARKER=str(self.marker),
        )
        if rewrite_token:
            env["EARLY_SIGNAL_REWRITE"] = f"{self.token_file}={NEW_TOKEN}"
        env.pop("NOTIFY_SOCKET", None)
        run = [str(self.script)] if program == "script" else ["-m", "tunneld"]
        argv = [sys.executable, *run, "serve", "--public-port", "0", "--agent-port", "0"]
        argv += ["--admin-port", "0", "--state-dir", str(self.state), "--grace-period", "5"]
        argv += ["--ports-file", str(self.ports), *args]
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                argv,
                env=env,
                cwd=self.tmp,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own group and session, as under a terminal
            )

    def wait(self) -> tuple[int, str]:
        assert self.proc is not None
        try:
            status = self.proc.wait(RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {RUN_TIMEOUT:g}s after the signal:\n{self.output()}")
        return status, self.output()

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

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def fired(self) -> str:
        return self.marker.read_text() if self.marker.exists() else ""

    def kill(self) -> None:
        if self.proc is None:
            return
        sid = self.proc.pid
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for member in session_members(sid):
            try:
                os.kill(int(member.split()[0]), signal.SIGKILL)
            except ProcessLookupError:
                pass

    def check_clean_end(self, point: str, text: str) -> None:
        assert self.proc is not None
        assert f"fired {point}" in self.fired(), (
            f"the point was never reached: {self.fired()!r}\n{text[-3000:]}"
        )
        assert "Traceback" not in text, text[-3000:]
        assert session_members(self.proc.pid) == [], (
            f"left running: {session_members(self.proc.pid)}\n{text[-3000:]}"
        )
        left = [p.name for p in self.tmp.rglob("*.tmp")]
        left += [p.name for p in self.state.glob(".write-probe-*")]
        assert left == [], left
        assert list(self.tmpdir.iterdir()) == [], "the private redis-server's directory is left"


@pytest.fixture
def run(tmp_path: Path) -> Iterator[Run]:
    r = Run(tmp_path)
    try:
        yield r
    finally:
        r.kill()
        shutil.rmtree(r.tmpdir, ignore_errors=True)


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
