"""Prometheus metrics of one edge (served on the admin listener at ``/metrics``).

Counters are bumped per connection or per control operation, never per chunk: the relay's hot path
stays free of metric calls. Gauges that are cheap to derive (agents, streams) are computed at scrape
time instead of being maintained.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


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
        # Refusals answered with an error page, by code (a fixed set: the codes of public.py)
        self.public_refusals = Counter(
            "tunneld_public_refusals",
            "Preview requests answered with an error page, by its code",
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
