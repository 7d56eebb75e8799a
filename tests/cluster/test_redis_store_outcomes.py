"""Which failed Redis writes the store reports as "nothing changed", against a real redis-server.

``StoreError.outcome_unknown`` decides what an admin client is told: False is 503 "nothing
changed", True is 503 "it may still be applied" (and the node follows the write's echo). Only a
failure that provably kept the command from Redis may say False; anything else errs on the safe
side. redis-py names no exception class for "could not connect" (a ``ConnectionError`` whose
message says "connecting to"), and with its retry the last exception is the reconnect's even when
the first attempt had sent the command: so the store asks its connection pool whether the call
ever got a connection, instead of reading messages.
"""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from relay.mux import abort_with_reset
from tunneld.redis_store import RedisStore
from tunneld.store import StoredExposure, StoreError

from ..redis_server import RedisServer, until_busy

pytestmark = pytest.mark.anyio


def rec(port: int = 8000) -> StoredExposure:
    return StoredExposure("sb1", port, f"tok{port}", None, 1700000000.5)


class ReplyCutter:
    """A TCP proxy to Redis. :meth:`mute` makes the connections open now drop Redis's replies
    (read and thrown away; new connections are not muted), :meth:`reset` resets those clients,
    :meth:`close` also stops listening, so that a reconnect is refused."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.links: list[tuple[asyncio.StreamWriter, set[str]]] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> ReplyCutter:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    def mute(self) -> None:
        for _writer, flags in self.links:
            flags.add("muted")

    def reset(self) -> None:
        for writer, _flags in self.links:
            abort_with_reset(writer.transport)  # type: ignore[arg-type]
        self.links.clear()

    async def close(self) -> None:
        if self.server is None:
            return
        self.server.close()
        self.reset()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.wait_for(self.server.wait_closed(), 5)
        self.server = None

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", self.target), 5
        )
        flags: set[str] = set()
        self.links.append((writer, flags))
        loop = asyncio.get_running_loop()
        pumps = [
            loop.create_task(self._pump(reader, up_writer, None)),
            loop.create_task(self._pump(up_reader, writer, flags)),
        ]
        self.tasks.update(pumps)
        try:
            await asyncio.gather(*pumps)
        except (asyncio.CancelledError, OSError):
            pass
        finally:
            up_writer.close()

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, flags: set[str] | None
    ) -> None:
        while data := await reader.read(65536):
            if flags is not None and "muted" in flags:
                continue
            writer.write(data)
            await writer.drain()


async def _wait_until_stored(url: str, port: int) -> None:
    raw = aioredis.Redis.from_url(url)
    try:
        async with asyncio.timeout(10):
            while not await raw.hexists("tunneld:exp:sb1", str(port)):
                await asyncio.sleep(0.01)
    finally:
        await raw.aclose()


async def test_a_write_sent_whose_reconnect_is_refused_may_still_be_applied(
    redis_tcp_server: RedisServer,
) -> None:
    """Redis applied the put, the reply was lost with the connection, and redis-py's retry then
    could not reconnect: its last exception says "connecting to", but the command had reached
    Redis. That is not "nothing changed"."""
    cutter = await ReplyCutter(redis_tcp_server.port).start()
    store = RedisStore(f"redis://127.0.0.1:{cutter.port}/0", timeout=5)
    try:
        await store.put(rec(8000))  # a pooled connection, replies flowing
        cutter.mute()
        put = asyncio.create_task(store.put(rec(8001)))
        await _wait_until_stored(redis_tcp_server.url, 8001)  # Redis applied it
        await cutter.close()
        with pytest.raises(StoreError, match="connecting to") as failed:
            await asyncio.wait_for(put, 30)
        assert failed.value.outcome_unknown is True
    finally:
        await store.close()
        await cutter.close()


async def test_a_write_that_never_got_a_connection_changed_nothing(
    redis_server: RedisServer,
) -> None:
    """Redis stopped: no connection can be made, so nothing was sent and nothing can land."""
    redis_server.stop()
    store = RedisStore(redis_server.url, timeout=2)
    try:
        for write in (lambda: store.put(rec(8001)), lambda: store.delete("sb1", 8000)):
            with pytest.raises(StoreError, match="connecting to") as failed:
                await write()
            assert failed.value.outcome_unknown is False
    finally:
        await store.close()


async def _refused(store: RedisStore, url: str) -> StoreError:
    """Put port 8001 (refused by Redis), check that Redis holds nothing of it; the error."""
    with pytest.raises(StoreError) as failed:
        await store.put(rec(8001))
    raw = aioredis.Redis.from_url(url)
    try:
        assert not await raw.hexists("tunneld:exp:sb1", "8001")
    finally:
        await raw.aclose()
    return failed.value


async def test_a_replica_s_readonly_refusal_changed_nothing(redis_server: RedisServer) -> None:
    raw = aioredis.Redis.from_url(redis_server.url)
    store = RedisStore(redis_server.url, timeout=2)
    try:
        await store.put(rec(8000))
        await raw.replicaof("127.0.0.1", "1")  # a replica (of nothing reachable): READONLY
        try:
            error = await _refused(store, redis_server.url)
            assert "ReadOnlyError" in str(error)
            assert error.outcome_unknown is False
            # A delete too, and with the script unknown to Redis (NOSCRIPT, loaded, sent again).
            await raw.script_flush()
            with pytest.raises(StoreError, match="ReadOnlyError") as failed:
                await store.delete("sb1", 8000)
            assert failed.value.outcome_unknown is False
        finally:
            await raw.replicaof("NO", "ONE")
        assert await raw.hexists("tunneld:exp:sb1", "8000")
    finally:
        await store.close()
        await raw.aclose()


async def test_an_oom_refusal_changed_nothing(redis_server: RedisServer) -> None:
    raw = aioredis.Redis.from_url(redis_server.url)
    store = RedisStore(redis_server.url, timeout=2)
    try:
        await store.put(rec(8000))
        await raw.config_set("maxmemory", "1")  # always over it; noeviction: writes refused
        try:
            error = await _refused(store, redis_server.url)
        finally:
            await raw.config_set("maxmemory", "0")
        assert "OutOfMemoryError" in str(error)
        assert error.outcome_unknown is False
    finally:
        await store.close()
        await raw.aclose()


async def test_a_busy_refusal_changed_nothing(redis_server: RedisServer) -> None:
    """Another client's script runs past busy-reply-threshold: Redis answers BUSY, an error
    redis-py has no class for (a ResponseError whose message starts with the code)."""
    raw = aioredis.Redis.from_url(redis_server.url)
    looping = aioredis.Redis.from_url(redis_server.url)
    store = RedisStore(redis_server.url, timeout=2)
    try:
        await store.put(rec(8000))
        await raw.config_set("busy-reply-threshold", "10")  # ms
        loop_task = asyncio.create_task(looping.eval("while true do end", 0))
        try:
            await until_busy(raw)  # until the script runs past the threshold
            with pytest.raises(StoreError, match="BUSY") as failed:
                await store.put(rec(8001))
        finally:
            await raw.script_kill()
            with pytest.raises(ResponseError):
                await asyncio.wait_for(loop_task, 10)  # killed
        assert failed.value.outcome_unknown is False
        assert not await raw.hexists("tunneld:exp:sb1", "8001")
    finally:
        await store.close()
        await raw.aclose()
        await looping.aclose()


async def test_a_refusal_after_a_retry_is_no_proof(redis_tcp_server: RedisServer) -> None:
    """The first try reached Redis and was applied, its reply was lost with the connection;
    redis-py's retry reconnects and Redis, a replica by then, refuses the second try. The
    exception is that READONLY, but the write was applied: not "nothing changed"."""
    cutter = await ReplyCutter(redis_tcp_server.port).start()
    raw = aioredis.Redis.from_url(redis_tcp_server.url)
    store = RedisStore(f"redis://127.0.0.1:{cutter.port}/0", timeout=5)
    try:
        await store.put(rec(8000))
        cutter.mute()
        put = asyncio.create_task(store.put(rec(8001)))
        await _wait_until_stored(redis_tcp_server.url, 8001)  # applied
        await raw.replicaof("127.0.0.1", "1")
        try:
            cutter.reset()  # the reply is lost; the reconnect gets through, to a replica
            with pytest.raises(StoreError, match="ReadOnlyError") as failed:
                await asyncio.wait_for(put, 30)
        finally:
            await raw.replicaof("NO", "ONE")
        assert failed.value.outcome_unknown is True
    finally:
        await store.close()
        await cutter.close()
        await raw.aclose()
