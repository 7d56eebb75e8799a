"""The store contract, the same for every backend (memory and sqlite now, Redis next).

A backend is "reopened" the way it survives: sqlite from the same directory (a new process would
do the same), memory as the same object (it lives as long as the process). On top, the registry's
write-through rules that must hold whatever the backend: the view changes only after the store
has the change, the per-sandbox cap holds under concurrency, tokens stay unique per sandbox.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from tunneld.registry import Registry, RegistryError
from tunneld.store import MemoryStore, SqliteStore, Store, StoredExposure

pytestmark = pytest.mark.anyio

Reopen = Callable[[], Awaitable[Store]]


@pytest.fixture(params=["memory", "sqlite"])
async def backend(request, tmp_path: Path) -> AsyncIterator[tuple[Store, Reopen]]:
    opened: list[Store] = []
    if request.param == "memory":
        memory = MemoryStore()
        opened.append(memory)

        async def reopen() -> Store:
            return memory

    else:
        opened.append(SqliteStore.open(tmp_path / "state"))

        async def reopen() -> Store:
            await opened[-1].close()
            opened.append(SqliteStore.open(tmp_path / "state"))
            return opened[-1]

    try:
        yield opened[0], reopen
    finally:
        for store in opened:
            await store.close()


def rec(sandbox: str = "sb1", port: int = 8000, token: str = "tok_a", name: str | None = None,
        created_at: float = 1700000000.5) -> StoredExposure:  # fmt: skip
    return StoredExposure(sandbox, port, token, name, created_at)


async def test_put_then_load_gives_every_field_back(backend) -> None:
    store, reopen = backend
    await store.put(rec(name="api ✓ \u0000 long" * 10))
    await store.put(rec("sb2", 9000, "tok_b"))
    loaded = await (await reopen()).load_all()
    assert loaded == [rec(name="api ✓ \u0000 long" * 10), rec("sb2", 9000, "tok_b")]


async def test_put_again_replaces_token_and_name_but_keeps_created_at(backend) -> None:
    store, reopen = backend
    await store.put(rec(token="old", name="a", created_at=1.0))
    await store.put(rec(token="new", name=None, created_at=2.0))
    assert await (await reopen()).load_all() == [rec(token="new", name=None, created_at=1.0)]


async def test_delete_removes_only_that_port_and_missing_is_fine(backend) -> None:
    store, reopen = backend
    await store.put(rec(port=8000))
    await store.put(rec(port=8001, token="tok_b"))
    await store.delete("sb1", 8000)
    await store.delete("sb1", 8000)
    await store.delete("nosuch", 1234)
    assert await (await reopen()).load_all() == [rec(port=8001, token="tok_b")]


async def test_registry_restarted_on_the_store_has_the_same_tokens(backend) -> None:
    store, reopen = backend
    registry = Registry(store)
    a = await registry.commit_expose("sb1", 8000, "api")
    b = await registry.commit_expose("sb1", 8001, None, "custom_tok")
    await registry.commit_expose("sb2", 8000)
    await registry.commit_expose("sb2", 8000, "renamed")  # idempotent: token kept
    await registry.commit_unexpose("sb2", 8000)
    again = Registry(await reopen())
    assert again.load(await again.store.load_all()) == 2
    assert again.records() == registry.records()
    assert again.match("sb1", 8000, a.token) is not None
    assert again.match("sb1", 8001, "custom_tok") is not None
    assert b.token == "custom_tok"
    assert again.get("sb2") is None


async def test_the_cap_holds_under_concurrent_exposes(backend) -> None:
    store, reopen = backend
    registry = Registry(store, max_exposures=16)
    results = await asyncio.gather(
        *(registry.commit_expose("sb1", 2000 + i) for i in range(40)), return_exceptions=True
    )
    refused = [r for r in results if isinstance(r, RegistryError)]
    assert len(refused) == 24
    assert {(r.status, r.code) for r in refused} == {(409, "TOO_MANY_EXPOSURES")}
    assert len(registry.exposures("sb1")) == 16
    # at the cap, re-exposing an exposed port still works; another sandbox is not affected
    await registry.commit_expose("sb1", 2000, "renamed")
    await registry.commit_expose("sb2", 2000)
    assert len(await (await reopen()).load_all()) == 17


async def test_concurrent_custom_tokens_stay_unique_per_sandbox(backend) -> None:
    store, reopen = backend
    registry = Registry(store)
    results = await asyncio.gather(
        *(registry.commit_expose("sb1", 2000 + i, None, "same") for i in range(10)),
        return_exceptions=True,
    )
    assert sum(1 for r in results if not isinstance(r, BaseException)) == 1
    assert [r.token for r in await (await reopen()).load_all()] == ["same"]


class FailingStore(MemoryStore):
    async def put(self, record: StoredExposure) -> None:
        from tunneld.store import StoreError

        raise StoreError("disk full")

    async def delete(self, sandbox_id: str, port: int) -> None:
        from tunneld.store import StoreError

        raise StoreError("disk full")


async def test_a_failed_write_changes_nothing_and_is_a_503() -> None:
    store = FailingStore()
    registry = Registry(store)
    registry.expose("sb1", 8000, token="tok_a")  # in the view only
    with pytest.raises(RegistryError) as expose_error:
        await registry.commit_expose("sb1", 8001)
    with pytest.raises(RegistryError) as unexpose_error:
        await registry.commit_unexpose("sb1", 8000)
    assert (expose_error.value.status, expose_error.value.code) == (503, "STORE_UNAVAILABLE")
    assert unexpose_error.value.code == "STORE_UNAVAILABLE"
    assert [r.port for r in registry.exposures("sb1")] == [8000]
    assert registry.match("sb1", 8000, "tok_a") is not None


async def test_exposure_options_survive_a_reopen_and_a_replace(backend) -> None:
    """Options (protocol, PROXY v2, inspect, the assigned public port) come back as written,
    a plain record next to them keeps the defaults, and a put replaces them like the name."""
    store, reopen = backend
    tcp = StoredExposure("sb1", 8000, "tok_a", None, 1.5, "tcp", True, False, 20001)
    http = StoredExposure("sb1", 8001, "tok_b", "web", 2.5, "http", False, True, None)
    await store.put(tcp)
    await store.put(http)
    await store.put(rec("sb2", 9000, "tok_c"))
    store = await reopen()
    loaded = await store.load_all()
    assert loaded == [tcp, http, rec("sb2", 9000, "tok_c")]
    assert loaded[2].protocol == "http" and loaded[2].public_port is None
    assert type(loaded[0].proxy_protocol) is bool and type(loaded[1].inspect) is bool
    await store.put(tcp._replace(protocol="http", proxy_protocol=False, public_port=None))
    again = await (await reopen()).load_all()
    assert again[0] == StoredExposure("sb1", 8000, "tok_a", None, 1.5)
    registry = Registry(await reopen())
    registry.load(await registry.store.load_all())
    record = registry.get("sb1").exposures[8001]
    assert (record.options.inspect, record.options.protocol, record.name) == (True, "http", "web")
