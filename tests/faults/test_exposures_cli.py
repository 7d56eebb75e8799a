"""`tunneld exposures export|import`: backup and restore of the stored exposures (issue 8).

Export works while tunneld runs (a WAL snapshot); import is refused while a tunneld holds the
state directory, checks every line before writing anything, and a tunneld started on the
imported directory serves the same list, tokens included.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.e2e.procs import BIN, Processes

from .durable import admin, state_dir


def exposures_cli(
    procs: Processes, *args: str, stdin: bytes = b"", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [str(BIN / "tunneld"), "exposures", *args],
        input=stdin,
        capture_output=True,
        timeout=30,
        env=env or procs.env(),
    )


def _expose_three(procs: Processes) -> list[dict]:
    with admin(procs) as a:
        for body in (
            {"port": 8000, "token": "mine"},
            {"port": 8001, "name": "api ✓", "inspect": True, "proxyProtocol": True},
        ):
            assert a.post("/v1/sandboxes/sb1/ports", json=body).status_code == 200
        assert a.post("/v1/sandboxes/sb2/ports", json={"port": 9000}).status_code == 200
        return [a.get(f"/v1/sandboxes/{s}/ports").json()["ports"] for s in ("sb1", "sb2")]


def test_export_while_running_then_import_elsewhere_gives_the_same_urls(
    procs: Processes, tmp_path: Path
) -> None:
    procs.start_edge("--url-port", "80")
    before = _expose_three(procs)
    out = exposures_cli(procs, "export", "--state-dir", str(state_dir(procs)))
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.decode().splitlines()]
    assert [(r["sandbox_id"], r["port"]) for r in lines] == [
        ("sb1", 8000), ("sb1", 8001), ("sb2", 9000)
    ]  # fmt: skip
    assert lines[0]["token"] == "mine" and lines[1]["name"] == "api ✓"
    assert lines[1]["inspect"] is lines[1]["proxy_protocol"] is True  # options are backed up
    assert "inspect" not in lines[0]  # and a plain record reads as before
    assert all(isinstance(r["created_at"], float) for r in lines)
    assert procs.edge is not None and procs.stop(procs.edge) == 0

    restored = tmp_path / "restored"
    backup = tmp_path / "backup.jsonl"
    backup.write_bytes(out.stdout)
    imported = exposures_cli(procs, "import", str(backup), "--state-dir", str(restored))
    assert imported.returncode == 0, imported.stderr
    assert b"imported 3 exposures" in imported.stderr
    procs.start_edge("--url-port", "80", "--state-dir", str(restored))
    with admin(procs) as a:
        after = [a.get(f"/v1/sandboxes/{s}/ports").json()["ports"] for s in ("sb1", "sb2")]
    assert after == before
    again = exposures_cli(procs, "export", "--state-dir", str(restored))
    assert again.stdout == out.stdout  # created_at too


def test_import_is_refused_while_tunneld_runs(procs: Processes) -> None:
    procs.start_edge()
    _expose_three(procs)
    line = b'{"sandbox_id": "sb3", "port": 8000, "token": "x"}\n'
    out = exposures_cli(procs, "import", "--state-dir", str(state_dir(procs)), stdin=line)
    assert out.returncode == 2
    assert b"in use by another process" in out.stderr and b"Traceback" not in out.stderr
    with admin(procs) as a:
        assert a.get("/v1/sandboxes/sb3/ports").json()["ports"] == []


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b"not json", b"line 2: not JSON"),
        (b'{"sandbox_id": "sb1", "port": 80, "token": "x"}', b"Invalid port number: 80"),
        (b'{"sandbox_id": "Bad", "port": 8000, "token": "x"}', b"Sandbox ID must"),
        (b'{"sandbox_id": "sb1", "port": 8000, "token": "x", "extra": 1}', b"unknown field"),
        (b'{"sandbox_id": "sb1", "port": 8002, "token": "ok"}', b"already in use by port"),
        (b'{"sandbox_id": "sb1", "port": 8002, "token": "y", "protocol": "udp"}', b"protocol must"),
        (b'{"sandbox_id": "sb1", "port": 8002, "token": "y", "inspect": "1"}', b"inspect must"),
    ],
)
def test_a_bad_line_imports_nothing(procs: Processes, line: bytes, message: bytes) -> None:
    first = b'{"sandbox_id": "sb1", "port": 8001, "token": "ok"}\n'
    out = exposures_cli(
        procs, "import", "--state-dir", str(state_dir(procs)), stdin=first + line + b"\n"
    )
    assert out.returncode == 2, out.stderr
    assert message in out.stderr and b"Traceback" not in out.stderr
    listed = exposures_cli(procs, "export", "--state-dir", str(state_dir(procs)))
    assert listed.stdout == b""  # no database (refused before opening it) or an empty one
    assert listed.returncode == 0 or b"no tunneld database at" in listed.stderr


def test_import_beyond_the_cap_is_refused_and_replace_restores_exactly(procs: Processes) -> None:
    state = str(state_dir(procs))
    many = b"".join(
        b'{"sandbox_id": "sb1", "port": %d, "token": "t%d"}\n' % (2000 + i, i) for i in range(129)
    )
    out = exposures_cli(procs, "import", "--state-dir", state, stdin=many)
    assert out.returncode == 2 and b"maximum (128)" in out.stderr
    one = b'{"sandbox_id": "sb1", "port": 2000, "token": "a"}\n'
    other = b'{"sandbox_id": "sb2", "port": 2000, "token": "b"}\n'
    assert exposures_cli(procs, "import", "--state-dir", state, stdin=one).returncode == 0
    assert exposures_cli(procs, "import", "--state-dir", state, stdin=other).returncode == 0
    merged = exposures_cli(procs, "export", "--state-dir", state).stdout.splitlines()
    assert len(merged) == 2
    out = exposures_cli(procs, "import", "--replace", "--state-dir", state, stdin=other)
    assert out.returncode == 0, out.stderr
    left = exposures_cli(procs, "export", "--state-dir", state).stdout.splitlines()
    assert [json.loads(x)["sandbox_id"] for x in left] == ["sb2"]


def test_the_default_state_dir_is_per_user(procs: Processes, tmp_path: Path) -> None:
    env = procs.env(XDG_STATE_HOME=str(tmp_path / "xdg"))
    env.pop("STATE_DIRECTORY", None)
    line = b'{"sandbox_id": "sb1", "port": 8000, "token": "a"}\n'
    assert exposures_cli(procs, "import", stdin=line, env=env).returncode == 0
    assert (tmp_path / "xdg" / "tunneld" / "exposures.db").exists()
    env["STATE_DIRECTORY"] = str(tmp_path / "systemd")  # what StateDirectory= sets
    assert exposures_cli(procs, "import", stdin=line, env=env).returncode == 0
    assert (tmp_path / "systemd" / "exposures.db").exists()


@pytest.mark.parametrize(
    ("store", "message"),
    [
        ("memory", b"nothing is stored"),
        ("redis://127.0.0.1:1/0", b"with Redis use redis-cli"),
    ],
)
def test_other_stores_are_refused_with_what_to_do(
    procs: Processes, store: str, message: bytes
) -> None:
    result = exposures_cli(procs, "export", env=procs.env(TUNNELD_STORE=store))
    assert result.returncode == 2, result
    assert message in result.stderr and b"Traceback" not in result.stderr
