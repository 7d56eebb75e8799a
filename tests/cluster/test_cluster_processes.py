"""Three `tunneld serve` processes on one real redis-server, and a real agent process that lists
all three: a node killed with SIGKILL loses nothing; its agent reconnects to the next node,
which takes the sandbox over with a higher epoch, and the preview URL answers 200 through every
surviving node within 5 s of the reconnect."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import httpx

from tests.e2e.origin import OriginThread
from tests.e2e.procs import Processes, wait_for

from .conftest import RedisServer


def _get(public_port: int, url: str) -> int:
    host = url.split("//", 1)[1].split("/", 1)[0]
    try:
        r = httpx.get(f"http://127.0.0.1:{public_port}/", headers={"host": host}, timeout=5)
    except httpx.HTTPError:
        return 0
    return r.status_code if r.content == b"hello from origin" or r.status_code != 200 else 0


def test_a_killed_node_loses_nothing_and_its_agent_moves_on(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    origin = OriginThread()
    p = Processes(tmp_path)
    try:
        edges = []
        for name in ("a", "b", "c"):
            ports = p.start_edge("--store", redis_server.url)
            assert p.edge is not None
            edges.append((name, p.edge, ports))
        servers = ",".join(f"127.0.0.1:{ports['agent']}" for _n, _e, ports in edges)
        agent, _api = p.start_agent_at(servers, "sb1")
        (_, edge_a, ports_a), (_, edge_b, ports_b), (_, _edge_c, ports_c) = edges
        headers = {"authorization": f"Bearer {p.admin_token}"}
        with httpx.Client(headers=headers, timeout=10) as admin:
            r = admin.post(
                f"http://127.0.0.1:{ports_c['admin']}/v1/sandboxes/sb1/ports",
                json={"port": origin.port},
            )
            assert r.status_code == 200, r.text
            url = r.json()["exposedAt"]
            for ports in (ports_a, ports_b, ports_c):
                wait_for(lambda pp=ports: _get(pp["public"], url) == 200, what="200 via each node")

            edge_a.send_signal(signal.SIGKILL)  # the owner (the agent's first address) dies
            edge_a.wait(10)
            moved = wait_for(
                lambda: f"connected to edge 127.0.0.1:{ports_b['agent']}" in p.output(agent),
                timeout=30,
                what="the agent to reconnect to node b",
            )
            assert moved
            reconnected = time.monotonic()
            for ports in (ports_b, ports_c):
                wait_for(
                    lambda pp=ports: _get(pp["public"], url) == 200,
                    timeout=5,
                    what="200 through a surviving node within 5 s of the reconnect",
                )
            assert time.monotonic() - reconnected < 5 + 1
            for ports in (ports_b, ports_c):  # nothing lost, on any surviving node
                listed = admin.get(f"http://127.0.0.1:{ports['admin']}/v1/sandboxes/sb1/ports")
                assert [e["port"] for e in listed.json()["ports"]] == [origin.port]
        assert "owned by this node (epoch 2)" in p.output(edge_b), p.output(edge_b)[-3000:]
    finally:
        p.close()
        origin.close()
