"""docs/operations.md: the claims of the Limits, Metrics and Logs sections that no other test
drove, each checked with real traffic on 127.0.0.1 (an in-process edge, real agents, real
sockets). The configuration table is checked in tests/test_doc_claims_config.py, signals with
real processes in this file's last tests.
"""

from __future__ import annotations

import asyncio
import logging
import re
import signal
from pathlib import Path

import orjson
import pytest

from tunneld.public import PublicLimits

from .conftest import Stack, raw_request, wait_until
from .origin import OriginThread
from .procs import Processes, preview_get, wait_for

pytestmark = pytest.mark.anyio

DOC = Path(__file__).parent.parent.parent / "docs" / "operations.md"


def _section(title: str) -> str:
    text = DOC.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end]


def _split(answer: bytes) -> tuple[int, bytes, bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), head.lower(), body


async def _started(**config: object) -> Stack:
    return await Stack(**config).start()


async def _exposed(stack: Stack, sandbox: str = "sb1") -> bytes:
    origin = await stack.origin()
    await stack.agent(sandbox)
    return stack.host_of((await stack.expose(sandbox, origin.port))["exposedAt"]).encode()


# -- Limits: public connections ---------------------------------------------------------------
@pytest.mark.parametrize("limit", ["max_connections", "max_connections_per_ip"])
async def test_too_many_connections_carries_retry_after_and_is_counted(limit: str) -> None:
    """Limits: "503 `TOO_MANY_CONNECTIONS`, then closed"; "`TOO_MANY_CONNECTIONS` now carries
    `Retry-After: 1` too"; "Every refusal of the public side is counted in
    `tunneld_public_refusals_total{code}`"."""
    stack = await _started(**{limit: 1})
    held: asyncio.StreamWriter | None = None
    try:
        assert stack.edge is not None
        port = stack.edge.public_port
        _, held = await asyncio.open_connection("127.0.0.1", port)
        await wait_until(lambda: len(stack.edge.public_connections) == 1, what="one connection")
        status, head, body = _split(await raw_request(port, b""))
        assert status == 503 and re.search(rb"\r\nretry-after: 1(\r\n|$)", head), head
        assert orjson.loads(body)["code"] == "TOO_MANY_CONNECTIONS"
        metrics = (await stack.admin.get("/metrics")).text
        assert 'tunneld_public_refusals_total{code="TOO_MANY_CONNECTIONS"} 1.0' in metrics
    finally:
        if held is not None:
            held.close()
        await stack.close()


# -- Limits: exposures per sandbox -------------------------------------------------------------
async def test_one_exposure_past_the_cap_is_409_too_many_exposures() -> None:
    stack = await _started(max_exposures_per_sandbox=2)
    try:
        await stack.agent("sb1")
        for port in (8001, 8002):
            await stack.expose("sb1", port)
        r = await stack.admin.post("/v1/sandboxes/sb1/ports", json={"port": 8003})
        assert r.status_code == 409 and r.json()["code"] == "TOO_MANY_EXPOSURES"
        # exposing a port already exposed again is not "one more"
        assert (await stack.admin.post("/v1/sandboxes/sb1/ports", json={"port": 8002})).is_success
    finally:
        await stack.close()


# -- Limits: admission control -----------------------------------------------------------------
async def test_admin_429s_are_counted_in_tunneld_admin_rate_limited_total() -> None:
    stack = await _started(admin_rate=5.0, admin_burst=5)
    try:
        refused = 0
        for _ in range(12):
            r = await stack.admin.get("/v1/sandboxes")
            refused += r.status_code == 429
        assert refused >= 5

        async def scrape() -> str | None:
            nonlocal refused
            r = await stack.admin.get("/metrics")
            refused += r.status_code == 429
            return r.text if r.status_code == 200 else None

        metrics = await scrape()
        for _ in range(50):  # a token comes back every 0.2 s
            if metrics is not None:
                break
            await asyncio.sleep(0.05)
            metrics = await scrape()
        assert metrics is not None
        assert f"tunneld_admin_rate_limited_total {float(refused)}" in metrics
    finally:
        await stack.close()


def test_miss_budgets_remember_65536_client_ips() -> None:
    """Limits: "65,536 IPs remembered": the 65,537th forgets the oldest, whose spent budget is
    then whole again; a recent one stays spent."""
    limits = PublicLimits()
    assert limits.allow_miss("ip-0", 0.0, 1e-9, 1) and not limits.allow_miss("ip-0", 0.0, 1e-9, 1)
    for i in range(1, 65_536):
        limits.allow_miss(f"ip-{i}", 0.0, 1e-9, 1)
    assert len(limits.misses) == 65_536
    assert not limits.allow_miss("ip-1", 0.0, 1e-9, 1)  # still remembered, still spent
    limits.allow_miss("ip-new", 0.0, 1e-9, 1)  # the 65,537th: evicts the oldest (ip-0)
    assert len(limits.misses) == 65_536 and "ip-0" not in limits.misses
    assert limits.allow_miss("ip-0", 0.0, 1e-9, 1)  # forgotten: a fresh budget


# -- Metrics -----------------------------------------------------------------------------------
async def test_every_metric_named_in_operations_md_is_served() -> None:
    """Metrics and Limits name series by their exposition names (``…_total``): each is in
    ``GET /metrics``, and the kinds the Metrics section lists exist with those types."""
    stack = await _started()
    try:
        text = (await stack.admin.get("/metrics")).text
        types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE))
        named = set(re.findall(r"`(tunneld_[a-z_]+)", DOC.read_text()))
        assert named
        for name in named:
            assert name in types, name
            assert types[name] == "counter" or not name.endswith("_total"), name
        listed = {  # "counters: …; … (gauges); … (histograms)" in the Metrics section
            "tunneld_public_connections_total": "counter",
            "tunneld_preview_denied_total": "counter",
            "tunneld_agent_sessions_total": "counter",
            "tunneld_agent_auth_failures_total": "counter",
            "tunneld_public_refusals_total": "counter",
            "tunneld_store_write_failures_total": "counter",
            "tunneld_agents_connected": "gauge",
            "tunneld_streams_open": "gauge",
            "tunneld_public_connections_open": "gauge",
            "tunneld_exposures": "gauge",
            "tunneld_agent_session_seconds": "histogram",
            "tunneld_store_write_seconds": "histogram",
            "tunneld_connections_handed_over_total": "counter",
            "tunneld_connections_forwarded_total": "counter",
        }
        assert {name: types.get(name) for name in listed} == listed
        assert (await stack.admin.get("/readyz", headers={"authorization": ""})).status_code == 200
        r = await stack.admin.get("/metrics", headers={"authorization": ""})
        assert r.status_code == 401  # "with the admin Bearer token"
    finally:
        await stack.close()


async def test_a_guessed_token_counts_in_preview_denied() -> None:
    """ "watch `tunneld_preview_denied_total` for token guessing"."""
    stack = await _started()
    try:
        assert stack.edge is not None
        host = await _exposed(stack)
        guess = host.replace(b"-sb1-", b"-sb1-x", 1)
        for _ in range(3):
            answer = await raw_request(
                stack.edge.public_port, b"GET / HTTP/1.1\r\nHost: " + guess + b"\r\n\r\n"
            )
            assert _split(answer)[0] == 404
        metrics = (await stack.admin.get("/metrics")).text
        assert "tunneld_preview_denied_total 3.0" in metrics
    finally:
        await stack.close()


# -- Logs --------------------------------------------------------------------------------------
async def test_the_logged_events_of_the_logs_table(caplog: pytest.LogCaptureFixture) -> None:
    """Logs, logger `tunneld`: listeners bound; agent connected (sandbox, peer, session id);
    port exposed / unexposed; session ended (GO_AWAY code and reason); and the warnings:
    authentication failed (peer, sandbox id), no hello in time."""
    caplog.set_level(logging.INFO, logger="tunneld")
    stack = await _started(handshake_timeout=1.0)
    closed = False
    try:
        assert stack.edge is not None
        origin = await stack.origin()
        agent = await stack.agent("sb1")
        await stack.expose("sb1", origin.port)
        assert (await stack.admin.delete(f"/v1/sandboxes/sb1/ports/{origin.port}")).is_success
        session = agent.session_id
        from tunneld.auth import agent_token

        stack.secret, real = "another-secret", stack.secret
        await stack.agent("sb2", wait=False)  # a token from another secret
        stack.secret = real
        _, silent = await asyncio.open_connection("127.0.0.1", stack.edge.agent_port)

        def lines() -> list[tuple[str, int, str]]:
            return [(r.name, r.levelno, r.getMessage()) for r in caplog.records]

        await wait_until(
            lambda: any("sent no hello within 1s" in m for _, _, m in lines()),
            what="the no-hello warning",
        )
        await wait_until(
            lambda: any("authentication failed for sandbox sb2" in m for _, _, m in lines()),
            what="the auth warning",
        )
        silent.close()
        await stack.close()
        closed = True
        logged = lines()
        assert agent_token(real, "sb1") not in str(logged)  # tokens are never logged

        def has(level: int, pattern: str) -> bool:
            return any(
                name == "tunneld" and lv == level and re.search(pattern, m)
                for name, lv, m in logged
            )

        assert has(logging.INFO, r"^tunneld listening: public http://127\.0\.0\.1:\d+ \(domain ")
        assert has(
            logging.INFO,
            rf"^sandbox sb1: agent connected from 127\.0\.0\.1:\d+ \(session {session}\)$",
        )
        assert has(logging.INFO, rf"^sandbox sb1: port {origin.port} exposed$")
        assert has(logging.INFO, rf"^sandbox sb1: port {origin.port} unexposed$")
        assert has(
            logging.WARNING, r"^agent 127\.0\.0\.1:\d+: authentication failed for sandbox sb2$"
        )
        assert has(logging.WARNING, r"^agent 127\.0\.0\.1:\d+ sent no hello within 1s; closing$")
        assert has(
            logging.INFO,
            rf"^sandbox sb1 \(agent 127\.0\.0\.1:\d+, session {session}\) ended after [\d.]+s: "
            r"[A-Z_]+ by the (agent|edge) \(",
        )
    finally:
        if not closed:
            await stack.close()


# -- Signals (real processes) ------------------------------------------------------------------
def test_sighup_keeps_flags_and_refuses_a_bad_file(tmp_path: Path) -> None:
    """SIGHUP: the file is read again; a command-line flag (``--access-log``) stays applied
    after the reload; an invalid file is refused with the documented ERROR line and the
    running configuration kept."""
    procs = Processes(tmp_path, "asyncio")
    origin = OriginThread()
    try:
        config = tmp_path / "tunneld.toml"
        config.write_text("access_log = false\n")
        procs.start_edge("--access-log", "-c", str(config))
        procs.start_agent("sb1")
        wait_for(lambda: _connected(procs, "sb1"), what="agent connected")
        url = _expose(procs, origin.port)
        assert edge_log_waits(procs, "SIGHUP: configuration reloaded", signal.SIGHUP)
        assert preview_get(procs, url).status_code == 200
        wait_for(
            lambda: re.search(r'tunneld\.access: 127\.0\.0\.1 "GET /" 200 ', _log(procs)),
            what="an access log line after the reload",
        )
        config.write_text("access_log = false\nbogus = 1\n")
        assert edge_log_waits(
            procs,
            f"ERROR   tunneld: SIGHUP: configuration not reloaded: config file {config}: "
            "unknown setting 'bogus'",
            signal.SIGHUP,
        )
        assert preview_get(procs, url).status_code == 200  # still serving, as configured
    finally:
        procs.close()
        origin.close()


def test_sigterm_logs_the_documented_lines(tmp_path: Path) -> None:
    procs = Processes(tmp_path, "asyncio")
    try:
        procs.start_edge("--grace-period", "30")  # the default, which the example shows
        procs.start_agent("sb1")
        wait_for(lambda: _connected(procs, "sb1"), what="agent connected")
        assert procs.edge is not None
        procs.edge.send_signal(signal.SIGTERM)
        assert procs.edge.wait(30) == 0
        log = _log(procs)
        assert re.search(r"INFO    tunneld: SIGTERM: draining \(grace period 30s\)\n", log)
        assert re.search(
            r"INFO    tunneld: sandbox sb1 \(agent 127\.0\.0\.1:\d+, session [0-9a-f]+\) ended "
            r"after [\d.]+s: SHUTTING_DOWN by the edge \(",
            log,
        )
        assert re.search(r"INFO    tunneld: stopped\n", log)
    finally:
        procs.close()


def _log(procs: Processes) -> str:
    assert procs.edge is not None
    return procs.output(procs.edge)


def edge_log_waits(procs: Processes, line: str, signum: int) -> bool:
    assert procs.edge is not None
    before = _log(procs).count(line)
    procs.edge.send_signal(signum)
    wait_for(lambda: _log(procs).count(line) > before, what=line)
    return True


def _connected(procs: Processes, sandbox: str) -> bool:
    from .procs import is_connected

    return is_connected(procs, sandbox)


def _expose(procs: Processes, port: int) -> str:
    from .procs import admin_client

    with admin_client(procs) as admin:
        r = admin.post("/v1/sandboxes/sb1/ports", json={"port": port})
        assert r.status_code == 200, r.text
        return r.json()["exposedAt"]


# -- Limits: public request head, with traffic at the boundary ---------------------------------
@pytest.mark.parametrize("parser", ["httptools", "h11"])
async def test_public_head_limits_32_kib_and_100_fields(parser: str) -> None:
    """Limits: "public request head | 32 KiB, 100 header fields (431)": a head just within
    each bound is served, just past it is 431 ``HEADERS_TOO_LARGE``."""
    stack = await _started(parser=parser)
    try:
        assert stack.edge is not None
        host = await _exposed(stack)
        start = b"GET / HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n"

        async def status(fields: bytes) -> tuple[int, bytes]:
            code, _, body = _split(await raw_request(stack.edge.public_port, start + fields))
            return code, body

        def padded(total: int) -> bytes:  # a head of ``total`` bytes in all
            return b"X-Pad: " + b"a" * (total - len(start) - 7 - 4) + b"\r\n\r\n"

        assert len(start + padded(32 * 1024 - 64)) == 32 * 1024 - 64
        assert (await status(padded(32 * 1024 - 64)))[0] == 200
        code, body = await status(padded(32 * 1024 + 64))
        assert code == 431 and orjson.loads(body)["code"] == "HEADERS_TOO_LARGE"
        # Host and Connection are two of the fields
        assert (await status(b"X-F: 1\r\n" * 98 + b"\r\n"))[0] == 200
        code, body = await status(b"X-F: 1\r\n" * 99 + b"\r\n")
        assert code == 431 and orjson.loads(body)["code"] == "HEADERS_TOO_LARGE"
    finally:
        await stack.close()


# -- Limits: agent writes waiting for the store ------------------------------------------------
async def test_agent_requests_waiting_for_the_store_are_bounded_at_64() -> None:
    """Limits: "agent expose/unexpose requests waiting for the store | 64 per session (then
    `RATE_LIMITED`)": with the store stalled, 64 exposes wait, the 65th is refused at once, and
    the 64 complete once the store moves again."""
    from agent.errors import AgentError
    from tunneld.store import MemoryStore

    class StalledStore(MemoryStore):
        def __init__(self) -> None:
            super().__init__()
            self.gate = asyncio.Event()
            self.waiting = 0

        async def put(self, record) -> None:  # type: ignore[no-untyped-def]
            self.waiting += 1
            await self.gate.wait()
            await super().put(record)

    store = StalledStore()
    stack = Stack(control_rate=10_000.0, control_burst=10_000, control_timeout=30.0)
    stack.store = store
    await stack.start()
    try:
        agent = await stack.agent("sb1")
        first = [asyncio.ensure_future(agent.expose(port)) for port in range(9001, 9065)]
        assert stack.edge is not None
        state = stack.edge.registry.get("sb1")
        assert state is not None and state.session is not None
        session = state.session  # one write at the store, the others queued behind it (the
        # per-sandbox lock): all 64 are the session's writes in flight
        await wait_until(
            lambda: store.waiting == 1 and len(session._writes) == 64,
            what="64 agent writes waiting for the store",
        )
        with pytest.raises(AgentError) as refused:
            await asyncio.wait_for(agent.expose(9065), 5)
        assert refused.value.code == "RATE_LIMITED"
        assert agent.connected  # refused, not disconnected
        store.gate.set()
        done = await asyncio.wait_for(asyncio.gather(*first), 10)
        assert sorted(e.port for e in done) == list(range(9001, 9065))
        await agent.expose(9065)  # room again
    finally:
        store.gate.set()
        await stack.close()
