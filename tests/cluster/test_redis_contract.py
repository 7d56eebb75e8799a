"""The store contract of tests/store/test_contract.py, run on RedisStore against a real Redis.

The contract's tests are imported, not copied: pytest runs them here with this module's
``backend`` fixture (a module's fixture wins over the one where the test was written). A Redis
store is "reopened" the way a restarted edge reopens it: a new client on the same URL.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.store.test_contract import (
    test_concurrent_custom_tokens_stay_unique_per_sandbox,
    test_delete_removes_only_that_port_and_missing_is_fine,
    test_exposure_options_survive_a_reopen_and_a_replace,
    test_put_again_replaces_token_and_name_but_keeps_created_at,
    test_put_then_load_gives_every_field_back,
    test_registry_restarted_on_the_store_has_the_same_tokens,
    test_the_cap_holds_under_concurrent_exposes,
)
from tunneld.redis_store import RedisStore
from tunneld.store import Store

from .conftest import RedisServer

__all__ = [
    "test_concurrent_custom_tokens_stay_unique_per_sandbox",
    "test_delete_removes_only_that_port_and_missing_is_fine",
    "test_exposure_options_survive_a_reopen_and_a_replace",
    "test_put_again_replaces_token_and_name_but_keeps_created_at",
    "test_put_then_load_gives_every_field_back",
    "test_registry_restarted_on_the_store_has_the_same_tokens",
    "test_the_cap_holds_under_concurrent_exposes",
]

pytestmark = pytest.mark.anyio


@pytest.fixture
async def backend(redis_server: RedisServer) -> AsyncIterator[tuple[Store, object]]:
    opened: list[RedisStore] = [RedisStore(redis_server.url)]

    async def reopen() -> Store:
        await opened[-1].close()
        opened.append(RedisStore(redis_server.url))
        return opened[-1]

    try:
        yield opened[0], reopen
    finally:
        for store in opened:
            await store.close()
