"""Two edges (in-process EdgeServers) on one real Redis: an expose through one reaches the other
and the agent connected to it; a Redis outage leaves previews serving, makes writes a clear 503,
and the nodes converge once Redis is back."""

from __future__ import annotations

import asyncio
import logging

import pytest

from tests.faults.faultproxy import FaultProxy

from .nodes import Cluster, wait_for

pytestmark = pytest.mark.anyio


async def test_an_expose_on_one_node_reaches_the_other_and_its_agent(cluster: Cluster) -> None:
    a = await cluster.node("node-a")
    b = await cluster.node("node-b")
    origin = await cluster.origin()
    agent = await cluster.agent(b, "sb1")

    r = await a.admin.post("/v1/sandboxes/sb1/ports", json={"port": origin.port, "name": "web"})
    assert r.status_code == 200, r.text
    url = r.json()["exposedAt"]
    token = a.edge.registry.exposures("sb1")[0].token
    await wait_for(lambda: b.edge.registry.match("sb1", origin.port, token), what="B's view")
    await wait_for(lambda: origin.port in agent.exposures, what="the Expose to B's agent")
    async with b.public(url) as client:
        response = await client.get("/")
    assert (response.status_code, response.content) == (200, b"hello from origin")
    listed = await b.admin.get("/v1/sandboxes/sb1/ports")
    assert [p["port"] for p in listed.json()["ports"]] == [origin.port]

    # an unexpose through A closes the URL on B and tells B's agent
    r = await a.admin.delete(f"/v1/sandboxes/sb1/ports/{origin.port}")
    assert r.status_code in (200, 204), r.text
    await wait_for(lambda: origin.port not in agent.exposures, what="the Unexpose to B's agent")
    assert b.edge.registry.get("sb1") is not None  # the session stays
    async with b.public(url) as client:
        response = await client.get("/")
    assert response.status_code == 404


async def test_a_redis_outage_keeps_previews_refuses_writes_and_converges(
    cluster: Cluster, caplog
) -> None:
    caplog.set_level(logging.INFO, "tunneld")
    a = await cluster.node("node-a")
    b = await cluster.node("node-b")
    origin = await cluster.origin()
    agent = await cluster.agent(b, "sb1")
    r = await a.admin.post("/v1/sandboxes/sb1/ports", json={"port": origin.port})
    url = r.json()["exposedAt"]
    await wait_for(lambda: origin.port in agent.exposures, what="B's agent to have the port")

    cluster.redis.stop()
    await wait_for(
        lambda: not a.store.feed_connected and not b.store.feed_connected,
        what="both feeds to notice",
    )
    loop = asyncio.get_running_loop()
    async with b.public(url) as client:
        for _ in range(5):  # the session serves from memory
            response = await client.get("/")
            assert (response.status_code, response.content) == (200, b"hello from origin")
    for node in (a, b):
        started = loop.time()
        r = await node.admin.post("/v1/sandboxes/sb1/ports", json={"port": 9999})
        assert loop.time() - started < 2 * node.store.timeout + 1
        assert r.status_code == 503
        assert r.json()["code"] == "STORE_UNAVAILABLE" and "redis at" in r.json()["error"]
    assert [e.port for e in b.edge.registry.exposures("sb1")] == [origin.port]

    cluster.redis.start()  # same socket, same append-only file
    await wait_for(lambda: a.store.feed_connected and b.store.feed_connected, what="resyncs")
    r = await b.admin.post("/v1/sandboxes/sb1/ports", json={"port": 9999, "name": "late"})
    assert r.status_code == 200, r.text
    r = await a.admin.post("/v1/sandboxes/sb2/ports", json={"port": 3001})
    assert r.status_code == 200, r.text
    stored = await a.store.load_all()
    await wait_for(
        lambda: a.records() == b.records() == stored,
        what=f"both views to equal Redis: {a.records()} / {b.records()} / {stored}",
    )
    assert {9999, origin.port} <= agent.exposures
    async with b.public(url) as client:
        assert (await client.get("/")).status_code == 200
    # The store's own lines: once per node, not per retry. (A's expose during the outage may
    # also log that it could not reach sb1's owner, node-b, when it had no link to it yet:
    # the owner's node-link address is in Redis. That line is the cluster's, not the store's.)
    messages = [r.getMessage() for r in caplog.records if r.name == "tunneld.store"]
    assert sum("unreachable" in m for m in messages) == 2
    assert sum("is back after" in m for m in messages) == 2


async def test_a_change_missed_while_cut_off_is_applied_by_the_resync(
    tcp_cluster: Cluster,
) -> None:
    cluster = tcp_cluster
    async with FaultProxy("127.0.0.1", cluster.redis.port) as proxy:
        a = await cluster.node("node-a")
        b = await cluster.node("node-b", f"redis://127.0.0.1:{proxy.port}/0")  # B via the proxy
        origin = await cluster.origin()
        agent = await cluster.agent(b, "sb1")
        r = await a.admin.post("/v1/sandboxes/sb1/ports", json={"port": origin.port})
        url = r.json()["exposedAt"]
        await wait_for(lambda: origin.port in agent.exposures, what="B's agent to have the port")

        proxy.refuse()
        proxy.drop()  # B is cut off from Redis: it misses what A does now
        await wait_for(lambda: not b.store.feed_connected, what="B to notice")
        r = await a.admin.delete(f"/v1/sandboxes/sb1/ports/{origin.port}")
        assert r.status_code == 204
        r = await a.admin.post("/v1/sandboxes/sb2/ports", json={"port": 3001})
        assert r.status_code == 200
        assert origin.port in agent.exposures  # B did not hear of it
        async with b.public(url) as client:
            assert (await client.get("/")).status_code == 200  # served from B's memory

        proxy.accept()  # the resync brings B up to date, side effects included
        await wait_for(lambda: b.records() == a.records(), what="B's view after the resync")
        assert [(r.sandbox_id, r.port) for r in b.records()] == [("sb2", 3001)]
        await wait_for(lambda: origin.port not in agent.exposures, what="the Unexpose to B's agent")
        async with b.public(url) as client:
            assert (await client.get("/")).status_code == 404
        await cluster.close()  # before the proxy goes: B's store closes without a new outage


def _slow_feed(store: object, delay: float) -> None:
    """Deliver ``store``'s change feed ``delay`` late, in order (as a loaded node would)."""
    from collections import deque

    loop = asyncio.get_running_loop()
    real = store._receive  # type: ignore[attr-defined]
    queue: deque[bytes] = deque()

    def late(data: bytes) -> None:
        queue.append(data)
        loop.call_later(delay, lambda: real(queue.popleft()))

    store._receive = late  # type: ignore[attr-defined]


async def test_a_url_exposed_through_another_node_answers_at_once_not_404(
    cluster: Cluster,
) -> None:
    """Node B hears of an expose answered by node A through the Redis feed, later: a request
    reaching B first waits until B's feed has delivered every change published before it
    (public.py ``_recheck_miss``) instead of answering 404. The wait takes a token of the
    client's miss budget; a URL nobody exposed still is a 404 after it, charged once."""
    a = await cluster.node("node-a")
    b = await cluster.node("node-b", miss_rate=0.001, miss_burst=50)  # no refill to speak of
    origin = await cluster.origin()
    await cluster.agent(a, "sb1")
    _slow_feed(b.store, 0.3)
    r = await a.admin.post("/v1/sandboxes/sb1/ports", json={"port": origin.port})
    assert r.status_code == 200, r.text
    url = r.json()["exposedAt"]
    token = a.edge.registry.exposures("sb1")[0].token
    assert b.edge.registry.match("sb1", origin.port, token) is None  # B has not heard yet
    async with b.public(url) as client:
        response = await client.get("/")
    assert (response.status_code, response.content) == (200, b"hello from origin")
    bucket = b.edge.public_limits.misses["127.0.0.1"]
    spent = bucket._burst - bucket._tokens
    assert spent == pytest.approx(1, abs=0.01)  # the wait is charged like a miss

    wrong = url.replace(token, "x" * len(token))
    async with b.public(wrong) as client:
        response = await client.get("/")
    assert response.status_code == 404 and response.json()["code"] == "INVALID_TOKEN"
    assert bucket._burst - bucket._tokens - spent == pytest.approx(1, abs=0.01)  # once, not twice


def _stalled_feed(store: object) -> list[bytes]:
    """``store``'s change feed stops delivering (a stuck subscriber): what it got is kept."""
    held: list[bytes] = []
    store._receive = held.append  # type: ignore[attr-defined]
    return held


def _unknown_url(node: object) -> str:
    return f"http://8080-sb9-wrongtoken12.{node.edge.config.domain}/"  # type: ignore[attr-defined]


def _denied(node: object) -> float:
    value = node.edge.metrics.preview_denied._value.get()  # type: ignore[attr-defined]
    return float(value)


async def test_a_feed_that_never_catches_up_still_ends_in_the_404_at_the_bound(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The wait before a 404 has a bound: a feed that never brings the marker back (stuck,
    or the marker lost in a resubscription) costs the client that long, then the 404."""
    import tunneld.public

    monkeypatch.setattr(tunneld.public, "MISS_RECHECK_TIMEOUT", 0.4)
    b = await cluster.node("node-b")
    held = _stalled_feed(b.store)
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with b.public(_unknown_url(b)) as client:
        response = await client.get("/")
    waited = loop.time() - started
    assert response.status_code == 404 and response.json()["code"] == "INVALID_TOKEN", response.text
    assert waited >= 0.4  # it did wait for the feed (the marker was published, never applied)
    assert any(b'"op":"sync"' in m for m in held)
    assert not b.store._markers  # the timed-out wait left nothing behind


async def test_with_the_feed_down_a_404_does_not_wait(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis away: there is no feed to wait for, so an unknown URL is a 404 at once (the
    recheck's bound set far beyond the client's timeout shows it was not waited out)."""
    import tunneld.public

    monkeypatch.setattr(tunneld.public, "MISS_RECHECK_TIMEOUT", 60.0)
    b = await cluster.node("node-b")
    cluster.redis.stop()
    try:
        await wait_for(lambda: not b.store.feed_connected, what="B to notice")
        async with b.public(_unknown_url(b)) as client:
            response = await client.get("/")  # the client gives up after 10 s
        assert response.status_code == 404 and response.json()["code"] == "INVALID_TOKEN"
    finally:
        cluster.redis.start()


async def test_a_store_failing_during_the_wait_still_gives_the_404(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, "tunneld")
    b = await cluster.node("node-b")

    async def broken(timeout: float) -> bool:
        raise RuntimeError("store exploded")

    b.store.caught_up = broken  # type: ignore[method-assign]
    async with b.public(_unknown_url(b)) as client:
        response = await client.get("/")
    assert response.status_code == 404 and response.json()["code"] == "INVALID_TOKEN"
    assert any("before a 404" in r.getMessage() and r.exc_info for r in caplog.records)


async def test_a_client_that_leaves_or_half_closes_during_the_wait(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """While its node waits for the feed the connection's reading is paused, so a client that
    hangs up looks like one that only shut its sending side and still reads (``nc -N``): both
    get the 404 when the wait ends, the half-closed one reads it, the gone one costs a write
    into the void, and the node goes on serving without a warning."""
    import tunneld.public

    caplog.set_level(logging.WARNING)
    monkeypatch.setattr(tunneld.public, "MISS_RECHECK_TIMEOUT", 0.3)
    a = await cluster.node("node-a")
    b = await cluster.node("node-b")
    origin = await cluster.origin()
    await cluster.agent(b, "sb1")
    r = await a.admin.post("/v1/sandboxes/sb1/ports", json={"port": origin.port})
    url = r.json()["exposedAt"]
    token = a.edge.registry.exposures("sb1")[0].token
    await wait_for(lambda: b.edge.registry.match("sb1", origin.port, token), what="B's view")
    _stalled_feed(b.store)
    host = _unknown_url(b).split("/")[2]
    request = f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()

    reader, writer = await asyncio.open_connection("127.0.0.1", b.edge.public_port)
    writer.write(request)
    await wait_for(lambda: b.store._markers, what="the wait to start")
    writer.write_eof()  # half-closed: still reading
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 404 ") and b'"code":"INVALID_TOKEN"' in answer

    denied = _denied(b)
    reader, writer = await asyncio.open_connection("127.0.0.1", b.edge.public_port)
    writer.write(request)
    await wait_for(lambda: b.store._markers, what="the wait to start")
    writer.close()  # gone
    await wait_for(lambda: not b.edge.public_connections, what="B to let the client go")
    assert not b.store._markers
    assert _denied(b) == denied + 1  # answered (into the void), counted once
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    async with b.public(url) as client:  # the node goes on serving
        response = await client.get("/")
    assert (response.status_code, response.content) == (200, b"hello from origin")


async def test_a_write_redis_may_still_apply_is_not_answered_nothing_changed(
    cluster: Cluster,
) -> None:
    """A 503 STORE_UNAVAILABLE says "nothing changed" only when it is true. A command sent to a
    hung Redis (SIGSTOP: the kernel takes it, nobody answers) times out, but Redis runs it once
    it resumes: that answer says the change may still be applied, and the change does reach
    every node's view, the writer's included. A command that could not be sent at all (Redis
    stopped: the connect fails) changed nothing, and the answer says so."""
    a = await cluster.node("node-a")
    b = await cluster.node("node-b")
    await cluster.agent(b, "sb1")
    # A forwards the expose to B, the writer (tunneld/exposefwd.py): once A knows B owns sb1,
    # so that the node link and B's node record are there before Redis hangs.
    await wait_for(lambda: a.edge.cluster.owners.get("sb1", ("",))[0] == "node-b", what="owner")
    r = await a.admin.post("/v1/sandboxes/sb1/ports", json={"port": 9000})
    assert r.status_code == 200, r.text  # (and Redis has the write script: EVALSHA finds it)

    cluster.redis.pause()
    try:
        r = await a.admin.post("/v1/sandboxes/sb1/ports", json={"port": 9001})
    finally:
        cluster.redis.resume()
    body = r.json()
    assert (r.status_code, body["code"]) == (503, "STORE_UNAVAILABLE"), r.text
    assert "may still be applied" in body["error"] and "nothing changed" not in body["error"]
    held = [9000, 9001]  # Redis ran it once resumed: every view, the writer's too, follows
    for node in (a, b):
        await wait_for(
            lambda n=node: [e.port for e in n.edge.registry.exposures("sb1")] == held,
            what=f"{node.edge.cluster.node_id}'s view to follow Redis",
        )
    assert sorted(r.port for r in await a.store.load_all() if r.sandbox_id == "sb1") == held
    listed = await a.admin.get("/v1/sandboxes/sb1/ports")
    assert [p["port"] for p in listed.json()["ports"]] == held

    cluster.redis.stop()
    r = await a.admin.post("/v1/sandboxes/sb1/ports", json={"port": 9002})
    body = r.json()
    assert (r.status_code, body["code"]) == (503, "STORE_UNAVAILABLE"), r.text
    assert "nothing changed" in body["error"] and "may still" not in body["error"]
    cluster.redis.start()
    await wait_for(lambda: a.store.feed_connected, what="A's feed to resync")
    assert [e.port for e in a.edge.registry.exposures("sb1")] == held
