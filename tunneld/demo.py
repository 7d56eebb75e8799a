"""``tunneld demo``: edge + agent + a sample service on loopback, exposed through the SDK.

Everything runs in this one process on one uvloop loop; the agent still talks to the edge over a
real TCP connection and the sample service is a real listener, exactly as they would be apart.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import signal
import socket
import sys

from relay.loop import new_event_loop

from .config import Config

PAGE = b"""<!doctype html>
<html><head><title>tunneld demo</title></head>
<body style="font-family: sans-serif">
<h1>Hello from sandbox <code>demo</code></h1>
<p>This page is served by a service on 127.0.0.1:%d inside the sandbox, reached through the agent's
single multiplexed connection to tunneld.</p>
</body></html>
"""


async def _sample_service(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, port: int
) -> None:
    """A minimal keep-alive HTTP/1.1 server: every GET gets the page."""
    try:
        while True:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
            except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                return
            length = 0
            close = False
            for line in head.split(b"\r\n"):
                lower = line.lower()
                if lower.startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
                elif lower.startswith(b"connection:") and b"close" in lower:
                    close = True
            if length:
                await reader.readexactly(length)
            body = PAGE % port
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/html; charset=utf-8\r\n"
                b"content-length: %d\r\n\r\n%s" % (len(body), body)
            )
            await writer.drain()
            if close:
                return
    except (ConnectionError, ValueError):
        return
    finally:
        writer.close()


def _free(port: int) -> int:
    """``port`` if it can be bound on 127.0.0.1, else 0 (let the OS pick)."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return 0
    return port


async def _fetch(port: int, host: str) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET / HTTP/1.1\r\nHost: " + host.encode() + b"\r\nConnection: close\r\n\r\n")
    data = await asyncio.wait_for(reader.read(-1), 10)
    writer.close()
    return data


async def _demo(args: argparse.Namespace) -> int:
    from agent.core import Agent, AgentConfig
    from agent.local_api import start_local_api

    from .auth import agent_token
    from .client import TunnelClient
    from .edge import EdgeServer

    loop = asyncio.get_running_loop()
    admin_token = secrets.token_urlsafe(24)
    secret = secrets.token_urlsafe(32)
    public_port = _free(args.public_port) if args.public_port else 0
    config = Config(
        public_port=public_port, agent_port=0, admin_port=0, admin_token=admin_token, secret=secret
    )
    edge = EdgeServer(config, loop)
    await edge.start()

    service_port = _free(args.service_port) or 0
    service = await asyncio.start_server(
        lambda r, w: _sample_service(r, w, service_port), "127.0.0.1", service_port
    )
    service_port = service.sockets[0].getsockname()[1]

    agent = Agent(AgentConfig("127.0.0.1", edge.agent_port, "demo", agent_token(secret, "demo")))
    agent_task = loop.create_task(agent.run())
    api = None
    try:
        await asyncio.wait_for(agent.connected_event.wait(), 10)
        try:
            api = await start_local_api(agent, "127.0.0.1", 3000)
        except OSError:
            api = await start_local_api(agent, "127.0.0.1", 0)
        async with TunnelClient(f"http://127.0.0.1:{edge.admin_port}", admin_token) as client:
            exposed = await client.sandbox("demo").expose_port(service_port, name="web")
        url = exposed.exposed_at
        print(f"tunneld demo is up.\n\n  preview URL:  {url}\n", flush=True)
        print(f"  try:  curl {url}", flush=True)
        print(
            f"  admin API:    http://127.0.0.1:{edge.admin_port}  (token {admin_token})\n"
            f"  agent API:    http://127.0.0.1:{_api_port(api)}  (inside the sandbox)\n",
            flush=True,
        )
        if args.self_test:
            host = url.split("//", 1)[1].split("/", 1)[0]
            data = await _fetch(edge.public_port, host)
            ok = data.startswith(b"HTTP/1.1 200") and b"Hello from sandbox" in data
            print("self-test:", "ok" if ok else "FAILED", flush=True)
            return 0 if ok else 1
        print("Ctrl-C to stop.", flush=True)
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        return 0
    finally:
        await agent.stop()
        agent_task.cancel()
        try:
            await agent_task
        except asyncio.CancelledError:
            pass
        if api is not None:
            await api.close()
        service.close()
        await edge.stop(grace=1.0)


def _api_port(api: object) -> int:
    port = getattr(api, "port", None)
    if isinstance(port, int):
        return port
    sockets = getattr(api, "sockets", None)
    return int(sockets[0].getsockname()[1]) if sockets else 0


def run_demo(args: argparse.Namespace) -> int:
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        try:
            return runner.run(_demo(args))
        except (TimeoutError, OSError) as exc:
            print(f"tunneld demo: {exc}", file=sys.stderr)
            return 1
