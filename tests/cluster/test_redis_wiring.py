"""The Redis store wired into config, CLI and `tunneld serve` (real processes on a real Redis)."""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.e2e.procs import BIN, Processes, wait_for
from tunneld.cli import build_parser
from tunneld.config import ConfigError, load_config
from tunneld.redis_store import RedisStore
from tunneld.store import StoredExposure, open_store

from .conftest import RedisServer

ENV = {"TUNNELD_ADMIN_TOKEN": "a", "TUNNELD_SECRET": "s"}


def test_config_and_cli_take_a_redis_url_and_refuse_a_bad_one() -> None:
    url = "redis://:pw@10.0.0.5:6379/1?prefix=edge&timeout=1.5"
    assert load_config(environ={**ENV, "TUNNELD_STORE": url}).store == url
    with pytest.raises(ConfigError, match="the database must be a number") as bad:
        load_config(environ={**ENV, "TUNNELD_STORE": "redis://:pw@h/one"})
    assert "pw" not in str(bad.value)
    with pytest.raises(ConfigError, match="store must be sqlite or memory or a Redis URL"):
        load_config(environ={**ENV, "TUNNELD_STORE": "postgres"})
    args = build_parser().parse_args(["serve", "--store", "unix:///run/redis.sock?db=2"])
    assert args.store == "unix:///run/redis.sock?db=2"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--store", "redis://h?timeout=-1"])


@pytest.mark.anyio
async def test_open_store_gives_a_redis_store_without_the_password() -> None:
    store = open_store("redis://:hunter2@127.0.0.1:1/0?prefix=x", "", "node-7")
    try:
        assert isinstance(store, RedisStore)
        assert (store.kind, store.prefix, store.node_id) == ("redis", "x", "node-7")
        assert "hunter2" not in store.location
    finally:
        await store.close()


@pytest.mark.anyio
async def test_a_burst_of_concurrent_writes_queues_for_connections(redis_server) -> None:
    store = RedisStore(redis_server.url)
    try:
        records = [StoredExposure(f"sb{i}", 2000 + j, f"t{j}", None, 1.0)
                   for i in range(50) for j in range(10)]  # fmt: skip
        await asyncio.gather(*map(store.put, records))  # more than the pool's connections
        assert len(await store.load_all()) == 500
    finally:
        await store.close()


def test_two_tunneld_processes_share_exposures_through_redis(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    p = Processes(tmp_path)
    try:
        ports_a = p.start_edge("--store", redis_server.url)
        edge_a = p.edge
        ports_b = p.start_edge("--store", redis_server.url)
        edge_b = p.edge
        assert edge_a is not None and edge_b is not None
        headers = {"authorization": f"Bearer {p.admin_token}"}
        with httpx.Client(headers=headers, timeout=10) as client:
            r = client.post(
                f"http://127.0.0.1:{ports_a['admin']}/v1/sandboxes/sb1/ports", json={"port": 8000}
            )
            assert r.status_code == 200, r.text

            def listed_on_b() -> list[int]:
                r = client.get(f"http://127.0.0.1:{ports_b['admin']}/v1/sandboxes/sb1/ports")
                return [e["port"] for e in r.json()["ports"]] if r.status_code == 200 else []

            wait_for(lambda: listed_on_b() == [8000], what="the expose on B")
        assert p.stop(edge_a) == 0 and p.stop(edge_b) == 0
        assert "loaded 0 exposures" in p.output(edge_a)
        assert f"from {redis_server.url}" in p.output(edge_a)

        redis_server.stop()  # no Redis at start: refuse (exit 2), as for an unreadable sqlite file
        started = time.monotonic()
        result = subprocess.run(
            [str(BIN / "tunneld"), "serve", "--store", redis_server.url, "--public-port", "0",
             "--agent-port", "0", "--admin-port", "0"],
            env=p.env(TUNNELD_ADMIN_TOKEN="a", TUNNELD_SECRET="s"),
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert result.returncode == 2, result.stderr
        assert "cannot start: redis at" in result.stderr
        assert time.monotonic() - started < 15
    finally:
        p.close()
