"""The edge's registry: which sandboxes exist, what they expose, which session serves them.

Theory of operation
-------------------
The edge is authoritative for exposures (port -> name, token). They live here, not in the agent,
so they survive agent restarts and reconnects and preview URLs stay stable. A sandbox is "known"
once it has exposed a port or connected. At most one live session serves a sandbox: ``attach``
swaps the new session in atomically and hands back the old one for the caller to close (rathole's
rule; the field's top complaint is a stale session holding a name after an unclean disconnect).

This class is synchronous and in memory on purpose: every method is one dict operation, so the
event loop never waits on it. A shared store (SQLite embedded, Redis for several nodes) would sit
behind the same methods.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from protocol.hostnames import ValidationError, generate_token, tokens_equal


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


@dataclass(slots=True)
class SandboxState:
    sandbox_id: str
    exposures: dict[int, ExposureRecord] = field(default_factory=dict)
    session: Any = None  # the EdgeSession serving this sandbox, or None when offline
    connected_at: float | None = None


class Registry:
    def __init__(self) -> None:
        self._sandboxes: dict[str, SandboxState] = {}

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

    # -- exposures -------------------------------------------------------------------------------
    def expose(
        self, sandbox_id: str, port: int, name: str | None = None, token: str | None = None
    ) -> ExposureRecord:
        """Expose ``port`` (idempotent: re-exposing keeps the token unless a new one is given)."""
        state = self._sandboxes.get(sandbox_id)
        if state is None:
            state = self._sandboxes[sandbox_id] = SandboxState(sandbox_id)
        existing = state.exposures.get(port)
        if token is None:
            token = existing.token if existing is not None else self._fresh_token(state)
        for other in state.exposures.values():
            if other.port != port and other.token == token:
                raise RegistryError(
                    409,
                    "TOKEN_IN_USE",
                    f"Token '{token}' is already in use by port {other.port}. "
                    "Please use a different token.",
                )
        record = ExposureRecord(port, token, name)
        state.exposures[port] = record
        return record

    def unexpose(self, sandbox_id: str, port: int) -> bool:
        state = self._sandboxes.get(sandbox_id)
        if state is None:
            return False
        removed = state.exposures.pop(port, None) is not None
        self._forget_if_empty(state)
        return removed

    @staticmethod
    def _fresh_token(state: SandboxState) -> str:
        used = {r.token for r in state.exposures.values()}
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
