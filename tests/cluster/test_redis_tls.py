"""The Redis store over TLS (``rediss://``) on a real redis-server that speaks TLS only
(``RedisServer(tls=True)``: a trustme CA, ``--port 0 --tls-port P``): two nodes share exposures
and serve a preview across the node link; a real ``tunneld serve`` starts and serves on it; a
certificate its CA does not sign, and a plaintext ``redis://`` URL to the TLS port, stop the start
with exit 2 and one line naming the cause, never a traceback."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import trustme

from tests.e2e.origin import OriginThread
from tests.e2e.procs import BIN, Processes, admin_client, preview_get, wait_for
from tunneld.redis_store import RedisStore
from tunneld.store import StoredExposure, StoreError

from .conftest import RedisServer
from .nodes import Cluster
from .nodes import wait_for as wait_until


@pytest.mark.anyio
async def test_two_nodes_on_a_rediss_store_share_exposures_and_serve_across_nodes(
    redis_tls_server: RedisServer,
) -> None:
    assert redis_tls_server.url.startswith("rediss://127.0.0.1:")
    cluster = Cluster(redis_tls_server)
    try:
        a = await cluster.node("node-a")
        b = await cluster.node("node-b")
        origin = await cluster.origin()
        agent = await cluster.agent(b, "sb1")
        r = await a.admin.post("/v1/sandboxes/sb1/ports", json={"port": origin.port})
        assert r.status_code == 200, r.text
        url = r.json()["exposedAt"]
        await wait_until(lambda: origin.port in agent.exposures, what="the Expose to B's agent")
        for node in (a, b):  # A forwards to B, the owner, over the node link
            async with node.public(url) as client:
                response = await client.get("/")
            assert (response.status_code, response.content) == (200, b"hello from origin")
        assert a.records() == b.records() == await a.store.load_all()
        assert a.store.feed_connected and b.store.feed_connected
    finally:
        await cluster.close()


def test_tunneld_serve_on_a_rediss_store_starts_and_serves(
    tmp_path: Path, redis_tls_server: RedisServer
) -> None:
    origin = OriginThread()
    p = Processes(tmp_path)
    try:
        p.start_edge("--store", redis_tls_server.url)
        edge = p.edge
        assert edge is not None
        p.start_agent("sb1")
        with admin_client(p) as admin:
            r = admin.post("/v1/sandboxes/sb1/ports", json={"port": origin.port})
            assert r.status_code == 200, r.text
            url = r.json()["exposedAt"]
            ready = admin.get("/readyz").json()
            assert ready == {"status": "ready", "store": "connected"}
        response = wait_for(
            lambda: (lambda r: r if r.status_code == 200 else None)(preview_get(p, url)),
            what="the preview through the edge",
        )
        assert response.content == b"hello from origin"
        assert p.stop(edge) == 0
        assert f"from {redis_tls_server.url} in" in p.output(edge)  # the URL as given, readable
    finally:
        p.close()
        origin.close()


def _serve(p: Processes, store: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "tunneld"), "serve", "--store", store, "--public-port", "0",
         "--agent-port", "0", "--admin-port", "0", "--state-dir", str(p.tmp / "state")],
        env=p.env(TUNNELD_ADMIN_TOKEN="a", TUNNELD_SECRET="s"),
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip


@pytest.mark.parametrize("mistake", ["another CA", "plaintext redis://"])
def test_a_failed_tls_handshake_stops_the_start_with_a_clear_line(
    tmp_path: Path, redis_tls_server: RedisServer, mistake: str
) -> None:
    if mistake == "another CA":
        other = tmp_path / "other-ca.pem"
        trustme.CA().cert_pem.write_to_path(str(other))
        store = f"rediss://127.0.0.1:{redis_tls_server.port}/0?ssl_ca_certs={other}"
        cause = "CERTIFICATE_VERIFY_FAILED"
    else:
        store = f"redis://127.0.0.1:{redis_tls_server.port}/0"
        cause = "a Redis that speaks TLS only resets plaintext clients: use rediss://"
    result = _serve(Processes(tmp_path), store)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if "cannot start" in line]
    assert len(lines) == 1, result.stderr
    assert f"cannot start: redis at {store}: reading the exposures failed" in lines[0]
    assert cause in lines[0]
    assert redis_tls_server.ping()  # the server was fine: the client's setting was not


@pytest.mark.anyio
async def test_the_store_names_the_tls_failure_in_its_store_error(
    tmp_path: Path, redis_tls_server: RedisServer
) -> None:
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    store = RedisStore(f"rediss://127.0.0.1:{redis_tls_server.port}/0?ssl_ca_certs={other}")
    try:
        with pytest.raises(StoreError, match="CERTIFICATE_VERIFY_FAILED"):
            await store.load_all()
    finally:
        await store.close()
    good = RedisStore(redis_tls_server.url)
    try:
        assert await good.load_all() == []
    finally:
        await good.close()


@pytest.mark.anyio
async def test_client_certificates_ride_in_the_url(tmp_path: Path) -> None:
    """A Redis that demands client certificates (``tls-auth-clients yes``): without
    ``ssl_certfile``/``ssl_keyfile`` the handshake is refused and the StoreError says so (TLS 1.3:
    the client learns it after its first command, as an alert or as a reset); with them the store
    works."""
    server = RedisServer(tmp_path / "redis-mtls", client_certs=True).start()
    try:
        bare = RedisStore(server.url)
        try:
            # the alert, or the reset that overtakes it, explained
            with pytest.raises(
                StoreError, match=r"CERTIFICATE_REQUIRED|without a certificate: set ssl_certfile"
            ):
                await bare.load_all()
        finally:
            await bare.close()
        cert, key = server.client_cert_file, server.client_key_file
        url = f"{server.url}&ssl_certfile={cert}&ssl_keyfile={key}"
        store = RedisStore(url)
        try:
            record = StoredExposure("sb1", 3000, "t" * 16, None, 1.0)
            await store.put(record)
            assert await store.load_all() == [record]
        finally:
            await store.close()
    finally:
        server.stop()
