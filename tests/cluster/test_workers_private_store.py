"""``--workers N`` without a Redis of the operator's: the supervisor runs a private redis-server,
exposures.db stays the copy at rest (copied in at start, written back at a clean stop), and a
run that did not stop cleanly is recovered, never silently overwritten
(tunneld/private_redis.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator

import httpx
import pytest

from tests.e2e.origin import OriginThread
from tests.e2e.procs import BIN, Processes, admin_client, preview_get, wait_for


@pytest.fixture
def origin() -> Iterator[OriginThread]:
    o = OriginThread()
    try:
        yield o
    finally:
        o.close()


def exposures(procs: Processes, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "tunneld"), "exposures", *args, "--state-dir", str(procs.tmp / "state")],
        env=procs.env(TUNNELD_ADMIN_TOKEN=procs.admin_token, TUNNELD_SECRET=procs.secret),
        capture_output=True,
        text=True,
        timeout=30,
    )


def exported(procs: Processes) -> dict[tuple[str, int], str]:
    out = exposures(procs, "export")
    assert out.returncode == 0, out.stderr
    return {(r["sandbox_id"], r["port"]): r["token"] for r in map(json.loads, out.stdout.split())}


def recovered_at_next_start(procs: Processes, token: str = "kept_tok") -> None:
    """A ``--workers`` start after a run that did not stop cleanly recovers the exposure
    (sb1:9000 with ``token``) from the private redis-server's file, serves it, and saves it to
    exposures.db when stopped."""
    procs.start_edge("--workers", "2")
    again = procs.edge
    assert again is not None
    assert "recovering the exposures" in procs.output(again)
    with admin_client(procs) as admin:
        ports = admin.get("/v1/sandboxes/sb1/ports").json()["ports"]
        assert [p["port"] for p in ports] == [9000] and token in ports[0]["exposedAt"]
    assert procs.stop(again) == 0
    assert exported(procs) == {("sb1", 9000): token}


def serve_single(procs: Processes) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "tunneld"), "serve", "--public-port", "0", "--agent-port", "0",
         "--admin-port", "0", "--state-dir", str(procs.tmp / "state")],
        env=procs.env(TUNNELD_ADMIN_TOKEN="a", TUNNELD_SECRET="b"),
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip


def test_workers_on_sqlite_share_a_private_redis_and_save_at_a_clean_stop(
    procs: Processes, origin: OriginThread
) -> None:
    line = json.dumps({"sandbox_id": "sb1", "port": origin.port, "token": "before_tok"}) + "\n"
    (procs.tmp / "state").mkdir()
    seeded = subprocess.run(
        [str(BIN / "tunneld"), "exposures", "import", "--state-dir", str(procs.tmp / "state")],
        input=line, text=True, capture_output=True, timeout=30, env=procs.env(),
    )  # fmt: skip
    assert seeded.returncode == 0, seeded.stderr
    procs.start_edge("--workers", "2")  # the default store: sqlite
    supervisor = procs.edge
    assert supervisor is not None
    assert "private redis-server: 1 exposures copied" in procs.output(supervisor)
    procs.start_agent("sb1")
    with admin_client(procs) as admin:
        url = admin.get("/v1/sandboxes/sb1/ports").json()["ports"][0]["exposedAt"]
        assert "before_tok" in url  # the stored exposure, same URL
        r = admin.post("/v1/sandboxes/sb2/ports", json={"port": 9000, "token": "during_tok"})
        assert r.status_code == 200, r.text
    for _ in range(10):  # through either worker
        r = preview_get(procs, url)
        assert (r.status_code, r.content) == (200, b"hello from origin")
    # while it runs: export reads the private redis (the newer copy); nobody else opens the dir
    assert exported(procs) == {("sb1", origin.port): "before_tok", ("sb2", 9000): "during_tok"}
    refused = serve_single(procs)
    assert refused.returncode == 2 and "in use by another process" in refused.stderr
    assert procs.stop(supervisor) == 0
    assert "2 exposures written back" in procs.output(supervisor)
    assert not (procs.tmp / "state" / "redis" / "UNSAVED").exists()
    assert exported(procs) == {("sb1", origin.port): "before_tok", ("sb2", 9000): "during_tok"}


def test_a_killed_supervisor_is_recovered_never_overwritten(procs: Processes) -> None:
    procs.start_edge("--workers", "2")
    supervisor = procs.edge
    assert supervisor is not None
    workers = procs.ports["workers"]
    with admin_client(procs) as admin:
        r = admin.post("/v1/sandboxes/sb1/ports", json={"port": 9000, "token": "kept_tok"})
        assert r.status_code == 200, r.text
    supervisor.send_signal(signal.SIGKILL)
    supervisor.wait(10)
    wait_for(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in workers), what="workers")
    # a single-process tunneld must not start on the older exposures.db
    refused = serve_single(procs)
    assert refused.returncode == 2, refused.stderr
    assert "did not stop cleanly" in refused.stderr and "--workers" in refused.stderr
    # --workers again recovers the exposure made before the kill, and saves it when stopped
    recovered_at_next_start(procs)


def test_workers_on_memory_and_a_missing_redis_server(procs: Processes) -> None:
    procs.start_edge("--workers", "2", "--store", "memory")
    supervisor = procs.edge
    assert supervisor is not None
    with httpx.Client(
        base_url=f"http://127.0.0.1:{procs.ports['admin']}",
        headers={"authorization": f"Bearer {procs.admin_token}"},
        timeout=10,
    ) as admin:
        assert admin.post("/v1/sandboxes/sb1/ports", json={"port": 9000}).status_code == 200
        for _ in range(6):  # every worker sees it (each request may land on either)
            assert [p["port"] for p in admin.get("/v1/sandboxes/sb1/ports").json()["ports"]] == [
                9000
            ]
    assert procs.stop(supervisor) == 0
    out = subprocess.run(
        [str(BIN / "tunneld"), "serve", "--workers", "2", "--store", "memory",
         "--public-port", "0", "--agent-port", "0", "--admin-port", "0"],
        env=procs.env(TUNNELD_ADMIN_TOKEN="a", TUNNELD_SECRET="b",
                      TUNNELD_REDIS_SERVER="/nonexistent/redis-server"),
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert out.returncode == 2
    assert "private redis-server" in out.stderr and "apt-get install redis-server" in out.stderr
