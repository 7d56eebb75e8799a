"""When the sqlite store cannot write: the answer is honest, memory and disk agree, now and after a
restart.

The contract: an expose or unexpose is answered 2xx only once the store has it, and 503
``STORE_UNAVAILABLE`` ("nothing changed") means nothing changed, in memory and on disk. Checked
here against real failures: a file size limit on a real ``tunneld serve`` (the kernel refuses the
WAL's growth with EFBIG, as a full disk refuses with ENOSPC), a page limit on the store's own
connection (SQLITE_FULL in the middle of a batch of many exposes), a write lock held by another
connection past the write timeout, and the database deleted or replaced under a running store.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import resource
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.e2e.procs import Processes
from tests.faults.durable import (
    Service,
    admin,
    connected,
    preview,
    state_dir,
    wait,
    without_root_powers,
)
from tunneld.registry import ExposureRecord, Registry, RegistryError
from tunneld.store import DB_FILE, SqliteStore, StoredExposure, read_exposures

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[2]


def _stored(state: Path) -> set[tuple[str, int, str]]:
    """What a new tunneld on ``state`` would load: (sandbox, port, token)."""
    return {(r.sandbox_id, r.port, r.token) for r in read_exposures(state)}


def _in_memory(registry: Registry) -> set[tuple[str, int, str]]:
    return {(r.sandbox_id, r.port, r.token) for r in registry.records()}


async def _reopened(state: Path) -> set[tuple[str, int, str]]:
    """What a restarted edge loads from ``state`` (the store opened again, the lock taken)."""
    store = SqliteStore.open(state)
    try:
        return {(r.sandbox_id, r.port, r.token) for r in await store.load_all()}
    finally:
        await store.close()


def _refused(error: object) -> str:
    """The message of a 503 STORE_UNAVAILABLE (AssertionError for anything else)."""
    assert isinstance(error, RegistryError), error
    assert (error.status, error.code) == (503, "STORE_UNAVAILABLE"), error
    assert "nothing changed" in error.message
    return error.message


# -- a full disk, for real: a tunneld serve process whose files may not grow --------------------
def test_a_disk_that_refuses_to_grow_is_a_503_that_changes_nothing_then_writes_resume(
    tmp_path: Path,
) -> None:
    procs = Processes(tmp_path, "uvloop")
    services = [Service() for _ in range(3)]
    try:
        procs.start_edge("--url-port", "80")  # URLs without the public port: it changes on restart
        procs.start_agent("sb1")
        wait(lambda: connected(procs, "sb1"), what="agent connected")
        edge = procs.edge
        assert edge is not None
        with admin(procs) as a:
            r = a.post("/v1/sandboxes/sb1/ports", json={"port": services[0].port})
            assert r.status_code == 200, r.text
            kept = r.json()
            assert preview(procs, kept["exposedAt"]).text == f"port {services[0].port}"

            # From now on no file of the edge may grow past the WAL's current size: the next
            # commit appends to the WAL, and the kernel refuses (EFBIG; Python ignores SIGXFSZ).
            wal = state_dir(procs) / f"{DB_FILE}-wal"
            limit = wal.stat().st_size
            log_size = len(procs.output(edge).encode())
            assert log_size + 8192 < limit, (log_size, limit)  # its log lines still fit
            resource.prlimit(edge.pid, resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

            refused = a.post("/v1/sandboxes/sb1/ports", json={"port": services[1].port})
            assert refused.status_code == 503, refused.text
            body = refused.json()
            assert body["code"] == "STORE_UNAVAILABLE", body
            # the disk's own reason, not a follow-up error that hides it
            assert re.search(r"exposures\.db: (disk I/O error|database or disk is full)\)", body[
                "error"]), body  # fmt: skip
            gone = a.delete(f"/v1/sandboxes/sb1/ports/{services[0].port}")
            assert gone.status_code == 503, gone.text
            assert gone.json()["code"] == "STORE_UNAVAILABLE"

            # memory unchanged: the refused expose is no URL, the refused unexpose still serves
            ports = a.get("/v1/sandboxes/sb1/ports").json()["ports"]
            assert [p["port"] for p in ports] == [services[0].port]
            guessed = kept["exposedAt"].replace(str(services[0].port), str(services[1].port), 1)
            assert preview(procs, guessed).status_code == 404
            assert preview(procs, kept["exposedAt"]).text == f"port {services[0].port}"
            assert edge.poll() is None

            # space is back: writes go through again, on the same connection
            resource.prlimit(edge.pid, resource.RLIMIT_FSIZE, (-1, -1))
            r = a.post("/v1/sandboxes/sb1/ports", json={"port": services[2].port})
            assert r.status_code == 200, r.text
            added = r.json()
            assert preview(procs, added["exposedAt"]).text == f"port {services[2].port}"
            acknowledged = a.get("/v1/sandboxes/sb1/ports").json()["ports"]
        log = procs.output(edge)
        assert "write failed, 1 change(s) not saved" in log, log
        assert "Traceback" not in log, log

        # after kill -9 and a start, the store holds exactly what was answered 2xx
        assert procs.stop(edge, signal.SIGKILL) == -signal.SIGKILL
        procs.start_edge("--url-port", "80")
        with admin(procs) as a:
            assert a.get("/v1/sandboxes/sb1/ports").json()["ports"] == acknowledged
        assert sorted(p["port"] for p in acknowledged) == sorted(
            [services[0].port, services[2].port]
        )
    finally:
        procs.close()
        for s in services:
            s.close()


# -- a full database in the middle of a batch of many writes ------------------------------------
async def test_a_batch_that_fails_part_way_answers_every_caller_503_and_keeps_none_of_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = tmp_path / "state"
    store = SqliteStore.open(state)
    registry = Registry(store)
    try:
        await registry.commit_expose("sb0", 8000, token="keep_me")
        # The database may not grow by a page: the first rows still fit the table's page, the
        # next ones fail with SQLITE_FULL, in whatever batch they land.
        store._conn.execute("PRAGMA max_page_count = 1")
        with caplog.at_level(logging.ERROR, "tunneld.store"):
            results = await asyncio.gather(
                *(registry.commit_expose(f"sb{i}", 8000) for i in range(1, 301)),
                registry.commit_unexpose("sb0", 8000),
                return_exceptions=True,
            )
        *exposed, unexposed = results
        failed = [r for r in results if isinstance(r, RegistryError)]
        assert all(isinstance(r, (RegistryError, ExposureRecord)) for r in exposed), exposed
        assert isinstance(unexposed, RegistryError) or unexposed is True, unexposed
        assert len(failed) > 200, len(failed)  # far more than one page holds
        assert all("database or disk is full" in _refused(r) for r in failed)
        # every caller of a failed batch was told so: the log counts them, batch by batch
        told = sum(int(n) for n in re.findall(r"write failed, (\d+) change", caplog.text))
        assert told == len(failed), (told, len(failed))
        # memory and disk hold exactly what was answered 2xx
        acknowledged = {
            (f"sb{i}", 8000) for i, r in enumerate(exposed, 1) if not isinstance(r, RegistryError)
        }
        if isinstance(unexposed, RegistryError):
            acknowledged.add(("sb0", 8000))
        assert {(s, p) for s, p, _ in _in_memory(registry)} == acknowledged
        assert _stored(state) == _in_memory(registry)

        # room again: the next writes commit
        store._conn.execute("PRAGMA max_page_count = 1073741823")
        await registry.commit_expose("sb1", 8001)
        assert ("sb1", 8001) in {(s, p) for s, p, _ in _stored(state)}
    finally:
        await store.close()
    assert await _reopened(state) == _in_memory(registry)


# -- a write held up past the write timeout -----------------------------------------------------
async def test_a_write_that_cannot_start_in_time_is_dropped_and_one_that_started_may_land(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = tmp_path / "state"
    store = SqliteStore.open(state)
    store.write_timeout = 0.5
    registry = Registry(store)
    began = threading.Event()
    store._conn.set_trace_callback(lambda sql: began.set() if sql == "BEGIN IMMEDIATE" else None)
    try:
        await registry.commit_expose("sb2", 8000, token="stays")
        began.clear()
        # Another process holds the database's write lock: the writer's BEGIN IMMEDIATE waits
        # for it (busy_timeout, 5 s), longer than the write timeout.
        other = sqlite3.connect(state / DB_FILE, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        try:
            started = asyncio.create_task(registry.commit_expose("sb1", 8000))
            assert await asyncio.to_thread(began.wait, 10), "the writer never began the batch"
            # queued behind it: not started when their time is up, so dropped, never written
            with caplog.at_level(logging.WARNING, "tunneld.store"):
                results = await asyncio.gather(
                    registry.commit_expose("sb3", 8000),
                    registry.commit_unexpose("sb2", 8000),
                    return_exceptions=True,
                )
                assert all("dropped, not written" in _refused(r) for r in results), results
                # the one the writer had started is answered too, but not "nothing changed"
                with pytest.raises(RegistryError) as unknown:
                    await asyncio.wait_for(started, 10)
            assert (unknown.value.status, unknown.value.code) == (503, "STORE_UNAVAILABLE")
            assert "it may still be applied" in unknown.value.message
            assert "nothing changed" not in unknown.value.message
            assert ("sb1", 8000) not in {(s, p) for s, p, _ in _in_memory(registry)}
        finally:
            other.execute("ROLLBACK")
            other.close()
        assert await registry.wait_writes(10) == 0  # its real outcome: committed, and applied
        assert "(it may still commit; the change is applied if it does)" in caplog.text
        await registry.commit_expose("sb4", 8000)  # the writer went past the dropped ones
        assert {(s, p) for s, p, _ in _in_memory(registry)} == {
            ("sb1", 8000), ("sb2", 8000), ("sb4", 8000)
        }  # fmt: skip
        assert _stored(state) == _in_memory(registry)
    finally:
        await store.close()
    assert await _reopened(state) == _in_memory(registry)


# -- the database deleted or replaced under a running store -------------------------------------
@pytest.mark.parametrize("change", ["delete", "delete-wal", "replace"])
async def test_a_database_deleted_or_replaced_under_the_store_refuses_writes(
    tmp_path: Path, change: str, caplog: pytest.LogCaptureFixture
) -> None:
    state = tmp_path / "state"
    path = state / DB_FILE
    store = SqliteStore.open(state)
    registry = Registry(store)
    try:
        await registry.commit_expose("sb1", 8000)
        before = _in_memory(registry)
        if change == "delete":
            path.unlink()
        elif change == "delete-wal":
            Path(f"{path}-wal").unlink()
        else:  # a backup moved into place while tunneld runs
            backup = SqliteStore.open(tmp_path / "backup")
            await backup.put(StoredExposure("sb9", 9000, "from_backup", None, 1.0))
            await backup.close()
            os.replace(tmp_path / "backup" / DB_FILE, path)
        with caplog.at_level(logging.ERROR, "tunneld.store"):
            results = await asyncio.gather(
                registry.commit_expose("sb1", 8001),
                registry.commit_unexpose("sb1", 8000),
                return_exceptions=True,
            )
        assert all("was deleted or replaced while tunneld runs" in _refused(r) for r in results)
        assert "write failed" in caplog.text and "deleted or replaced" in caplog.text
        assert _in_memory(registry) == before  # previews keep serving what was acknowledged
    finally:
        await store.close()
    # A start reads what is at the path now; the refused changes are in no file.
    expected = {
        "delete": set(),  # gone with the file (the docs say so: restore a backup)
        "delete-wal": before,  # the clean close checkpointed the open WAL into the database
        "replace": {("sb9", 9000, "from_backup")},
    }[change]
    assert await _reopened(state) == expected


# -- the state directory made read-only at runtime ----------------------------------------------
_READ_ONLY_RUN = """
import asyncio, os, sys
from pathlib import Path
from tunneld.store import SqliteStore, StoredExposure, StoreError
async def main(state):
    store = SqliteStore.open(state)
    await store.put(StoredExposure("sb1", 8000, "before", None, 1.0))
    os.chmod(state, 0o500)
    await store.put(StoredExposure("sb1", 8001, "after", None, 1.0))
    await store.close()
    try:
        SqliteStore.open(state).close_now()
    except StoreError as exc:
        print(exc)
asyncio.run(main(Path(sys.argv[1])))
"""


def test_a_state_dir_made_read_only_at_runtime_keeps_writes_and_refuses_the_next_start(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    argv = without_root_powers([sys.executable, "-c", _READ_ONLY_RUN, str(state)])
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out
    # the open files took the write; the next start says why it cannot run there
    assert "is not writable (Permission denied)" in out.stdout, out
    state.chmod(0o700)
    assert _stored(state) == {("sb1", 8000, "before"), ("sb1", 8001, "after")}
