"""Suite-wide settings."""

from __future__ import annotations

from hypothesis import HealthCheck, settings

# The machines that run this suite are shared and noisy: a per-example deadline would turn a busy
# neighbour into a failure. Example counts stay bounded by each test's own @settings.
settings.register_profile("tunneld", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("tunneld")
