"""``tunnel-agent run --max-connections N``: the cap on concurrent local connections.

docs/agent.md, Running it and What the agent dials: the option reaches the agent
(``Agent.max_connections``), a count that is no positive number is a usage error (exit 2), and a
value that leaves fewer than ``FD_RESERVE`` descriptors is warned about at start. The behaviour
of the cap itself: tests/faults/test_agent_fd_limit.py.
"""

from __future__ import annotations

import logging
import os
import resource
import subprocess
import sys

import pytest

from agent.cli import _log_connection_limit, agent_config, build_parser
from agent.core import FD_RESERVE, Agent, default_max_connections

RUN = ["run", "--server", "127.0.0.1:7000", "--sandbox-id", "sb1"]


def _config(*extra: str):  # type: ignore[no-untyped-def]
    args = build_parser().parse_args([*RUN, *extra])
    args.token = "t"
    return agent_config(args, environ={})


def test_max_connections_reaches_the_agent_and_defaults_to_the_descriptor_limit() -> None:
    assert Agent(_config("--max-connections", "50")).max_connections == 50
    config = _config()
    assert config.max_connections is None
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    assert Agent(config).max_connections == default_max_connections(soft)


@pytest.mark.parametrize("value", ["0", "-1", "many", "1000001"])
def test_a_bad_count_is_a_usage_error(value: str) -> None:
    env = dict(os.environ, TUNNEL_AGENT_TOKEN="t")
    done = subprocess.run(
        [sys.executable, "-m", "agent", *RUN, f"--max-connections={value}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2, done
    assert "--max-connections: expected a count 1-1000000" in done.stderr, done.stderr


def test_a_cap_past_the_descriptor_reserve_is_warned_about(
    caplog: pytest.LogCaptureFixture,
) -> None:
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY or soft > 1_000_000:
        pytest.skip("no finite descriptor limit to exceed")
    log = logging.getLogger("tunnel.agent")
    caplog.set_level(logging.INFO, "tunnel.agent")
    _log_connection_limit(Agent(_config("--max-connections", str(soft))), log)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert f"leaves fewer than {FD_RESERVE} of the {soft} file descriptors" in warnings[0]
    caplog.clear()
    _log_connection_limit(Agent(_config()), log)  # the default: no warning
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "local connections at a time" in caplog.records[0].getMessage()
