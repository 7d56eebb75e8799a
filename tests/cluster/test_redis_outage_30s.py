"""Issue 9's outage, literally: Redis stopped for 30 s under two real ``tunneld serve`` nodes and
a real agent. Throughout, the preview URL answers 200 through both nodes (one of them forwards to
the owner over the node link), admin writes answer 503 STORE_UNAVAILABLE within the command
timeout, and /readyz stays 200 with ``"store": "unavailable"``. Once Redis is back (same address,
same append-only file) both nodes resync, the owner claims its sandbox again (its lease expired
in Redis meanwhile), an expose through the other node reaches the agent, and nothing is lost.
The test takes about 40 s: the outage is sampled a few times, not hammered."""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from tests.e2e.origin import OriginThread
from tests.e2e.procs import Processes, wait_for

from .conftest import RedisServer

OUTAGE = 30.0
SAMPLES = 4  # checks spread over the outage: its start, its end and between
COMMAND_TIMEOUT = 2.0  # the store's default: a write fails within 2 x timeout (one retry) + slack


def _preview(public_port: int, url: str) -> tuple[int, bytes]:
    host = url.split("//", 1)[1].split("/", 1)[0]
    r = httpx.get(f"http://127.0.0.1:{public_port}/", headers={"host": host}, timeout=10)
    return r.status_code, r.content


def test_a_30_second_redis_outage_under_two_nodes_and_an_agent(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    origin, late_origin = OriginThread(), OriginThread()
    p = Processes(tmp_path)
    admin = httpx.Client(headers={"authorization": f"Bearer {p.admin_token}"}, timeout=30)
    try:
        ports_a, ports_b = (
            p.start_edge("--store", redis_server.url, env=p.env(
                TUNNELD_ADMIN_TOKEN=p.admin_token, TUNNELD_SECRET=p.secret, TUNNELD_NODE_ID=name))
            for name in ("node-a", "node-b")
        )  # fmt: skip
        edge_b = p.edge  # the last one started
        assert edge_b is not None
        p.start_agent_at(f"127.0.0.1:{ports_b['agent']}", "sb1")  # node B owns sb1
        nodes = {"A": ports_a, "B": ports_b}

        def api(node: str, path: str) -> str:
            return f"http://127.0.0.1:{nodes[node]['admin']}{path}"

        r = admin.post(api("A", "/v1/sandboxes/sb1/ports"), json={"port": origin.port})
        assert r.status_code == 200, r.text
        url = r.json()["exposedAt"]
        for name, ports in nodes.items():
            wait_for(lambda pp=ports: _preview(pp["public"], url)[0] == 200, what=f"200 via {name}")

        redis_server.stop()
        stopped = time.monotonic()
        for name in nodes:
            wait_for(
                lambda n=name: admin.get(api(n, "/readyz")).json().get("store") == "unavailable",
                timeout=10,
                what=f"node {name} to notice the outage",
            )
        for i in range(SAMPLES):
            if i:  # spread the samples over the outage, the last one just before its end
                time.sleep(max(0.0, stopped + i * (OUTAGE - 2) / (SAMPLES - 1) - time.monotonic()))
            for name, ports in nodes.items():
                assert _preview(ports["public"], url) == (200, b"hello from origin"), (i, name)
                ready = admin.get(api(name, "/readyz"))
                assert (ready.status_code, ready.json()) == (
                    200,
                    {"status": "ready", "store": "unavailable"},
                ), (i, name)
                if i in (0, SAMPLES - 1):
                    started = time.monotonic()
                    r = admin.post(api(name, "/v1/sandboxes/sb1/ports"), json={"port": 9999})
                    assert time.monotonic() - started < 2 * COMMAND_TIMEOUT + 1, (i, name)
                    assert r.status_code == 503, (i, name, r.text)
                    assert r.json()["code"] == "STORE_UNAVAILABLE", r.text
                    assert "redis at" in r.json()["error"], r.text
        time.sleep(max(0.0, stopped + OUTAGE - time.monotonic()))
        outage = time.monotonic() - stopped
        redis_server.start()  # the same socket and append-only file

        for name in nodes:
            wait_for(
                lambda n=name: admin.get(api(n, "/readyz")).json().get("store") == "connected",
                timeout=15,
                what=f"node {name} to resync",
            )
        # the lease (15 s) expired in Redis meanwhile: B, still the owner, claims sb1 again
        wait_for(
            lambda: "sandbox sb1: owned by this node (epoch 2)" in p.output(edge_b),
            timeout=15,
            what="node B to claim sb1 again",
        )
        r = admin.post(api("A", "/v1/sandboxes/sb1/ports"), json={"port": late_origin.port})
        assert r.status_code == 200, r.text
        late_url = r.json()["exposedAt"]
        for name, ports in nodes.items():  # the expose through A reached B's agent
            wait_for(
                lambda pp=ports: _preview(pp["public"], late_url) == (200, b"hello from origin"),
                timeout=10,
                what=f"the late exposure via {name}",
            )
            assert _preview(ports["public"], url) == (200, b"hello from origin"), name
            listed = admin.get(api(name, "/v1/sandboxes/sb1/ports")).json()["ports"]
            assert sorted(e["port"] for e in listed) == sorted([origin.port, late_origin.port])
        assert outage >= OUTAGE
        for edge in p.procs[:2]:
            log = p.output(edge)
            lost = [
                line for line in log.splitlines() if "redis at" in line and "unreachable (" in line
            ]
            assert len(lost) == 1, log[-3000:]  # logged once, not per retry
            assert "is back after" in log, log[-3000:]
    finally:
        admin.close()
        p.close()
        origin.close()
        late_origin.close()
