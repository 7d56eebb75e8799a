"""A node that falls behind the other nodes' changes keeps a bounded backlog: past
``FEED_BACKLOG`` it drops the queued changes, asks the store for a fresh snapshot, and converges
on it (real Redis, two in-process nodes)."""

from __future__ import annotations

import asyncio

import pytest

import tunneld.edge

from .nodes import Cluster, wait_for

pytestmark = pytest.mark.anyio

BACKLOG = 20
PORTS = range(10_000, 10_060)


async def test_a_node_behind_drops_its_backlog_resyncs_and_converges(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tunneld.edge, "FEED_BACKLOG", BACKLOG)
    a = await cluster.node("node-a")
    b = await cluster.node("node-b")
    feed = b.edge._feed
    assert feed is not None
    resyncs_before = b.store.resyncs

    # B's feed consumer stalls on sb1's lock (as behind a slow store write of its own).
    release = asyncio.Event()
    held = asyncio.Event()

    async def hold() -> None:
        async with b.edge.registry._sandbox_lock("sb1"):
            held.set()
            await release.wait()

    holder = asyncio.get_running_loop().create_task(hold())
    await held.wait()
    peak = 0
    try:
        for port in PORTS:
            r = await a.admin.post("/v1/sandboxes/sb1/ports", json={"port": port})
            assert r.status_code == 200, r.text
            peak = max(peak, feed.changes.qsize())
        await wait_for(lambda: feed.overflows >= 1, what="B's backlog to overflow")
        peak = max(peak, feed.changes.qsize())
        assert peak <= BACKLOG
        metrics = await b.admin.get("/metrics")
        assert f"tunneld_store_feed_overflows_total {float(feed.overflows)}" in metrics.text
    finally:
        release.set()
        await holder

    await wait_for(lambda: b.store.resyncs > resyncs_before, what="the requested resync")
    await wait_for(
        lambda: [e.port for e in b.edge.registry.exposures("sb1")] == list(PORTS),
        what="B's view to hold every port exposed through A",
    )
    assert feed.changes.qsize() == 0 and not feed.awaiting_resync
    # and the feed goes on as before: one more change arrives as a change
    r = await a.admin.delete(f"/v1/sandboxes/sb1/ports/{PORTS[0]}")
    assert r.status_code in (200, 204)
    await wait_for(
        lambda: PORTS[0] not in b.edge.registry.get("sb1").exposures, what="the unexpose on B"
    )
