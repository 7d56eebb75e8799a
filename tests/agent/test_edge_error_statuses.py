"""The agent's local API answers the edge's refusal of an expose/unexpose with the status tunneld's
admin API gives the same code (409 for the caps and conflicts, 400 for bad input, 503 for the
store or the public TCP ports), not the 502 of "an error the edge reported".

The edge's codes are derived from tunneld's source, so a code added there cannot be forgotten
here: every ``RegistryError(STATUS, "CODE", ...)`` (what ``EdgeSession._reply_after_write`` sends
back as a control ``Error``, and what the admin API answers with that status), every code of the
shared validator (``protocol.hostnames``) and every literal control ``Error`` the edge sends. Then a
real edge, a real agent and its local API over HTTP on 127.0.0.1 answer the refusals.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.errors import DEFAULT_STATUS, STATUS_BY_CODE, status_for
from protocol import hostnames
from tests.e2e.conftest import (  # the e2e suite's fixtures: both loops, no unhandled errors
    Stack,
    anyio_backend,
    no_unhandled_errors,
)
from tests.test_doc_claims_error_codes import documented
from tunneld import edge, tcpexpose

__all__ = ["anyio_backend", "no_unhandled_errors"]

ROOT = Path(__file__).resolve().parents[2]
IO_TIMEOUT = 30.0

# Where a RegistryError answers something other than an agent's expose/unexpose: the admin API's
# wait for a port (here and forwarded in a cluster), and the admin API's expose telling the agent.
NOT_AN_EXPOSE_ANSWER = {
    ("tunneld/edge.py", "EdgeServer.wait_port"),
    ("tunneld/edge.py", "EdgeServer._tell_agent"),
    ("tunneld/edge.py", "PortNotReady.__init__"),
    ("tunneld/waitfwd.py", "forward_wait"),
}
# What the agent's expose and unexpose run at the edge (none of them reaches the above).
EXPOSE_PATH = (
    edge.EdgeServer.expose_from_agent,
    edge.EdgeServer.unexpose_from_agent,
    edge.EdgeServer._unexpose_local,
    tcpexpose.TcpExposures.commit_expose,
)
# The literal control Errors of tunneld/edge.py, and the status the local API gives each.
CONTROL_ERRORS = {
    "RATE_LIMITED": 429,  # past control_rate: retry later, as the admin API's own RATE_LIMITED
    "TOO_LARGE": 502,  # a list reply over one control message: the edge's failure, relayed
    "UNEXPECTED_MESSAGE": 502,  # answers a message that is no request: never an expose
    "INTERNAL_ERROR": 500,  # a bug while serving an agent's expose/unexpose (logged)
}
# Validator codes the edge never answers an expose with: the sandbox id is the session's (checked
# at hello), the domain is configuration.
NOT_FROM_AN_EXPOSE = {"INVALID_SANDBOX_ID", "INVALID_DOMAIN", "VALIDATION_ERROR"}


def _literal_call(node: ast.Call) -> tuple[int, str] | None:
    if len(node.args) < 2:
        return None
    status, code = node.args[0], node.args[1]
    if (
        isinstance(status, ast.Constant)
        and isinstance(status.value, int)
        and isinstance(code, ast.Constant)
        and isinstance(code.value, str)
    ):
        return status.value, code.value
    return None


class _Raises(ast.NodeVisitor):
    """``RegistryError(STATUS, "CODE", ...)`` calls (and ``super().__init__(STATUS, "CODE")`` in
    a RegistryError subclass), each with the function it is in."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.scope: list[str] = []
        self.bases: list[set[str]] = []
        self.found: list[tuple[int, str, str, str]] = []

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self.bases.append({b.id for b in node.bases if isinstance(b, ast.Name)})
        self.scope.append(node.name)
        self.generic_visit(node)
        self.scope.pop()
        self.bases.pop()

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self.scope.append(node.name)
        self.generic_visit(node)
        self.scope.pop()

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
        in_subclass = bool(self.bases) and "RegistryError" in self.bases[-1]
        if name == "RegistryError" or (name == "__init__" and in_subclass):
            literal = _literal_call(node)
            if literal is not None:
                self.found.append((*literal, self.path, ".".join(self.scope)))
        self.generic_visit(node)


def registry_errors() -> list[tuple[int, str, str, str]]:
    """(status, code, file, function) of every literal RegistryError tunneld raises."""
    found = []
    for path in sorted((ROOT / "tunneld").rglob("*.py")):
        visitor = _Raises(str(path.relative_to(ROOT)))
        visitor.visit(ast.parse(path.read_text(), str(path)))
        found += visitor.found
    return found


def control_error_codes() -> set[str]:
    """The codes of ``control.Error("CODE", ...)`` in tunneld/edge.py."""
    codes = set()
    for node in ast.walk(ast.parse((ROOT / "tunneld" / "edge.py").read_text())):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "Error"
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "control"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            codes.add(node.args[0].value)
    return codes


def edge_expose_codes() -> dict[str, int]:
    """Each code the edge can answer an agent's expose/unexpose with, and its admin API status."""
    statuses: dict[str, set[int]] = {}
    for status, code, path, function in registry_errors():
        if (path, function) not in NOT_AN_EXPOSE_ANSWER:
            statuses.setdefault(code, set()).add(status)
    for cls in vars(hostnames).values():
        is_error = isinstance(cls, type) and issubclass(cls, hostnames.ValidationError)
        if is_error and cls.code not in NOT_FROM_AN_EXPOSE:
            statuses.setdefault(cls.code, set()).add(cls.status)
    several = {code: s for code, s in statuses.items() if len(s) > 1}
    assert not several, f"one code, several statuses at the edge: {several}"
    return {code: s.pop() for code, s in statuses.items()}


def test_the_scan_sees_the_edge_s_refusals() -> None:
    codes = edge_expose_codes()
    assert codes["TOO_MANY_SANDBOXES"] == codes["TOO_MANY_EXPOSURES"] == 409
    assert codes["TCP_EXPOSURES_DISABLED"] == codes["INVALID_OPTION"] == 400
    assert codes["STORE_UNAVAILABLE"] == 503
    assert len(codes) >= 12
    # the excluded places exist and are what their name says (a renamed function fails here)
    excluded = {(path, function) for _, _, path, function in registry_errors()}
    assert excluded >= NOT_AN_EXPOSE_ANSWER
    assert "AGENT_TIMEOUT" not in codes and "PORT_NOT_READY" not in codes


def test_the_agent_s_expose_path_reaches_none_of_the_excluded_functions() -> None:
    names = {function.rsplit(".", 1)[-1] for _, function in NOT_AN_EXPOSE_ANSWER} - {"__init__"}
    for function in EXPOSE_PATH:
        source = inspect.getsource(function)
        assert not [name for name in names if name in source], function.__qualname__
    assert "PortNotReady" not in "".join(inspect.getsource(f) for f in EXPOSE_PATH)


def test_every_edge_refusal_of_an_expose_has_the_admin_api_s_status_at_the_agent() -> None:
    wrong = {
        code: (status_for(code), status)
        for code, status in edge_expose_codes().items()
        if status_for(code) != status
    }
    assert not wrong, f"code: (agent's status, admin API's status): {wrong}"


def test_the_admin_api_documents_each_of_those_codes_with_that_status() -> None:
    missing = [
        f"{status} {code}"
        for code, status in edge_expose_codes().items()
        if not documented(status, code)
    ]
    assert not missing, "not in docs/admin-api.md: " + ", ".join(missing)


def test_the_edge_s_control_errors_are_the_known_ones_with_their_statuses() -> None:
    assert control_error_codes() == set(CONTROL_ERRORS)
    assert {code: status_for(code) for code in CONTROL_ERRORS} == CONTROL_ERRORS
    assert status_for("TOO_LARGE") == DEFAULT_STATUS and "TOO_LARGE" not in STATUS_BY_CODE


# -- real components: an edge, an agent, its local API over HTTP -------------------------------

# case -> (edge settings, what the admin API exposes first, the local API request's body)
Case = tuple[dict[str, Any], list[tuple[str, int]], dict[str, Any], int]
CASES: dict[str, Case] = {
    "TOO_MANY_EXPOSURES": ({"max_exposures_per_sandbox": 1}, [("sb1", 8000)], {"port": 8001}, 409),
    "TOO_MANY_SANDBOXES": ({"max_sandboxes": 1}, [("sb0", 8000)], {"port": 8001}, 409),
    "TOKEN_IN_USE": ({}, [], {"port": 8001, "token": "t1"}, 409),
    "TCP_EXPOSURES_DISABLED": ({}, [], {"port": 8001, "protocol": "tcp"}, 400),
}  # fmt: skip


@pytest.fixture
async def local_api(
    request: pytest.FixtureRequest,
) -> AsyncIterator[tuple[Stack, httpx.AsyncClient]]:
    settings, exposed, _, _ = CASES[request.param]
    stack = await Stack(**settings).start()
    try:
        assert stack.admin is not None
        for sandbox, port in exposed:
            r = await stack.admin.post(f"/v1/sandboxes/{sandbox}/ports", json={"port": port})
            assert r.status_code == 200, r.text
        agent = await stack.agent("sb1")
        api = await agent.serve_local_api("127.0.0.1", 0)
        try:
            async with httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{api.port}", timeout=IO_TIMEOUT
            ) as client:
                yield stack, client
        finally:
            await api.close()
    finally:
        await stack.close()


@pytest.mark.anyio
@pytest.mark.parametrize("local_api", sorted(CASES), indirect=True)
async def test_the_local_api_answers_the_edge_s_refusal_with_the_admin_api_s_status(
    local_api: tuple[Stack, httpx.AsyncClient], request: pytest.FixtureRequest
) -> None:
    stack, client = local_api
    code = request.node.callspec.params["local_api"]
    _, _, body, status = CASES[code]
    if code == "TOKEN_IN_USE":
        r = await client.post("/v1/ports", json={"port": 8000, "token": "t1"})
        assert r.status_code == 200, r.text
    r = await client.post("/v1/ports", json=body)
    assert (r.status_code, r.json()["code"]) == (status, code), r.text
    # the legacy endpoint (no token, no protocol there) for the refusals it can meet
    if "token" not in body and "protocol" not in body:
        r = await client.post("/api/expose-port", json=body)
        legacy = r.json()
        assert (r.status_code, legacy["httpStatus"], legacy["code"]) == (status, status, code)
    # the orchestrator gets the same status for the same request
    assert stack.admin is not None
    r = await stack.admin.post("/v1/sandboxes/sb1/ports", json=body)
    assert (r.status_code, r.json()["code"]) == (status, code), r.text


@pytest.mark.anyio
async def test_a_failure_serving_the_agent_s_expose_is_answered_500_not_left_to_time_out(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Whatever goes wrong at the edge while it serves an agent's expose, the agent gets an
    answer at once (500 INTERNAL_ERROR, the traceback only in the edge's log), not silence that
    ends in its 504 EDGE_TIMEOUT after control_timeout."""
    stack = await Stack(control_timeout=20.0).start()
    try:
        agent = await stack.agent("sb1")
        api = await agent.serve_local_api("127.0.0.1", 0)

        async def broken(sandbox_id: str, message: object) -> object:
            raise RuntimeError("a bug in the expose path")

        assert stack.edge is not None
        stack.edge.expose_from_agent = broken  # type: ignore[method-assign,assignment]
        try:
            async with httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{api.port}", timeout=IO_TIMEOUT
            ) as client:
                r = await asyncio.wait_for(client.post("/v1/ports", json={"port": 8000}), 10)
        finally:
            await api.close()
        assert (r.status_code, r.json()["code"]) == (500, "INTERNAL_ERROR"), r.text
        assert "a bug in the expose path" not in r.text  # the detail stays in the edge's log
        logged = [r for r in caplog.get_records("call") if "from the agent failed" in r.message]
        assert logged and logged[0].exc_info is not None
        for record in logged:  # expected here: not a crash for no_unhandled_errors
            caplog.get_records("call").remove(record)
    finally:
        await stack.close()
