"""``--log-format json``: every line tunneld writes is one JSON object; access records carry their
fields as keys (a real ``tunneld serve`` process)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from .origin import OriginThread
from .procs import Processes, admin_client, preview_get, wait_for


def _json_edge_exposing(
    procs: Processes, origin: OriginThread
) -> tuple[subprocess.Popen[bytes], str]:
    """A ``tunneld serve --log-format json --access-log`` and an agent exposing ``origin``."""
    procs.start_edge("--log-format", "json", "--access-log")
    edge = procs.edge
    assert edge is not None
    procs.start_agent("sb1")
    with admin_client(procs) as admin:
        url = admin.post("/v1/sandboxes/sb1/ports", json={"port": origin.port}).json()["exposedAt"]
    return edge, url


def test_json_lines_with_access_fields(procs: Processes) -> None:
    origin = OriginThread()
    try:
        edge, url = _json_edge_exposing(procs, origin)
        r = preview_get(procs, url, "/?x=1")
        assert r.status_code == 200

        def access() -> list[dict]:
            lines = [ln for ln in procs.output(edge).splitlines() if ln.strip()]
            rows = [json.loads(ln) for ln in lines]  # every line is JSON, or this raises
            return [row for row in rows if row["logger"] == "tunneld.access"]

        (row,) = wait_for(access, 10, "the access record")
        assert row["level"] == "info" and row["time"].endswith("Z")
        assert (row["method"], row["path"], row["status"]) == ("GET", "/?x=1", 200)
        assert row["sandbox"] == "sb1" and row["bytes_out"] == len(r.content)
        assert row["request_id"] == r.headers["x-request-id"]
        assert procs.stop(edge) == 0
        access()  # the shutdown lines are JSON too
    finally:
        origin.close()


def test_lines_still_buffered_at_sigterm_are_written(procs: Processes) -> None:
    """Access lines leave in batches (accesslog.FLUSH_AFTER after the first): every request
    of a burst answered just before SIGTERM is in the log once the process exited."""
    origin = OriginThread()
    try:
        edge, url = _json_edge_exposing(procs, origin)
        paths = [f"/?n={i}" for i in range(20)]
        for path in paths:
            assert preview_get(procs, url, path).status_code == 200
        assert procs.stop(edge) == 0
        rows = [json.loads(ln) for ln in procs.output(edge).splitlines() if ln.strip()]
        logged = [row["path"] for row in rows if row["logger"] == "tunneld.access"]
        assert logged == paths
    finally:
        origin.close()


def test_a_bad_log_format_is_a_usage_error(procs: Processes, tmp_path: Path) -> None:
    from .procs import BIN

    out = subprocess.run(
        [str(BIN / "tunneld"), "serve", "--log-format", "xml"],
        env=procs.env(), capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert out.returncode == 2 and "--log-format" in out.stderr
