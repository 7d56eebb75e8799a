"""A stop signal that reaches ``tunneld serve`` while it is still starting ends it cleanly.

SIGTERM (systemd, an operator) or SIGINT (Ctrl-C, which a terminal sends to the whole
foreground process group: the supervisor, its workers and its private redis-server alike) at
any point of the start: the process exits promptly, 0 for SIGTERM and 130 for SIGINT (once the
``--workers`` supervisor's loop has its handlers: 0, docs/operations.md), with a line saying so
and no traceback, and leaves nothing behind: no process of its session (workers, the private
redis-server), no ``.write-probe-*`` or ``*.tmp`` file, no half-written ports file, no private
redis-server directory in ``$TMPDIR``, no ``UNSAVED`` marker.

No timing: a ``sitecustomize`` on ``PYTHONPATH`` raises the signal in the process itself the
moment one chosen point of the start is reached: a module starts to be imported (a meta-path
finder), a function is entered or calls a chosen C function (``sys.setprofile``). For the
points inside a worker, worker 0 sends SIGTERM to its supervisor (as systemd or an operator
would) and holds its own SIGTERM blocked until the supervisor has passed it on, so it arrives
at that point. Each case fails if its point is never reached, so the sweep cannot go stale.

Before tunneld/cli.py took SIGTERM and SIGINT in its first lines and ``_serve`` before it opens
the store, 67 of these 101 cases failed: a SIGTERM in 30 cases killed the process by the
signal's default action (status -15, nothing said), in one leaving a ``.write-probe-*`` file in
the state directory and in two a half-written ``ports.json.tmp``; worker 0 was killed the same
way at all 10 of its points; a SIGINT during the imports printed a KeyboardInterrupt traceback
(5), elsewhere it exited 130 without a word, through asyncio's own SIGINT handling once the loop
ran, which cancelled the start without stopping what it began; two supervisor cases found the
exposures not written back (the private redis-server had taken the signal too: fixed with
tests/cluster/test_workers_stop_signal_to_all.py).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
RUN_TIMEOUT = 60.0  # a start and its stop take a second or two; this only bounds a hang

# Installed at start by Python (site imports sitecustomize). STARTUP_SIGNAL_AT names the point:
#   import:MODULE                 MODULE starts to be imported
#   call:FILE:QUALNAME[#N]        the Nth call (default the first) of that function begins
#   ccall:FILE:QUALNAME:NAME      that function calls the C function NAME
# (FILE: the last two parts of its path, e.g. tunneld/cli.py). STARTUP_SIGNAL_HOW:
#   TERM      SIGTERM raised in this process
#   INT       SIGINT sent to this process's group, as a terminal's Ctrl-C
#   TERM-all  SIGTERM to every process of this session, as systemd's stop sends it to every
#             process of the unit (KillMode=control-group, the default the unit keeps)
#   TERM-up   (worker 0) SIGTERM sent to the supervisor; its own SIGTERM, blocked from the
#             start, is let in once the supervisor passed it on (bounded wait)
# The marker file gets "fired POINT" when it fires.
_SITECUSTOMIZE = r"""
import json, os, signal, sys, time

_point = os.environ.get("STARTUP_SIGNAL_AT", "")
_how = os.environ.get("STARTUP_SIGNAL_HOW", "")
_marker = os.environ.get("STARTUP_SIGNAL_MARKER", "")
_overrides = os.environ.get("TUNNELD_WORKER_OVERRIDES")
_worker = None
if _overrides is not None:
    _worker = json.loads(_overrides).get("node_id", "").rsplit("-w", 1)[-1]
_wanted = (_how == "TERM-up") == (_worker is not None) and _worker in (None, "0")


def _fire():
    sys.setprofile(None)
    with open(_marker, "a") as f:
        f.write("fired " + _point + "\n")
    if _how == "TERM":
        signal.raise_signal(signal.SIGTERM)
    elif _how == "INT":
        os.killpg(os.getpgrp(), signal.SIGINT)
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
    elif _how == "TERM-up":
        os.kill(os.getppid(), signal.SIGTERM)
        deadline = time.monotonic() + 30
        while signal.SIGTERM not in signal.sigpending() and time.monotonic() < deadline:
            time.sleep(0.01)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


if _point and _wanted:
    if _how == "TERM-up":  # every thread started later inherits the mask
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
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
        where = parts[0] + ":" + parts[1]
        cname = parts[2] if kind == "ccall" else None
        left = [int(nth or 1)]

        def _profile(frame, event, arg):
            if event != ("c_call" if cname else "call"):
                return
            if cname and getattr(arg, "__name__", None) != cname:
                return
            code = frame.f_code
            name = code.co_filename.replace(os.sep, "/").rsplit("/", 2)
            if "/".join(name[-2:]) + ":" + code.co_qualname != where:
                return
            left[0] -= 1
            if left[0] == 0:
                _fire()

        sys.setprofile(_profile)
"""

# The single process, as `tunneld serve` on its default sqlite store.
SINGLE_POINTS = [
    "import:argparse",
    "import:asyncio",
    "import:tunneld.config",
    "import:tunneld.inspect_cli",
    "call:tunneld/cli.py:main",
    "call:tunneld/config.py:load_config",
    "call:tunneld/cli.py:_setup_logging",
    "call:tunneld/cli.py:serve",
    "import:tunneld.edge",
    "call:tunneld/cli.py:_serve",
    "call:tunneld/store.py:open_store",
    "call:tunneld/store.py:lock_state_dir",
    "ccall:tunneld/store.py:_check_writable:fsync",
    "call:tunneld/edge.py:EdgeServer.start",
    "call:tunneld/edge.py:EdgeServer._load_exposures",
    "call:tunneld/edge.py:_listening#1",
    "call:tunneld/edge.py:_listening#2",
    "call:tunneld/edge.py:_listening#3",
    "call:json/__init__.py:dump",  # in _write_ports: the ports file half-written
    "ccall:tunneld/cli.py:_write_ports:replace",
]

# The --workers 2 supervisor (sqlite store: it runs a private redis-server for the workers).
# Up to the first step of Supervisor.run, the handler of tunneld/cli.py's first lines.
SUPERVISOR_EARLY = [
    "call:tunneld/cli.py:main",
    "call:tunneld/config.py:load_config",
    "import:tunneld.supervisor",
    "call:tunneld/supervisor.py:supervise",
    "call:tunneld/supervisor.py:Supervisor.run",
]
SUPERVISOR_RUN = [
    "call:tunneld/supervisor.py:Supervisor._start_up",
    "call:tunneld/supervisor.py:reserve_port#3",
    "call:tunneld/systemd.py:open_notify_socket",
    "call:tunneld/store.py:SqliteStore.open",
    "ccall:tunneld/store.py:_check_writable:fsync",
    "call:tunneld/private_redis.py:PrivateRedis._spawn",
    "call:tunneld/private_redis.py:PrivateRedis._started",
    "call:tunneld/supervisor.py:_copy",
    "call:tunneld/supervisor.py:_write_marker",
    "call:tunneld/supervisor.py:Supervisor._start#1",
    "call:tunneld/supervisor.py:Supervisor._start#2",
    "call:tunneld/supervisor.py:Supervisor._on_notify",
]

# Inside worker 0 (the supervisor gets SIGTERM and passes it on): its store is the private
# redis-server, so it is a cluster node.
WORKER_POINTS = [
    "import:argparse",
    "call:tunneld/supervisor.py:prepare_worker",
    "call:tunneld/config.py:load_config",
    "call:tunneld/cli.py:_serve",
    "call:tunneld/redis_store.py:RedisStore.from_url",
    "call:tunneld/edge.py:EdgeServer.start",
    "call:tunneld/cluster.py:Cluster.start",
    "call:tunneld/cluster.py:Cluster._register",
    "call:tunneld/edge.py:_listening#1",
    "call:tunneld/edge.py:_listening#3",
]


def _session_members(sid: int) -> list[str]:
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


class Run:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.hook = tmp / "hook"
        self.hook.mkdir()
        (self.hook / "sitecustomize.py").write_text(_SITECUSTOMIZE)
        self.state = tmp / "state"
        # the private redis-server's socket directory goes here: short, as a socket path must
        # be (under xdist tmp_path is too long, and tunneld would take /tmp instead)
        self.tmpdir = Path(tempfile.mkdtemp(prefix="tunneld-sig-", dir="/tmp"))
        self.marker = tmp / "fired"
        self.ports = tmp / "ports.json"
        self.log = tmp / "tunneld.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, point: str, how: str, *args: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TUNNELD_", "STARTUP_"))}
        env.update(
            TUNNELD_ADMIN_TOKEN="admintok",
            TUNNELD_SECRET="s3cret",
            TUNNELD_NODE_PORT="0",
            TMPDIR=str(self.tmpdir),
            PYTHONPATH=os.pathsep.join(filter(None, [str(self.hook), env.get("PYTHONPATH")])),
            PYTHONUNBUFFERED="1",
            STARTUP_SIGNAL_AT=point,
            STARTUP_SIGNAL_HOW=how,
            STARTUP_SIGNAL_MARKER=str(self.marker),
        )
        env.pop("NOTIFY_SOCKET", None)
        argv = [str(BIN / "tunneld"), "serve", "--public-port", "0", "--agent-port", "0"]
        argv += ["--admin-port", "0", "--state-dir", str(self.state), "--grace-period", "5"]
        argv += ["--ports-file", str(self.ports), *args]
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                argv,
                env=env,
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
        for member in _session_members(sid):
            try:
                os.kill(int(member.split()[0]), signal.SIGKILL)
            except ProcessLookupError:
                pass

    def check_nothing_left(self, point: str, status: int, text: str) -> None:
        assert self.proc is not None
        assert f"fired {point}" in self.fired(), (
            f"the point was never reached: {self.fired()!r}\n{text[-3000:]}"
        )
        assert "Traceback" not in text, text[-3000:]
        assert _session_members(self.proc.pid) == [], (
            f"left running: {_session_members(self.proc.pid)}\n{text[-3000:]}"
        )
        left = [p.name for p in self.state.glob(".write-probe-*")]
        left += [p.name for p in self.tmp.rglob("*.tmp")]
        assert left == [], left
        assert list(self.tmpdir.iterdir()) == [], "the private redis-server's directory is left"
        assert not (self.state / "redis" / "UNSAVED").exists(), text[-3000:]
        if self.ports.exists():  # written whole or not at all
            json.loads(self.ports.read_text())


@pytest.fixture
def run(tmp_path: Path) -> Iterator[Run]:
    r = Run(tmp_path)
    try:
        yield r
    finally:
        r.kill()
        shutil.rmtree(r.tmpdir, ignore_errors=True)


SIGNALS = {"SIGTERM": ("TERM", 0), "SIGINT": ("INT", 130)}
# systemd's stop: SIGTERM to the supervisor, its workers and its redis-server at once
SUPERVISOR_SIGNALS = {**SIGNALS, "SIGTERM to all": ("TERM-all", 0)}


@pytest.mark.parametrize("sig", list(SIGNALS))
@pytest.mark.parametrize("point", SINGLE_POINTS)
def test_a_signal_while_a_single_process_starts_stops_it_cleanly(
    run: Run, point: str, sig: str
) -> None:
    how, expected = SIGNALS[sig]
    run.start(point, how)
    status, text = run.wait()
    run.check_nothing_left(point, status, text)
    assert status == expected, (status, text[-3000:])
    assert f"{sig} during start-up" in text, text[-3000:]
    assert "READY" not in text and "draining" not in text, text[-3000:]


needs_redis = pytest.mark.skipif(
    shutil.which("redis-server") is None and not Path("/usr/bin/redis-server").exists(),
    reason="--workers on a sqlite store runs a private redis-server",
)


@needs_redis
@pytest.mark.parametrize("point", WORKER_POINTS)
def test_a_sigterm_passed_on_to_a_starting_worker_stops_everything_cleanly(
    run: Run, point: str
) -> None:
    run.start(point, "TERM-up", "--workers", "2")
    status, text = run.wait()
    run.check_nothing_left(point, status, text)
    assert status == 0, (status, text[-3000:])
    # worker 0 took the signal at the point with its handlers, not by the signal's default
    assert re.search(r"worker 0 \(pid \d+\) was killed by", text) is None, text[-3000:]
    assert "supervisor stopped" in text, text[-3000:]
