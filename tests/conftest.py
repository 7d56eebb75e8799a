"""Suite-wide settings."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings

# The machines that run this suite are shared and noisy: a per-example deadline would turn a busy
# neighbour into a failure. Example counts stay bounded by each test's own @settings.
settings.register_profile("tunneld", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("tunneld")


# The agent honours the proxy variables (agent/proxy.py); a developer's or CI's own proxy must
# not reroute the loopback edges of the suite. Tests that want a proxy set their own.
PROXY_VARIABLES = (
    "http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY",
    "no_proxy", "NO_PROXY", "TUNNEL_AGENT_PROXY",
)  # fmt: skip


@pytest.fixture(autouse=True)
def _no_proxy_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
