"""The edge's registry: which sandboxes exist, what they expose, which session serves them.

Theory of operation
-------------------
The edge is authoritative for exposures (port -> name, token). They live here, not in the agent,
so they survive agent restarts and reconnects and preview URLs stay stable. A sandbox is "known"
once it has exposed a port or connected. At most one live session serves a sandbox: ``attach``
swaps the new session in atomically and hands back the old one for the caller to close (rathole's
rule; the field's top complaint is a stale session holding a name after an unclean disconnect).

The view routing reads (``get``, ``match``, ``exposures``) is synchronous and in memory: every
lookup is one dict operation, so a preview request never waits on storage. Durability is behind
it: a :class:`~tunneld.store.Store` is read once at start-up (``load``) and written through by
``commit_expose`` / ``commit_unexpose``, which change the view only after the store has the
change (an expose is answered 2xx only once its record is committed). Changes to one sandbox are
serialized by a per-sandbox lock, so the cap and the token-uniqueness checks see every earlier
change of that sandbox; different sandboxes write concurrently (the SQLite writer commits them
together). The plain ``expose`` / ``unexpose`` change only the view (tests, memory-only use).

A change's caller never waits without a bound, and the view follows the store whatever the
caller does. The write and the change of the view run as one task, shielded from the caller
(``_write_then_apply``): a caller cancelled meanwhile, or answered 503 "may still be applied"
because the store could not tell the outcome in time (a SQLite write still running past its
write timeout: ``StoreError.outcome``), leaves the task to wait for the real outcome, apply the
change if it committed, and only then give the sandbox's lock back. A later change of that
sandbox waits for the lock at most the store's write timeout, then is refused (503, nothing
changed). A Redis write that timed out is not followed here: its echo on the feed applies it
(``apply_remote_put``).

Each sandbox holds at most ``max_exposures`` exposures (at most 1024, the control codec's list
bound), so stored state stays bounded; the edge sends a reconnecting agent whatever does not fit
its welcome as Expose requests (``EdgeSession._send_welcome``), so any such set reconnects.
And at most ``max_sandboxes`` sandboxes hold exposures: an expose that would make one more is
refused (409 ``TOO_MANY_SANDBOXES``) once as many as that hold exposures or are being given
their first one (``_new_sandboxes``: the per-sandbox locks do not serialize two new sandboxes, so
a slot is reserved before the store write). What the view holds is what is counted: records
loaded at start (all of them, even past the cap: stored data is never dropped) and, with a shared
store, those other nodes wrote; sandboxes with only a session are not counted. A shared store
(Redis) also checks the cap itself, atomically with the write (``_put``): two nodes' views miss
each other's first exposes in flight, the store does not, so the cluster never passes the cap.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

from protocol.hostnames import (
    DEFAULT_OPTIONS,
    ExposureOptions,
    InvalidOptionError,
    ValidationError,
    generate_token,
    tokens_equal,
    validate_custom_token,
    validate_exposure_options,
    validate_port,
    validate_port_name,
    validate_sandbox_id,
)

from .store import WRITE_TIMEOUT, MemoryStore, Store, StoredExposure, StoreError

log = logging.getLogger("tunneld")

_T = TypeVar("_T")

# Exposures per sandbox: far above what a dev server uses (a handful), and with the longest names
# and a domain of up to ~100 characters the welcome stays under the 64 KiB control-message limit.
DEFAULT_MAX_EXPOSURES: Final = 128
# Sandboxes holding exposures (Config.max_sandboxes; docs/operations.md says why this number).
DEFAULT_MAX_SANDBOXES: Final = 100_000


class RegistryError(ValidationError):
    """A registry rule refused the operation (``status`` and ``code`` go to the API client)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass(slots=True)
class ExposureRecord:
    port: int
    token: str
    name: str | None = None
    created_at: float = 0.0
    options: ExposureOptions = DEFAULT_OPTIONS
    public_port: int | None = None  # the public TCP port of a "tcp" exposure, once assigned

    def stored(self, sandbox_id: str) -> StoredExposure:
        o = self.options
        return StoredExposure(
            sandbox_id,
            self.port,
            self.token,
            self.name,
            self.created_at,
            o.protocol,
            o.proxy_protocol,
            o.inspect,
            self.public_port,
        )


@dataclass(slots=True)
class SandboxState:
    sandbox_id: str
    exposures: dict[int, ExposureRecord] = field(default_factory=dict)
    session: Any = None  # the EdgeSession serving this sandbox, or None when offline
    connected_at: float | None = None


class Registry:
    def __init__(
        self,
        store: Store | None = None,
        max_exposures: int = DEFAULT_MAX_EXPOSURES,
        max_sandboxes: int = DEFAULT_MAX_SANDBOXES,
    ) -> None:
        self._sandboxes: dict[str, SandboxState] = {}
        self.store: Store = store if store is not None else MemoryStore()
        self.max_exposures = max_exposures
        self.max_sandboxes = max_sandboxes
        self.exposing = 0  # sandboxes with at least one exposure in the view
        self._new_sandboxes = 0  # first exposes of sandboxes waiting for the store (reserved)
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}
        # Told how long each store write took and whether it succeeded (the edge's metrics)
        self.on_write: Callable[[float, bool], None] | None = None
        # Changes being written (_write_then_apply): they hold their sandbox's lock
        self._writing: set[asyncio.Task[None]] = set()
        # Told (sandbox, port, the record exposed or None: unexposed, the port's record before)
        # when a change answered 503 "may still be applied" was saved after all and applied to
        # the view, for what follows the view beyond it (the agent, a tcp exposure's listener,
        # the live connections of a token it replaced)
        self.on_late_change: (
            Callable[[str, int, ExposureRecord | None, ExposureRecord | None], None] | None
        ) = None
        # Raises ValidationError for a record whose preview host this edge cannot hand out (DNS
        # cannot carry it: EdgeServer.check_host): run on every record an expose would install,
        # before the store write; at load, a stored one it refuses is kept and logged once
        self.host_check: Callable[[str, ExposureRecord], None] | None = None

    # -- lookups ---------------------------------------------------------------------------------
    def get(self, sandbox_id: str) -> SandboxState | None:
        return self._sandboxes.get(sandbox_id)

    def sandboxes(self) -> list[SandboxState]:
        return [self._sandboxes[k] for k in sorted(self._sandboxes)]

    def exposures(self, sandbox_id: str) -> list[ExposureRecord]:
        state = self._sandboxes.get(sandbox_id)
        if state is None:
            return []
        return [state.exposures[p] for p in sorted(state.exposures)]

    def match(self, sandbox_id: str, port: int, token: str | None) -> SandboxState | None:
        """The sandbox if ``port`` is exposed with ``token`` (constant-time compare), else None.

        ``token`` None means the edge runs without tokens (trusted network): exposure suffices.
        """
        state = self._sandboxes.get(sandbox_id)
        if state is None:
            return None
        record = state.exposures.get(port)
        if record is None:
            # Compare anyway so an unexposed port and a wrong token take the same time.
            if token is not None:
                tokens_equal(token, "x" * len(token))
            return None
        if token is not None and not tokens_equal(token, record.token):
            return None
        return state

    # -- exposures, durable -----------------------------------------------------------------------
    @property
    def write_timeout(self) -> float:
        """How long a change waits for the store, and for an earlier change of its sandbox to be
        written: the store's own write timeout (``SqliteStore.write_timeout``), else
        ``WRITE_TIMEOUT`` (a Redis command has a shorter deadline of its own)."""
        return float(getattr(self.store, "write_timeout", WRITE_TIMEOUT))

    async def commit_expose(
        self,
        sandbox_id: str,
        port: int,
        name: str | None = None,
        token: str | None = None,
        options: ExposureOptions = DEFAULT_OPTIONS,
        public_port: int | None = None,
        assign_port: Callable[[], Awaitable[int | None]] | None = None,
    ) -> ExposureRecord:
        """``expose``, answered only once the store has the record (then the view changes).
        ``public_port``: a newly assigned public TCP port (None keeps the one it has).
        ``assign_port``: awaited once every rule passed (the caps, the token), still under the
        sandbox's lock, for a public TCP port to bind (None: keep the one it has), so that an
        expose the rules refuse never binds one (``TcpExposures.commit_expose``)."""
        lock = await self._lock_for_change(sandbox_id)
        new_sandbox = False
        handed = False
        try:
            new_sandbox = self._check_room(sandbox_id)
            self._new_sandboxes += new_sandbox
            record = self._prepare(sandbox_id, port, name, token, None, options, public_port)
            if assign_port is not None:
                assigned = await assign_port()
                if assigned is not None:
                    record.public_port = assigned
            stored = record.stored(sandbox_id)

            def apply() -> ExposureRecord:
                self._apply(sandbox_id, record)
                return record

            def release() -> None:
                self._new_sandboxes -= new_sandbox  # the slot is held until the outcome is known
                self._unlock(sandbox_id, lock)

            handed = True
            return await self._write_then_apply(
                sandbox_id, port, record, lambda: self._put(stored), apply, release
            )
        finally:
            if not handed:
                self._new_sandboxes -= new_sandbox
                self._unlock(sandbox_id, lock)

    def _check_room(self, sandbox_id: str) -> bool:
        """Whether an expose of ``sandbox_id`` would be its first (a new sandbox with exposures);
        RegistryError 409 TOO_MANY_SANDBOXES when that would be one more than ``max_sandboxes``."""
        state = self._sandboxes.get(sandbox_id)
        if state is not None and state.exposures:
            return False
        held = self.exposing + self._new_sandboxes
        if held >= self.max_sandboxes:
            raise self._too_many_sandboxes(sandbox_id, held)
        return True

    def _too_many_sandboxes(self, sandbox_id: str, held: int) -> RegistryError:
        return RegistryError(
            409,
            "TOO_MANY_SANDBOXES",
            f"Sandbox {sandbox_id} cannot get a first exposure: {held} sandboxes already "
            f"hold exposures on this edge, the maximum (max_sandboxes = "
            f"{self.max_sandboxes}). Unexpose every port of a sandbox that no longer needs "
            "them, or raise max_sandboxes.",
        )

    async def _put(self, record: StoredExposure) -> None:
        """Store ``record``. A store shared by several nodes enforces ``max_sandboxes`` itself,
        in the same atomic step as the write (``RedisStore.put_capped``): the check above sees
        only this node's view, which lags other nodes' first exposes. Its refusal is 409
        TOO_MANY_SANDBOXES, nothing written."""
        put_capped = getattr(self.store, "put_capped", None)
        if put_capped is None:
            await self.store.put(record)
            return
        held = await put_capped(record, self.max_sandboxes)
        if held is not None:
            raise self._too_many_sandboxes(record.sandbox_id, held)

    async def commit_unexpose(self, sandbox_id: str, port: int) -> bool:
        """``unexpose``, answered only once the store has forgotten the record."""
        lock = await self._lock_for_change(sandbox_id)
        state = self._sandboxes.get(sandbox_id)
        if state is None or port not in state.exposures:
            self._unlock(sandbox_id, lock)
            return False
        return await self._write_then_apply(
            sandbox_id,
            port,
            None,
            lambda: self.store.delete(sandbox_id, port),
            lambda: self.unexpose(sandbox_id, port),
            lambda: self._unlock(sandbox_id, lock),
        )

    async def _write_then_apply(
        self,
        sandbox_id: str,
        port: int,
        record: ExposureRecord | None,
        write: Callable[[], Awaitable[None]],
        apply: Callable[[], _T],
        release: Callable[[], None],
    ) -> _T:
        """Write, then apply the change to the view once the store has it; ``release`` (the
        sandbox's lock) when the write's real outcome is known.

        This runs as a task of its own, shielded from the caller: a caller cancelled (an edge
        stopping, a client gone) leaves the view following the store all the same. The caller
        gets the answer: the change applied, or 503 ``STORE_UNAVAILABLE``, also when the store
        cannot tell the outcome in time (a write still running past its timeout, which may
        still commit): the task then waits for that outcome and applies the change only if the
        write committed, holding the sandbox's lock until then so that no later change of it
        passes the one in flight (they wait, bounded: ``_lock_for_change``)."""
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[_T] = loop.create_future()
        answer.add_done_callback(_retrieve)  # a caller gone never reads it
        task = loop.create_task(
            self._settle(sandbox_id, port, record, write, apply, release, answer)
        )
        self._writing.add(task)
        task.add_done_callback(self._writing.discard)
        return await asyncio.shield(answer)

    async def _settle(
        self,
        sandbox_id: str,
        port: int,
        record: ExposureRecord | None,
        write: Callable[[], Awaitable[None]],
        apply: Callable[[], _T],
        release: Callable[[], None],
        answer: asyncio.Future[_T],
    ) -> None:
        started = time.monotonic()
        what = f"the {'expose' if record is not None else 'unexpose'} of port {port}"
        try:
            try:
                await write()
            except RegistryError as exc:  # the store refused it (its own max_sandboxes)
                if self.on_write is not None:
                    self.on_write(time.monotonic() - started, True)
                _answer(answer, error=exc)
                return
            except StoreError as exc:
                if self.on_write is not None:
                    self.on_write(time.monotonic() - started, False)
                _answer(answer, error=self._refusal(exc))
                if exc.outcome is None:
                    return  # not written, or (Redis) its echo tells this view if it was
                try:
                    await asyncio.shield(exc.outcome)
                except StoreError:
                    log.warning(
                        "sandbox %s: %s (answered 503, outcome unknown) was not saved after all "
                        "(%.1fs); nothing changed",
                        sandbox_id,
                        what,
                        time.monotonic() - started,
                    )
                    return
                state = self._sandboxes.get(sandbox_id)
                previous = state.exposures.get(port) if state is not None else None
                apply()
                log.warning(
                    "sandbox %s: %s (answered 503, outcome unknown) was saved after all (%.1fs); "
                    "this edge now holds it",
                    sandbox_id,
                    what,
                    time.monotonic() - started,
                )
                if self.on_late_change is not None:
                    self.on_late_change(sandbox_id, port, record, previous)
                return
            if self.on_write is not None:
                self.on_write(time.monotonic() - started, True)
            _answer(answer, result=apply())
        except asyncio.CancelledError:
            # only at an edge's stop, past its wait (wait_writes): the store decides
            _answer(answer, error=_may_still_apply(f"{what} was still being written at stop"))
            raise
        except Exception as exc:  # a bug: the caller's answer (a 500), not a lost task
            if answer.done():
                log.exception("sandbox %s: %s: following its outcome failed", sandbox_id, what)
            _answer(answer, error=exc)
        finally:
            release()

    async def wait_writes(self, timeout: float) -> int:
        """Wait up to ``timeout`` for the changes still being written (the view then follows
        their outcome); cancel what is left (the store decides about those). How many were
        left."""
        pending = set(self._writing)
        if pending:
            _, pending = await asyncio.wait(pending, timeout=timeout)
        if pending:
            log.warning(
                "%d change(s) still being written after %gs at stop: the store decides whether "
                "they were saved",
                len(pending),
                timeout,
            )
            for task in pending:
                task.cancel()
            await asyncio.wait(pending, timeout=1)
        return len(pending)

    @staticmethod
    def _refusal(exc: StoreError) -> RegistryError:
        if exc.outcome_unknown:
            return _may_still_apply(str(exc))
        return RegistryError(
            503,
            "STORE_UNAVAILABLE",
            f"The change could not be saved ({exc}); nothing changed. See the tunneld log.",
        )

    async def _lock_for_change(self, sandbox_id: str) -> asyncio.Lock:
        """The sandbox's lock, for a change: waited for at most ``write_timeout``, then 503
        ``STORE_UNAVAILABLE`` (an earlier change of it is still being written; nothing changed).
        The caller releases it with ``_unlock``."""
        lock = self._lock_user(sandbox_id)
        timeout = self.write_timeout
        try:
            async with asyncio.timeout(timeout):
                await lock.acquire()
        except TimeoutError:
            self._drop_lock_user(sandbox_id)
            raise RegistryError(
                503,
                "STORE_UNAVAILABLE",
                f"An earlier change of sandbox {sandbox_id} is still being written (waited "
                f"{timeout:g}s for the store); nothing changed. List the sandbox's ports to see "
                "where it stands, and retry. See the tunneld log.",
            ) from None
        except BaseException:
            self._drop_lock_user(sandbox_id)
            raise
        return lock

    def _unlock(self, sandbox_id: str, lock: asyncio.Lock) -> None:
        lock.release()
        self._drop_lock_user(sandbox_id)

    @asynccontextmanager
    async def _sandbox_lock(self, sandbox_id: str) -> AsyncIterator[None]:
        """The sandbox's lock, waited for without a bound (a change from a shared store's feed:
        it must land, and local writes with such a store are bounded by the store)."""
        lock = self._lock_user(sandbox_id)
        try:
            async with lock:
                yield
        finally:
            self._drop_lock_user(sandbox_id)

    def _lock_user(self, sandbox_id: str) -> asyncio.Lock:
        lock, users = self._locks.get(sandbox_id, (None, 0))
        if lock is None:
            lock = asyncio.Lock()
        self._locks[sandbox_id] = (lock, users + 1)
        return lock

    def _drop_lock_user(self, sandbox_id: str) -> None:
        lock, users = self._locks[sandbox_id]
        if users == 1:
            del self._locks[sandbox_id]
        else:
            self._locks[sandbox_id] = (lock, users - 1)

    def load(self, records: Iterable[StoredExposure]) -> int:
        """Install stored exposures at start-up; StoreError on a record the rules refuse."""
        count = 0
        before = self.exposing
        valid_ids: set[str] = set()
        unreachable: list[tuple[str, int, str]] = []  # (sandbox, port, why) host_check refused
        for r in records:
            try:
                if r.sandbox_id not in valid_ids:
                    valid_ids.add(validate_sandbox_id(r.sandbox_id))
                validate_port(r.port)
                validate_port_name(r.name)
                validate_custom_token(r.token)
                if not isinstance(r.created_at, (int, float)):
                    raise RegistryError(400, "INVALID_REQUEST", "created_at is not a number")
                record = self._prepare(
                    r.sandbox_id,
                    r.port,
                    r.name,
                    r.token,
                    float(r.created_at),
                    _stored_options(r),
                    _stored_public_port(r),
                    check=False,
                )
            except ValidationError as exc:
                where = f"stored exposure {r.sandbox_id!r} port {r.port!r}"
                hint = ""
                if getattr(exc, "code", "") == "TOO_MANY_EXPOSURES":
                    hint = " (raise max_exposures_per_sandbox, or export, trim and import)"
                raise StoreError(f"{where}: {exc.message}{hint}") from None
            if self.host_check is not None:
                try:
                    self.host_check(r.sandbox_id, record)
                except ValidationError as exc:
                    unreachable.append((r.sandbox_id, r.port, exc.message))
            self._apply(r.sandbox_id, record)
            count += 1
        if unreachable:
            _log_unreachable(unreachable)
        if before <= self.max_sandboxes < self.exposing:  # said once, when the cap is crossed
            log.warning(
                "%d sandboxes have stored exposures, more than max_sandboxes (%d): all of them are "
                "kept and served, but exposes for new sandboxes are refused (409 "
                "TOO_MANY_SANDBOXES) until fewer than %d hold exposures",
                self.exposing,
                self.max_sandboxes,
                self.max_sandboxes,
            )
        return count

    def records(self) -> list[StoredExposure]:
        """The whole view as store records (sorted), e.g. for an export."""
        return [
            r.stored(s.sandbox_id) for s in self.sandboxes() for r in self.exposures(s.sandbox_id)
        ]

    # -- exposures, changed by another node (a shared store's feed) -------------------------------
    async def apply_remote_put(self, r: StoredExposure) -> ExposureRecord | None:
        """Install a record another node stored; the new record, or None if nothing changed.

        Taken under the sandbox's lock, so it lands after a local write of that sandbox in
        flight (the store's order; the cap is the writer's to enforce: the store holds it)."""
        async with self._sandbox_lock(r.sandbox_id):
            return self._install_remote(r)

    async def apply_remote_delete(self, sandbox_id: str, port: int) -> bool:
        """Forget an exposure another node deleted; True when the view had it."""
        async with self._sandbox_lock(sandbox_id):
            return self.unexpose(sandbox_id, port)

    def resync(
        self, records: Iterable[StoredExposure]
    ) -> tuple[list[tuple[str, ExposureRecord]], list[tuple[str, int]]]:
        """Make the view equal to ``records`` (a full snapshot of the store); return what it
        changed: (sandbox, record) installed or replaced, (sandbox, port) removed. Sessions are
        kept: a sandbox with a session but no exposure left stays known."""
        wanted: dict[str, dict[int, StoredExposure]] = {}
        for r in records:
            wanted.setdefault(r.sandbox_id, {})[r.port] = r
        removed: list[tuple[str, int]] = []
        for state in list(self._sandboxes.values()):
            keep = wanted.get(state.sandbox_id, {})
            for port in [p for p in state.exposures if p not in keep]:
                self.unexpose(state.sandbox_id, port)
                removed.append((state.sandbox_id, port))
        installed: list[tuple[str, ExposureRecord]] = []
        for sandbox_records in wanted.values():
            for r in sandbox_records.values():
                record = self._install_remote(r)
                if record is not None:
                    installed.append((r.sandbox_id, record))
        return installed, removed

    def _install_remote(self, r: StoredExposure) -> ExposureRecord | None:
        try:
            validate_sandbox_id(r.sandbox_id)
            validate_port(r.port)
            validate_port_name(r.name)
            validate_custom_token(r.token)
            options = _stored_options(r)
            public_port = _stored_public_port(r)
        except ValidationError as exc:  # not a record a tunneld writes: skipped, said once
            log.warning("stored exposure %r port %r skipped: %s", r.sandbox_id, r.port, exc)
            return None
        record = ExposureRecord(r.port, r.token, r.name, float(r.created_at), options, public_port)
        state = self._sandboxes.get(r.sandbox_id)
        if state is not None and state.exposures.get(r.port) == record:
            return None
        self._apply(r.sandbox_id, record)
        return record

    # -- exposures, in memory --------------------------------------------------------------------
    def expose(
        self,
        sandbox_id: str,
        port: int,
        name: str | None = None,
        token: str | None = None,
        options: ExposureOptions = DEFAULT_OPTIONS,
    ) -> ExposureRecord:
        """Expose ``port`` (idempotent: re-exposing keeps the token unless a new one is given;
        name and options are replaced by the ones given)."""
        self._check_room(sandbox_id)
        record = self._prepare(sandbox_id, port, name, token, options=options)
        self._apply(sandbox_id, record)
        return record

    def _prepare(
        self,
        sandbox_id: str,
        port: int,
        name: str | None,
        token: str | None,
        created_at: float | None = None,
        options: ExposureOptions = DEFAULT_OPTIONS,
        public_port: int | None = None,
        *,
        check: bool = True,
    ) -> ExposureRecord:
        """The record ``expose`` would install, after the rules (``check``: ``host_check`` too,
        off for stored records); changes nothing."""
        state = self._sandboxes.get(sandbox_id)
        exposures = state.exposures if state is not None else {}
        existing = exposures.get(port)
        if existing is None and len(exposures) >= self.max_exposures:
            raise RegistryError(
                409,
                "TOO_MANY_EXPOSURES",
                f"Sandbox {sandbox_id} already exposes {len(exposures)} ports, the maximum "
                f"({self.max_exposures}). Unexpose a port first.",
            )
        if token is None:
            token = existing.token if existing is not None else self._fresh_token(exposures)
        for other in exposures.values():
            if other.port != port and other.token == token:
                raise RegistryError(
                    409,
                    "TOKEN_IN_USE",
                    f"Token '{token}' is already in use by port {other.port}. "
                    "Please use a different token.",
                )
        if created_at is None:
            created_at = existing.created_at if existing is not None else time.time()
        if (
            public_port is None
            and existing is not None
            and existing.options.protocol == options.protocol
        ):
            public_port = existing.public_port  # an assigned public port stays with the exposure
        record = ExposureRecord(port, token, name, created_at, options, public_port)
        if check and self.host_check is not None:
            self.host_check(sandbox_id, record)  # the token is known here: generated or kept
        return record

    def _apply(self, sandbox_id: str, record: ExposureRecord) -> None:
        state = self._sandboxes.get(sandbox_id)
        if state is None:
            state = self._sandboxes[sandbox_id] = SandboxState(sandbox_id)
        if not state.exposures:
            self.exposing += 1
        state.exposures[record.port] = record

    def unexpose(self, sandbox_id: str, port: int) -> bool:
        state = self._sandboxes.get(sandbox_id)
        if state is None:
            return False
        removed = state.exposures.pop(port, None) is not None
        if removed and not state.exposures:
            self.exposing -= 1  # its last port: the sandbox's slot is free
        self._forget_if_empty(state)
        return removed

    @staticmethod
    def _fresh_token(exposures: dict[int, ExposureRecord]) -> str:
        used = {r.token for r in exposures.values()}
        while True:
            token = generate_token()
            if token not in used:
                return token

    # -- sessions --------------------------------------------------------------------------------
    def attach(self, sandbox_id: str, session: Any, now: float) -> Any:
        """Make ``session`` the one serving the sandbox; return the session it replaced, if any."""
        state = self._sandboxes.get(sandbox_id)
        if state is None:
            state = self._sandboxes[sandbox_id] = SandboxState(sandbox_id)
        old, state.session, state.connected_at = state.session, session, now
        return old

    def detach(self, sandbox_id: str, session: Any) -> None:
        """Forget ``session`` if it is still the current one (a replaced session must not win)."""
        state = self._sandboxes.get(sandbox_id)
        if state is not None and state.session is session:
            state.session = None
            state.connected_at = None
            self._forget_if_empty(state)

    def _forget_if_empty(self, state: SandboxState) -> None:
        if not state.exposures and state.session is None:
            self._sandboxes.pop(state.sandbox_id, None)


def _may_still_apply(why: str) -> RegistryError:
    return RegistryError(
        503,
        "STORE_UNAVAILABLE",
        f"The store did not confirm the change ({why}); it may still be applied. List the "
        "sandbox's ports to see whether it was: this edge follows what the store holds either "
        "way.",
    )


def _answer(
    answer: asyncio.Future[_T], result: Any = None, error: BaseException | None = None
) -> None:
    if answer.done():
        return
    if error is not None:
        answer.set_exception(error)
    else:
        answer.set_result(result)


def _retrieve(answer: asyncio.Future[Any]) -> None:
    if not answer.cancelled():
        answer.exception()


def _stored_options(r: StoredExposure) -> ExposureOptions:
    """A stored record's options, checked like an API client's (InvalidOptionError)."""
    return validate_exposure_options(r.protocol, r.proxy_protocol, r.inspect)


def _stored_public_port(r: StoredExposure) -> int | None:
    port = r.public_port
    if port is None:
        return None
    if isinstance(port, int) and not isinstance(port, bool) and 1 <= port <= 65535:
        return port
    raise InvalidOptionError(f"public_port must be a TCP port number; got {port!r}.")


# Stored exposures named in the one warning about those whose preview host DNS cannot carry
_UNREACHABLE_SHOWN: Final = 5


def _log_unreachable(found: list[tuple[str, int, str]]) -> None:
    """One warning for the stored exposures whose preview host this edge would refuse today
    (stored before the check, or the domain or the token mode changed since): kept, listed and
    stored, since another domain or token mode may fit them again, but never routed."""
    shown = "; ".join(f"{sid} port {port}: {why}" for sid, port, why in found[:_UNREACHABLE_SHOWN])
    more = len(found) - _UNREACHABLE_SHOWN
    log.warning(
        "%d stored exposure(s) have a preview host DNS cannot carry: kept (listed, stored) but "
        "no request reaches them (404 UNKNOWN_HOST); unexpose them, or expose the port again "
        "with a shorter custom token. %s%s",
        len(found),
        shown,
        f"; and {more} more" if more > 0 else "",
    )
