"""Agent authentication: tokens derived from one server secret.

``agent_token(secret, sandbox_id)`` is an HMAC-SHA256 of the sandbox id, so the orchestrator can
mint a token for a new sandbox (``tunneld token ID``) and tunneld stores no per-sandbox secret.
A token works for exactly one sandbox id; rotating the secret revokes every token at once.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

_CONTEXT = b"tunneld agent token v1\x00"


def agent_token(secret: str, sandbox_id: str) -> str:
    digest = hmac.new(secret.encode(), _CONTEXT + sandbox_id.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def verify_agent_token(secret: str, sandbox_id: str, token: str) -> bool:
    """Constant-time check of an agent's token."""
    return hmac.compare_digest(agent_token(secret, sandbox_id).encode(), token.encode())


def verify_bearer(expected: str, authorization: bytes | None) -> bool:
    """Constant-time check of an ``Authorization: Bearer <token>`` header."""
    if not authorization or authorization[:7].lower() != b"bearer ":
        return False
    return hmac.compare_digest(expected.encode(), authorization[7:].strip())
