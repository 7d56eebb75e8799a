"""Public TCP ports in a cluster: one port, one exposure, whatever node chooses it.

Workers of one host bind the public TCP ports with SO_REUSEPORT, so a successful bind says
nothing about the other nodes: two exposures made at the same moment through two nodes picked
the same lowest free port, and the kernel then spread that port's connections over two
sandboxes. The store's claim (``RedisStore.claim_public_port``) now decides (real Redis, two
in-process nodes with reuse_port as under ``--workers``)."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from tunneld.redis_store import PORT_CLAIM_GRACE

from .nodes import Cluster, wait_for

pytestmark = pytest.mark.anyio


def port_range(size: int) -> tuple[int, str]:
    first = random.randint(61000, 65535 - size)
    return first, f"{first}-{first + size - 1}"


async def test_two_nodes_exposing_at_once_get_different_ports(cluster: Cluster) -> None:
    first, ports = port_range(8)
    a = await cluster.node("node-a", public_tcp_ports=ports, reuse_port=True)
    b = await cluster.node("node-b", public_tcp_ports=ports, reuse_port=True)
    for round_ in range(3):  # several races, each on a fresh pair of sandboxes
        ra, rb = await asyncio.gather(
            a.admin.post(f"/v1/sandboxes/sa{round_}/ports", json={"port": 9000, "protocol": "tcp"}),
            b.admin.post(f"/v1/sandboxes/sb{round_}/ports", json={"port": 9000, "protocol": "tcp"}),
        )
        assert ra.status_code == rb.status_code == 200, (ra.text, rb.text)
        assert ra.json()["publicPort"] != rb.json()["publicPort"]
    claims = await a.store._client.hgetall(a.store.tcp_ports_key)
    assert len(claims) == 6 and all(first <= int(p) < first + 8 for p in claims)

    # an unexpose gives the port back at once: another sandbox may have it
    held = (await a.admin.get("/v1/sandboxes/sa0/ports")).json()["ports"][0]["publicPort"]
    r = await a.admin.delete("/v1/sandboxes/sa0/ports/9000")
    assert r.status_code in (200, 204)
    assert str(held).encode() not in await a.store._client.hgetall(a.store.tcp_ports_key)
    await wait_for(lambda: held not in b.edge.tcp.listeners, what="B to close the port")
    r = await b.admin.post("/v1/sandboxes/sc/ports", json={"port": 9001, "protocol": "tcp"})
    assert r.json()["publicPort"] == held  # the lowest free one again


async def test_a_live_claim_is_respected_and_a_stale_one_taken_over(cluster: Cluster) -> None:
    first, ports = port_range(4)
    a = await cluster.node("node-a", public_tcp_ports=ports, reuse_port=True)
    key, client = a.store.tcp_ports_key, a.store._client
    # first: claimed just now by an exposure still being stored elsewhere -> skipped
    await client.hset(key, first, f"other 9000 {int(time.time())}")
    # first + 1: an old claim whose exposure is not stored (its node died) -> stale, taken
    await client.hset(key, first + 1, f"gone 9000 {int(time.time() - PORT_CLAIM_GRACE - 5)}")
    r = await a.admin.post("/v1/sandboxes/s1/ports", json={"port": 9000, "protocol": "tcp"})
    assert r.status_code == 200, r.text
    assert r.json()["publicPort"] == first + 1
    assert (await client.hget(key, first + 1)).decode().startswith("s1 9000 ")
    assert (await client.hget(key, first)).decode().startswith("other 9000 ")
