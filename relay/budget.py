"""Token buckets: :class:`RequestBudget`, the one every rate limit of both daemons uses (agent
control requests, new streams per sandbox, preview 404s per client IP, admin requests), and
:class:`RateLimitedLog`, for the log lines a peer can cause at will.

Here rather than in tunneld/ because the agent needs them too (it imports relay/, never tunneld/).
"""

from __future__ import annotations

import logging
from typing import Final

__all__ = ["LOG_BURST", "LOG_RATE", "RateLimitedLog", "RequestBudget"]

# Lines a peer can cause (one per connection or stream it opens): a burst, then one a second.
LOG_RATE: Final = 1.0
LOG_BURST: Final = 10


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


class RateLimitedLog:
    """Log lines that anyone who reaches a listener (or a hostile peer) can cause, one per
    connection or stream: the first ``burst`` are logged, then at most ``rate`` a second. The
    first line dropped is replaced by one saying so; the next line logged after a gap is
    preceded by the count of those dropped. ``what`` names the lines, plural ("warnings about
    refused admin API connections"). ``now`` is always the same clock (the loop's time)."""

    __slots__ = ("_budget", "_level", "_logger", "_rate", "_skipped", "_what")

    def __init__(
        self,
        logger: logging.Logger,
        what: str,
        now: float = 0.0,
        *,
        level: int = logging.WARNING,
        rate: float = LOG_RATE,
        burst: int = LOG_BURST,
    ) -> None:
        self._logger = logger
        self._what = what
        self._level = level
        self._rate = rate
        self._budget = RequestBudget(rate, burst, now)
        self._skipped = 0

    @property
    def skipped(self) -> int:
        """Lines dropped since the last one logged."""
        return self._skipped

    def log(self, now: float, message: str, *args: object) -> None:
        logger = self._logger
        if not logger.isEnabledFor(self._level):
            return
        if self._budget.take(now):
            if self._skipped:
                logger.log(
                    self._level,
                    "%d more %s were not logged",
                    self._skipped,
                    self._what,
                    stacklevel=2,
                )
                self._skipped = 0
            logger.log(self._level, message, *args, stacklevel=2)  # the caller's file and line
            return
        if not self._skipped:
            logger.log(
                self._level,
                "too many %s: further ones are not logged one by one (at most %g a second, "
                "then a count)",
                self._what,
                self._rate,
                stacklevel=2,
            )
        self._skipped += 1
