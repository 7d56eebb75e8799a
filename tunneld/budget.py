"""A token bucket, the one every rate limit of the edge uses (agent control requests, new
streams per sandbox, preview 404s per client IP, admin requests)."""

from __future__ import annotations

__all__ = ["RequestBudget"]


class RequestBudget:
    """Token bucket: ``rate`` requests per second on average, bursts of up to ``burst``."""

    __slots__ = ("_at", "_burst", "_rate", "_tokens")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._tokens = float(burst)
        self._at = now

    def take(self, now: float) -> bool:
        tokens = min(self._burst, self._tokens + (now - self._at) * self._rate)
        self._at = now
        if tokens < 1.0:
            self._tokens = tokens
            return False
        self._tokens = tokens - 1.0
        return True
