"""Durable exposures: the store behind the registry (``memory`` or ``sqlite``; Redis later).

Theory of operation
-------------------
The registry (:mod:`tunneld.registry`) keeps the in-memory view that routing reads on every
preview request; the store only makes that view survive a restart. It is read once, at start-up
(``load_all``), and written through on every expose and unexpose (``put`` / ``delete``), before
the caller is answered. Nothing about sessions is stored: they are runtime state.

The interface is asynchronous so that a networked backend (Redis, for several edges) fits
behind it unchanged; the embedded backends simply finish quickly:

- :class:`MemoryStore` keeps records in a dict, gone with the process (tests, the demo).
- :class:`SqliteStore` keeps one database file, ``exposures.db``, in the state directory. WAL
  journal, ``synchronous=FULL`` (a commit is on disk, WAL fsynced, before ``put`` returns, so a
  2xx expose survives ``kill -9`` and power loss), schema migrations numbered in
  ``PRAGMA user_version``. Writes never run on the event loop: one writer thread owns the only
  writing connection and commits whatever has queued up in one transaction (group commit), so
  1,000 concurrent exposes cost a handful of fsyncs, not 1,000. A lock file (``flock``) makes
  the state directory one edge's: a second tunneld on the same directory refuses to start, and
  ``tunneld exposures import`` refuses while the edge runs. Readers (``export``) need no lock:
  WAL gives them a consistent snapshot while the edge writes.

Opening checks everything a later surprise would hide: the directory is writable, the file is a
database of a schema this version knows, ``PRAGMA quick_check`` passes. Anything else raises
:class:`StoreError` with a message naming the file and what to do; the CLI exits 2 with it. An
edge never starts empty over a database it could not read.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import queue
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, NamedTuple, Protocol

__all__ = [
    "DB_FILE",
    "LOCK_FILE",
    "SCHEMA_VERSION",
    "MemoryStore",
    "SqliteStore",
    "Store",
    "StoreError",
    "StoredExposure",
    "default_state_dir",
    "open_store",
    "read_exposures",
]

log = logging.getLogger("tunneld.store")

DB_FILE: Final = "exposures.db"
LOCK_FILE: Final = "tunneld.lock"
SCHEMA_VERSION: Final = 2
# Operations one commit may carry: big enough that a burst of exposes shares a few fsyncs,
# small enough that one transaction never holds the write lock for long.
MAX_BATCH: Final = 512
# How long a caller waits for its write (a hung disk, a stuck NFS mount, a lock held elsewhere):
# one the writer has not started by then is dropped (never written: "nothing changed"); one it
# has started may still commit, so its caller is told the outcome is unknown and handed the
# write's real outcome to follow (StoreError.outcome; the registry applies the change if it
# commits). Nobody waits on a write without bound (_submit).
WRITE_TIMEOUT: Final = 30.0
# Changes waiting for the writer (not yet in a batch), those whose callers gave up included: a
# write dropped after WRITE_TIMEOUT stays queued until the writer reaches it (skipped then), so
# while the disk hangs they pile up, one per sandbox per WRITE_TIMEOUT. Past this many a change
# is refused at once, 503 STORE_UNAVAILABLE, nothing changed. A disk that keeps up never gets
# near it (one change per sandbox at a time, 512 per commit: 16 commits' worth); at a few hundred
# bytes each the queue stays under a few MiB.
MAX_QUEUED: Final = 16 * MAX_BATCH

_MIGRATIONS: Final[dict[int, str]] = {
    # version -> SQL that brings the previous version to it
    1: """
        CREATE TABLE exposures (
            sandbox_id TEXT NOT NULL,
            port       INTEGER NOT NULL,
            token      TEXT NOT NULL,
            name       TEXT,
            created_at REAL NOT NULL,
            PRIMARY KEY (sandbox_id, port)
        ) WITHOUT ROWID;
    """,
    # exposure options (issue 11): defaults are what every version-1 exposure was
    2: """
        ALTER TABLE exposures ADD COLUMN protocol TEXT NOT NULL DEFAULT 'http';
        ALTER TABLE exposures ADD COLUMN proxy_protocol INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE exposures ADD COLUMN inspect INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE exposures ADD COLUMN public_port INTEGER;
    """,
}


class StoreError(Exception):
    """The store cannot be used: the message names the file and says what to do.

    ``outcome_unknown``: a write that failed after it reached the store, which may still apply
    it (a Redis command that timed out or lost its connection once sent): the caller must not be
    told that nothing changed.

    ``outcome``: for a write still running when its caller's time was up (SQLite: the writer had
    started it), the future of its real outcome: None once it committed, a StoreError if it was
    not written. Whoever keeps a view of the store follows it (``Registry``); None when nobody
    can tell (Redis: the feed's echo of the write says whether it was applied)."""

    outcome_unknown = False
    outcome: asyncio.Future[None] | None = None


class StoredExposure(NamedTuple):
    """One exposure as stored (and as exported: one JSON object per line). A tuple: start-up
    builds 100,000 of them, and a frozen dataclass costs several times more per instance."""

    sandbox_id: str
    port: int
    token: str
    name: str | None
    created_at: float
    # Options (schema 2); the defaults are a plain HTTP preview URL.
    protocol: str = "http"
    proxy_protocol: bool = False
    inspect: bool = False
    public_port: int | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "sandbox_id": self.sandbox_id,
            "port": self.port,
            "token": self.token,
            "name": self.name,
            "created_at": self.created_at,
        }
        # Options only when set: an export of plain exposures reads as it always did.
        if self.protocol != "http":
            out["protocol"] = self.protocol
        if self.proxy_protocol:
            out["proxy_protocol"] = True
        if self.inspect:
            out["inspect"] = True
        if self.public_port is not None:
            out["public_port"] = self.public_port
        return out


class Store(Protocol):
    """What the registry needs from durable storage. Every write is durable when it returns."""

    kind: str
    location: str  # for logs and messages: a path, a URL, or "memory"

    async def load_all(self) -> list[StoredExposure]: ...

    async def put(self, record: StoredExposure) -> None: ...

    async def delete(self, sandbox_id: str, port: int) -> None: ...

    async def close(self) -> None: ...


class MemoryStore:
    """Exposures for as long as this object lives (``--store memory``, tests, the demo).

    It keeps its records like any store, so an edge restarted in the same process with the same
    object gets them back (the contract tests run on it as on sqlite); nothing reaches a disk."""

    kind = "memory"
    location = "memory"

    def __init__(self) -> None:
        self._records: dict[tuple[str, int], StoredExposure] = {}

    async def load_all(self) -> list[StoredExposure]:
        return [self._records[k] for k in sorted(self._records)]

    async def put(self, record: StoredExposure) -> None:
        key = (record.sandbox_id, record.port)
        old = self._records.get(key)
        if old is not None:  # the same rule as sqlite's upsert: created_at stays
            record = record._replace(created_at=old.created_at)
        self._records[key] = record

    async def delete(self, sandbox_id: str, port: int) -> None:
        self._records.pop((sandbox_id, port), None)

    async def close(self) -> None:
        return None


def default_state_dir(environ: dict[str, str] | os._Environ[str] | None = None) -> Path:
    """Where ``tunneld serve`` keeps state when no ``state_dir`` is configured.

    Under systemd, ``StateDirectory=tunneld`` sets ``$STATE_DIRECTORY`` (/var/lib/tunneld); by
    hand it is the per-user ``$XDG_STATE_HOME/tunneld`` (~/.local/state/tunneld), never the
    current directory, so a run from a checkout writes nothing into it.
    """
    env = os.environ if environ is None else environ
    systemd_dir = env.get("STATE_DIRECTORY")
    if systemd_dir:
        return Path(systemd_dir.split(":")[0])
    xdg = env.get("XDG_STATE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "state"
    return base / "tunneld"


def _what_to_do(path: Path) -> str:
    return (
        f"stop tunneld, move {path} aside and restore it from a backup "
        "(`tunneld exposures import`), or start with an empty state directory"
    )


def _connect(path: Path, *, readonly: bool = False) -> sqlite3.Connection:
    """A connection to ``path`` with the store's pragmas, the schema checked (and migrated)."""
    try:
        if readonly:
            conn = sqlite3.connect(
                f"{path.as_uri()}?mode=ro", uri=True, isolation_level=None, check_same_thread=False
            )
        else:
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open the state database {path}: {exc}") from None
    try:
        conn.execute("PRAGMA busy_timeout = 5000")
        if not readonly:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreError(f"{path}: cannot switch the database to WAL mode (got {mode})")
            conn.execute("PRAGMA synchronous = FULL")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{path} has schema version {version}, newer than this tunneld knows "
                f"({SCHEMA_VERSION}): run the tunneld that wrote it, or export/import with it"
            )
        if version < SCHEMA_VERSION:
            if readonly:
                if version == 0 and not _has_tables(conn):
                    return conn  # empty: nothing to read
                raise StoreError(
                    f"{path} has schema version {version}: start tunneld once to migrate it"
                )
            _migrate(conn, version)
        check = conn.execute("PRAGMA quick_check").fetchall()
        if check != [("ok",)]:
            detail = "; ".join(str(row[0]) for row in check[:3])
            raise StoreError(f"{path} is corrupt ({detail}): {_what_to_do(path)}")
    except StoreError:
        conn.close()
        raise
    except sqlite3.Error as exc:
        conn.close()
        raise StoreError(
            f"{path} is not a usable tunneld database ({exc}): {_what_to_do(path)}"
        ) from None
    return conn


def _has_tables(conn: sqlite3.Connection) -> bool:
    return bool(conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] > 0)


def _migrate(conn: sqlite3.Connection, version: int) -> None:
    conn.execute("BEGIN IMMEDIATE")
    try:
        if version == 0 and _has_tables(conn):
            raise StoreError(
                f"{conn_path(conn)} holds tables but no tunneld schema version: it is not a "
                "tunneld database; point state_dir elsewhere"
            )
        for target in range(version + 1, SCHEMA_VERSION + 1):
            for statement in _MIGRATIONS[target].split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {target}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def conn_path(conn: sqlite3.Connection) -> str:
    row = conn.execute("PRAGMA database_list").fetchone()
    return str(row[2]) if row else "the database"


def _rows(conn: sqlite3.Connection) -> Iterator[StoredExposure]:
    cursor = conn.execute(
        "SELECT sandbox_id, port, token, name, created_at, protocol, proxy_protocol, inspect, "
        "public_port FROM exposures ORDER BY sandbox_id, port"
    )
    return (
        StoredExposure(s, p, t, n, c, proto, bool(pp), bool(i), pub)
        for s, p, t, n, c, proto, pp, i, pub in cursor
    )


# _Op.state: queued, then taken into a batch by the writer (started) or given up by its caller
# before that (dropped: the writer skips it). Changed under SqliteStore._states only.
_QUEUED: Final = 0
_STARTED: Final = 1
_DROPPED: Final = 2


@dataclass(slots=True)
class _Op:
    sql: str
    args: tuple[Any, ...]
    done: asyncio.Future[None]
    loop: asyncio.AbstractEventLoop
    state: int = _QUEUED


_PUT: Final = (
    "INSERT INTO exposures (sandbox_id, port, token, name, created_at, protocol, proxy_protocol, "
    "inspect, public_port) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (sandbox_id, port) DO UPDATE SET token = excluded.token, name = excluded.name, "
    "protocol = excluded.protocol, proxy_protocol = excluded.proxy_protocol, "
    "inspect = excluded.inspect, public_port = excluded.public_port"
)
# import restores a backup exactly, created_at included
_RESTORE: Final = _PUT + ", created_at = excluded.created_at"
_DELETE: Final = "DELETE FROM exposures WHERE sandbox_id = ? AND port = ?"


class SqliteStore:
    """Exposures in ``<state_dir>/exposures.db`` (see the module docstring)."""

    kind = "sqlite"

    def __init__(self, state_dir: Path, conn: sqlite3.Connection, lock_fd: int) -> None:
        self.state_dir = state_dir
        self.path = state_dir / DB_FILE
        self.location = str(self.path)
        self._conn = conn
        self._lock_fd = lock_fd
        self._queue: queue.SimpleQueue[_Op | None] = queue.SimpleQueue()
        self._states = threading.Lock()  # guards every _Op.state
        self._thread: threading.Thread | None = None
        self._closed = False
        self.write_timeout = WRITE_TIMEOUT
        self.max_queued = MAX_QUEUED
        self._queued = 0  # ops put in _queue and not yet taken into a batch (under _states)
        self._full = False  # refusals past max_queued logged (until the queue is half empty)
        self._slow = 0  # writes still running past write_timeout (answered already)
        # The files this connection writes: one deleted or replaced under us would take every
        # later write where no restart finds it (checked before each batch: _files_moved).
        self._files = _file_ids(self.path)

    # -- opening ---------------------------------------------------------------------------------
    @classmethod
    def open(cls, state_dir: str | os.PathLike[str], *, unsaved_ok: bool = False) -> SqliteStore:
        """Open (creating if needed) the store in ``state_dir``; raise StoreError if unusable,
        or if a ``--workers`` run left newer exposures in its private Redis (``unsaved_ok``:
        the supervisor, which recovers them)."""
        directory = Path(state_dir)
        try:
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise StoreError(
                f"cannot create the state directory {directory}: {exc.strerror}; create it "
                "writable by tunneld's user or set state_dir / --state-dir"
            ) from None
        lock_fd = lock_state_dir(directory)
        try:
            if not unsaved_ok:
                from .private_redis import check_unsaved

                check_unsaved(directory)
            _check_writable(directory)
            conn = _connect(directory / DB_FILE)
        except BaseException:
            os.close(lock_fd)
            raise
        return cls(directory, conn, lock_fd)

    # -- Store -----------------------------------------------------------------------------------
    async def load_all(self) -> list[StoredExposure]:
        try:
            return await asyncio.to_thread(lambda: list(_rows(self._conn)))
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read {self.path} ({exc}): {_what_to_do(self.path)}") from None

    async def put(self, record: StoredExposure) -> None:
        await self._submit(_PUT, tuple(record))

    async def delete(self, sandbox_id: str, port: int) -> None:
        await self._submit(_DELETE, (sandbox_id, port))

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._thread is not None:
            self._queue.put(None)
            await asyncio.to_thread(self._thread.join, self.write_timeout)
            if self._thread.is_alive():
                # A write still running (a hung disk): closing its connection would block this
                # thread on SQLite's mutex until the disk answers, and dropping the lock would let
                # another tunneld in while it may still write. Both go when the process exits.
                log.error(
                    "%s: a write was still running %gs after the stop began (a hung disk?); the "
                    "database is left to close when this process exits, its lock held until then",
                    self.path,
                    self.write_timeout,
                )
                return
        self._conn.close()
        self._drop_stale_wal()
        os.close(self._lock_fd)

    def _drop_stale_wal(self) -> None:
        """After the database was deleted or replaced under us, SQLite leaves its WAL behind
        (it does not checkpoint a moved file): the next start would lay those pages over the
        file now at the path (a restored backup overwritten by the deleted file's last pages).
        Remove that WAL, and its index, if they are still the ones this connection wrote."""
        now = _file_ids(self.path)
        if now[0] == self._files[0] or now[1] is None or now[1] != self._files[1]:
            return
        for suffix in ("-wal", "-shm"):
            with contextlib.suppress(OSError):
                os.unlink(f"{self.path}{suffix}")
        log.warning(
            "%s was deleted or replaced while tunneld ran: removed the WAL it left, so the next "
            "start reads only the file now at that path",
            self.path,
        )

    # -- offline use (tunneld exposures import), with the lock held -------------------------------
    def read_all_now(self) -> list[StoredExposure]:
        try:
            return list(_rows(self._conn))
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read {self.path} ({exc}): {_what_to_do(self.path)}") from None

    def import_now(self, records: Iterable[StoredExposure], *, replace: bool) -> int:
        """Write ``records`` in one transaction (``replace``: drop every stored one first)."""
        conn = self._conn
        count = 0
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                if replace:
                    conn.execute("DELETE FROM exposures")
                for r in records:
                    conn.execute(_RESTORE, tuple(r))
                    count += 1
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: import failed, nothing written ({exc})") from None
        return count

    def close_now(self) -> None:
        assert self._thread is None, "close() a store whose writer thread runs"
        if not self._closed:
            self._closed = True
            self._conn.close()
            os.close(self._lock_fd)

    # -- the writer thread -----------------------------------------------------------------------
    async def _submit(self, sql: str, args: tuple[Any, ...]) -> None:
        if self._closed:
            raise StoreError(f"{self.path}: the store is closed")
        loop = asyncio.get_running_loop()
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._writer, name="tunneld-store-writer", daemon=True
            )
            self._thread.start()
        with self._states:
            queued = self._queued
            if queued < self.max_queued:
                self._queued = queued + 1
        if queued >= self.max_queued:
            raise self._queue_full(queued)
        if queued < self.max_queued // 2:
            self._full = False  # room again: a queue that fills up once more is logged again
        done: asyncio.Future[None] = loop.create_future()
        op = _Op(sql, args, done, loop)
        self._queue.put(op)
        try:
            await asyncio.wait_for(asyncio.shield(done), self.write_timeout)
            return
        except (TimeoutError, asyncio.CancelledError) as exc:
            # "Nothing changed" only where it is true: an op the writer has not taken yet is
            # dropped (skipped when its turn comes); one it took may still commit.
            with self._states:
                if op.state == _QUEUED:
                    op.state = _DROPPED
            if op.state == _DROPPED:
                if isinstance(exc, asyncio.CancelledError):
                    raise
                raise StoreError(
                    f"{self.path}: the write did not start within {self.write_timeout:g}s "
                    "(the disk or the database lock is held up); it was dropped, not written"
                ) from None
            if isinstance(exc, asyncio.CancelledError):
                raise  # the caller is gone; the change lands (or not) as the writer finishes
        # Started and still running (a hung disk, a lock held elsewhere): the caller is answered
        # now, not when the disk is done, and handed the real outcome to follow.
        if not self._slow:  # said once while writes are that slow, not once per caller
            log.warning(
                "%s: a write has run for over %gs: answered 503 STORE_UNAVAILABLE (it may still "
                "commit; the change is applied if it does)",
                self.path,
                self.write_timeout,
            )
        self._slow += 1
        done.add_done_callback(self._slow_write_ended)
        error = StoreError(
            f"{self.path}: the write has run for over {self.write_timeout:g}s (the disk or the "
            "database lock is held up) and may still commit"
        )
        error.outcome_unknown = True
        error.outcome = done
        raise error

    def _queue_full(self, queued: int) -> StoreError:
        """The refusal of a change past ``max_queued`` (logged once while the queue is full)."""
        if not self._full:  # said once while writes are that slow, not once per refused change
            self._full = True
            log.warning(
                "%s: %d changes are waiting to be written (the disk or the database lock is held "
                "up): further ones are answered 503 STORE_UNAVAILABLE, not written, until the "
                "writer catches up",
                self.path,
                queued,
            )
        return StoreError(
            f"{self.path}: {queued} changes are already waiting to be written: the disk is not "
            "keeping up (or the database lock is held up); this one was refused, not written"
        )

    def _slow_write_ended(self, done: asyncio.Future[None]) -> None:
        self._slow -= 1
        if not done.cancelled():
            done.exception()  # seen here: a caller that did not follow it logs no warning

    def _writer(self) -> None:
        conn = self._conn
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < MAX_BATCH:
                try:
                    op = self._queue.get_nowait()
                except queue.Empty:
                    break
                if op is None:
                    self._queue.put(None)  # finish this batch, then stop
                    break
                batch.append(op)
            with self._states:  # from here on, callers wait for the outcome (_submit)
                self._queued -= len(batch)
                batch = [op for op in batch if op.state == _QUEUED]
                for op in batch:
                    op.state = _STARTED
            if not batch:
                continue
            error: BaseException | None = None
            try:
                moved = self._files_moved()
                if moved:
                    raise StoreError(moved)
                conn.execute("BEGIN IMMEDIATE")
                try:
                    for op in batch:
                        conn.execute(op.sql, op.args)
                    conn.execute("COMMIT")
                except BaseException:
                    # SQLite rolls back by itself on a full disk or an I/O error; a ROLLBACK
                    # then would only fail and hide the error that matters.
                    if conn.in_transaction:
                        with contextlib.suppress(sqlite3.Error):
                            conn.execute("ROLLBACK")
                    raise
            except Exception as exc:  # every caller is answered, whatever went wrong
                log.error(
                    "%s: write failed, %d change(s) not saved (answered 503 STORE_UNAVAILABLE): %s",
                    self.path,
                    len(batch),
                    exc,
                )
                error = exc if isinstance(exc, StoreError) else StoreError(f"{self.path}: {exc}")
            for op in batch:
                with contextlib.suppress(RuntimeError):  # a loop closed meanwhile
                    op.loop.call_soon_threadsafe(_settle, op.done, error)

    def _files_moved(self) -> str:
        """Why writes must stop because the database or its WAL is no longer the file this
        connection writes (deleted, or another file moved in its place); "" while it is."""
        if _file_ids(self.path) == self._files:
            return ""
        return (
            f"{self.path} (or its -wal file) was deleted or replaced while tunneld runs: changes "
            "are refused, as no restart would find them; previews keep serving from memory. "
            "Stop tunneld, restore exposures.db (`tunneld exposures import` of a backup) and "
            "start it again; exposes made since that backup must be made again"
        )


def _file_ids(path: Path) -> tuple[tuple[int, int] | None, ...]:
    """(device, inode) of the database and of its WAL, None for a missing one."""
    ids: list[tuple[int, int] | None] = []
    for name in (path, path.with_name(path.name + "-wal")):
        try:
            st = os.stat(name)
        except OSError:
            ids.append(None)
        else:
            ids.append((st.st_dev, st.st_ino))
    return tuple(ids)


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


def lock_state_dir(directory: Path) -> int:
    """Take the state directory's lock (non-blocking); StoreError if another process holds it."""
    path = directory / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise StoreError(
            f"cannot open the lock file {path}: {exc.strerror}; the state directory "
            f"{directory} must be writable by tunneld's user"
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise StoreError(
            f"the state directory {directory} is in use by another process (lock {path} is "
            "held): stop the tunneld that uses it first"
        ) from None
    return fd


def _check_writable(directory: Path) -> None:
    """Fail now, with a clear message, rather than at the first expose."""
    probe = directory / f".write-probe-{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(b"x")
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as exc:
        with contextlib.suppress(OSError):
            probe.unlink()
        raise StoreError(
            f"the state directory {directory} is not writable ({exc.strerror}): tunneld must "
            "be able to write its database there; fix the permissions or the mount, or set "
            "state_dir / --state-dir"
        ) from None


def read_exposures(state_dir: str | os.PathLike[str]) -> list[StoredExposure]:
    """Every stored exposure, read without the lock (safe while tunneld runs: WAL snapshot)."""
    path = Path(state_dir) / DB_FILE
    if not path.exists():
        raise StoreError(f"no tunneld database at {path}")
    conn = _connect(path, readonly=True)
    try:
        if not _has_tables(conn):
            return []
        return list(_rows(conn))
    except sqlite3.Error as exc:
        raise StoreError(f"cannot read {path} ({exc}): {_what_to_do(path)}") from None
    finally:
        conn.close()


def open_store(kind: str, state_dir: str, node_id: str = "") -> Store:
    """The store ``tunneld serve`` runs with (``state_dir`` empty: :func:`default_state_dir`);
    ``kind`` is ``memory``, ``sqlite`` or a Redis URL (:mod:`tunneld.redis_store`), whose
    changes carry ``node_id`` ("" = host-pid-random)."""
    if kind == "memory":
        return MemoryStore()
    if kind == "sqlite":
        return SqliteStore.open(state_dir or default_state_dir())
    if kind.split("://", 1)[0].lower() in ("redis", "rediss", "unix") and "://" in kind:
        from .redis_store import RedisStore  # imported only by those who use it

        return RedisStore.from_url(kind, node_id=node_id or None)
    raise StoreError(f"unknown store {kind!r} (memory, sqlite or a redis:// URL)")
