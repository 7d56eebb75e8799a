"""``--workers N`` on a sqlite store, stopped the way systemd and a terminal do it: the stop
signal reaches every process at once, the private redis-server included.

systemd's stop sends SIGTERM to every process of the unit's control group
(``KillMode=control-group``, the default deploy/tunneld.service keeps), and a terminal's Ctrl-C
sends SIGINT to the whole foreground process group. Before, the private redis-server took that
signal too and exited while the workers drained, so the supervisor found nobody to read the
exposures from: "exposures NOT written back", exit 1, ``UNSAVED`` left for the next start. Now
the redis-server has a process group of its own (Ctrl-C does not reach it), and one that was
stopped anyway is started again on its append-only file to write the exposures back
(tunneld/supervisor.py ``_revive_private_store``): exit 0, exposures.db up to date.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.e2e.procs import BIN, Processes, admin_client, wait_for_file

from .test_workers_private_store import exported

REDIS = Path("/usr/bin/redis-server")


def _session(sid: int) -> list[int]:
    """The running (not zombie) processes of session ``sid``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                rest = (entry / "stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            if rest[0] != "Z" and int(rest[3]) == sid:
                pids.append(int(entry.name))
    return pids


@pytest.mark.parametrize("how", ["systemd stop (SIGTERM to all)", "Ctrl-C (SIGINT to the group)"])
def test_a_stop_signal_to_every_process_still_writes_the_exposures_back(
    procs: Processes, how: str
) -> None:
    ports = procs.tmp / "ports.json"
    log = procs.tmp / "supervisor.log"
    argv = [str(BIN / "tunneld"), "serve", "--workers", "2", "--grace-period", "5"]
    argv += ["--public-port", "0", "--agent-port", "0", "--admin-port", "0"]
    argv += ["--ports-file", str(ports), "--state-dir", str(procs.tmp / "state")]
    env = procs.env(TUNNELD_ADMIN_TOKEN=procs.admin_token, TUNNELD_SECRET=procs.secret)
    with log.open("wb") as out:
        supervisor = subprocess.Popen(
            argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    procs.procs.append(supervisor)
    try:
        procs.ports = wait_for_file(ports, supervisor, timeout=30, log=log)
        with admin_client(procs) as admin:
            r = admin.post("/v1/sandboxes/sb1/ports", json={"port": 9000, "token": "kept_tok"})
            assert r.status_code == 200, r.text
        members = _session(supervisor.pid)
        assert len(members) == 4, members  # the supervisor, 2 workers, the redis-server
        if how.startswith("systemd"):
            for pid in members:
                os.kill(pid, signal.SIGTERM)
        else:
            os.killpg(supervisor.pid, signal.SIGINT)
        status = supervisor.wait(60)
        text = log.read_text(errors="replace")
        assert "Traceback" not in text, text[-3000:]
        assert status == 0, text[-3000:]
        assert "1 exposures written back" in text, text[-3000:]
        if how.startswith("Ctrl-C"):  # it never reached the redis-server: nothing to revive
            assert "starting it again" not in text, text[-3000:]
        assert _session(supervisor.pid) == [], text[-3000:]
        assert not (procs.tmp / "state" / "redis" / "UNSAVED").exists(), text[-3000:]
    finally:
        for pid in _session(supervisor.pid):
            os.kill(pid, signal.SIGKILL)
    assert exported(procs) == {("sb1", 9000): "kept_tok"}
