"""``--workers N``: a stop signal at either end of the supervisor's life, with the private
redis-server it runs for a sqlite store (tunneld/supervisor.py ``Supervisor.run``,
``_stop_private_store``; tunneld/private_redis.py ``PrivateRedis.stop_async``).

At the start: the supervisor used to install its SIGTERM/SIGINT handlers only once its private
redis-server answered and the exposures were copied into it. A SIGTERM before that took the
default action (the supervisor died at once, exit status -15, nothing logged, the state
directory left as it was at that moment), and a SIGINT cancelled the start and ended in
Python's KeyboardInterrupt (exit 130). Now the signals are the supervisor's from its first
moment: one during the start abandons it, stops the redis-server it started, and exits 0 when
exposures.db is still the newest copy, 1 when a run's exposures could not be written back.

At the end: the supervisor stopped its redis-server with a blocking wait (10 s, then SIGKILL
and another wait that could raise), with its signal handlers already removed and nothing
logged. Now the wait is on the loop, bounded (10 s, SIGKILL, 5 s), the SIGKILL is logged, and
a second SIGTERM meanwhile is taken (logged) instead of killing the supervisor mid-stop.

``$TUNNELD_REDIS_SERVER`` is a stand-in script run in place of the real redis-server, which
it then runs (the moment to signal is a file it creates, never a sleep):

- ``hold`` in its directory: it creates ``waiting`` and waits until ``hold`` is gone (at most
  60 s) before it starts the real server: the supervisor's start waits for it;
- ``stubborn``: it runs the real server as its child (which the kernel kills with it) and does
  not exit on SIGTERM (it creates ``term`` instead): a redis-server that does not stop.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.procs import BIN, Processes, admin_client, wait_for, wait_for_file

from .test_workers import alive
from .test_workers_private_store import exported, recovered_at_next_start

GRACE = 5
STOP_MARGIN = 10  # tunneld/supervisor.py: SIGTERM -> SIGKILL for a worker hung past its grace
STOP_TIMEOUT = 10  # tunneld/private_redis.py: SIGTERM -> SIGKILL for the redis-server
KILL_WAIT = 5  # tunneld/private_redis.py: after that SIGKILL
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
SETPRIV = shutil.which("setpriv") or "/usr/bin/setpriv"  # util-linux, essential on Debian


class StandIn:
    """The ``$TUNNELD_REDIS_SERVER`` script and the files that drive it."""

    def __init__(self, gate: Path) -> None:
        self.gate = gate
        gate.mkdir()
        self.script = gate / "redis-server"
        self.script.write_text(
            "#!/bin/sh\n"
            f'G="{gate}"\n'
            'echo $$ > "$G/pid"\n'
            'if [ -e "$G/hold" ]; then\n'
            '  touch "$G/waiting"\n'
            "  i=0\n"
            '  while [ -e "$G/hold" ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i + 1)); done\n'
            "fi\n"
            'if [ -e "$G/stubborn" ]; then\n'
            "  trap 'touch \"$G/term\"' TERM\n"
            f'  "{SETPRIV}" --pdeathsig KILL "{REDIS_SERVER}" "$@" &\n'
            "  child=$!\n"
            '  echo $child > "$G/child"\n'
            "  while kill -0 $child 2>/dev/null; do wait $child; done\n"
            "  exit 0\n"
            "fi\n"
            f'exec "{REDIS_SERVER}" "$@"\n'
        )
        self.script.chmod(0o755)

    def pid(self, name: str = "pid") -> int:
        return int(wait_for(lambda: _read(self.gate / name), what=f"the stand-in's {name}"))

    def release(self) -> None:
        (self.gate / "hold").unlink(missing_ok=True)

    def kill_all(self) -> None:
        """Whatever the stand-in left (a supervisor killed by a signal leaves it to itself)."""
        self.release()
        for name in ("pid", "child"):
            pid = _read(self.gate / name)
            if pid and alive(int(pid)):
                os.kill(int(pid), signal.SIGKILL)


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        return ""


@pytest.fixture
def stand_in(tmp_path: Path) -> Iterator[StandIn]:
    s = StandIn(tmp_path / "gate")
    try:
        yield s
    finally:
        s.kill_all()


def _supervisor(procs: Processes, stand_in: StandIn) -> tuple[subprocess.Popen[bytes], Path, Path]:
    """``tunneld serve --workers 2`` on the default (sqlite) store with the stand-in as its
    redis-server: (process, ports file, log)."""
    n = len(procs.procs)
    ports = procs.tmp / f"ports-{n}.json"
    log = procs.tmp / f"supervisor-{n}.log"
    argv = ["serve", "--workers", "2", "--grace-period", str(GRACE)]
    argv += ["--public-port", "0", "--agent-port", "0", "--admin-port", "0"]
    argv += ["--ports-file", str(ports), "--state-dir", str(procs.tmp / "state")]
    env = procs.env(
        TUNNELD_ADMIN_TOKEN=procs.admin_token,
        TUNNELD_SECRET=procs.secret,
        TUNNELD_REDIS_SERVER=str(stand_in.script),
    )
    with log.open("wb") as out:
        supervisor = subprocess.Popen(
            [str(BIN / "tunneld"), *argv], env=env, stdout=out, stderr=subprocess.STDOUT
        )
    procs.procs.append(supervisor)
    return supervisor, ports, log


def _seed(procs: Processes, token: str) -> None:
    """One exposure in exposures.db, as ``tunneld exposures import`` stores it."""
    (procs.tmp / "state").mkdir(exist_ok=True)
    line = json.dumps({"sandbox_id": "sb1", "port": 9000, "token": token}) + "\n"
    seeded = subprocess.run(
        [str(BIN / "tunneld"), "exposures", "import", "--state-dir", str(procs.tmp / "state")],
        input=line, text=True, capture_output=True, timeout=30, env=procs.env(),
    )  # fmt: skip
    assert seeded.returncode == 0, seeded.stderr


def _unsaved(procs: Processes) -> bool:
    return (procs.tmp / "state" / "redis" / "UNSAVED").exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_while_the_private_redis_starts_stops_everything_cleanly(
    procs: Processes, stand_in: StandIn, sig: signal.Signals
) -> None:
    """The signal arrives while the supervisor waits for its redis-server to answer: the start
    is abandoned, the redis-server it started is stopped, no worker is started, exposures.db
    (still the newest copy: nothing was copied yet) is left as it was, exit 0."""
    _seed(procs, "seeded_tok")
    (stand_in.gate / "hold").touch()
    supervisor, ports, log = _supervisor(procs, stand_in)
    wait_for(
        lambda: (stand_in.gate / "waiting").exists() or supervisor.poll() is not None,
        what="the supervisor's redis-server to be started",
    )
    assert supervisor.poll() is None, log.read_text()
    server = stand_in.pid()
    supervisor.send_signal(sig)
    status = supervisor.wait(30)
    text = log.read_text()
    assert status == 0, text[-3000:]
    assert f"{sig.name} during start-up" in text, text[-3000:]
    assert "supervisor stopped" in text
    assert not alive(server), "the redis-server being started was left running"
    assert "worker 0 started" not in text and not ports.exists()
    assert not _unsaved(procs)
    assert exported(procs) == {("sb1", 9000): "seeded_tok"}


def test_a_stop_signal_while_a_run_is_recovered_is_an_unclean_stop(
    procs: Processes, stand_in: StandIn
) -> None:
    """A run killed with its exposures only in the private redis-server is recovered by the next
    start; a SIGTERM while that start waits for its redis-server cannot write them back: said,
    exit 1, the marker stays, and the start after recovers them."""
    supervisor, ports, log = _supervisor(procs, stand_in)
    procs.ports = wait_for_file(ports, supervisor, log=log)
    with admin_client(procs) as admin:
        r = admin.post("/v1/sandboxes/sb1/ports", json={"port": 9000, "token": "kept_tok"})
        assert r.status_code == 200, r.text
    first = [stand_in.pid(), *json.loads(ports.read_text())["workers"]]
    supervisor.send_signal(signal.SIGKILL)  # its exposures are in its redis-server only
    supervisor.wait(10)
    wait_for(lambda: not any(alive(pid) for pid in first), what="the killed run's processes")
    assert _unsaved(procs)

    (stand_in.gate / "waiting").unlink(missing_ok=True)
    (stand_in.gate / "pid").unlink()
    (stand_in.gate / "hold").touch()
    supervisor, ports, log = _supervisor(procs, stand_in)
    wait_for(
        lambda: (stand_in.gate / "waiting").exists() or supervisor.poll() is not None,
        what="the recovering start's redis-server to be started",
    )
    assert supervisor.poll() is None, log.read_text()
    server = stand_in.pid()
    supervisor.send_signal(signal.SIGTERM)
    status = supervisor.wait(30)
    text = log.read_text()
    assert status == 1, text[-3000:]
    assert "SIGTERM during start-up" in text, text[-3000:]
    assert "exposures NOT written back" in text and "the next --workers start recovers" in text
    assert not alive(server), "the redis-server being started was left running"
    assert "worker 0 started" not in text and not ports.exists()
    assert _unsaved(procs)

    recovered_at_next_start(procs)  # the real redis-server: recovered from its file


def test_a_redis_server_that_does_not_stop_is_killed_without_blocking_the_supervisor(
    procs: Processes, stand_in: StandIn
) -> None:
    """At the stop, after the write-back, the redis-server ignores SIGTERM: the supervisor waits
    ``STOP_TIMEOUT`` for it on its loop (a second SIGTERM meanwhile is taken and logged, before
    the kill), then kills it (logged) and exits 0: the exposures were written back."""
    (stand_in.gate / "stubborn").touch()
    supervisor, ports, log = _supervisor(procs, stand_in)
    procs.ports = wait_for_file(ports, supervisor, log=log)
    with admin_client(procs) as admin:
        r = admin.post("/v1/sandboxes/sb1/ports", json={"port": 9000, "token": "kept_tok"})
        assert r.status_code == 200, r.text
    server, child = stand_in.pid(), stand_in.pid("child")
    supervisor.send_signal(signal.SIGTERM)
    wait_for(
        lambda: (stand_in.gate / "term").exists() or supervisor.poll() is not None,
        timeout=GRACE + STOP_MARGIN + 15,
        what="the supervisor to stop its redis-server",
    )
    assert supervisor.poll() is None, log.read_text()[-3000:]
    supervisor.send_signal(signal.SIGTERM)  # while it waits for the redis-server to exit
    status = supervisor.wait(STOP_TIMEOUT + KILL_WAIT + 15)
    text = log.read_text()
    assert status == 0, text[-3000:]
    assert "1 exposures written back" in text, text[-3000:]
    killed = f"the private redis-server (pid {server}) did not exit {STOP_TIMEOUT}s after SIGTERM"
    assert killed in text, text[-3000:]
    again = "SIGTERM again: already stopping"
    assert again in text, "the second SIGTERM was not taken: " + text[-3000:]
    assert text.index(again) < text.index(killed), "the second SIGTERM waited for the stop"
    wait_for(lambda: not alive(server) and not alive(child), what="the redis-server to be gone")
    assert not _unsaved(procs)
    assert exported(procs) == {("sb1", 9000): "kept_tok"}
