"""A token bucket, the one every rate limit of the edge uses (agent control requests, new
streams per sandbox, preview 404s per client IP, admin requests). It lives in relay/budget.py,
with the rate-limited log both daemons use, so the agent can use it too."""

from __future__ import annotations

from relay.budget import RequestBudget

__all__ = ["RequestBudget"]
