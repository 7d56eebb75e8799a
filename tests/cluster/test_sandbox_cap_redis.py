"""``max_sandboxes`` with the Redis store: exact across nodes.

Each node's view of Redis lags the first exposes other nodes have in flight, so the cap is
checked by Redis itself, in the script that writes the exposure (``RedisStore.put_capped``):
nodes (or many clients of one node) racing first exposes of different sandboxes at the cap end
with exactly ``max_sandboxes`` sandboxes in Redis, and every other expose is 409
``TOO_MANY_SANDBOXES``. The count is the ``{prefix}:sandboxes`` set: a sandbox leaves it with
its last exposure (its slot is free for every node), a copy of stored exposures (the
supervisor's, at a ``--workers`` start) keeps them all, even past the cap, and a member left
without exposures by hand (HDEL) stops counting at the next load. Everything runs on a real
redis-server; the races are made certain, not likely: either the nodes' views know nothing of
each other's writes, or Redis is paused (SIGSTOP) until every node has sent its writes.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from tunneld.redis_store import RedisStore
from tunneld.registry import ExposureRecord, Registry, RegistryError
from tunneld.store import StoredExposure
from tunneld.supervisor import _copy

from .conftest import RedisServer
from .nodes import Cluster, Node, wait_for

pytestmark = pytest.mark.anyio

CAP = 12
FREE = 4  # slots left when the race starts
RACERS = 30  # first exposes per node (or per client) in a race: far more than FREE
IO_TIMEOUT = 30.0


def _store(server: RedisServer, stores: list[RedisStore], name: str, url: str = "") -> RedisStore:
    store = RedisStore(url or server.url, node_id=name)
    stores.append(store)
    return store


async def _held(server: RedisServer) -> set[str]:
    """The sandboxes Redis counts: the members of the set, each checked to hold a hash."""
    raw: Any = aioredis.Redis.from_url(server.url)  # bytes back (decode_responses is off)
    try:
        members = {m.decode() for m in await raw.smembers("tunneld:sandboxes")}
        for sandbox in members:
            assert await raw.hlen(f"tunneld:exp:{sandbox}") > 0, sandbox
        return members
    finally:
        await raw.aclose()


def _split(results: list[Any]) -> tuple[list[ExposureRecord], list[RegistryError]]:
    admitted = [r for r in results if isinstance(r, ExposureRecord)]
    refused = [r for r in results if not isinstance(r, ExposureRecord)]
    for error in refused:
        assert isinstance(error, RegistryError), repr(error)
        assert (error.status, error.code) == (409, "TOO_MANY_SANDBOXES"), error.message
        assert f"max_sandboxes = {CAP})" in error.message, error.message
    return admitted, refused


async def _race(registries: dict[str, Registry], racers: int = RACERS) -> list[Any]:
    """``racers`` first exposes of distinct new sandboxes on each registry, all at once."""
    calls = [
        registry.commit_expose(f"new-{name}-{i}", 8000)
        for name, registry in registries.items()
        for i in range(racers)
    ]
    async with asyncio.timeout(IO_TIMEOUT):
        return await asyncio.gather(*calls, return_exceptions=True)


async def test_two_nodes_racing_first_exposes_stop_exactly_at_the_cap(
    redis_server: RedisServer, open_stores: list[RedisStore]
) -> None:
    """Both nodes see CAP - FREE sandboxes and each admits FREE new ones by its own view: only
    Redis sees both nodes' writes, and it admits FREE in all."""
    a = Registry(_store(redis_server, open_stores, "node-a"), max_sandboxes=CAP)
    b = Registry(_store(redis_server, open_stores, "node-b"), max_sandboxes=CAP)
    for i in range(CAP - FREE):
        await a.commit_expose(f"old-{i}", 8000)
    b.load(await b.store.load_all())
    assert a.exposing == b.exposing == CAP - FREE

    admitted, refused = _split(await _race({"a": a, "b": b}))

    assert len(admitted) == FREE and len(refused) == 2 * RACERS - FREE
    assert len(await _held(redis_server)) == CAP
    assert a.exposing + b.exposing - (CAP - FREE) == CAP  # each view holds what it wrote


async def test_many_clients_whose_views_know_nothing_cannot_pass_the_cap(
    redis_server: RedisServer, open_stores: list[RedisStore]
) -> None:
    """Four nodes whose views never loaded what Redis holds (a view that lags as far as it
    can): each admits every one of its CAP first exposes by its own count, so all of them reach
    Redis, which refuses all but FREE."""
    first = Registry(_store(redis_server, open_stores, "node-0"), max_sandboxes=CAP)
    for i in range(CAP - FREE):
        await first.commit_expose(f"old-{i}", 8000)
    blind = {
        f"n{k}": Registry(_store(redis_server, open_stores, f"node-{k}"), max_sandboxes=CAP)
        for k in range(1, 5)
    }
    writes: list[bool] = []  # what each registry tells the edge's metrics about its writes
    for registry in blind.values():
        registry.on_write = lambda _seconds, ok: writes.append(ok)

    admitted, refused = _split(await _race(blind, CAP))

    assert len(admitted) == FREE and len(refused) == 4 * CAP - FREE
    held = await _held(redis_server)
    assert len(held) == CAP and len(held - {f"old-{i}" for i in range(CAP - FREE)}) == FREE
    # Redis's count, not the view's, is in the answer
    assert all(f"{CAP} sandboxes already hold exposures" in e.message for e in refused)
    # a refusal is Redis's answer, not a failed write
    assert len(writes) == 4 * CAP and all(writes)
    # another port of a sandbox Redis holds is no new sandbox: admitted at the cap
    assert (await blind["n1"].commit_expose("old-0", 8001)).port == 8001
    assert len(await _held(redis_server)) == CAP


async def test_the_last_unexpose_frees_a_slot_for_every_node(
    redis_server: RedisServer, open_stores: list[RedisStore]
) -> None:
    a = Registry(_store(redis_server, open_stores, "node-a"), max_sandboxes=CAP)
    blind = Registry(_store(redis_server, open_stores, "node-b"), max_sandboxes=CAP)
    for i in range(CAP):
        await a.commit_expose(f"old-{i}", 8000)
    await a.commit_expose("old-0", 8001)

    async def refused(sandbox: str) -> None:
        with pytest.raises(RegistryError) as caught:
            await blind.commit_expose(sandbox, 8000)
        assert caught.value.code == "TOO_MANY_SANDBOXES"

    await refused("late-1")
    assert await a.commit_unexpose("old-0", 8000)  # not its last port: still held
    await refused("late-1")
    assert await a.commit_unexpose("old-0", 8001)  # its last: the slot is free
    assert len(await _held(redis_server)) == CAP - 1
    assert (await blind.commit_expose("late-1", 8000)).port == 8000
    await refused("late-2")
    assert await _held(redis_server) == {f"old-{i}" for i in range(1, CAP)} | {"late-1"}


async def test_a_copy_past_the_cap_keeps_every_sandbox_and_refuses_new_ones(
    redis_server: RedisServer, open_stores: list[RedisStore]
) -> None:
    """The supervisor's copy of exposures.db into Redis (a ``--workers`` start) is not capped:
    stored data is never dropped. Redis then counts them all: new sandboxes are refused until
    fewer than the cap hold exposures."""
    records = [StoredExposure(f"old-{i}", 8000, f"tok_{i}", None, 1.5) for i in range(CAP + 2)]
    await _copy(records, redis_server.url)
    assert len(await _held(redis_server)) == CAP + 2

    store = _store(redis_server, open_stores, "node-a")
    registry = Registry(store, max_sandboxes=CAP)
    registry.load(await store.load_all())
    blind = Registry(_store(redis_server, open_stores, "node-b"), max_sandboxes=CAP)
    for node in (registry, blind):
        with pytest.raises(RegistryError) as caught:
            await node.commit_expose("new-1", 8000)
        assert caught.value.code == "TOO_MANY_SANDBOXES"
        assert f"{CAP + 2} sandboxes already hold exposures" in caught.value.message
    assert (await blind.commit_expose("old-3", 8001)).port == 8001  # a held one: admitted
    for i in range(3):
        assert await registry.commit_unexpose(f"old-{i}", 8000)
    assert (await blind.commit_expose("new-1", 8000)).port == 8000  # CAP - 1 held: one more
    with pytest.raises(RegistryError):
        await blind.commit_expose("new-2", 8000)
    assert len(await _held(redis_server)) == CAP


async def test_a_sandbox_emptied_by_hand_stops_counting_at_the_next_load(
    redis_server: RedisServer, open_stores: list[RedisStore]
) -> None:
    """HDEL of a hash's last field (what the store's message for an unreadable record suggests)
    leaves the sandbox in the set; the next load (a start, a feed resync) prunes it."""
    store = _store(redis_server, open_stores, "node-a")
    registry = Registry(store, max_sandboxes=2)
    await registry.commit_expose("sb1", 8000)
    await registry.commit_expose("sb2", 8000)
    raw = aioredis.Redis.from_url(redis_server.url)
    try:
        assert await raw.hdel("tunneld:exp:sb2", "8000") == 1
        assert await raw.sismember("tunneld:sandboxes", "sb2")
        with pytest.raises(RegistryError):
            await Registry(store, max_sandboxes=2).commit_expose("sb3", 8000)
        assert [r.sandbox_id for r in await store.load_all()] == ["sb1"]
        assert await raw.smembers("tunneld:sandboxes") == {b"sb1"}
    finally:
        await raw.aclose()
    assert (await Registry(store, max_sandboxes=2).commit_expose("sb3", 8000)).port == 8000


# -- through the admin API of two nodes ------------------------------------------------------------
async def _expose(node: Node, sandbox: str, port: int = 8000) -> httpx.Response:
    return await node.admin.post(f"/v1/sandboxes/{sandbox}/ports", json={"port": port})


async def _listed(node: Node) -> set[str]:
    sandboxes = (await node.admin.get("/v1/sandboxes")).json()["sandboxes"]
    return {s["id"] for s in sandboxes if s["ports"]}


async def test_two_nodes_admin_apis_racing_at_the_cap_admit_exactly_the_free_slots(
    cluster: Cluster,
) -> None:
    """Redis is paused while both nodes take the exposes: each admits FREE by its own view (the
    rest are 409 at once) and sends them; resumed, Redis admits FREE in all, every other
    expose is 409 TOO_MANY_SANDBOXES, and both nodes list exactly CAP sandboxes."""
    url = f"{cluster.redis.url}?timeout=20"  # the pause must not time the writes out
    a = await cluster.node("node-a", url, max_sandboxes=CAP)
    b = await cluster.node("node-b", url, max_sandboxes=CAP)
    for i in range(CAP - FREE):
        r = await _expose(a, f"old-{i}")
        assert r.status_code == 200, r.text
    await wait_for(lambda: b.edge.registry.exposing == CAP - FREE, what="B's view")

    loop = asyncio.get_running_loop()
    cluster.redis.pause()
    try:
        tasks = [
            loop.create_task(_expose(node, f"new-{k}-{i}"))
            for k, node in enumerate((a, b))
            for i in range(RACERS)
        ]
        # each node refuses all but FREE by its own view, at once; FREE each wait for Redis
        await wait_for(
            lambda: sum(t.done() for t in tasks) == 2 * (RACERS - FREE),
            timeout=IO_TIMEOUT,
            what="the exposes each node refuses by its view",
        )
    finally:
        cluster.redis.resume()
    async with asyncio.timeout(IO_TIMEOUT):
        answers = await asyncio.gather(*tasks)

    admitted = [r for r in answers if r.status_code == 200]
    refused = [r for r in answers if r.status_code != 200]
    assert len(admitted) == FREE, [r.text for r in admitted]
    for r in refused:
        assert (r.status_code, r.json()["code"]) == (409, "TOO_MANY_SANDBOXES"), r.text
    assert len(await _held(cluster.redis)) == CAP
    for node in (a, b):
        assert await node.store.caught_up(IO_TIMEOUT)
        assert len(await _listed(node)) == CAP
        assert node.edge.registry.exposing == CAP


async def test_a_first_expose_redis_applies_after_its_timeout_counts_on_every_node(
    cluster: Cluster,
) -> None:
    """The cap's check rides in the write's script, so a first expose whose outcome is unknown
    (Redis hung past the timeout: 503 "may still be applied") is applied by Redis once it
    resumes, reaches every view through the feed, and takes the last slot."""
    url = f"{cluster.redis.url}?timeout=0.5"
    a = await cluster.node("node-a", url, max_sandboxes=CAP)
    b = await cluster.node("node-b", url, max_sandboxes=CAP)
    for i in range(CAP - 1):
        assert (await _expose(a, f"old-{i}")).status_code == 200
    cluster.redis.pause()
    try:
        r = await _expose(a, "late")
    finally:
        cluster.redis.resume()
    assert (r.status_code, r.json()["code"]) == (503, "STORE_UNAVAILABLE"), r.text
    assert "may still be applied" in r.json()["error"]
    for registry in (a.edge.registry, b.edge.registry):

        def full(r: Registry = registry) -> bool:
            return r.exposing == CAP

        await wait_for(full, what="the late expose in the view")
    assert "late" in await _held(cluster.redis)
    for node in (a, b):
        r = await _expose(node, "one-more")
        assert (r.status_code, r.json()["code"]) == (409, "TOO_MANY_SANDBOXES"), r.text
