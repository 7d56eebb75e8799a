"""``max_sandboxes``: how many sandboxes may hold exposures on one edge, and the answer past it.

An expose that would give one more sandbox its first exposure is 409 ``TOO_MANY_SANDBOXES``
(admin API and the agent's own expose over the control channel alike); another port of a sandbox
that already holds exposures is not one more; unexposing a sandbox's last port frees its slot;
exposures stored past the cap are all loaded and served at start, with one warning, and only new
sandboxes wait until fewer than the cap hold exposures. Everything runs against a real edge on
127.0.0.1 (the e2e ``Stack`` in this process, or a real ``tunneld serve``), over real HTTP.
"""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import (  # the e2e suite's fixtures: both loops, no unhandled errors
    Stack,
    anyio_backend,
    no_unhandled_errors,
)
from tests.e2e.procs import BIN, Processes, admin_client
from tunneld.store import SqliteStore

__all__ = ["anyio_backend", "no_unhandled_errors"]

CAP = 3
IO_TIMEOUT = 30.0


async def _expose(stack: Stack, sandbox: str, port: int = 8000) -> httpx.Response:
    assert stack.admin is not None
    return await stack.admin.post(f"/v1/sandboxes/{sandbox}/ports", json={"port": port})


async def _unexpose(stack: Stack, sandbox: str, port: int = 8000) -> None:
    assert stack.admin is not None
    r = await stack.admin.delete(f"/v1/sandboxes/{sandbox}/ports/{port}")
    assert r.status_code == 204, r.text


def _assert_too_many(r: httpx.Response, sandbox: str, cap: int = CAP) -> None:
    assert r.status_code == 409, (r.status_code, r.text)
    body = r.json()
    assert body["code"] == "TOO_MANY_SANDBOXES", body
    assert sandbox in body["error"] and f"max_sandboxes = {cap})" in body["error"], body


async def _listed(stack: Stack) -> dict[str, list[int]]:
    """Each sandbox the edge lists with the ports it exposes (sandboxes without any left out)."""
    assert stack.admin is not None
    sandboxes = (await stack.admin.get("/v1/sandboxes")).json()["sandboxes"]
    listed = {s["id"]: sorted(p["port"] for p in s["ports"]) for s in sandboxes}
    return {sandbox: ports for sandbox, ports in listed.items() if ports}


@pytest.mark.anyio
async def test_one_sandbox_past_the_cap_is_409_and_another_port_of_a_held_one_is_not() -> None:
    stack = await Stack(max_sandboxes=CAP).start()
    try:
        for i in range(1, CAP + 1):
            assert (await _expose(stack, f"sb{i}")).status_code == 200
        refused = await _expose(stack, "sb4")
        _assert_too_many(refused, "sb4")
        assert "3 sandboxes already hold exposures" in refused.json()["error"]
        # nothing of the refused sandbox was kept
        assert stack.admin is not None
        assert (await stack.admin.get("/v1/sandboxes/sb4/ports")).json() == {"ports": []}
        assert sorted(await _listed(stack)) == ["sb1", "sb2", "sb3"]
        # at the cap: another port of a sandbox that holds exposures, and a re-expose, work
        assert (await _expose(stack, "sb1", 8001)).status_code == 200
        assert (await _expose(stack, "sb2", 8000)).status_code == 200
        # an agent connected for sb4 (a session, no exposure) does not give it a slot either
        await stack.agent("sb4")
        _assert_too_many(await _expose(stack, "sb4"), "sb4")
        assert await _listed(stack) == {"sb1": [8000, 8001], "sb2": [8000], "sb3": [8000]}
    finally:
        await stack.close()


@pytest.mark.anyio
async def test_unexposing_the_last_port_of_a_sandbox_frees_its_slot() -> None:
    stack = await Stack(max_sandboxes=CAP).start()
    try:
        for i in range(1, CAP + 1):
            assert (await _expose(stack, f"sb{i}")).status_code == 200
        assert (await _expose(stack, "sb1", 8001)).status_code == 200
        await _unexpose(stack, "sb1", 8000)  # sb1 still holds 8001: still counted
        _assert_too_many(await _expose(stack, "sb4"), "sb4")
        await _unexpose(stack, "sb1", 8001)  # its last port: the slot is free
        assert (await _expose(stack, "sb4")).status_code == 200
        _assert_too_many(await _expose(stack, "sb5"), "sb5")  # and taken again
        assert sorted(await _listed(stack)) == ["sb2", "sb3", "sb4"]
    finally:
        await stack.close()


@pytest.mark.anyio
async def test_concurrent_first_exposes_of_new_sandboxes_never_pass_the_cap(
    tmp_path: Path,
) -> None:
    """Each sandbox has its own lock, so two new sandboxes' exposes run side by side while the
    store writes: a slot is taken before the write, and exactly the cap of them get one."""
    stack = Stack(max_sandboxes=CAP)
    stack.store = SqliteStore.open(tmp_path)  # a write that really waits for the disk
    await stack.start()
    try:
        answers = await asyncio.gather(*(_expose(stack, f"new{i}") for i in range(12)))
        assert sorted(r.status_code for r in answers) == [200] * CAP + [409] * (12 - CAP)
        for r in answers:
            if r.status_code == 409:
                assert r.json()["code"] == "TOO_MANY_SANDBOXES"
        assert len(await _listed(stack)) == CAP
    finally:
        await stack.close()


@pytest.mark.anyio
async def test_the_agent_s_own_expose_obeys_the_cap_and_tunnel_agent_expose_says_so() -> None:
    """A process in the sandbox asks the agent (its local API), the agent asks the edge over the
    control channel: the edge's refusal comes back with its code and sentence, and
    ``tunnel-agent expose`` prints them and exits 1."""
    stack = await Stack(max_sandboxes=1).start()
    try:
        assert (await _expose(stack, "sb1")).status_code == 200
        agent = await stack.agent("sb2")
        api = await agent.serve_local_api("127.0.0.1", 0)
        url = f"http://127.0.0.1:{api.port}"
        try:
            async with httpx.AsyncClient(base_url=url, timeout=IO_TIMEOUT) as local:
                r = await local.post("/v1/ports", json={"port": 8000})
                assert r.json()["code"] == "TOO_MANY_SANDBOXES", r.text
                assert "max_sandboxes = 1)" in r.json()["error"]
            cli = await asyncio.create_subprocess_exec(
                str(BIN / "tunnel-agent"),
                "expose",
                "8000",
                "--api",
                url,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            out, err = await asyncio.wait_for(cli.communicate(), IO_TIMEOUT)
            assert cli.returncode == 1, (out, err)
            line = err.decode().strip()
            assert line.startswith("error: Sandbox sb2 cannot get a first exposure"), line
            assert "max_sandboxes = 1" in line and line.endswith("(TOO_MANY_SANDBOXES)"), line
            assert await _listed(stack) == {"sb1": [8000]}
            # once sb1 lets its slot go, the same request from inside the sandbox works
            await _unexpose(stack, "sb1")
            exposure = await agent.expose(8000)
            assert exposure.port == 8000 and await _listed(stack) == {"sb2": [8000]}
        finally:
            await api.close()
    finally:
        await stack.close()


def test_a_restart_with_more_stored_sandboxes_than_the_cap_keeps_them_all(
    tmp_path: Path,
) -> None:
    """A real ``tunneld serve`` on a sqlite state directory: five sandboxes stored under
    ``--max-sandboxes 5``, restarted with ``--max-sandboxes 3``. All five are loaded and listed
    with their URLs, one warning says so, new sandboxes are refused until fewer than three hold
    exposures; the stored records survive another restart."""
    procs = Processes(tmp_path, "asyncio")
    try:
        procs.start_edge("--max-sandboxes", "5")
        with admin_client(procs) as admin:
            urls = {}
            for i in range(1, 6):
                r = admin.post(f"/v1/sandboxes/sb{i}/ports", json={"port": 8000})
                assert r.status_code == 200, r.text
                urls[f"sb{i}"] = r.json()["exposedAt"]
            _assert_too_many(admin.post("/v1/sandboxes/sb6/ports", json={"port": 8000}), "sb6", 5)
        assert procs.edge is not None and procs.stop(procs.edge) == 0

        procs.start_edge("--max-sandboxes", "3")
        edge = procs.edge
        with admin_client(procs) as admin:

            def listed() -> dict[str, str]:
                sandboxes = admin.get("/v1/sandboxes").json()["sandboxes"]
                return {s["id"]: s["ports"][0]["exposedAt"] for s in sandboxes if s["ports"]}

            assert set(listed()) == set(urls)  # all five loaded, none dropped
            # the same URLs, with the port the restarted edge bound
            assert {s: u.split("-", 1)[1].split(".")[0] for s, u in listed().items()} == {
                s: u.split("-", 1)[1].split(".")[0] for s, u in urls.items()
            }
            _assert_too_many(admin.post("/v1/sandboxes/sb6/ports", json={"port": 8000}), "sb6")
            assert admin.post("/v1/sandboxes/sb1/ports", json={"port": 8001}).status_code == 200
            for sandbox in ("sb4", "sb5"):  # down to three: still not below the cap
                assert admin.delete(f"/v1/sandboxes/{sandbox}/ports/8000").status_code == 204
            _assert_too_many(admin.post("/v1/sandboxes/sb6/ports", json={"port": 8000}), "sb6")
            assert admin.delete("/v1/sandboxes/sb3/ports/8000").status_code == 204
            assert admin.post("/v1/sandboxes/sb6/ports", json={"port": 8000}).status_code == 200
        assert edge is not None and procs.stop(edge) == 0
        log = procs.output(edge)
        assert log.count("more than max_sandboxes") == 1, log
        assert "5 sandboxes have stored exposures, more than max_sandboxes (3)" in log, log

        procs.start_edge("--max-sandboxes", "3")
        with admin_client(procs) as admin:
            sandboxes = admin.get("/v1/sandboxes").json()["sandboxes"]
            ports = {s["id"]: sorted(p["port"] for p in s["ports"]) for s in sandboxes}
        assert ports == {"sb1": [8000, 8001], "sb2": [8000], "sb6": [8000]}
    finally:
        procs.close()


@pytest.mark.parametrize("value", ["0", "-1", "many"])
def test_a_bad_max_sandboxes_is_one_line_and_exit_2(tmp_path: Path, value: str) -> None:
    out = subprocess.run(
        [str(BIN / "tunneld"), "serve", "--public-port", "0", "--agent-port", "0",
         "--admin-port", "0", "--state-dir", str(tmp_path / "state"), "--max-sandboxes", value],
        env={"TUNNELD_ADMIN_TOKEN": "a", "TUNNELD_SECRET": "s", "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=15, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert out.returncode == 2, out
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.startswith("tunneld: configuration error: max_sandboxes"), out.stderr


def test_max_sandboxes_from_the_config_file_and_the_flag(tmp_path: Path) -> None:
    from tunneld.config import ConfigError, load_config

    secrets = {"TUNNELD_ADMIN_TOKEN": "a", "TUNNELD_SECRET": "s"}
    toml = tmp_path / "t.toml"
    toml.write_text("max_sandboxes = 7\n")
    assert load_config(str(toml), environ=secrets).max_sandboxes == 7
    assert load_config(str(toml), {"max_sandboxes": "9"}, environ=secrets).max_sandboxes == 9
    assert load_config(None, environ=secrets).max_sandboxes == 100_000
    toml.write_text('max_sandboxes = "7"\n')
    with pytest.raises(ConfigError, match="max_sandboxes must be an integer"):
        load_config(str(toml), environ=secrets)


def test_the_docs_name_the_code_the_setting_and_its_default() -> None:
    """admin-api.md lists 409 ``TOO_MANY_SANDBOXES`` (raised as a RegistryError, which the
    error-code scan of test_doc_claims_error_codes.py does not see); operations.md's Limits
    table has the setting with its default."""
    from tests.test_doc_claims_error_codes import documented
    from tunneld.config import Config

    assert documented(409, "TOO_MANY_SANDBOXES")
    operations = (Path(__file__).parent.parent / "docs" / "operations.md").read_text()
    limits = operations[operations.index("\n## Limits\n") :]
    row = next(line for line in limits.splitlines() if line.startswith("| sandboxes holding"))
    assert f"`max_sandboxes`, {Config().max_sandboxes:,}:" in row and "TOO_MANY_SANDBOXES" in row
