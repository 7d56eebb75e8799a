"""Bound: the sqlite store's writer queue (tunneld/store.py ``MAX_QUEUED``).

While the disk hangs, a write whose caller's time ran out (``WRITE_TIMEOUT``) before the writer
took it is dropped ("nothing changed") but stays in the writer's queue until the writer reaches
it, and the sandbox's lock is free again for the next change. So dropped writes pile up, one per
sandbox per write timeout. Past ``max_queued`` waiting changes a new one is refused at once, 503
``STORE_UNAVAILABLE`` saying the disk is not keeping up, nothing written, and once the writer
catches up changes are written again.

The writer is held up for real, as in test_store_hung_writes.py: another sqlite3 connection holds
the database's write lock; the store's busy timeout is raised so that the writer waits for that
lock (a hung disk) until the test releases it rather than failing after 5 s.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from tests.e2e.conftest import wait_until
from tunneld.registry import RegistryError
from tunneld.store import MAX_QUEUED

from .test_store_hung_writes import ANSWER_GUARD, _Held, _in_memory, _reopened, _stored, _unknown

pytestmark = pytest.mark.anyio

BOUND = 8  # the store's max_queued here (MAX_QUEUED, 8192, takes as long to fill, only bigger)
WAIT = 30.0  # bound on every wait


def _nothing_changed(error: BaseException) -> RegistryError:
    assert isinstance(error, RegistryError), error
    assert (error.status, error.code) == (503, "STORE_UNAVAILABLE"), error
    assert "nothing changed" in error.message, error.message
    return error


async def test_dropped_writes_piling_up_in_a_hung_store_are_capped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    held = _Held(tmp_path / "state")
    registry = held.registry
    held.store.max_queued = BOUND
    try:
        await registry.commit_expose("sb0", 8000)  # the writer runs, the table exists
        # the writer waits for a lock held elsewhere until it is released (a hung disk)
        held.store._conn.execute("PRAGMA busy_timeout = 120000")
        held.hold()
        first = asyncio.create_task(registry.commit_expose("sb0", 8001))
        await held.writer_began()  # taken into a batch: it does not count in the queue

        # BOUND changes of other sandboxes queue up; their callers' time runs out before the
        # writer takes them: dropped ("did not start"), yet still in the queue
        waiting = [f"q{i}" for i in range(BOUND)]
        for sandbox in waiting:
            with pytest.raises(RegistryError) as dropped:
                await asyncio.wait_for(registry.commit_expose(sandbox, 8000), WAIT)
            error = _nothing_changed(dropped.value)
            assert "did not start within" in error.message, error.message
        with pytest.raises(RegistryError) as first_error:
            await asyncio.wait_for(first, WAIT)
        _unknown(first_error.value)  # the one the writer started: "may still be applied"

        # the queue is full of dropped writes: the next change is refused at once, not queued
        with caplog.at_level(logging.WARNING, "tunneld.store"):
            for sandbox in ("q0", "new"):  # a sandbox whose write was dropped, and another
                with pytest.raises(RegistryError) as full:
                    await asyncio.wait_for(registry.commit_expose(sandbox, 8001), WAIT)
                error = _nothing_changed(full.value)
                assert "the disk is not keeping up" in error.message, error.message
                assert f"{BOUND} changes are already waiting to be written" in error.message
        full_lines = [
            r for r in caplog.records if "changes are waiting to be written" in r.getMessage()
        ]
        assert len(full_lines) == 1, [r.getMessage() for r in full_lines]  # once, not per refusal
        assert _stored(held.state) == _in_memory(registry) == {("sb0", 8000)}

        held.release()  # the writer catches up: the started write commits, the dropped are skipped
        wanted = {("sb0", 8000), ("sb0", 8001)}
        await wait_until(lambda: _stored(held.state) == wanted, WAIT, "the held-up write to commit")
        await wait_until(lambda: _in_memory(registry) == wanted, WAIT, "the view to follow")
        # changes are written again, the refused ones included when made again
        await asyncio.wait_for(registry.commit_expose("new", 8001), ANSWER_GUARD)
        await asyncio.wait_for(registry.commit_expose("q0", 8001), ANSWER_GUARD)
        wanted |= {("new", 8001), ("q0", 8001)}
        assert _stored(held.state) == _in_memory(registry) == wanted
    finally:
        await held.close()
    assert await _reopened(held.state) == wanted


def test_docs_give_the_bound_the_store_has() -> None:
    text = (Path(__file__).parents[2] / "docs" / "operations.md").read_text()
    text = " ".join(text.split())
    assert f"The queue holds at most {MAX_QUEUED:,} changes waiting for the writer" in text
    assert f"{MAX_QUEUED} changes are already waiting to be written" in text
