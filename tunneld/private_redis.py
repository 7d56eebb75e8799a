"""The shared state of ``--workers N`` without a Redis of the operator's: one the supervisor runs.

Theory of operation
-------------------
Workers are separate processes: exposures and the ownership of agent sessions must be shared,
and every change seen by all of them at once. The cluster code already does exactly that over
Redis (:mod:`tunneld.redis_store`, :mod:`tunneld.cluster`), so rather than a second mechanism
for one host (SQLite shared by several writers would need polling for changes and a lease table
of its own), the supervisor starts a private ``redis-server`` for its workers when the configured
store is ``sqlite`` or ``memory``: listening only on a Unix socket (mode 0700, in a private
temporary directory), never on TCP, in a process group of its own (a terminal's Ctrl-C is
for the supervisor, which stops it after the write-back), stopped with the supervisor. The
workers get ``store = unix://...`` and are a cluster of one host.

The operator's ``sqlite`` store stays the durable copy at rest. The supervisor holds the state
directory's lock for its whole life (no single-process tunneld can open it meanwhile), and:

- at start, unless the marker below exists, copies every exposure of ``exposures.db`` into a
  fresh private Redis (its append-only file in ``<state_dir>/redis/``, ``appendfsync always``:
  a 2xx expose is on disk, as with SQLite) and creates ``<state_dir>/redis/UNSAVED``;
- at a clean stop, once the workers are gone, writes the exposures back into ``exposures.db``
  (replacing its contents, in one transaction) and removes the marker.

If the supervisor is killed or the host crashes, the marker stays: the next ``--workers`` start
restarts the private Redis on its append-only file (which is then the newer copy) instead of
copying from SQLite, and a single-process tunneld refuses the state directory with a message
saying how to recover (:func:`check_unsaved`), so the two copies never diverge silently.
``memory`` gets a private Redis without persistence.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Final

from .store import StoredExposure, StoreError

__all__ = ["REDIS_DIR", "UNSAVED", "PrivateRedis", "check_unsaved", "read_unsaved"]

REDIS_DIR: Final = "redis"  # in the state directory: the private Redis's append-only file
UNSAVED: Final = "UNSAVED"  # marker: the private Redis holds exposures not yet in exposures.db
SOCKET_FILE: Final = "SOCKET"  # where a running private Redis listens (for `exposures export`)
START_TIMEOUT: Final = 15.0
# sockaddr_un's sun_path holds 108 bytes with the terminating NUL
MAX_SOCKET_PATH: Final = 107
STOP_TIMEOUT: Final = 10.0  # SIGTERM -> SIGKILL: redis-server fsyncs its append-only file and exits
KILL_WAIT: Final = 5.0  # after SIGKILL, the kernel's part

# Its lines are the supervisor's (docs/operations.md, Logs): it runs this redis-server.
log = logging.getLogger("tunneld.supervisor")


def check_unsaved(state_dir: Path) -> None:
    """StoreError if a ``--workers`` run left exposures only in its private Redis."""
    marker = state_dir / REDIS_DIR / UNSAVED
    if marker.exists():
        raise StoreError(
            f"{state_dir} holds exposures of a `tunneld serve --workers N` run that did not stop "
            f"cleanly ({marker} exists): start it with --workers N again to recover them (they "
            "are written back to exposures.db at its next clean stop), or remove "
            f"{state_dir / REDIS_DIR} to discard them"
        )


def read_unsaved(state_dir: Path) -> list[StoredExposure] | None:
    """The exposures a running ``--workers`` supervisor holds in its private Redis (newer than
    exposures.db), None when there is no such run; StoreError when a run left them but is gone."""
    data_dir = state_dir / REDIS_DIR
    if not (data_dir / UNSAVED).exists():
        return None
    try:
        url = "unix://" + (data_dir / SOCKET_FILE).read_text().strip()
    except OSError:
        url = ""
    if url and _ping(url.removeprefix("unix://")):
        from .redis_store import RedisStore

        async def load() -> list[StoredExposure]:
            store = RedisStore(url, node_id="exposures-export")
            try:
                return await store.load_all()
            finally:
                await store.close()

        return asyncio.run(load())
    check_unsaved(state_dir)  # raises: the run is gone and its exposures are not saved
    return None


def _ping(path: str) -> bool:
    try:
        with socket.socket(socket.AF_UNIX) as conn:
            conn.settimeout(1)
            conn.connect(path)
            conn.sendall(b"PING\r\n")
            return conn.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def find_redis_server() -> str | None:
    """``$TUNNELD_REDIS_SERVER`` if set (a path), else ``redis-server`` on PATH or in /usr/bin."""
    chosen = os.environ.get("TUNNELD_REDIS_SERVER")
    if chosen is not None:
        return chosen if os.access(chosen, os.X_OK) else None
    return shutil.which("redis-server") or (
        "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None
    )


def _die_with_parent() -> None:
    """In the child: SIGTERM when the supervisor dies (kill -9), as its workers get."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG


class PrivateRedis:
    """A redis-server on a private Unix socket; ``data_dir`` None: nothing persisted."""

    def __init__(self, data_dir: Path | None) -> None:
        self.data_dir = data_dir
        self._tmp = Path(tempfile.mkdtemp(prefix="tunneld-redis-"))  # short: a socket path
        if len(os.fsencode(self._tmp / "redis.sock")) > MAX_SOCKET_PATH:
            # a long TMPDIR: redis-server would refuse the socket ("unix socket path too long")
            self._tmp.rmdir()
            self._tmp = Path(tempfile.mkdtemp(prefix="tunneld-redis-", dir="/tmp"))
        self._tmp.chmod(0o700)
        self.socket_path = self._tmp / "redis.sock"
        self.url = f"unix://{self.socket_path}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self._tmp / "redis.log"

    @property
    def unsaved_marker(self) -> Path | None:
        return self.data_dir / UNSAVED if self.data_dir is not None else None

    def start(self, *, fresh: bool) -> None:
        """Start it (``fresh``: drop an old append-only file first); StoreError if it cannot.
        Blocks up to ``START_TIMEOUT``: for a caller with no event loop to keep turning (the
        supervisor uses :meth:`start_async`)."""
        self._spawn(fresh=fresh)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self._started(self.ping()):
                return
            time.sleep(0.02)
        self.stop()
        raise StoreError(f"the workers' private redis-server did not answer in {START_TIMEOUT}s")

    async def start_async(self, *, fresh: bool) -> None:
        """:meth:`start` without blocking the event loop: the supervisor's loop goes on taking
        signals, restarting workers and feeding systemd's watchdog while redis-server comes up
        (up to ``START_TIMEOUT``). Cancelled, it stops the process it started."""
        self._spawn(fresh=fresh)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT
        try:
            while loop.time() < deadline:
                if self._started(await self.ping_async()):
                    return
                await asyncio.sleep(0.02)
        except BaseException:
            await self.stop_async()
            raise
        await self.stop_async()
        raise StoreError(f"the workers' private redis-server did not answer in {START_TIMEOUT}s")

    def _started(self, answered: bool) -> bool:
        """True once it answered (its socket recorded for `exposures export`); StoreError when
        it exited."""
        assert self.proc is not None
        if self.proc.poll() is not None:
            path = self.log_path
            tail = path.read_text(errors="replace")[-500:] if path.exists() else ""
            raise StoreError(f"the workers' private redis-server exited at start: {tail}")
        if not answered:
            return False
        if self.data_dir is not None:
            (self.data_dir / SOCKET_FILE).write_text(str(self.socket_path))
        return True

    def _spawn(self, *, fresh: bool) -> None:
        binary = find_redis_server()
        if binary is None:
            raise StoreError(
                "--workers N without a Redis store runs a private redis-server for the workers, "
                "and none is installed (or $TUNNELD_REDIS_SERVER is not executable): install it "
                "(Debian: apt-get install redis-server) or set store = redis://host:port/db"
            )
        data = self.data_dir if self.data_dir is not None else self._tmp
        if self.data_dir is not None:
            if fresh:
                shutil.rmtree(self.data_dir, ignore_errors=True)
            self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        argv = [
            binary,
            "--port", "0",  # no TCP at all
            "--unixsocket", str(self.socket_path),
            "--unixsocketperm", "700",
            "--dir", str(data),
            "--appendonly", "yes" if self.data_dir is not None else "no",
            "--appendfsync", "always",
            "--save", "",
            "--daemonize", "no",
            "--logfile", str(self.log_path),
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
            # A process group of its own: the SIGINT a terminal's Ctrl-C sends to the whole
            # foreground group must not stop it before the supervisor has written its exposures
            # back; the supervisor stops it (and the kernel, should the supervisor die).
            process_group=0,
        )

    def ping(self) -> bool:
        return _ping(str(self.socket_path))

    async def ping_async(self) -> bool:
        """:meth:`ping` on the event loop (the same 1 s bound)."""
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(1):
                reader, writer = await asyncio.open_unix_connection(str(self.socket_path))
                writer.write(b"PING\r\n")
                return (await reader.read(16)).startswith(b"+PONG")
        except (OSError, TimeoutError):
            return False
        finally:
            if writer is not None:
                writer.close()

    def exited(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def stop(self) -> None:
        """SIGTERM, up to ``STOP_TIMEOUT`` for it to exit, then SIGKILL and up to ``KILL_WAIT``
        (both logged). Blocks: for a caller with no event loop (the supervisor uses
        :meth:`stop_async`)."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()  # redis-server fsyncs its append-only file and exits
        try:
            proc.wait(STOP_TIMEOUT)
            return
        except subprocess.TimeoutExpired:
            _log_kill(proc)
        proc.kill()
        try:
            proc.wait(KILL_WAIT)
        except subprocess.TimeoutExpired:
            _log_unkillable(proc)

    async def stop_async(self) -> None:
        """:meth:`stop` on the event loop: the loop goes on taking signals while redis-server
        saves and exits (the same bounds, the same log lines)."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()  # redis-server fsyncs its append-only file and exits
        if await _exited(proc, STOP_TIMEOUT):
            return
        _log_kill(proc)
        proc.kill()
        if not await _exited(proc, KILL_WAIT):
            _log_unkillable(proc)

    def cleanup(self) -> None:
        """Stop it (:meth:`stop`: a no-op after :meth:`stop_async`) and remove its socket's
        directory."""
        self.stop()
        with contextlib.suppress(OSError):
            shutil.rmtree(self._tmp)


async def _exited(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    """Whether ``proc`` exited (and was reaped) within ``timeout``, polling on the loop."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.02)
    return True


def _log_kill(proc: subprocess.Popen[bytes]) -> None:
    log.warning(
        "the private redis-server (pid %d) did not exit %.0fs after SIGTERM: SIGKILL",
        proc.pid,
        STOP_TIMEOUT,
    )


def _log_unkillable(proc: subprocess.Popen[bytes]) -> None:
    log.error(
        "the private redis-server (pid %d) still running %.0fs after SIGKILL: left to the kernel",
        proc.pid,
        KILL_WAIT,
    )
