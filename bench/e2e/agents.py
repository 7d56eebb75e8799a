"""Many agents in one process (``python -m bench.e2e.agents --count 1000``): in-process
``agent.core.Agent`` objects, each its own sandbox id and token, all connected to one tunneld.
Prints ``{"connected": N, "connect_s": s, "bytes_per_agent": b}`` once all are connected, then
holds them until stdin closes. Cheaper than 1,000 processes and measures the edge the same way.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

from agent.core import Agent, AgentConfig
from tunneld.auth import agent_token

from .loadgen import raise_nofile
from .stack import SECRET, rss


async def main_async(args: argparse.Namespace) -> None:
    import os

    host, port = args.server.rsplit(":", 1)
    base = rss(os.getpid())
    t0 = time.perf_counter()
    agents = []
    tasks = []
    for i in range(args.count):
        sid = f"scale-{i}"
        agent = Agent(AgentConfig(host, int(port), sid, agent_token(SECRET, sid)))
        agents.append(agent)
        tasks.append(asyncio.create_task(agent.run()))
        if i % 50 == 49:
            await asyncio.sleep(0.05)
    await asyncio.wait_for(asyncio.gather(*(a.connected_event.wait() for a in agents)), 120)
    connect_s = time.perf_counter() - t0
    await asyncio.sleep(0.5)
    per_agent = (rss(os.getpid()) - base) / len(agents)
    print(
        json.dumps(
            {"connected": len(agents), "connect_s": connect_s, "bytes_per_agent": per_agent}
        ),
        flush=True,
    )
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await asyncio.gather(*(a.stop() for a in agents), return_exceptions=True)
    for t in tasks:
        t.cancel()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--server", required=True)
    ap.add_argument("--count", type=int, default=1000)
    args = ap.parse_args()
    raise_nofile()
    import uvloop

    uvloop.run(main_async(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
