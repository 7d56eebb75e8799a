"""A sqlite write held up (a hung disk, a lock held elsewhere): every wait has a bound, and the
edge's view follows what the store ends up holding.

A write the writer has started and that outlasts the store's write timeout is answered 503
``STORE_UNAVAILABLE`` "it may still be applied"; the registry then waits for the write's real
outcome, holding the sandbox's lock, and applies the change if (and only if) it committed. Later
changes of that sandbox wait for the lock at most the write timeout and are answered 503 "still
being written; nothing changed". A caller cancelled meanwhile, or an edge stopping, leaves memory
and disk agreeing.

The writer is held up for real: another sqlite3 connection holds the database's write lock
(``BEGIN IMMEDIATE``), so the writer's own ``BEGIN IMMEDIATE`` waits in SQLite's busy handler
(``busy_timeout``, 5 s) and either commits once the lock is released or fails with "database is
locked". The write timeout is shortened below that so the answer falls due while it waits.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sqlite3
import sys
import threading
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import Stack, wait_until
from tests.e2e.procs import Processes, wait_for_file
from tests.faults.durable import Service, admin, connected, preview, state_dir, wait
from tunneld.config import Config
from tunneld.edge import EdgeServer
from tunneld.registry import Registry, RegistryError
from tunneld.store import DB_FILE, SqliteStore, StoreError, read_exposures
from tunneld.store import WRITE_TIMEOUT as STORE_WRITE_TIMEOUT

pytestmark = pytest.mark.anyio

# The writer's BEGIN IMMEDIATE waits up to busy_timeout (5 s) for a lock held elsewhere; the
# write timeout is far below it, so the caller's answer is due while the write still waits.
WRITE_TIMEOUT = 0.5
# A generous bound on an answer that must not wait for the disk: still below busy_timeout, so a
# caller that waited for the write's outcome (the lock is only released after the answers) would
# miss it.
ANSWER_GUARD = 4.0


def _stored(state: Path) -> set[tuple[str, int]]:
    """What a new tunneld on ``state`` would load: (sandbox, port)."""
    return {(r.sandbox_id, r.port) for r in read_exposures(state)}


def _in_memory(registry: Registry) -> set[tuple[str, int]]:
    return {(r.sandbox_id, r.port) for r in registry.records()}


async def _reopened(state: Path) -> set[tuple[str, int]]:
    """What a restarted edge loads from ``state`` (the store opened again, the lock taken)."""
    store = SqliteStore.open(state)
    try:
        return {(r.sandbox_id, r.port) for r in await store.load_all()}
    finally:
        await store.close()


def _unknown(error: BaseException) -> None:
    """A 503 STORE_UNAVAILABLE that says the change may still be applied (not "nothing
    changed")."""
    assert isinstance(error, RegistryError), error
    assert (error.status, error.code) == (503, "STORE_UNAVAILABLE"), error
    assert "it may still be applied" in error.message, error.message
    assert "this edge follows what the store holds either way" in error.message
    assert "nothing changed" not in error.message, error.message


def _still_being_written(error: BaseException, sandbox: str) -> None:
    assert isinstance(error, RegistryError), error
    assert (error.status, error.code) == (503, "STORE_UNAVAILABLE"), error
    assert f"An earlier change of sandbox {sandbox} is still being written" in error.message
    assert "nothing changed" in error.message, error.message


class _Held:
    """A registry on a sqlite store whose writer can be held up by a write lock taken
    elsewhere; ``began`` is set when the writer begins a batch."""

    def __init__(self, state: Path) -> None:
        self.state = state
        self.store = SqliteStore.open(state)
        self.store.write_timeout = WRITE_TIMEOUT
        self.registry = Registry(self.store)
        self.began = threading.Event()
        self.store._conn.set_trace_callback(
            lambda sql: self.began.set() if sql == "BEGIN IMMEDIATE" else None
        )
        self.other: sqlite3.Connection | None = None

    def hold(self) -> None:
        """Another connection takes the database's write lock."""
        self.other = sqlite3.connect(
            self.state / DB_FILE, isolation_level=None, check_same_thread=False
        )
        self.other.execute("BEGIN IMMEDIATE")
        self.began.clear()

    def unhurried(self) -> None:
        """The store's own write timeout again: a write checked to go through once the lock is
        free must not be answered "may still commit" because a loaded machine's fsync took
        longer than the shortened ``WRITE_TIMEOUT``."""
        self.store.write_timeout = STORE_WRITE_TIMEOUT

    def release(self) -> None:
        if self.other is not None:
            self.other.execute("ROLLBACK")
            self.other.close()
            self.other = None

    async def writer_began(self) -> None:
        assert await asyncio.to_thread(self.began.wait, 10), "the writer never began the batch"

    async def close(self) -> None:
        self.release()
        await self.store.close()


# -- in process: a real SqliteStore and Registry ------------------------------------------------
@pytest.mark.parametrize("change", ["expose", "unexpose"])
async def test_a_held_up_write_is_answered_in_time_and_applied_once_it_commits(
    tmp_path: Path, change: str
) -> None:
    held = _Held(tmp_path / "state")
    registry = held.registry
    try:
        await registry.commit_expose("sb1", 8000)
        before = _in_memory(registry)
        after = before | {("sb1", 8001)} if change == "expose" else before - {("sb1", 8000)}
        held.hold()
        loop = asyncio.get_running_loop()
        started = loop.time()
        first = asyncio.create_task(
            registry.commit_expose("sb1", 8001)
            if change == "expose"
            else registry.commit_unexpose("sb1", 8000)
        )
        await held.writer_began()
        # a later change of the same sandbox, while the first is being written
        later = asyncio.create_task(registry.commit_expose("sb1", 8002))

        with pytest.raises(RegistryError) as first_error:
            await asyncio.wait_for(first, ANSWER_GUARD)
        _unknown(first_error.value)
        with pytest.raises(RegistryError) as later_error:
            await asyncio.wait_for(later, ANSWER_GUARD)
        _still_being_written(later_error.value, "sb1")
        assert loop.time() - started < ANSWER_GUARD  # answered without waiting for the disk
        # The lock is still held: nothing is written yet, and the view is as before.
        assert _in_memory(registry) == before
        assert _stored(held.state) == before

        held.release()  # the write commits: the view follows
        await wait_until(lambda: _stored(held.state) == after, 15, "the held-up write to commit")
        await wait_until(lambda: _in_memory(registry) == after, 15, "the view to follow the store")
        assert ("sb1", 8002) not in _in_memory(registry)  # the refused change: nowhere
        # the sandbox's lock is free again
        held.unhurried()
        await asyncio.wait_for(registry.commit_expose("sb1", 8003), ANSWER_GUARD)
        assert _stored(held.state) == _in_memory(registry) == after | {("sb1", 8003)}
    finally:
        await held.close()
    assert await _reopened(held.state) == after | {("sb1", 8003)}


async def test_a_held_up_write_that_then_fails_is_in_neither_memory_nor_disk(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    held = _Held(tmp_path / "state")
    registry = held.registry
    try:
        await registry.commit_expose("sb1", 8000)
        before = _in_memory(registry)
        held.hold()
        with caplog.at_level(logging.WARNING):
            first = asyncio.create_task(registry.commit_expose("sb1", 8001))
            await held.writer_began()
            later = asyncio.create_task(registry.commit_unexpose("sb1", 8000))
            with pytest.raises(RegistryError) as first_error:
                await asyncio.wait_for(first, ANSWER_GUARD)
            _unknown(first_error.value)
            with pytest.raises(RegistryError) as later_error:
                await asyncio.wait_for(later, ANSWER_GUARD)
            _still_being_written(later_error.value, "sb1")
            # The lock stays held past busy_timeout: the writer gives up.
            await wait_until(lambda: "database is locked" in caplog.text, 15, "the write to fail")
            held.release()
            await wait_until(lambda: "was not saved after all" in caplog.text, 15, "the registry")
        assert _in_memory(registry) == before
        assert _stored(held.state) == before
        # the sandbox's lock is free again, and writes go through
        held.unhurried()
        await asyncio.wait_for(registry.commit_unexpose("sb1", 8000), ANSWER_GUARD)
        assert _stored(held.state) == _in_memory(registry) == set()
    finally:
        await held.close()
    assert await _reopened(held.state) == set()


async def test_a_caller_cancelled_while_its_write_runs_leaves_memory_and_disk_agreeing(
    tmp_path: Path,
) -> None:
    held = _Held(tmp_path / "state")
    registry = held.registry
    try:
        await registry.commit_expose("sb1", 8000)
        held.hold()
        caller = asyncio.create_task(registry.commit_expose("sb1", 8001))
        await held.writer_began()
        caller.cancel()  # a client gone, a handler cancelled: the write goes on regardless
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(caller, ANSWER_GUARD)
        held.release()
        wanted = {("sb1", 8000), ("sb1", 8001)}
        await wait_until(lambda: _stored(held.state) == wanted, 15, "the write to commit")
        await wait_until(lambda: _in_memory(registry) == wanted, 15, "the view to follow the store")
    finally:
        await held.close()
    assert await _reopened(held.state) == wanted


async def test_waiting_for_the_writes_at_stop_is_bounded_and_leaves_the_view_settled(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """What ``EdgeServer.stop`` calls before closing the store: a write in flight settles into
    the view before it returns; one held up past the bound is left to the store, its sandbox's
    lock free."""
    held = _Held(tmp_path / "state")
    registry = held.registry
    timer = threading.Timer(0.3, held.release)  # the disk lets the first write finish
    try:
        held.hold()
        caller = asyncio.create_task(registry.commit_expose("sb1", 8000))
        await held.writer_began()
        timer.start()
        assert await registry.wait_writes(10) == 0
        # settled when it returns: no further step of the loop needed
        assert _in_memory(registry) == _stored(held.state) == {("sb1", 8000)}
        assert (await asyncio.wait_for(caller, ANSWER_GUARD)).port == 8000

        held.hold()  # now held past the bound
        caller = asyncio.create_task(registry.commit_expose("sb1", 8001))
        await held.writer_began()
        with caplog.at_level(logging.WARNING, "tunneld"):
            assert await asyncio.wait_for(registry.wait_writes(0.2), ANSWER_GUARD) == 1
        assert "1 change(s) still being written after 0.2s at stop" in caplog.text
        with pytest.raises(RegistryError) as error:
            await asyncio.wait_for(caller, ANSWER_GUARD)
        _unknown(error.value)
        held.release()
        # its sandbox's lock was given back: the next change is not refused as "still written"
        held.unhurried()
        await asyncio.wait_for(registry.commit_expose("sb1", 8002), ANSWER_GUARD)
    finally:
        timer.cancel()
        timer.join(5)
        await held.close()
    # the one left to the store was committed once the lock was released: a start loads it
    assert await _reopened(held.state) == {("sb1", 8000), ("sb1", 8001), ("sb1", 8002)}


async def test_an_edge_stopping_while_a_write_runs_stops_with_its_view_following_the_store(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    config = Config(public_port=0, agent_port=0, admin_port=0, admin_token="a", secret="s")
    store = SqliteStore.open(state)
    store.write_timeout = 3.0  # the write is still in flight (unanswered) when the stop begins
    edge = EdgeServer(config, asyncio.get_running_loop(), store)
    await edge.start()
    began = threading.Event()
    store._conn.set_trace_callback(lambda sql: began.set() if sql == "BEGIN IMMEDIATE" else None)
    other = sqlite3.connect(state / DB_FILE, isolation_level=None, check_same_thread=False)
    release = threading.Timer(0.5, lambda: other.execute("ROLLBACK"))
    try:
        other.execute("BEGIN IMMEDIATE")
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{edge.admin_port}",
            headers={"authorization": "Bearer a"},
            timeout=10,
        ) as client:
            request = asyncio.create_task(
                client.post("/v1/sandboxes/sb1/ports", json={"port": 8000})
            )
            assert await asyncio.to_thread(began.wait, 10), "the writer never began the batch"
            release.start()  # the disk lets the write finish while the edge stops
            await asyncio.wait_for(edge.stop(grace=0), 20)
            view = _in_memory(edge.registry)  # as stop() left it: no later step of the loop
            request.cancel()
            await asyncio.gather(request, return_exceptions=True)
        # stopped: what its view held at the end is what the store holds
        assert view == _stored(state) == {("sb1", 8000)}
    finally:
        release.cancel()
        release.join(5)
        other.close()
        await store.close()
    assert await _reopened(state) == {("sb1", 8000)}


# -- a real `tunneld serve` -----------------------------------------------------------------------
_SERVE = """
import sys
import tunneld.store
tunneld.store.WRITE_TIMEOUT = float(sys.argv.pop(1))  # read by SqliteStore.open
from tunneld.cli import main
sys.exit(main())
"""


def _start_edge_with_write_timeout(procs: Processes, seconds: float) -> None:
    """``procs.start_edge`` with the sqlite store's write timeout set to ``seconds``."""
    ports_file = procs.tmp / f"edge-{len(procs.procs)}.json"
    argv = [
        sys.executable, "-c", _SERVE, str(seconds),
        "serve", "--public-port", "0", "--agent-port", "0", "--admin-port", "0",
        "--ports-file", str(ports_file), "--grace-period", "5",
        "--state-dir", str(state_dir(procs)), "--url-port", "80",
    ]  # fmt: skip
    env = procs.env(TUNNELD_ADMIN_TOKEN=procs.admin_token, TUNNELD_SECRET=procs.secret)
    procs.edge = procs._spawn("edge", argv, env)
    procs.ports = wait_for_file(ports_file, procs.edge, log=procs.logs[procs.edge.pid])


@pytest.mark.parametrize("outcome", ["committed", "failed"])
def test_tunneld_serve_answers_a_held_up_expose_in_time_and_follows_its_outcome(
    tmp_path: Path, outcome: str
) -> None:
    procs = Processes(tmp_path, "uvloop")
    services = [Service() for _ in range(2)]
    other: sqlite3.Connection | None = None
    try:
        _start_edge_with_write_timeout(procs, 1.0)
        agent, _ = procs.start_agent("sb1")
        wait(lambda: connected(procs, "sb1"), what="agent connected")
        edge = procs.edge
        assert edge is not None
        kept_port, held_port = services[0].port, services[1].port
        with admin(procs) as a:
            r = a.post("/v1/sandboxes/sb1/ports", json={"port": kept_port})
            assert r.status_code == 200, r.text
            kept = r.json()["exposedAt"]

            other = sqlite3.connect(state_dir(procs) / DB_FILE, isolation_level=None)
            other.execute("BEGIN IMMEDIATE")  # the edge's writer will wait for this lock
            r = a.post("/v1/sandboxes/sb1/ports", json={"port": held_port})
            body = r.json()
            assert (r.status_code, body["code"]) == (503, "STORE_UNAVAILABLE"), r.text
            assert "it may still be applied" in body["error"], body
            # meanwhile a change of the same sandbox is refused, and changes nothing
            r = a.delete(f"/v1/sandboxes/sb1/ports/{kept_port}")
            body = r.json()
            assert (r.status_code, body["code"]) == (503, "STORE_UNAVAILABLE"), r.text
            assert "An earlier change of sandbox sb1 is still being written" in body["error"]
            assert "nothing changed" in body["error"]

            if outcome == "failed":  # held past busy_timeout (5 s): "database is locked"
                wait(
                    lambda: "database is locked" in procs.output(edge),
                    what="the held-up write to fail",
                )
            other.execute("ROLLBACK")
            other.close()
            other = None
            wanted = sorted([kept_port, held_port] if outcome == "committed" else [kept_port])

            def listed() -> list[int]:
                return sorted(p["port"] for p in a.get("/v1/sandboxes/sb1/ports").json()["ports"])

            wait(lambda: listed() == wanted, what="the listing to follow the store")
            assert sorted(p for s, p in _stored(state_dir(procs)) if s == "sb1") == wanted
            assert preview(procs, kept).text == f"port {kept_port}"  # the refused delete
            log = procs.output(edge)
            assert "Traceback" not in log, log
            assert ("was saved after all" if outcome == "committed" else "was not saved") in log

        # after kill -9 and a start: what the store holds, served
        assert procs.stop(edge, signal.SIGKILL) == -signal.SIGKILL
        procs.stop(agent)
        procs.start_edge("--url-port", "80")  # (new ports: a new agent dials them)
        procs.start_agent("sb1")
        wait(lambda: connected(procs, "sb1"), what="agent connected to the new edge")
        with admin(procs) as a:
            ports = a.get("/v1/sandboxes/sb1/ports").json()["ports"]
        assert sorted(p["port"] for p in ports) == wanted
        for p in ports:
            assert preview(procs, p["exposedAt"]).text == f"port {p['port']}"
    finally:
        if other is not None:
            other.close()
        procs.close()
        for s in services:
            s.close()


async def test_a_change_saved_after_its_503_reaches_the_agent_too(tmp_path: Path) -> None:
    """An expose answered 503 "may still be applied" that then commits: besides the view, the
    sandbox's connected agent is told (as for a change made through another node), so the
    preview URL answers rather than its streams being refused as a port the agent never got."""
    held = _Held(tmp_path / "state")
    stack = Stack()
    stack.store = held.store
    try:
        await stack.start()
        assert stack.admin is not None and stack.edge is not None
        origin = await stack.origin()
        agent = await stack.agent("sb1")
        held.hold()
        r = await stack.admin.post("/v1/sandboxes/sb1/ports", json={"port": origin.port})
        assert r.status_code == 503 and "may still be applied" in r.json()["error"], r.text
        assert origin.port not in agent.exposures
        held.release()
        await wait_until(lambda: origin.port in agent.exposures, 15, "the agent to be told")
        listed = (await stack.admin.get("/v1/sandboxes/sb1/ports")).json()["ports"]
        host = listed[0]["exposedAt"].split("//", 1)[1].split("/", 1)[0]
        async with httpx.AsyncClient(timeout=10) as client:
            answer = await client.get(
                f"http://127.0.0.1:{stack.edge.public_port}/", headers={"host": host}
            )
        assert (answer.status_code, answer.content) == (200, b"hello from origin")
    finally:
        held.release()
        await stack.close()


async def test_closing_the_store_under_a_write_still_running_does_not_wait_for_the_disk(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The last step of a stop, ``SqliteStore.close``, with a write the disk still holds past the
    write timeout: closing its connection would block the event loop's thread on SQLite's mutex
    until the disk answers (here up to the 5 s busy timeout; a hung mount: for ever), and giving
    the state directory's lock back would let another tunneld in while the write may land. Both
    are left to the process's exit; the log says so."""
    held = _Held(tmp_path / "state")
    try:
        held.hold()
        caller = asyncio.create_task(held.registry.commit_expose("sb1", 8000))
        await held.writer_began()
        with caplog.at_level(logging.ERROR, "tunneld"):
            await asyncio.wait_for(held.store.close(), ANSWER_GUARD)
        thread = held.store._thread
        assert thread is not None and thread.is_alive()  # returned without waiting for it
        assert "a write was still running" in caplog.text
        with pytest.raises(StoreError, match="is in use"):
            SqliteStore.open(held.state)  # the lock is still this process's
        held.release()
        with pytest.raises(RegistryError):
            await asyncio.wait_for(caller, ANSWER_GUARD)
        await asyncio.to_thread(thread.join, 10)
        assert not thread.is_alive()
    finally:
        held.release()
        if held.store._thread is not None and not held.store._thread.is_alive():
            held.store._conn.close()
            os.close(held.store._lock_fd)
