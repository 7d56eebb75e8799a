"""A stop signal that reaches ``tunneld serve`` while it is still starting ends it cleanly.

SIGTERM (systemd, an operator) or SIGINT (Ctrl-C, which a terminal sends to the whole
foreground process group: the supervisor, its workers and its private redis-server alike) at
any point of the start: the process exits promptly, 0 for SIGTERM and 130 for SIGINT (once the
``--workers`` supervisor's loop has its handlers: 0, docs/operations.md), with a line saying so
and no traceback, and leaves nothing behind: no process of its session (workers, the private
redis-server), no ``.write-probe-*`` or ``*.tmp`` file, no half-written ports file, no private
redis-server directory in ``$TMPDIR``, no ``UNSAVED`` marker.

No timing: a ``sitecustomize`` on ``PYTHONPATH`` (tests/signal_hooks.py) raises the signal in
the process itself the moment one chosen point of the start is reached: a module starts to be
imported (a meta-path finder), a function is entered or calls a chosen C function
(``sys.setprofile``). For the points inside a worker, worker 0 sends SIGTERM to its supervisor
(as systemd or an operator would) and holds its own SIGTERM blocked until the supervisor has
passed it on, so it arrives at that point. Each case fails if its point is never reached, so
the sweep cannot go stale.

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
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.signal_hooks import StartRun

BIN = Path(sys.executable).parent

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


class Run(StartRun):
    """One ``tunneld serve`` of the venv's console script, in a session of its own, with the hook
    of tests/signal_hooks.py installed."""

    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp, "tunneld-sig-")

    def start(self, point: str, how: str, *args: str) -> None:
        env = self.environment(
            point,
            how,
            "w0" if how == "TERM-up" else "main",
            TUNNELD_ADMIN_TOKEN="admintok",
            PYTHONPATH=os.pathsep.join(
                filter(None, [str(self.hook), os.environ.get("PYTHONPATH")])
            ),
        )
        self.serve([str(BIN / "tunneld")], env, *args, cwd=None)

    def check_nothing_left(self, point: str, status: int, text: str) -> None:
        self.check_clean_end(point, text)
        assert not (self.state / "redis" / "UNSAVED").exists(), text[-3000:]
        if self.ports.exists():  # written whole or not at all
            json.loads(self.ports.read_text())


@pytest.fixture
def run(tmp_path: Path) -> Iterator[Run]:
    with Run(tmp_path) as r:
        yield r


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
