"""The store wired into the edge: config and CLI choices, and the agent's own expose path.

An expose the *agent* asks for (tunnel-agent expose, the local API) is answered only after the
store has it too: a new edge on the same state directory serves it with the same token.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest

from agent.core import Agent, AgentConfig
from tunneld.auth import agent_token
from tunneld.cli import build_parser
from tunneld.config import Config, ConfigError, load_config
from tunneld.edge import EdgeServer
from tunneld.store import MemoryStore, SqliteStore

pytestmark = pytest.mark.anyio

ENV = {"TUNNELD_ADMIN_TOKEN": "a", "TUNNELD_SECRET": "s"}


def test_config_defaults_and_refusals() -> None:
    config = load_config(environ=ENV)
    assert (config.store, config.state_dir, config.max_exposures_per_sandbox) == ("sqlite", "", 128)
    with pytest.raises(ConfigError, match="store must be sqlite or memory"):
        load_config(environ={**ENV, "TUNNELD_STORE": "redis"})
    for bad in ("0", "1025"):
        with pytest.raises(ConfigError, match="max_exposures_per_sandbox must be 1-1024"):
            load_config(environ={**ENV, "TUNNELD_MAX_EXPOSURES_PER_SANDBOX": bad})
    args = build_parser().parse_args(["serve", "--store", "memory", "--state-dir", "/x"])
    assert (args.store, args.state_dir) == ("memory", "/x")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--store", "redis"])


async def test_an_edge_built_directly_keeps_exposures_in_memory() -> None:
    edge = EdgeServer(Config(admin_token="a", secret="s"), asyncio.get_running_loop())
    assert isinstance(edge.registry.store, MemoryStore)


async def test_an_agent_expose_is_stored_before_its_ok(tmp_path: Path) -> None:
    config = Config(public_port=0, agent_port=0, admin_port=0, admin_token="a", secret="s")
    loop = asyncio.get_running_loop()
    edge = EdgeServer(config, loop, SqliteStore.open(tmp_path))
    await edge.start()
    agent = Agent(AgentConfig("127.0.0.1", edge.agent_port, "sb1", agent_token("s", "sb1")))
    task = loop.create_task(agent.run())
    try:
        await asyncio.wait_for(agent.connected_event.wait(), 10)
        exposure = await agent.expose(8000, "web")
        await agent.expose(8001)
        await agent.unexpose(8001)
    finally:
        await agent.stop()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await edge.stop(grace=0)
    again = EdgeServer(config, loop, SqliteStore.open(tmp_path))
    await again.start()
    try:
        [record] = again.registry.exposures("sb1")
        assert (record.port, record.name, record.token) == (8000, "web", exposure.token)
    finally:
        await again.stop(grace=0)
