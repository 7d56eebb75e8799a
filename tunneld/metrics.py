"""Prometheus metrics of one edge (served on the admin listener at ``/metrics``).

Counters are bumped per connection or per control operation, never per chunk: the relay's hot path
stays free of metric calls. Gauges that are cheap to derive (agents, streams) are computed at scrape
time instead of being maintained.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterator
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from . import speedups

# Request duration and time to first byte: 1 ms (a small local response) to 5 min (a download).
REQUEST_BUCKETS: Final = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
)  # fmt: skip
_STATUS_CLASSES: Final = ("1xx", "2xx", "3xx", "4xx", "5xx")
# The first status past each class: 1xx is [100, 200), ..., 5xx is [500, 600).
_STATUS_BOUNDS: Final = (200, 300, 400, 500, 600)


class _Buckets:
    """A histogram's counts kept as plain ints (prometheus_client's Histogram takes a lock and
    walks its buckets per observation: several times this, per request)."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(REQUEST_BUCKETS) + 1)  # the last one: above every bound
        self.total = 0.0

    def add(self, counts: list[int], total: float) -> None:
        """Count many observations at once: ``counts`` per bucket, ``total`` their sum."""
        mine = self.counts
        for i, n in enumerate(counts):
            mine[i] += n
        self.total += total

    def family(self, name: str, documentation: str) -> HistogramMetricFamily:
        cumulative, buckets = 0, []
        for bound, count in zip((*REQUEST_BUCKETS, float("inf")), self.counts, strict=True):
            cumulative += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
        return HistogramMetricFamily(name, documentation, buckets=buckets, sum_value=self.total)


# Observations of whole responses a pure-Python ``Tally`` keeps before it counts them.
FOLD_AFTER: Final = 1024
# Items per observation in ``Tally``'s batch: seconds, status, body_in, body_out.
WHOLE_ITEMS: Final = 4
_FOLD_ITEMS: Final = FOLD_AFTER * WHOLE_ITEMS


class Tally:
    """The observations of whole responses (``ResponseFramer.whole``: most small ones), counted
    until ``take``: per bucket of ``bounds`` (a duration ``d`` falls in the first bucket whose
    bound is >= ``d``, the last bucket holding what is above every bound), their sum in seconds,
    statuses by class (1xx-5xx, then anything else), and body bytes each way. A whole response's
    time to first byte is its duration, so one set of counts serves both histograms.

    ``add`` keeps the observation in a flat list and counts ``FOLD_AFTER`` of them at once: a
    sort and one bisection per bound cost less than a bisection per observation, and one flat
    list less than a tuple each (the garbage collector, the transposition). This is the
    reference and the pure-Python fallback of tunneld/_speedups.c's ``Tally``, which counts each
    observation in C as it comes (``whole_response`` calls it without a Python call): the same
    counts, and the same sum up to the order its floats are added in."""

    __slots__ = (
        "_body_in",
        "_body_out",
        "_bounds",
        "_counts",
        "_kept",
        "_n",
        "_statuses",
        "_total",
    )

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self._kept: list[float] = []  # WHOLE_ITEMS per observation (ints are floats to mypy)
        self._reset()

    def _reset(self) -> None:
        self._counts = [0] * (len(self._bounds) + 1)
        self._total = 0.0
        self._statuses = [0] * (len(_STATUS_CLASSES) + 1)
        self._body_in = 0
        self._body_out = 0
        self._n = 0

    def __len__(self) -> int:
        """Observations added since the last ``take``."""
        return self._n

    def add(self, ns: int, status: int, body_in: int, body_out: int) -> None:
        """One whole response: its duration (``ns``), status and body sizes."""
        kept = self._kept
        kept += (ns / 1e9, status, body_in, body_out)
        self._n += 1
        if len(kept) >= _FOLD_ITEMS:
            self._fold()

    def _fold(self) -> None:
        kept = self._kept
        if not kept:
            return
        ordered = sorted(kept[0::WHOLE_ITEMS])
        counts = self._counts
        below = 0  # values <= the previous bound
        for i, bound in enumerate(self._bounds):
            upto = bisect_right(ordered, bound, below)
            counts[i] += upto - below
            below = upto
        counts[-1] += len(ordered) - below
        self._total += sum(ordered)
        # Statuses by class: sorted (runs of equal ones sort in one pass), one bisection per
        # class bound; a Counter costs a dictionary update per observation.
        statuses = sorted(kept[1::WHOLE_ITEMS])
        classes = self._statuses
        below = bisect_left(statuses, 100)
        for i, bound in enumerate(_STATUS_BOUNDS):
            upto = bisect_left(statuses, bound, below)
            classes[i] += upto - below
            below = upto
        classes[-1] += len(statuses) - below + bisect_left(statuses, 100)
        self._body_in += int(sum(kept[2::WHOLE_ITEMS]))
        self._body_out += int(sum(kept[3::WHOLE_ITEMS]))
        kept.clear()

    def take(self) -> tuple[list[int], float, list[int], int, int]:
        """What was counted since the last ``take`` (then zero): counts per bucket, the sum of
        the durations, counts per status class (1xx-5xx, other), body bytes in and out."""
        self._fold()
        taken = (self._counts, self._total, self._statuses, self._body_in, self._body_out)
        self._reset()
        return taken


def tally_py(bounds: tuple[float, ...]) -> Tally:
    """A new ``Tally``. The reference of ``tally`` (tunneld/_speedups.c when built:
    speedups.py)."""
    return Tally(bounds)


class RequestStats(Collector):
    """Per-request figures of the preview requests whose responses the edge follows (access log
    or inspection on: tunneld/accesslog.py), read by Prometheus at scrape time: duration and
    time to first byte histograms, requests by status class, body bytes each way. No label
    names a sandbox, a path or a client (unbounded cardinality).

    A response that arrived whole in one read (most small ones: ``ResponseFramer.whole``) is
    counted in ``whole`` (a ``Tally``: C when built), taken into the histograms at every scrape;
    counting one observation in Python costs as much as ~4 % of relaying a small request. The
    other responses go through ``observe``, one at a time."""

    def __init__(self) -> None:
        self.duration = _Buckets()
        self.ttfb = _Buckets()
        self.statuses = dict.fromkeys((*_STATUS_CLASSES, "none"), 0)
        self.bytes_in = 0
        self.bytes_out = 0
        self.whole = tally(REQUEST_BUCKETS)

    def observe(
        self, duration: float, ttfb: float | None, status: int | None, body_in: int, body_out: int
    ) -> None:
        d = self.duration
        d.counts[bisect_left(REQUEST_BUCKETS, duration)] += 1
        d.total += duration
        if ttfb is not None:
            t = self.ttfb
            t.counts[bisect_left(REQUEST_BUCKETS, ttfb)] += 1
            t.total += ttfb
        if status is None or not 100 <= status <= 599:
            self.statuses["none"] += 1
        else:
            self.statuses[_STATUS_CLASSES[status // 100 - 1]] += 1
        self.bytes_in += body_in
        self.bytes_out += body_out

    def fold(self) -> None:
        """Take what ``whole`` counted into the histograms and counters."""
        counts, total, statuses, body_in, body_out = self.whole.take()
        self.duration.add(counts, total)
        self.ttfb.add(counts, total)
        classes = self.statuses
        for name, n in zip((*_STATUS_CLASSES, "none"), statuses, strict=True):
            classes[name] += n
        self.bytes_in += body_in
        self.bytes_out += body_out

    def collect(self) -> Iterator[Metric]:
        self.fold()
        yield self.duration.family(
            "tunneld_http_request_duration_seconds",
            "Preview requests from the head's arrival to the response's end (followed responses)",
        )
        yield self.ttfb.family(
            "tunneld_http_ttfb_seconds",
            "Preview requests from the head's arrival to the response's first byte",
        )
        requests = CounterMetricFamily(
            "tunneld_http_requests",
            "Preview requests answered, by status class (none: no whole response)",
            labels=["status"],
        )
        for status, count in self.statuses.items():
            requests.add_metric([status], count)
        yield requests
        yield CounterMetricFamily(
            "tunneld_http_request_body_bytes",
            "Request body bytes relayed to services (followed requests)",
            value=self.bytes_in,
        )
        yield CounterMetricFamily(
            "tunneld_http_response_body_bytes",
            "Response body bytes relayed to clients (followed responses)",
            value=self.bytes_out,
        )


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.public_connections = Counter(
            "tunneld_public_connections",
            "Client connections accepted on the public listener",
            registry=r,
        )
        self.preview_denied = Counter(
            "tunneld_preview_denied",
            "Preview requests refused: bad token or port not exposed",
            registry=r,
        )
        self.agent_sessions = Counter(
            "tunneld_agent_sessions", "Agent sessions authenticated", registry=r
        )
        self.agent_auth_failures = Counter(
            "tunneld_agent_auth_failures", "Agent handshakes refused", registry=r
        )
        self.agent_connections_refused = Counter(
            "tunneld_agent_connections_refused",
            "Agent connections closed on accept: max_pending_agents were waiting to authenticate",
            registry=r,
        )
        self.agents_connected = Gauge(
            "tunneld_agents_connected", "Agents with a live session", registry=r
        )
        self.streams_open = Gauge(
            "tunneld_streams_open", "Streams open across all sessions", registry=r
        )
        # Cluster: connections that landed on a node without the sandbox's agent
        self.handed_over = Counter(
            "tunneld_connections_handed_over",
            "Public connections passed to the owner worker of this host (socket hand-over)",
            registry=r,
        )
        self.adopted = Counter(
            "tunneld_connections_adopted",
            "Public connections another worker of this host handed to this one",
            registry=r,
        )
        self.forwarded = Counter(
            "tunneld_connections_forwarded",
            "Public connections relayed to the owner node over a node link",
            registry=r,
        )
        # Refusals of the public side by code (a fixed set: the codes of public.py), the
        # HTTP-to-HTTPS redirect listener's (tls.py) included
        self.public_refusals = Counter(
            "tunneld_public_refusals",
            "Refusals of the public side (previews, raw TCP, the HTTPS redirect), by code",
            ["code"],
            registry=r,
        )
        self.admin_rate_limited = Counter(
            "tunneld_admin_rate_limited",
            "Admin API requests refused with 429 RATE_LIMITED (admin_rate / admin_burst)",
            registry=r,
        )
        self.public_open = Gauge(
            "tunneld_public_connections_open", "Client connections open now", registry=r
        )
        self.agent_session_seconds = Histogram(
            "tunneld_agent_session_seconds",
            "How long authenticated agent sessions lasted (observed when one ends)",
            buckets=(1, 10, 60, 300, 1800, 3600, 6 * 3600, 86400, float("inf")),
            registry=r,
        )
        self.store_write_seconds = Histogram(
            "tunneld_store_write_seconds",
            "Time to make an expose or unexpose durable in the store",
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, float("inf")),
            registry=r,
        )
        self.store_write_failures = Counter(
            "tunneld_store_write_failures",
            "Store writes that failed (answered 503 STORE_UNAVAILABLE)",
            registry=r,
        )
        self.exposures = Gauge(
            "tunneld_exposures", "Exposed ports across all sandboxes", registry=r
        )
        self.requests = RequestStats()
        r.register(self.requests)
        self.agent_reconnects = Counter(
            "tunneld_agent_reconnects",
            "Agent sessions of a sandbox this edge already knew (exposures or a live session)",
            registry=r,
        )
        self.store_feed_overflows = Counter(
            "tunneld_store_feed_overflows",
            "Times this node fell too far behind other nodes' changes and resynced instead",
            registry=r,
        )

    def bind(
        self,
        agents: Callable[[], float],
        streams: Callable[[], float],
        exposures: Callable[[], float],
        public_open: Callable[[], float] | None = None,
    ) -> None:
        self.agents_connected.set_function(agents)
        self.streams_open.set_function(streams)
        self.exposures.set_function(exposures)
        if public_open is not None:
            self.public_open.set_function(public_open)

    def store_write(self, seconds: float, ok: bool) -> None:
        self.store_write_seconds.observe(seconds)
        if not ok:
            self.store_write_failures.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


# The C version when built (tunneld/speedups.py), else the reference above.
tally = tally_py if speedups.c is None else speedups.c.tally
