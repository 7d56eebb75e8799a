"""RedisStore against a real redis-server: the store contract, the key layout, the change feed
between two nodes, leases, node records, and what an unreachable or hung Redis does to callers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import orjson
import pytest
import redis.asyncio as aioredis

from tests.faults.faultproxy import FaultProxy
from tunneld.redis_store import (
    ExposureDeleted,
    ExposurePut,
    OwnerChanged,
    RedisStore,
    Resync,
    parse_redis_url,
)
from tunneld.store import StoredExposure, StoreError

from .conftest import RedisServer

pytestmark = pytest.mark.anyio


def rec(sandbox: str = "sb1", port: int = 8000, token: str = "tok_a", name: str | None = None,
        created_at: float = 1700000000.123456) -> StoredExposure:  # fmt: skip
    return StoredExposure(sandbox, port, token, name, created_at)


async def wait_for(predicate: Callable[[], object], timeout: float = 10, what: str = "it") -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


class Feed:
    """What a watching node received."""

    def __init__(self, store: RedisStore) -> None:
        self.changes: list[object] = []
        store.watch(self.changes.append)

    def of(self, kind: type) -> list:
        return [c for c in self.changes if isinstance(c, kind)]


def store_on(server: RedisServer, stores: list[RedisStore], url: str | None = None,
             **options: object) -> RedisStore:  # fmt: skip
    store = RedisStore(url or server.url, **options)  # type: ignore[arg-type]
    stores.append(store)
    return store


# -- URLs ------------------------------------------------------------------------------------------
def test_urls_are_checked_and_the_password_never_shown() -> None:
    parsed = parse_redis_url("redis://:s3cret@db.example:6380/2?prefix=prod&timeout=0.5")
    assert (parsed.prefix, parsed.timeout) == ("prod", 0.5)
    assert parsed.url == "redis://:s3cret@db.example:6380/2"  # our options stripped
    assert "s3cret" not in parsed.location and "db.example:6380/2" in parsed.location
    assert parse_redis_url("unix:///run/redis.sock?db=3").url == "unix:///run/redis.sock?db=3"
    assert parse_redis_url("rediss://h").prefix == "tunneld"
    for bad, why in [
        ("redis://", "needs a host"),
        ("redis://h/x", "database must be a number"),
        ("unix://", "socket path"),
        ("redis://h?prefix=a b", "prefix must be"),
        ("redis://h?timeout=0", "timeout must be"),
        ("http://h", "not a Redis URL"),
    ]:
        with pytest.raises(ValueError, match=why):
            parse_redis_url(bad)


# -- the contract ----------------------------------------------------------------------------------
async def test_put_load_delete_and_created_at_kept(redis_server, open_stores) -> None:
    store = store_on(redis_server, open_stores)
    assert store.kind == "redis" and store.location == redis_server.url
    await store.put(rec(name='api ✓ \u0000 "quoted", long' * 10))
    await store.put(rec("sb2", 9000, "tok_b"))
    await store.put(rec(token="new", name="renamed", created_at=5.0))  # created_at stays
    await store.put(rec("sb1", 8001, "tok_c", created_at=7))
    await store.delete("sb2", 9000)
    await store.delete("sb2", 9000)  # missing is fine
    await store.delete("nobody", 1)
    again = store_on(redis_server, open_stores)  # another client: what Redis holds
    assert await again.load_all() == [
        rec(token="new", name="renamed"),
        rec("sb1", 8001, "tok_c", created_at=7.0),
    ]


async def test_the_key_layout(redis_server, open_stores) -> None:
    store = store_on(redis_server, open_stores, redis_server.url + "?prefix=pfx")
    await store.put(rec(name="web"))
    await store.put(rec("sb2", 9000, "tok_b"))
    await store.delete("sb2", 9000)
    raw = aioredis.Redis.from_url(redis_server.url)
    try:
        assert sorted(await raw.keys("*")) == [b"pfx:exp:sb1", b"pfx:sandboxes"]
        assert await raw.smembers("pfx:sandboxes") == {b"sb1"}
        value = await raw.hget("pfx:exp:sb1", "8000")
        assert value.startswith(b'{"created_at":1700000000.123456,')
        assert orjson.loads(value) == {
            "created_at": 1700000000.123456,
            "token": "tok_a",
            "name": "web",
        }
    finally:
        await raw.aclose()


async def test_an_unreadable_record_is_a_clear_error(redis_server, open_stores) -> None:
    store = store_on(redis_server, open_stores)
    raw = aioredis.Redis.from_url(redis_server.url)
    try:
        await raw.hset("tunneld:exp:sb1", "8000", b"not json")
        await raw.sadd("tunneld:sandboxes", "sb1")
    finally:
        await raw.aclose()
    with pytest.raises(StoreError, match=r"tunneld:exp:sb1 port 8000 .*unreadable"):
        await store.load_all()


async def test_records_survive_a_redis_restart(redis_server, open_stores) -> None:
    store = store_on(redis_server, open_stores)
    await store.put(rec())
    redis_server.kill()  # SIGKILL: only the fsynced append-only file brings it back
    redis_server.start()
    assert await store.load_all() == [rec()]  # the pooled connection was dead: retried once


# -- the change feed -------------------------------------------------------------------------------
async def test_two_nodes_see_each_others_changes_but_not_their_own(
    redis_server, open_stores
) -> None:
    a = store_on(redis_server, open_stores, node_id="node-a")
    b = store_on(redis_server, open_stores, node_id="node-b")
    await a.put(rec("sb0", 1000))  # before anyone watches: comes in the first resync
    feed_a, feed_b = Feed(a), Feed(b)
    await wait_for(lambda: feed_a.of(Resync) and feed_b.of(Resync), what="first resyncs")
    assert feed_a.of(Resync)[0].records == [rec("sb0", 1000)]

    await b.put(rec(name="web"))
    await b.put(rec(token="tok_new", created_at=99.0))
    await a.put(rec("sb2", 9000, "tok_b"))
    await b.delete("sb1", 8000)
    await wait_for(lambda: len(feed_a.changes) == 4, what="three changes on A")
    await wait_for(lambda: len(feed_b.changes) == 2, what="one change on B")
    assert feed_a.changes[1:] == [
        ExposurePut("node-b", rec(name="web")),
        ExposurePut("node-b", rec(token="tok_new")),  # the stored created_at, not 99
        ExposureDeleted("node-b", "sb1", 8000),
    ]
    assert feed_b.changes[1:] == [ExposurePut("node-a", rec("sb2", 9000, "tok_b"))]


async def test_a_node_cut_off_resyncs_and_sees_what_it_missed(
    redis_tcp_server, open_stores, caplog
) -> None:
    caplog.set_level(logging.INFO, "tunneld.store")
    async with FaultProxy("127.0.0.1", redis_tcp_server.port) as proxy:
        a = store_on(
            redis_tcp_server,
            open_stores,
            f"redis://127.0.0.1:{proxy.port}/0",
            node_id="node-a",
            ping_interval=0.2,
        )
        b = store_on(redis_tcp_server, open_stores, node_id="node-b")
        await b.put(rec("sb1", 8000))
        await b.put(rec("sb1", 8001, "tok_b"))
        feed = Feed(a)
        await wait_for(lambda: feed.of(Resync), what="A's first resync")

        proxy.refuse()
        proxy.drop()  # A is cut off: what B publishes now never reaches A's subscription
        await wait_for(lambda: not a.feed_connected, what="A to notice")
        await b.put(rec("sb3", 3000, "tok_c"))
        await b.delete("sb1", 8000)
        with pytest.raises(StoreError):
            await a.put(rec("sb4", 4000))  # and A's own writes fail, fast
        proxy.accept()
        await wait_for(lambda: len(feed.of(Resync)) == 2, what="the resync after the cut")
        assert feed.of(ExposurePut) == feed.of(ExposureDeleted) == []
        assert feed.of(Resync)[1].records == [rec("sb1", 8001, "tok_b"), rec("sb3", 3000, "tok_c")]
        # logged once each, however many tries it took (the proxy refused several)
        lost = [r for r in caplog.records if "unreachable" in r.getMessage()]
        back = [r for r in caplog.records if "is back after" in r.getMessage()]
        assert len(lost) == 1 and len(back) == 1, [r.getMessage() for r in caplog.records]
        assert proxy.refused >= 1


async def test_the_feed_resyncs_after_a_redis_restart(redis_server, open_stores) -> None:
    a = store_on(redis_server, open_stores, node_id="node-a", ping_interval=0.2)
    b = store_on(redis_server, open_stores, node_id="node-b")
    feed = Feed(a)
    await wait_for(lambda: a.resyncs == 1, what="the first resync")
    await b.put(rec())
    redis_server.stop()
    await wait_for(lambda: not a.feed_connected, what="A to notice Redis is gone")
    redis_server.start()
    await wait_for(lambda: a.resyncs == 2, what="the resync after the restart")
    assert feed.of(Resync)[-1].records == [rec()]
    await b.put(rec("sb2", 9000, "tok_b"))  # and the feed goes on
    await wait_for(lambda: ExposurePut("node-b", rec("sb2", 9000, "tok_b")) in feed.changes)


# -- leases ----------------------------------------------------------------------------------------
async def test_claims_hand_out_increasing_epochs_and_the_newest_wins(
    redis_server, open_stores
) -> None:
    a = store_on(redis_server, open_stores, node_id="node-a")
    b = store_on(redis_server, open_stores, node_id="node-b")
    feed = Feed(b)
    await wait_for(lambda: feed.of(Resync), what="B's first resync")
    assert await a.owner("sb1") is None
    e1 = await a.claim("sb1", "node-a", 10)
    assert await b.owner("sb1") == ("node-a", e1)
    e2 = await b.claim("sb1", "node-b", 10)
    assert e2 > e1
    assert await a.owner("sb1") == ("node-b", e2)
    assert not await a.renew("sb1", "node-a", e1, 10)  # replaced: A must stop serving
    assert await b.renew("sb1", "node-b", e2, 10)
    assert not await a.release("sb1", "node-a", e1)  # not A's any more
    assert await a.owner("sb1") == ("node-b", e2)
    assert await a.claim("sb2", "node-a", 10) == 1  # epochs are per sandbox
    await wait_for(lambda: len(feed.of(OwnerChanged)) == 2, what="A's claims on B's feed")
    assert feed.of(OwnerChanged) == [
        OwnerChanged("node-a", "sb1", ("node-a", e1)),
        OwnerChanged("node-a", "sb2", ("node-a", 1)),
    ]
    assert await b.release("sb1", "node-b", e2)
    assert await a.owner("sb1") is None
    e3 = await a.claim("sb1", "node-a", 10)  # after a release, still higher than ever before
    assert e3 > e2
    # a resync carries the leases too
    redis_server.stop()
    redis_server.start()
    await wait_for(lambda: b.resyncs == 2, what="B's resync")
    assert feed.of(Resync)[-1].owners == {"sb1": ("node-a", e3), "sb2": ("node-a", 1)}


async def test_a_lease_expires_and_cannot_be_renewed_after(redis_server, open_stores) -> None:
    # The renew while the lease holds comes within a 30 s claim (a 0.2 s one made the test
    # depend on its next call coming within 0.2 s), and cuts the lease to 0.2 s; a claim of
    # 0.2 s (sb2's) expires by itself too.
    a = store_on(redis_server, open_stores)
    short = await a.claim("sb2", "node-a", 0.2)
    epoch = await a.claim("sb1", "node-a", 30)
    assert await a.renew("sb1", "node-a", epoch, 0.2)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while await a.owner("sb1") is not None or await a.owner("sb2") is not None:
        assert loop.time() < deadline, "the lease never expired"  # Redis expires it; bounded
        await asyncio.sleep(0.05)
    assert not await a.renew("sb1", "node-a", epoch, 10)
    assert not await a.renew("sb2", "node-a", short, 10)
    assert await a.claim("sb1", "node-b", 10) > epoch


# -- node records ----------------------------------------------------------------------------------
async def test_node_records_live_as_long_as_they_are_renewed(redis_server, open_stores) -> None:
    a = store_on(redis_server, open_stores)
    await a.register_node("node-a", {"link": "10.0.0.1:7443", "host": "h1"}, ttl_s=30)
    await a.register_node("node-b", {"link": "10.0.0.2:7443"}, ttl_s=30)
    assert await a.nodes() == {
        "node-a": {"link": "10.0.0.1:7443", "host": "h1"},
        "node-b": {"link": "10.0.0.2:7443"},
    }
    # registered again with 0.3 s, and not renewed (registered with 0.3 s at first, the listing
    # above depended on coming within 0.3 s)
    await a.register_node("node-a", {"link": "10.0.0.1:7443", "host": "h1"}, ttl_s=0.3)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while "node-a" in await a.nodes():  # not renewed: it expires, and the set is pruned
        assert loop.time() < deadline, "node-a never expired"
        await asyncio.sleep(0.05)
    assert not await a.renew_node("node-a", 30)
    assert await a.renew_node("node-b", 30)
    await a.unregister_node("node-b")
    assert await a.nodes() == {}
    raw = aioredis.Redis.from_url(redis_server.url)
    try:
        assert await raw.scard("tunneld:nodes") == 0
    finally:
        await raw.aclose()


# -- an unreachable or hung Redis ------------------------------------------------------------------
async def test_a_hung_redis_fails_calls_within_the_timeout(redis_server, open_stores) -> None:
    store = store_on(redis_server, open_stores, timeout=0.5)
    await store.put(rec())
    redis_server.pause()  # SIGSTOP: the kernel still accepts, nothing answers
    try:
        loop = asyncio.get_running_loop()
        for call in (
            lambda: store.put(rec(port=8001)),
            lambda: store.delete("sb1", 8000),
            store.load_all,
            lambda: store.claim("sb1", "n", 5),
            lambda: store.nodes(),
        ):
            started = loop.time()
            with pytest.raises(StoreError, match=r"redis at .* failed"):
                await asyncio.wait_for(call(), 10)  # the guard of the test, not of the store
            assert loop.time() - started < 2 * 0.5 + 0.5 + 0.3
    finally:
        redis_server.resume()
    # A timeout is ambiguous: Redis, resumed, still runs the commands it had read.
    assert rec() in await store.load_all()


async def test_a_timed_out_write_that_lands_later_reaches_the_writers_feed(
    redis_server, open_stores
) -> None:
    a = store_on(redis_server, open_stores, node_id="node-a", timeout=0.5, ping_interval=5)
    feed = Feed(a)
    await wait_for(lambda: a.resyncs == 1, what="the first resync")
    await a.put(rec())  # a write that succeeds: its echo is not delivered
    redis_server.pause()
    try:
        with pytest.raises(StoreError):
            await a.put(rec(port=8001))
    finally:
        redis_server.resume()
    landed = rec(port=8001)

    def seen() -> bool:
        return ExposurePut("node-a", landed) in feed.changes or any(
            landed in r.records for r in feed.of(Resync)[1:]
        )

    await wait_for(seen, what="the write that landed after its timeout, on A's own feed")
    assert ExposurePut("node-a", rec()) not in feed.changes


async def test_a_stopped_redis_fails_calls_at_once(redis_server, open_stores) -> None:
    store = store_on(redis_server, open_stores)
    await store.put(rec())
    redis_server.stop()
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(StoreError, match="failed"):
        await store.put(rec(port=8001))
    assert loop.time() - started < 1.0
    redis_server.start()
    await store.put(rec(port=8001))
    assert [r.port for r in await store.load_all()] == [8000, 8001]


async def test_close_is_bounded_when_the_feed_swallows_cancels(
    redis_server, open_stores, caplog
) -> None:
    """close() cancels the feed task and waits `timeout` each time, a bounded number of times:
    a feed stuck in a read that swallows cancellation (seen once as a hung test teardown)
    cannot hold a shutdown forever. Here the feed swallows every cancel."""
    caplog.set_level(logging.WARNING, "tunneld")
    store = store_on(redis_server, open_stores, timeout=0.2)
    stuck = asyncio.Event()
    swallow = True

    async def stubborn() -> None:
        while True:
            try:
                stuck.set()
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                if not swallow:
                    raise
                # swallowed, as a buggy read would

    store._feed = feed = asyncio.get_running_loop().create_task(stubborn())
    await stuck.wait()
    await asyncio.wait_for(store.close(), 10)  # 3 x 0.2 s, not forever
    assert "did not stop after 3 cancels" in caplog.text
    assert not feed.done()  # left behind, as logged
    swallow = False
    feed.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await feed
