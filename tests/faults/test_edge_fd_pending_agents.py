"""Agent connections that have not said hello yet, under a low descriptor limit.

Each pending agent connection holds a descriptor until its hello or ``handshake_timeout``, up to
``max_pending_agents`` (1024 by default): at ``RLIMIT_NOFILE`` 128 anyone who reaches the agent
port could take every descriptor that ``max_connections``' fitting (tunneld/cli.py,
``_fit_public_connections``) keeps for agent sessions and the admin API. Now the same start
lowers ``max_pending_agents`` to a quarter of the descriptors left besides the public
connections (at 128: 64 public, (128 - 64) / 4 = 16 pending), with a warning; past it a new
agent connection is closed at once, as past ``max_pending_agents`` (tunneld/edge.py), and the
admin API, the public side and a connected agent keep working.

docs/operations.md, File descriptors. Real processes: tunneld under ``prlimit --nofile=128``, a
real tunnel-agent and service, raw client sockets on 127.0.0.1; both loops.
"""

from __future__ import annotations

import resource
import socket
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.e2e.procs import admin_client, is_connected, preview_get, wait_for
from tests.faults.test_agent_api_port_admin_expose import _Hello
from tests.faults.test_edge_fd_limit import LimitedProcesses, _closed_by_peer

NOFILE = 128
PUBLIC_CAP = NOFILE // 2  # max_connections at 128 (test_edge_fd_limit.py)
PENDING_CAP = (NOFILE - PUBLIC_CAP) // 4
CLIENTS = 100  # without the bound, about all the descriptors left


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_pending_agents_past_a_quarter_of_the_reserve_are_refused(
    tmp_path: Path, loop: str
) -> None:
    service = ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    threading.Thread(target=service.serve_forever, daemon=True).start()
    procs = LimitedProcesses(tmp_path, loop, NOFILE, NOFILE)
    clients: list[socket.socket] = []
    try:
        # Pending connections are not closed by handshake_timeout while the test runs.
        env = procs.env(
            TUNNELD_ADMIN_TOKEN=procs.admin_token,
            TUNNELD_SECRET=procs.secret,
            TUNNELD_HANDSHAKE_TIMEOUT="300",
        )
        ports = procs.start_edge(env=env)
        assert procs.edge is not None
        procs.start_agent("sb1")
        wait_for(lambda: is_connected(procs, "sb1"), what="the agent's session")
        with admin_client(procs) as admin:
            exposed = admin.post("/v1/sandboxes/sb1/ports", json={"port": service.server_port})
            assert exposed.status_code == 200, exposed.text
            url = exposed.json()["exposedAt"]

        clients = [
            socket.create_connection(("127.0.0.1", ports["agent"]), timeout=10)
            for _ in range(CLIENTS)
        ]
        refused = CLIENTS - PENDING_CAP

        def closed() -> int:
            return sum(map(_closed_by_peer, clients))

        wait_for(lambda: closed() >= refused, what=f"{refused} agent connections closed")
        assert closed() == refused  # the first 16 wait for their hello
        # Meanwhile the admin API, the public side and the connected agent serve.
        with admin_client(procs) as admin:
            assert admin.get("/healthz").status_code == 200
            metrics = admin.get("/metrics").text
        assert f"tunneld_agent_connections_refused_total {refused}" in metrics, metrics[-2000:]
        answer = preview_get(procs, url)  # through the connected agent
        assert answer.status_code == 200, answer.text
        assert answer.text == "hello from the origin"
        assert is_connected(procs, "sb1")
    finally:
        for conn in clients:
            conn.close()
        procs.close()
        service.shutdown()
        service.server_close()
    output = procs.output(procs.edge)
    assert "Traceback" not in output, output[-3000:]
    assert "accept failed" not in output, output[-3000:]
    assert output.count("agent connected") == 1, output[-3000:]
    assert (
        f"file descriptor limit {NOFILE} leaves {NOFILE - PUBLIC_CAP} besides {PUBLIC_CAP} public "
        f"connections: agent connections waiting to authenticate limited to {PENDING_CAP}, a "
        "quarter of them (max_pending_agents 1024; past it a new agent connection is closed at "
        "once)"
    ) in output, output[-3000:]
    assert (
        f"refused: {PENDING_CAP} connections already wait to authenticate (max_pending_agents)"
    ) in output, output[-3000:]


def test_the_pending_cap_follows_the_limit() -> None:
    from tunneld.cli import NOFILE_RESERVE, pending_agents_cap, public_connections_cap

    assert pending_agents_cap(1024, 10000, resource.RLIM_INFINITY) == 1024
    assert pending_agents_cap(1024, 10000, 1 << 20) == 1024  # room to spare: unchanged
    # the limit exactly max_connections plus the reserve: a quarter of the reserve
    assert pending_agents_cap(1024, 10000, 10000 + NOFILE_RESERVE) == NOFILE_RESERVE // 4
    assert pending_agents_cap(1024, public_connections_cap(10000, 128), 128) == 16
    assert pending_agents_cap(8, 64, 128) == 8  # never above max_pending_agents
    assert pending_agents_cap(1024, 1, 2) == 1  # at least one
