"""A stop signal that reaches ``tunneld serve --workers 2`` while its supervisor is still
starting (its private redis-server, the copy of the exposures, the workers' start) ends it
cleanly: the cases of tests/e2e/test_signal_during_startup.py (its docstring says how they
work) for the supervisor, in a file of their own so that the test runs' workers share them out
(``--dist loadfile``)."""

from __future__ import annotations

import pytest

from .test_signal_during_startup import (
    SUPERVISOR_EARLY,
    SUPERVISOR_RUN,
    SUPERVISOR_SIGNALS,
    Run,
    needs_redis,
    run,  # noqa: F401  (the fixture)
)


@needs_redis
@pytest.mark.parametrize("sig", list(SUPERVISOR_SIGNALS))
@pytest.mark.parametrize("point", SUPERVISOR_EARLY + SUPERVISOR_RUN)
def test_a_signal_while_the_supervisor_starts_stops_everything_cleanly(
    run: Run,  # noqa: F811  (the fixture imported above)
    point: str,
    sig: str,
) -> None:
    how, expected = SUPERVISOR_SIGNALS[sig]
    sig = sig.split()[0]
    if point in SUPERVISOR_RUN:
        expected = 0  # the supervisor's own handlers: exit 0 (docs/operations.md, Signals)
    run.start(point, how, "--workers", "2")
    status, text = run.wait()
    run.check_nothing_left(point, status, text)
    assert status == expected, (status, text[-3000:])
    # After its start (the workers being started): the stop of a running supervisor.
    assert f"{sig} during start-up" in text or f"{sig}: stopping" in text, text[-3000:]
    if point != "call:tunneld/supervisor.py:Supervisor._on_notify":
        assert "all 2 workers ready" not in text, text[-3000:]
    # At the first _on_notify the signal is raised while the notifications are read: the loop
    # runs its handler after that read, which may hold both workers' READY=1 (then "all 2
    # workers ready" is logged just before "SIGTERM: stopping"; CI saw it once) or one.
