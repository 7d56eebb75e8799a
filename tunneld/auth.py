"""Agent authentication: tokens derived from one server secret, and who may use plaintext links.

Theory of operation
-------------------
``agent_token(secret, sandbox_id)`` is an HMAC-SHA256 of the sandbox id (a "v1" token), so the
orchestrator can mint a token for a new sandbox (``tunneld token ID``) and tunneld stores no
per-sandbox secret. A token works for exactly one sandbox id; rotating the secret revokes every
token at once. ``agent_token(..., expires_at=T)`` mints a "v2" token, ``v2.<T>.<mac>``, whose MAC
covers the sandbox id and ``T`` (Unix seconds): it stops verifying at ``T``.

Tokens are checked when an agent says hello and again whenever they may have stopped verifying:
``AgentAuth.revalidate()`` after a reload (SIGHUP with a rotated secret) closes every session
whose token no longer verifies, and one timer, armed for the earliest expiry among live sessions,
closes a session when its v2 token expires. Both end the session with GO_AWAY ``AUTH_FAILED``.

Integrity of the agent link comes from TLS (its record MAC), not from a checksum per frame
(docs/operations.md, "Integrity of the agent link"). So a plaintext link (raw TCP or ``ws://``)
is accepted only from a loopback peer, unless ``allow_plaintext_agents`` is set.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import ipaddress
import logging
import re
import time
import weakref
from typing import TYPE_CHECKING, Final

from protocol.errors import GoAwayCode

if TYPE_CHECKING:
    from .edge import EdgeServer, EdgeSession

log = logging.getLogger("tunneld")

_CONTEXT = b"tunneld agent token v1\x00"
_CONTEXT_V2 = b"tunneld agent token v2\x00"

MAX_EXPIRY_DIGITS: Final = 12
"""Unix seconds up to year 33658: a longer expiry field is garbage, not a date."""

MAX_TIMER_DELAY: Final = 3600.0
"""The expiry timer wakes at least hourly (and re-arms), so a far expiry never needs a huge
``call_later`` and a wall-clock step is corrected within the hour."""

_TTL: Final = re.compile(r"([1-9][0-9]{0,8})([smhd]?)", re.ASCII | re.IGNORECASE)
_TTL_UNITS: Final = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def _mac(secret: str, message: bytes) -> str:
    digest = hmac.new(secret.encode(), message, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def agent_token(secret: str, sandbox_id: str, expires_at: int | None = None) -> str:
    """The agent token of ``sandbox_id``; with ``expires_at`` (Unix seconds) a v2 token."""
    if expires_at is None:
        return _mac(secret, _CONTEXT + sandbox_id.encode())
    expiry = str(int(expires_at))
    mac = _mac(secret, _CONTEXT_V2 + sandbox_id.encode() + b"\x00" + expiry.encode())
    return f"v2.{expiry}.{mac}"


def token_expiry(token: str) -> int | None:
    """The expiry a v2 token claims (not verified), or None for a v1 or malformed token."""
    if not token.startswith("v2."):
        return None
    parts = token.split(".")
    if len(parts) != 3:
        return None
    expiry = parts[1]
    if not (0 < len(expiry) <= MAX_EXPIRY_DIGITS and expiry.isascii() and expiry.isdigit()):
        return None
    return int(expiry)


def verify_agent_token(secret: str, sandbox_id: str, token: str, now: float | None = None) -> bool:
    """Check an agent's token: the MAC in constant time, then a v2 token's expiry."""
    expiry = token_expiry(token)
    if token.startswith("v2."):
        if expiry is None:
            return False
        expected = agent_token(secret, sandbox_id, expires_at=expiry)
    else:
        expected = agent_token(secret, sandbox_id)
    if not hmac.compare_digest(expected.encode(), token.encode()):
        return False
    return expiry is None or (time.time() if now is None else now) < expiry


def parse_ttl(text: str) -> int:
    """``90``, ``90s``, ``15m``, ``24h``, ``7d`` -> seconds (positive, ASCII digits only)."""
    match = _TTL.fullmatch(text)
    if match is None:
        raise ValueError(f"expected a duration like 90s, 15m, 24h or 7d, got {text!r}")
    return int(match[1]) * _TTL_UNITS[match[2].lower()]


def verify_bearer(expected: str, authorization: bytes | None) -> bool:
    """Constant-time check of an ``Authorization: Bearer <token>`` header."""
    if not authorization or authorization[:7].lower() != b"bearer ":
        return False
    return hmac.compare_digest(expected.encode(), authorization[7:].strip())


# -- plaintext agent links ----------------------------------------------------------------------


def is_loopback_peer(peer: object) -> bool:
    """Whether a transport's ``peername`` is a loopback address (127/8, ::1, ::ffff:127/104)."""
    if not isinstance(peer, tuple) or not peer or not isinstance(peer[0], str):
        return False
    try:
        address = ipaddress.ip_address(peer[0].split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def plaintext_refusal(peer: object, *, tls: bool, allowed: bool) -> str | None:
    """Why an agent link from ``peer`` must be refused, or None if it may go on."""
    if tls or allowed or is_loopback_peer(peer):
        return None
    where = peer[0] if isinstance(peer, tuple) and peer else "an unknown address"
    return (
        f"plaintext agent link from {where} refused: use TLS (wss:// or --tls) off loopback, "
        "or set allow_plaintext_agents on the edge for a trusted network"
    )


# -- the edge's hook ----------------------------------------------------------------------------


class AgentAuth:
    """Token and transport checks for one ``EdgeServer``'s agent sessions.

    The edge calls ``link_refusal`` and ``verify`` on hello and ``admit`` after a successful one;
    the SIGHUP handler calls ``revalidate`` after it installed the new secret.
    """

    def __init__(self, server: EdgeServer) -> None:
        self.server = server
        self._tokens: weakref.WeakKeyDictionary[EdgeSession, str] = weakref.WeakKeyDictionary()
        self._expiring: weakref.WeakKeyDictionary[EdgeSession, int] = weakref.WeakKeyDictionary()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None

    def link_refusal(self, session: EdgeSession) -> str | None:
        transport = session.transport
        if transport is None:
            return "connection closed"
        return plaintext_refusal(
            transport.get_extra_info("peername"),
            tls=transport.get_extra_info("ssl_object") is not None,
            allowed=self.server.config.allow_plaintext_agents,
        )

    def verify(self, sandbox_id: str, token: str) -> bool:
        return verify_agent_token(self.server.config.secret, sandbox_id, token)

    def admit(self, session: EdgeSession, token: str) -> None:
        """Remember a session's token: it is checked again on reload and at its expiry."""
        self._tokens[session] = token
        expiry = token_expiry(token)
        if expiry is not None:
            self._expiring[session] = expiry
            self._arm()

    def revalidate(self) -> int:
        """Close every session whose token no longer verifies (rotated secret, expiry) or whose
        plaintext link is no longer allowed (``allow_plaintext_agents`` unset by a reload)."""
        closed = 0
        now = time.time()
        for session, token in list(self._tokens.items()):
            sandbox_id = session.sandbox_id
            if sandbox_id is None or session.session.closed or session.transport is None:
                self._forget(session)
                continue
            refusal = self.link_refusal(session)  # allow_plaintext_agents may have been unset
            if refusal is None and verify_agent_token(
                self.server.config.secret, sandbox_id, token, now
            ):
                continue
            expiry = token_expiry(token)
            if refusal is not None:
                why = refusal
            elif expiry is not None and expiry <= now and self._mac_valid(sandbox_id, token):
                why = "its token expired"
            else:
                why = "its token no longer verifies (secret rotated)"
            log.warning(
                "sandbox %s: closing session %s from %s: %s",
                sandbox_id,
                session.session_id,
                session.peer,
                why,
            )
            self._forget(session)
            session.go_away(GoAwayCode.AUTH_FAILED)
            closed += 1
        self._arm()
        return closed

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = self._timer_at = None

    # -- helpers ---------------------------------------------------------------------------------
    def _mac_valid(self, sandbox_id: str, token: str) -> bool:
        return verify_agent_token(self.server.config.secret, sandbox_id, token, now=0)

    def _forget(self, session: EdgeSession) -> None:
        self._tokens.pop(session, None)
        self._expiring.pop(session, None)

    def _arm(self) -> None:
        """One timer for the earliest expiry among live sessions."""
        if not self._expiring:
            self.close()
            return
        loop = self.server.loop
        delay = min(self._expiring.values()) - time.time()
        delay = min(max(delay, 0.0), MAX_TIMER_DELAY)
        at = loop.time() + delay
        if self._timer is not None and self._timer_at is not None and self._timer_at <= at:
            return  # already due no later than that
        self.close()
        self._timer_at = at
        self._timer = loop.call_at(at, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = self._timer_at = None
        self.revalidate()
