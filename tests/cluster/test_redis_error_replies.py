"""Redis ERROR REPLIES to a write, through the admin API of a node on a real redis-server.

Redis refusing a command (LOADING, MISCONF, NOPERM, READONLY, OOM, BUSY) applied nothing of it:
the admin client is told 503 STORE_UNAVAILABLE "nothing changed", with Redis's own words and
what they mean for an operator, not the vaguer "it may still be applied" a lost reply gets.
Each refusal is made real: an ACL user without a command (at the script call, or one that the
script runs half-way: the store checks the script's commands before its first write), a replica
(REPLICAOF), ``maxmemory 1`` with noeviction, a snapshot whose child was killed with
``stop-writes-on-bgsave-error yes``, another client's script past ``busy-reply-threshold``.
LOADING (a Redis reading its data after a restart) comes from a stand-in in front of the real
server that answers ``-LOADING`` while told to. After each refusal Redis and the node's list
agree, also once the node has caught up with the change feed.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from tunneld.redis_store import RedisStore
from tunneld.store import StoreError

from ..redis_server import RedisServer, until_busy
from .nodes import Cluster, Node, wait_for

pytestmark = pytest.mark.anyio

PASSWORD = "tunneld-pw"


def _nothing_changed(r: httpx.Response, *words: str) -> None:
    body = r.json()
    assert (r.status_code, body["code"]) == (503, "STORE_UNAVAILABLE"), r.text
    error = body["error"]
    assert "nothing changed" in error and "may still" not in error, error
    for word in words:
        assert word in error, error


async def _agree(node: Node, raw: Any, expected: list[int]) -> None:
    """Redis, the node's view and its admin list hold ``expected`` (sb1's ports)."""
    stored = sorted(int(p) for p in await raw.hkeys("tunneld:exp:sb1"))
    listed = (await node.admin.get("/v1/sandboxes/sb1/ports")).json()["ports"]
    assert stored == [p["port"] for p in listed] == expected
    assert await raw.sismember("tunneld:sandboxes", "sb1")


async def _settled(node: Node, raw: Any, expected: list[int]) -> None:
    """Once the node's feed is back and has delivered everything published so far (a write
    that half-ran would have published, or not), Redis and the node still agree."""
    await wait_for(lambda: node.store.feed_connected, what="the feed to be connected")
    assert await node.store.caught_up(10)
    await _agree(node, raw, expected)


async def _refused_both_ways(node: Node, raw: Any, *words: str, read: bool = True) -> None:
    """sb1 holds 9000: an expose of 9001 and the unexpose of 9000 are both refused (``read``:
    Redis can be read meanwhile, to check that it agrees)."""
    _nothing_changed(await node.admin.post("/v1/sandboxes/sb1/ports", json={"port": 9001}), *words)
    _nothing_changed(await node.admin.delete("/v1/sandboxes/sb1/ports/9000"), *words)
    if read:
        await _agree(node, raw, [9000])


async def _writes_work_again(node: Node, raw: Any) -> None:
    r = await node.admin.post("/v1/sandboxes/sb1/ports", json={"port": 9002})
    assert r.status_code == 200, r.text
    r = await node.admin.delete("/v1/sandboxes/sb1/ports/9002")
    assert r.status_code == 204, r.text
    await _settled(node, raw, [9000])


@asynccontextmanager
async def _raw(url: str) -> AsyncIterator[Any]:
    client = aioredis.Redis.from_url(url)
    try:
        yield client
    finally:
        await client.aclose()


async def _node_with_9000(cluster: Cluster, url: str | None = None, **settings: object) -> Node:
    node = await cluster.node("node-a", url, **settings)
    r = await node.admin.post("/v1/sandboxes/sb1/ports", json={"port": 9000})
    assert r.status_code == 200, r.text
    return node


# -- NOPERM ----------------------------------------------------------------------------------------
async def _acl_node(tcp_cluster: Cluster, raw: Any) -> Node:
    """A node logged in as user ``tunneld`` (every command, key and channel, for now)."""
    await raw.execute_command(
        "ACL", "SETUSER", "tunneld", "on", f">{PASSWORD}", "~*", "&*", "+@all"
    )
    url = f"redis://tunneld:{PASSWORD}@127.0.0.1:{tcp_cluster.redis.port}/0"
    return await _node_with_9000(tcp_cluster, url)


async def test_an_acl_refusing_the_script_call_changed_nothing(tcp_cluster: Cluster) -> None:
    async with _raw(tcp_cluster.redis.url) as raw:
        node = await _acl_node(tcp_cluster, raw)
        await raw.execute_command("ACL", "SETUSER", "tunneld", "-evalsha")
        await _refused_both_ways(node, raw, "NOPERM", "the Redis user lacks permission for EVALSHA")
        await raw.execute_command("ACL", "SETUSER", "tunneld", "+evalsha")
        await _writes_work_again(node, raw)


async def test_an_acl_refusing_a_command_inside_the_script_changed_nothing(
    tcp_cluster: Cluster,
) -> None:
    """Redis checks a script's commands as they run and undoes nothing: without SADD the put's
    HSET would be stored, the sandbox left out of the set max_sandboxes counts; without PUBLISH
    the record would be stored (or deleted) and no node told, this one's view included."""
    async with _raw(tcp_cluster.redis.url) as raw:
        node = await _acl_node(tcp_cluster, raw)
        await raw.execute_command("ACL", "SETUSER", "tunneld", "-sadd")
        r = await node.admin.post("/v1/sandboxes/sb1/ports", json={"port": 9001})
        _nothing_changed(
            r, "NOPERM", "the Redis user lacks permission for SADD on tunneld:sandboxes"
        )
        await _agree(node, raw, [9000])
        await raw.execute_command("ACL", "SETUSER", "tunneld", "+sadd", "-publish")
        await _refused_both_ways(
            node, raw, "NOPERM", "the Redis user lacks permission for PUBLISH on tunneld:changes"
        )
        await raw.execute_command("ACL", "SETUSER", "tunneld", "+publish")
        await _settled(node, raw, [9000])
        await _writes_work_again(node, raw)


# -- READONLY, OOM, MISCONF, BUSY ------------------------------------------------------------------
async def test_a_replica_s_readonly_refusal_changed_nothing(cluster: Cluster) -> None:
    async with _raw(cluster.redis.url) as raw:
        node = await _node_with_9000(cluster)
        await raw.replicaof("127.0.0.1", "1")  # a replica of nothing reachable: READONLY
        try:
            await _refused_both_ways(node, raw, "READONLY", "connected to a replica")
        finally:
            await raw.replicaof("NO", "ONE")
        await _writes_work_again(node, raw)


async def test_an_out_of_memory_refusal_changed_nothing(cluster: Cluster) -> None:
    async with _raw(cluster.redis.url) as raw:
        node = await _node_with_9000(cluster)
        await raw.config_set("maxmemory", "1")  # always over it; noeviction: writes refused
        try:
            r = await node.admin.post("/v1/sandboxes/sb1/ports", json={"port": 9001})
            _nothing_changed(r, "OOM", "Redis is out of memory (maxmemory)")
            await _agree(node, raw, [9000])  # (an unexpose is let through: HDEL frees memory)
        finally:
            await raw.config_set("maxmemory", "0")
        await _writes_work_again(node, raw)


async def _fail_a_snapshot(raw: Any, server: RedisServer) -> None:
    """Make Redis's last RDB snapshot a failure (its child killed): with ``save`` set and
    stop-writes-on-bgsave-error yes (the default), Redis then refuses writes (MISCONF)."""
    assert server.proc is not None
    await raw.config_set("save", "3600 1")
    await raw.config_set("rdb-key-save-delay", "1000000")  # 1 s per key: time to kill it
    await raw.bgsave()
    children = Path(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children")
    async with asyncio.timeout(10):
        while not (pids := children.read_text().split()):
            await asyncio.sleep(0.01)
    os.kill(int(pids[0]), signal.SIGKILL)
    async with asyncio.timeout(10):
        while True:
            info = await raw.info("persistence")
            if not info["rdb_bgsave_in_progress"] and info["rdb_last_bgsave_status"] == "err":
                break
            await asyncio.sleep(0.01)
    await raw.config_set("rdb-key-save-delay", "0")


async def test_a_failing_snapshot_s_misconf_refusal_changed_nothing(cluster: Cluster) -> None:
    async with _raw(cluster.redis.url) as raw:
        node = await _node_with_9000(cluster)
        await _fail_a_snapshot(raw, cluster.redis)
        try:
            await _refused_both_ways(
                node, raw, "MISCONF", "Redis refuses writes: its snapshot (RDB) is failing"
            )
        finally:
            await raw.config_set("stop-writes-on-bgsave-error", "no")
            await raw.config_set("save", "")
        await _writes_work_again(node, raw)


async def test_a_busy_refusal_changed_nothing(cluster: Cluster) -> None:
    """Another client's script runs past busy-reply-threshold: Redis answers BUSY."""
    async with _raw(cluster.redis.url) as raw, _raw(cluster.redis.url) as looping:
        node = await _node_with_9000(cluster)
        await raw.config_set("busy-reply-threshold", "10")  # ms
        loop_task = asyncio.create_task(looping.eval("while true do end", 0))
        try:
            await until_busy(raw)  # until the script runs past the threshold
            await _refused_both_ways(node, raw, "BUSY", "a script is running in Redis", read=False)
        finally:
            await raw.script_kill()
            with pytest.raises(ResponseError):
                await asyncio.wait_for(loop_task, 10)  # killed
        await _settled(node, raw, [9000])
        await _writes_work_again(node, raw)


async def test_a_refused_public_tcp_port_claim_binds_and_stores_nothing(cluster: Cluster) -> None:
    """A ``tcp`` expose first claims its public port in Redis: a replica refuses the claim,
    the answer says why, no port is held (in Redis or bound) and nothing is stored."""
    first = random.randint(61000, 65000)
    node = await _node_with_9000(cluster, public_tcp_ports=f"{first}-{first + 3}")
    async with _raw(cluster.redis.url) as raw:
        await raw.replicaof("127.0.0.1", "1")
        try:
            r = await node.admin.post(
                "/v1/sandboxes/sb1/ports", json={"port": 9001, "protocol": "tcp"}
            )
        finally:
            await raw.replicaof("NO", "ONE")
        body = r.json()
        assert (r.status_code, body["code"]) == (503, "STORE_UNAVAILABLE"), r.text
        assert "READONLY" in body["error"] and "connected to a replica" in body["error"], r.text
        assert "may still" not in body["error"] and "nothing changed" in body["error"], r.text
        assert await raw.hgetall("tunneld:tcp_ports") == {}
        assert not node.edge.tcp.listeners
        await _settled(node, raw, [9000])
        r = await node.admin.post("/v1/sandboxes/sb1/ports", json={"port": 9001, "protocol": "tcp"})
        assert r.status_code == 200, r.text
        claimed = [int(port) for port in await raw.hkeys("tunneld:tcp_ports")]
        assert len(claimed) == 1 and first <= claimed[0] <= first + 3


# -- LOADING ---------------------------------------------------------------------------------------
LOADING_REPLY = b"-LOADING Redis is loading the dataset in memory\r\n"


def _command_length(buffer: bytes | bytearray) -> int:
    """Bytes of the first whole RESP command in ``buffer`` (0: not all there yet)."""
    end = buffer.find(b"\r\n")
    if end < 0:
        return 0
    if not buffer.startswith(b"*"):
        return end + 2  # an inline command
    at = end + 2
    for _ in range(int(buffer[1:end])):
        line = buffer.find(b"\r\n", at)
        if line < 0:
            return 0
        at = line + 2 + int(buffer[at + 1 : line]) + 2
        if at > len(buffer):
            return 0
    return at


class LoadingStandIn:
    """A TCP proxy to a real Redis that, while ``loading``, answers each command itself as a
    Redis still loading its data does: ``-LOADING`` (the connection's set-up commands, CLIENT
    and SELECT, ``+OK``). Switched only while the node is idle: a reply still on its way
    from Redis would come after one of these."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.loading = False
        self.port = 0
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> LoadingStandIn:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for writer in self.writers:
            writer.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", self.target), 5
        )
        self.writers += [writer, up_writer]
        loop = asyncio.get_running_loop()
        pumps = [
            loop.create_task(self._commands(reader, writer, up_writer)),
            loop.create_task(self._replies(up_reader, writer)),
        ]
        self.tasks.update(pumps)
        try:
            await asyncio.gather(*pumps)
        except (asyncio.CancelledError, OSError, ValueError):
            pass
        finally:
            self.tasks.difference_update(pumps)
            writer.close()
            up_writer.close()

    async def _commands(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        up_writer: asyncio.StreamWriter,
    ) -> None:
        buffer = bytearray()
        while data := await reader.read(65536):
            buffer += data
            while length := _command_length(buffer):
                command = bytes(buffer[:length])
                del buffer[:length]
                if not self.loading:
                    up_writer.write(command)
                    continue
                name = command.split(b"\r\n")[2].upper() if command.startswith(b"*") else b""
                writer.write(b"+OK\r\n" if name in (b"CLIENT", b"SELECT") else LOADING_REPLY)
            await up_writer.drain()
            await writer.drain()

    async def _replies(self, up_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await up_reader.read(65536):
            writer.write(data)
            await writer.drain()


async def test_a_loading_refusal_changed_nothing(tcp_cluster: Cluster) -> None:
    """redis-py raises LOADING as a ConnectionError and retries it once, on a new connection:
    refused twice, still nothing changed."""
    stand_in = await LoadingStandIn(tcp_cluster.redis.port).start()
    try:
        async with _raw(tcp_cluster.redis.url) as raw:
            node = await _node_with_9000(tcp_cluster, f"redis://127.0.0.1:{stand_in.port}/0")
            stand_in.loading = True
            try:
                await _refused_both_ways(
                    node, raw, "LOADING", "Redis is loading its data; try again"
                )
            finally:
                stand_in.loading = False
            await _writes_work_again(node, raw)
    finally:
        await tcp_cluster.close()  # the node, before its Redis stand-in goes
        await stand_in.close()


# -- every other write of the store ----------------------------------------------------------------
def _other_writes(store: RedisStore) -> dict[str, Callable[[], Awaitable[object]]]:
    return {
        "claim_public_port": lambda: store.claim_public_port(20001, "sb1", 9000),
        "release_public_port": lambda: store.release_public_port(20000, "sb1", 9000),
        "claim": lambda: store.claim("sb1", "node-x", 30),
        "renew": lambda: store.renew("sb1", "node-x", 1, 30),
        "release": lambda: store.release("sb1", "node-x", 1),
        "register_node": lambda: store.register_node("node-y", {"a": 1}, 30),
        "renew_node": lambda: store.renew_node("node-x", 30),
    }


async def _keyspace(raw: Any) -> dict[bytes, bytes]:
    return {key: await raw.dump(key) for key in sorted(await raw.keys("tunneld:*"))}


@pytest.mark.parametrize("refusal", ["READONLY", "NOPERM", "NOREPLICAS"])
async def test_every_other_write_refused_by_redis_changed_nothing(
    redis_tcp_server: RedisServer, refusal: str
) -> None:
    """TCP port claims, ownership leases and node records: a refusal is "nothing changed"
    (``outcome_unknown`` false), with the hint, and Redis holds what it held."""
    async with _raw(redis_tcp_server.url) as raw:
        await raw.execute_command(
            "ACL", "SETUSER", "tunneld", "on", f">{PASSWORD}", "~*", "&*", "+@all"
        )
        url = f"redis://tunneld:{PASSWORD}@127.0.0.1:{redis_tcp_server.port}/0"
        store = RedisStore(url, node_id="node-x", timeout=2)
        try:
            assert await store.claim_public_port(20000, "sb1", 9000)
            assert await store.claim("sb1", "node-x", 30) == 1
            await store.register_node("node-x", {"a": 1}, 30)
            before = await _keyspace(raw)
            if refusal == "READONLY":
                await raw.replicaof("127.0.0.1", "1")
                words = ("READONLY", "connected to a replica")
            elif refusal == "NOPERM":
                await raw.execute_command("ACL", "SETUSER", "tunneld", "-@write")
                words = ("NOPERM", "the Redis user lacks permission for ")
            else:
                await raw.config_set("min-replicas-to-write", "1")  # and it has none
                words = ("NOREPLICAS", "fewer replicas than min-replicas-to-write")
            try:
                for name, write in _other_writes(store).items():
                    with pytest.raises(StoreError) as failed:
                        await write()
                    for word in words:
                        assert word in str(failed.value), (name, str(failed.value))
                    assert failed.value.outcome_unknown is False, (name, str(failed.value))
            finally:
                await raw.replicaof("NO", "ONE")
                await raw.execute_command("ACL", "SETUSER", "tunneld", "+@all")
                await raw.config_set("min-replicas-to-write", "0")
            assert await _keyspace(raw) == before
        finally:
            await store.close()
