"""A node-link listener that cannot be opened is said as the other listeners say it.

docs/operations.md, Troubleshooting: exit 1, ``cannot start: cannot open the node link listener
on 127.0.0.1:P (node_host, node_port): [Errno 98] ... address already in use``. Before, a
cluster node (a Redis store, or a worker of ``tunneld serve --workers N``) said
``cannot start: [Errno 98] error while attempting to bind on address ('127.0.0.1', P): address
already in use``, naming neither the listener nor its settings.

Real processes: ``python -m tunneld serve`` on a real redis-server (tests/redis_server.py), or
with ``--workers 2`` on its private one, ``node_port`` held by a socket of the test.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.redis_server import RedisServer

ROOT = Path(__file__).resolve().parent.parent.parent
RUN_TIMEOUT = 60.0

pytestmark = pytest.mark.skipif(
    shutil.which("redis-server") is None and not Path("/usr/bin/redis-server").exists(),
    reason="needs redis-server",
)


def _serve(tmp: Path, node_port: int, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNNELD_")}
    env.update(TUNNELD_ADMIN_TOKEN="a", TUNNELD_SECRET="b", TUNNELD_NODE_PORT=str(node_port))
    argv = [sys.executable, "-m", "tunneld", "serve"]
    argv += ["--public-port", "0", "--agent-port", "0", "--admin-port", "0"]
    argv += ["--state-dir", str(tmp / "state"), *args]
    try:
        return subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT,
            env=env,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(
            f"still running after {RUN_TIMEOUT:g} s with node_port in use: {exc.stderr!r:.2000}"
        )


@pytest.mark.parametrize("mode", ["redis store", "workers"])
def test_a_node_port_in_use_names_the_node_link_listener(tmp_path: Path, mode: str) -> None:
    taken = socket.create_server(("127.0.0.1", 0))
    port = taken.getsockname()[1]
    redis = None
    try:
        if mode == "redis store":
            redis = RedisServer(tmp_path / "redis").start()
            out = _serve(tmp_path, port, "--store", redis.url)
        else:  # worker 0's node port is node_port + 0
            out = _serve(tmp_path, port, "--workers", "2")
    finally:
        taken.close()
        if redis is not None:
            redis.stop()
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    assert out.returncode == 1, (out.returncode, out.stderr[-3000:])
    line = (
        f"cannot start: cannot open the node link listener on 127.0.0.1:{port} "
        "(node_host, node_port): [Errno 98] "
    )
    assert line in out.stderr, out.stderr[-3000:]
    assert "address already in use" in out.stderr, out.stderr[-3000:]
