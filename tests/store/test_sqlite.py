"""The sqlite backend's own promises: WAL + FULL sync + versioned schema, writes off the event
loop and committed in groups, one edge per state directory, and a clear StoreError (never an
empty start) for every database it cannot trust."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path

import pytest

from tunneld.registry import Registry
from tunneld.store import (
    DB_FILE,
    SCHEMA_VERSION,
    SqliteStore,
    StoredExposure,
    StoreError,
    read_exposures,
)

pytestmark = pytest.mark.anyio


def rec(port: int, sandbox: str = "sb1", token: str | None = None) -> StoredExposure:
    return StoredExposure(sandbox, port, token or f"tok{port}", None, 1.0)


async def test_the_file_is_wal_full_sync_and_versioned(tmp_path: Path) -> None:
    store = SqliteStore.open(tmp_path)
    try:
        conn = store._conn
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    finally:
        await store.close()


async def test_writes_run_on_one_thread_that_is_not_the_loop_and_share_commits(
    tmp_path: Path,
) -> None:
    store = SqliteStore.open(tmp_path)
    statements: list[tuple[str, str]] = []
    store._conn.set_trace_callback(
        lambda sql: statements.append((threading.current_thread().name, sql))
    )
    try:
        await asyncio.gather(*(store.put(rec(2000 + i)) for i in range(300)))
        await store.delete("sb1", 2000)
    finally:
        await store.close()
    writers = {name for name, sql in statements if sql.startswith("INSERT")}
    assert writers == {"tunneld-store-writer"}
    assert threading.current_thread().name not in writers
    commits = sum(1 for _, sql in statements if sql == "COMMIT")
    assert 2 <= commits < 300 / 4, commits  # grouped: far fewer fsyncs than writes
    assert len(read_exposures(tmp_path)) == 299


async def test_a_second_opener_of_the_directory_is_refused(tmp_path: Path) -> None:
    store = SqliteStore.open(tmp_path)
    try:
        with pytest.raises(StoreError, match="in use by another process"):
            SqliteStore.open(tmp_path)
        assert read_exposures(tmp_path) == []  # readers need no lock
    finally:
        await store.close()
    again = SqliteStore.open(tmp_path)  # free again once closed
    await again.close()


def test_a_file_that_is_not_a_database_is_refused_by_name(tmp_path: Path) -> None:
    (tmp_path / DB_FILE).write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError) as error:
        SqliteStore.open(tmp_path)
    assert str(tmp_path / DB_FILE) in str(error.value)
    assert "restore it from a backup" in str(error.value)
    assert (tmp_path / DB_FILE).read_bytes().startswith(b"this is not sqlite")  # left alone


async def test_a_damaged_page_is_refused(tmp_path: Path) -> None:
    store = SqliteStore.open(tmp_path)
    await asyncio.gather(*(store.put(rec(2000 + i)) for i in range(2000)))
    await store.close()
    conn = sqlite3.connect(tmp_path / DB_FILE)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    data = bytearray((tmp_path / DB_FILE).read_bytes())
    assert len(data) > 4 * 4096
    data[2 * 4096 : 3 * 4096] = b"\xff" * 4096  # trash a whole page of the table
    (tmp_path / DB_FILE).write_bytes(bytes(data))
    with pytest.raises(StoreError, match=r"corrupt|not a usable"):
        SqliteStore.open(tmp_path)


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / DB_FILE)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(StoreError, match="newer than this tunneld"):
        SqliteStore.open(tmp_path)


def test_someone_elses_database_is_refused(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / DB_FILE)
    conn.execute("CREATE TABLE accounts (id INTEGER)")
    conn.close()
    with pytest.raises(StoreError, match="not a tunneld database"):
        SqliteStore.open(tmp_path)


async def test_a_stored_row_the_rules_refuse_stops_the_load(tmp_path: Path) -> None:
    store = SqliteStore.open(tmp_path)
    await store.put(StoredExposure("Bad_Id", 8000, "tok", None, 1.0))
    registry = Registry(store)
    with pytest.raises(StoreError, match="'Bad_Id'"):
        registry.load(await store.load_all())
    await store.close()


async def test_more_stored_than_the_cap_stops_the_load(tmp_path: Path) -> None:
    store = SqliteStore.open(tmp_path)
    await asyncio.gather(*(store.put(rec(2000 + i)) for i in range(5)))
    with pytest.raises(StoreError, match="maximum"):
        Registry(store, max_exposures=4).load(await store.load_all())
    await store.close()


def test_a_state_dir_that_cannot_be_created_is_refused(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="cannot create the state directory"):
        SqliteStore.open(tmp_path / "file" / "state")
