"""``PrivateRedis.start_async`` (tunneld/private_redis.py): the supervisor's wait for its workers'
redis-server, on the event loop without blocking it, bounded by ``START_TIMEOUT``; a process
that never answers, or whose start is cancelled (a stop), is stopped, not left behind.

``$TUNNELD_REDIS_SERVER`` is a script that records its pid and then never answers (``exec
sleep``), or exits at once. The whole-process behaviour (a supervisor that keeps taking SIGTERM
and feeding systemd while a restart waits) is test_workers_private_store_restart.py.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from tunneld import private_redis
from tunneld.private_redis import PrivateRedis
from tunneld.store import StoreError

WAIT = 10.0  # bound on every wait here


def _server(tmp_path: Path, body: str) -> Path:
    script = tmp_path / "redis-server"
    script.write_text(f'#!/bin/sh\necho $$ > "{tmp_path}/pid"\n{body}\n')
    script.chmod(0o755)
    return script


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def _pid(tmp_path: Path) -> int:
    async with asyncio.timeout(WAIT):
        while not (tmp_path / "pid").exists() or not (tmp_path / "pid").read_text().strip():
            await asyncio.sleep(0.01)
    return int((tmp_path / "pid").read_text())


def test_a_server_that_never_answers_is_waited_for_without_blocking_the_loop_then_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TUNNELD_REDIS_SERVER", str(_server(tmp_path, "exec sleep 60")))
    monkeypatch.setattr(private_redis, "START_TIMEOUT", 1.0)
    redis = PrivateRedis(None)

    async def main() -> tuple[BaseException | None, list[bool]]:
        # per turn of a concurrent task: the server was up, being waited for (not yet stopped:
        # stopping it sets redis.proc to None first)
        seen: list[bool] = []

        async def other_work() -> None:
            while True:
                proc = redis.proc
                seen.append(
                    proc is not None and proc.poll() is None and (tmp_path / "pid").exists()
                )
                await asyncio.sleep(0.05)

        ticker = asyncio.create_task(other_work())
        try:
            async with asyncio.timeout(WAIT):
                await redis.start_async(fresh=True)
        except StoreError as exc:
            return exc, seen
        finally:
            ticker.cancel()
        return None, seen

    try:
        error, seen = asyncio.run(main())
        assert isinstance(error, StoreError), error
        assert "did not answer in 1.0s" in str(error)
        # the loop ran other work while the server was up and not answering
        assert any(seen), seen
        pid = int((tmp_path / "pid").read_text())
        assert _gone(pid), "the server that never answered was left running"
        assert redis.proc is None
    finally:
        redis.cleanup()


def test_a_start_cancelled_by_a_stop_stops_the_server_it_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TUNNELD_REDIS_SERVER", str(_server(tmp_path, "exec sleep 60")))
    redis = PrivateRedis(None)

    async def main() -> int:
        start = asyncio.create_task(redis.start_async(fresh=True))
        pid = await _pid(tmp_path)
        start.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(start, WAIT)
        return pid

    try:
        pid = asyncio.run(main())
        assert _gone(pid), "the server whose start was cancelled was left running"
        assert redis.proc is None
    finally:
        redis.cleanup()


def test_a_server_that_exits_at_start_is_a_store_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TUNNELD_REDIS_SERVER", str(_server(tmp_path, "exit 3")))
    redis = PrivateRedis(None)
    try:
        with pytest.raises(StoreError, match="exited at start"):
            asyncio.run(asyncio.wait_for(redis.start_async(fresh=True), WAIT))
    finally:
        redis.cleanup()


def test_a_long_tmpdir_still_gives_a_socket_redis_server_accepts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """sun_path holds 107 bytes: under a TMPDIR that long (a test runner's, a user's), the real
    redis-server refused the socket and the start failed; the socket now goes under /tmp."""
    long_dir = tmp_path / ("d" * (120 - len(str(tmp_path))))
    long_dir.mkdir()
    monkeypatch.setenv("TMPDIR", str(long_dir))
    monkeypatch.setattr(private_redis.tempfile, "tempdir", None)  # re-read TMPDIR
    redis = PrivateRedis(None)
    try:
        assert len(os.fsencode(redis.socket_path)) <= 107
        asyncio.run(asyncio.wait_for(redis.start_async(fresh=True), WAIT))
        assert redis.ping()
    finally:
        redis.cleanup()
    assert list(long_dir.iterdir()) == []
