"""What the tests that signal a starting program share: the console script as pip writes it, and
for ``tunneld serve`` a ``sitecustomize`` hook that signals it the moment one chosen point of its
start is reached, with ``StartRun``, one such run in a session of its own
(tests/e2e/test_signal_during_startup.py, tests/e2e/test_signal_before_handlers.py and the files
that take their cases; the console script also tests/agent/test_agent_sigint_import.py)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path
from types import TracebackType

import pytest

ROOT = Path(__file__).resolve().parents[1]  # the tree under test (also in a copy of it)
RUN_TIMEOUT = 60.0  # a start and its stop take a second or two; this only bounds a hang


def console_script(directory: Path, name: str) -> Path:
    """The script ``name`` as pip writes it for this tree's ``[project.scripts]``."""
    with open(ROOT / "pyproject.toml", "rb") as f:
        entry = tomllib.load(f)["project"]["scripts"][name]
    module, func = entry.split(":")
    script = directory / name
    script.write_text(
        f"#!{sys.executable}\n"
        "import sys\n"
        f"from {module} import {func}\n"
        "if __name__ == '__main__':\n"
        "    sys.argv[0] = sys.argv[0].removesuffix('.exe')\n"
        f"    sys.exit({func}())\n"
    )
    return script


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


# Installed at start by Python (site imports sitecustomize). STARTUP_SIGNAL_AT names the point:
#   import:MODULE                 MODULE starts to be imported
#   call:FILE:QUALNAME[#N]        the Nth call (default the first) of that function begins
#   ccall:FILE:QUALNAME:NAME      that function calls the C function NAME
# (FILE: the last two parts of its path, e.g. tunneld/cli.py), in the process STARTUP_SIGNAL_IN
# names: "main" (the one started) or "w0" (worker 0 of --workers). STARTUP_SIGNAL_HOW:
#   TERM      SIGTERM raised in this process
#   INT       SIGINT sent to this process's group, as a terminal's Ctrl-C
#   HUP       SIGHUP raised in this process
#   TERM-all  SIGTERM to every process of this session, as systemd's stop sends it to every
#             process of the unit (KillMode=control-group, the default the unit keeps)
#   TERM-up   (worker 0) SIGTERM sent to the supervisor; its own SIGTERM, blocked from the
#             start, arrives once the supervisor passed it on (bounded wait): let in then, unless
#             the worker itself holds it blocked at that point (the supervisor blocks it across
#             the worker's Python start, tunneld/entry.py lets it in): the worker's own unblocking
#             before the point is put off to the point, and its mask is then what it would be
#   TERM-up-stuck  (worker 0) TERM-up, then it stays at that point (up to STUCK_FOR s): a start
#             that hangs, which only the supervisor's SIGKILL ends
#   TERM-starved  (the supervisor) SIGTERM to itself and to worker 0, as systemd's stop sends it,
#             with its own SIGTERM and SIGCHLD held until worker 0 has exited (bounded wait): both
#             then reach it at once, as when the stop finds it without a CPU while the worker ends
#   TERM-redis  (the supervisor) SIGTERM to its private redis-server, then a wait (bounded) until
#             that has exited
#   HUP-up    (a worker) SIGHUP sent to the supervisor, as systemctl reload does; the worker holds
#             its own SIGHUP blocked until the supervisor passed it on (at most PASS_ON_WAIT s),
#             so that it arrives at that point
# STARTUP_SIGNAL_REWRITE=PATH=TEXT is written to PATH first (a configuration changed, then the
# reload asked for). The marker file gets "fired POINT" when it fires. STARTUP_SIGNAL_ONCE=1: a
# point fires once per test (not in a process started once the marker file is there).
# STARTUP_SIGNAL_TREE_ONLY=1: the tree on PYTHONPATH only, without an editable install's finder.
PASS_ON_WAIT = 10.0
STUCK_FOR = 120.0
SITECUSTOMIZE = r"""
import json, os, signal, sys, time

_point = os.environ.get("STARTUP_SIGNAL_AT", "")
_how = os.environ.get("STARTUP_SIGNAL_HOW", "")
_where = os.environ.get("STARTUP_SIGNAL_IN", "main")
_marker = os.environ.get("STARTUP_SIGNAL_MARKER", "")
_rewrite = os.environ.get("STARTUP_SIGNAL_REWRITE", "")
_once = os.environ.get("STARTUP_SIGNAL_ONCE") == "1"
_overrides = os.environ.get("TUNNELD_WORKER_OVERRIDES")
_me = "main"
if _overrides is not None:
    _me = "w" + json.loads(_overrides).get("node_id", "").rsplit("-w", 1)[-1]


def _child(name, index=None):  # this process's child of that command name (worker index)
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                head, _, rest = f.read().rpartition(")")
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if int(rest.split()[1]) != os.getpid() or not head.partition("(")[2].startswith(name):
            continue
        if index is None:
            return int(entry)
        if b"--worker-index" in argv and argv[argv.index(b"--worker-index") + 1] == b"%d" % index:
            return int(entry)
    raise RuntimeError(f"no child {name} {index}")


def _stat(pid):
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rpartition(")")[2].split()


def _zombie(pid):
    try:
        return _stat(pid)[0] == "Z"
    except OSError:
        return True


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
    elif _how == "TERM-all":
        sid = os.getsid(0)
        for entry in os.listdir("/proc"):
            if entry.isdigit() and int(entry) != os.getpid():
                try:
                    if os.getsid(int(entry)) == sid:
                        os.kill(int(entry), signal.SIGTERM)
                except OSError:
                    pass
        signal.raise_signal(signal.SIGTERM)
    elif _how in ("TERM-up", "TERM-up-stuck"):
        os.kill(os.getppid(), signal.SIGTERM)
        deadline = time.monotonic() + 30
        while signal.SIGTERM not in signal.sigpending() and time.monotonic() < deadline:
            time.sleep(0.01)
        with open(_marker, "a") as f:
            passed = signal.SIGTERM in signal.sigpending()
            f.write("passed on\n" if passed else "not passed on\n")
            f.write("held by the worker\n" if _term_held else "")
        signal.pthread_sigmask = _real_sigmask
        if not _term_held:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        if _how == "TERM-up-stuck":
            deadline = time.monotonic() + STUCK_FOR
            while time.monotonic() < deadline:
                time.sleep(0.1)
    elif _how == "TERM-starved":
        both = {signal.SIGTERM, signal.SIGCHLD}
        signal.pthread_sigmask(signal.SIG_BLOCK, both)
        worker = _child("python", 0)
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(worker, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while not _zombie(worker) and time.monotonic() < deadline:
            time.sleep(0.01)
        with open(_marker, "a") as f:
            f.write("both pending\n" if both <= signal.sigpending() else "not both pending\n")
        signal.pthread_sigmask(signal.SIG_UNBLOCK, both)
    elif _how == "TERM-redis":
        redis = _child("redis-server")
        os.kill(redis, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while not _zombie(redis) and time.monotonic() < deadline:
            time.sleep(0.01)
        with open(_marker, "a") as f:
            f.write("redis-server exited\n" if _zombie(redis) else "redis-server running\n")
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


# An editable install's finder (appended by its .pth) would supply from another tree what this
# one lacks (tunneld/__main__.py, tunneld/entry.py in a copy).
if os.environ.get("STARTUP_SIGNAL_TREE_ONLY") == "1":
    sys.meta_path[:] = [
        f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")
    ]

_real_sigmask = signal.pthread_sigmask
_term_held = False  # TERM-up: whether the worker itself holds SIGTERM blocked (its own view)


def _sigmask(how, mask):
    # TERM-up, before the point: SIGTERM stays blocked whatever the worker does; what the worker
    # asked for is noted, and applied at the point (_fire).
    global _term_held
    mask = set(mask)
    held = _term_held
    if how == signal.SIG_SETMASK:
        _term_held = signal.SIGTERM in mask
        old = _real_sigmask(how, mask | {signal.SIGTERM})
    elif how == signal.SIG_UNBLOCK:
        _term_held = _term_held and signal.SIGTERM not in mask
        old = _real_sigmask(how, mask - {signal.SIGTERM})
    else:
        _term_held = _term_held or signal.SIGTERM in mask
        old = _real_sigmask(how, mask)
    return old if held else old - {signal.SIGTERM}


if _point and _where == _me and not (_once and os.path.exists(_marker)):
    if _how in ("TERM-up", "TERM-up-stuck"):  # every thread started later inherits the mask
        _term_held = signal.SIGTERM in _real_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        signal.pthread_sigmask = _sigmask
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
        spec, _, nth = spec.partition("#")
        parts = spec.split(":")
        at = parts[0] + ":" + parts[1]
        cname = parts[2] if kind == "ccall" else None
        left = [int(nth or 1)]

        def _profile(frame, event, arg):
            if event != ("c_call" if cname else "call"):
                return
            if cname and getattr(arg, "__name__", None) != cname:
                return
            code = frame.f_code
            name = code.co_filename.replace(os.sep, "/").rsplit("/", 2)
            if "/".join(name[-2:]) + ":" + code.co_qualname != at:
                return
            left[0] -= 1
            if left[0] == 0:
                _fire()

        sys.setprofile(_profile)
""".replace("PASS_ON_WAIT", repr(PASS_ON_WAIT)).replace("STUCK_FOR", repr(STUCK_FOR))


class StartRun:
    """One ``tunneld serve`` in a session of its own, with the hook installed; a context manager
    that kills what is left of it (its whole session) and removes its ``$TMPDIR``."""

    def __init__(self, tmp: Path, tmpdir_prefix: str) -> None:
        self.tmp = tmp
        self.hook = tmp / "hook"
        self.hook.mkdir()
        (self.hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
        self.state = tmp / "state"
        # the private redis-server's socket directory goes here (--workers): short, as a socket
        # path must be (under xdist tmp_path is too long, and tunneld would take /tmp instead)
        self.tmpdir = Path(tempfile.mkdtemp(prefix=tmpdir_prefix, dir="/tmp"))
        self.marker = tmp / "fired"
        self.ports = tmp / "ports.json"
        self.log = tmp / "tunneld.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> StartRun:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.kill()
        finally:
            shutil.rmtree(self.tmpdir, ignore_errors=True)

    def environment(self, point: str, how: str, where: str, **more: str) -> dict[str, str]:
        """This environment without TUNNELD_ and STARTUP_ variables, with the hook's (the point
        fires in the process ``where``) and ``more``."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TUNNELD_", "STARTUP_"))}
        env.update(
            TUNNELD_SECRET="s3cret",
            TUNNELD_NODE_PORT="0",
            TMPDIR=str(self.tmpdir),
            PYTHONUNBUFFERED="1",
            STARTUP_SIGNAL_AT=point,
            STARTUP_SIGNAL_HOW=how,
            STARTUP_SIGNAL_IN=where,
            STARTUP_SIGNAL_MARKER=str(self.marker),
        )
        env.update(more)
        env.pop("NOTIFY_SOCKET", None)
        return env

    def serve(self, command: list[str], env: dict[str, str], *args: str, cwd: Path | None) -> None:
        """``command serve`` on ports 0, the state directory and the ports file here, and
        ``args``; its output (stdout and stderr) into the log file."""
        argv = [*command, "serve", "--public-port", "0", "--agent-port", "0"]
        argv += ["--admin-port", "0", "--state-dir", str(self.state), "--grace-period", "5"]
        argv += ["--ports-file", str(self.ports), *args]
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                argv,
                env=env,
                cwd=cwd,
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
        """The point was reached; no traceback, no process of its session left, no ``*.tmp`` or
        ``.write-probe-*`` file, nothing in its ``$TMPDIR`` (the private redis-server's)."""
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
