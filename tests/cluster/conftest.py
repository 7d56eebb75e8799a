"""Cluster test fixtures: stores and in-process nodes over a real redis-server
(``tests/redis_server.py``; the ``redis_server`` and ``redis_tcp_server`` fixtures are in
tests/conftest.py, shared with the raw TCP tests)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.redis_server import RedisServer
from tunneld.redis_store import RedisStore

__all__ = ["RedisServer"]  # tests import it from here too


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def open_stores(redis_server: RedisServer) -> AsyncIterator[list[RedisStore]]:
    """Stores opened by a test (append to the list), closed after it."""
    stores: list[RedisStore] = []
    try:
        yield stores
    finally:
        for store in stores:
            await store.close()


@pytest.fixture
async def cluster(redis_server: RedisServer) -> AsyncIterator[Any]:
    """In-process cluster nodes on ``redis_server`` (tests/cluster/nodes.py), closed after."""
    from .nodes import Cluster  # nodes.py imports this module

    c = Cluster(redis_server)
    try:
        yield c
    finally:
        await c.close()


@pytest.fixture
async def tcp_cluster(redis_tcp_server: RedisServer) -> AsyncIterator[Any]:
    from .nodes import Cluster

    c = Cluster(redis_tcp_server)
    try:
        yield c
    finally:
        await c.close()
