"""The error codes an HTTP client or the agent can receive are documented with their status.

docs/admin-api.md lists every code tunneld/ and relay/ answer with, whatever carries it: an
``ApiError`` (the admin API), a ``RegistryError`` (the registry's rules, the store, the public TCP
ports, the waits; the admin API answers its status and the agent gets its code), a ``RouteError``
(cluster routing), a ``HeadError`` and the preview-URL pages (``fail``, ``error_response``,
``_page``, the reset-page tables), each found as a literal ``(STATUS, "CODE"`` pair in a call or a
tuple; the agent's codes the admin API maps to a status (``"CODE": STATUS`` tables); and the
shared validator's codes (``protocol.hostnames``: each error class's ``code`` and the codes given
to its constructor, with the class's status). Each is in the error table, or in the text of its
section as "STATUS `CODE`".

docs/agent.md's error table lists every code the agent's local API raises itself
(``AgentError`` / ``_HTTPError`` / ``ValidationError`` in agent/, and the shared HTTP server's
``ApiError`` in relay/httpapi.py) with its status, unless it is a 502 ("anything else"). The
edge's codes the agent maps are tests/agent/test_edge_error_statuses.py's, and the table equals
agent/errors.py's (tests/agent/test_doc_claims_agent.py).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from protocol import hostnames

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "admin-api.md").read_text()
AGENT_DOC = (ROOT / "docs" / "agent.md").read_text()
# ``ApiError(400, "X"``, ``RegistryError(\n 409, "X"``, ``fail(503, "X"``, ``(502, "X",`` (a page
# table), ``status, code = 429, "X"``: a status and a code side by side, whoever carries them.
RAISED = re.compile(r'(?:\(|=)\s*(\d{3}),\s*"([A-Z][A-Z0-9_]+)"')
# ``"AGENT_TIMEOUT": 504``: the agent's codes and the status the admin API relays each with.
MAPPED = re.compile(r'"([A-Z][A-Z0-9_]+)":\s*(\d{3})\b')
# Raised only when the client has already gone: nobody reads it.
NEVER_SEEN = {"CLIENT_GONE"}
# The shared validator's codes that answer no request: the preview domain and scheme are
# configuration (a bad one is a configuration error at start), never a client's input.
CONFIGURATION_ONLY = {"INVALID_DOMAIN", "VALIDATION_ERROR"}


def raised_codes() -> set[tuple[int, str, str]]:
    """(status, code, where) of every code tunneld/ and relay/ answer an HTTP client or the
    agent with."""
    found = set()
    for package in ("tunneld", "relay"):
        for path in sorted((ROOT / package).rglob("*.py")):
            text = path.read_text()
            where = str(path.relative_to(ROOT))
            for status, code in RAISED.findall(text):
                found.add((int(status), code, where))
            for code, status in MAPPED.findall(text):
                found.add((int(status), code, where))
    return found | validator_codes()


def validator_codes() -> set[tuple[int, str, str]]:
    """protocol/hostnames.py's codes: each ValidationError class's, and the codes its raises give
    the constructor (``InvalidSandboxIdError("...", "INVALID_SANDBOX_ID_LENGTH")``)."""
    path = ROOT / "protocol" / "hostnames.py"
    where = str(path.relative_to(ROOT))
    classes = {
        name: cls
        for name, cls in vars(hostnames).items()
        if isinstance(cls, type) and issubclass(cls, hostnames.ValidationError)
    }
    found = {(cls.status, cls.code, where) for cls in classes.values()}
    for node in ast.walk(ast.parse(path.read_text())):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
            continue
        cls = classes.get(node.func.id)
        code = node.args[1] if len(node.args) > 1 else None
        if cls is not None and isinstance(code, ast.Constant) and isinstance(code.value, str):
            found.add((cls.status, code.value, where))
    return {(s, c, w) for s, c, w in found if c not in CONFIGURATION_ONLY}


def documented(status: int, code: str, doc: str = DOC) -> bool:
    return bool(re.search(rf"\|\s*{status}\s*\|\s*`{code}`|\b{status}\s+`{code}`", doc))


def test_every_error_code_is_documented_with_its_status() -> None:
    found = raised_codes()
    assert len(found) >= 60  # the scan sees the admin API's errors at all
    codes = {code for _, code, _ in found}
    # every kind of carrier is seen: ApiError, RegistryError, RouteError, HeadError, the
    # preview pages, a page table, a status table, the validator's class and constructor codes
    assert {"UNAUTHORIZED", "TOO_MANY_SANDBOXES", "TCP_PORTS_EXHAUSTED", "PORT_NOT_READY"} <= codes
    assert {"HTTP_VERSION_NOT_SUPPORTED", "TOO_MANY_STREAMS", "PORT_NOT_ALLOWED"} <= codes
    assert {"TOO_MANY_MISSES", "INVALID_OPTION", "INVALID_SANDBOX_ID_LENGTH"} <= codes
    missing = [
        f"{status} {code} ({path})"
        for status, code, path in sorted(found)
        if code not in NEVER_SEEN and not documented(status, code)
    ]
    assert not missing, "not in docs/admin-api.md: " + ", ".join(missing)


def documented_rows(doc: str = DOC) -> set[tuple[int, str]]:
    """(status, code) of every error table row in ``doc`` (``| 409 | `CODE` | ...``)."""
    return {
        (int(status), code)
        for status, code in re.findall(r"^\|\s*(\d{3})\s*\|\s*`([A-Z][A-Z0-9_]+)`", doc, re.M)
    }


def test_every_documented_error_code_is_one_tunneld_answers() -> None:
    """The other way round: a table row whose status and code nothing raises is a stale claim
    (a client would wait for an answer tunneld never gives)."""
    rows = documented_rows()
    assert len(rows) >= 40  # the scan sees the tables at all
    found = {(status, code) for status, code, _ in raised_codes()}
    stale = sorted(f"{status} {code}" for status, code in rows - found)
    assert not stale, "in docs/admin-api.md but never answered: " + ", ".join(stale)
    assert documented_rows(DOC + "| 501 | `NOT_AN_ANSWER` | x | y |\n") - found


def test_the_check_sees_a_code_missing_from_the_doc() -> None:
    assert documented(409, "TOO_MANY_EXPOSURES")
    assert not documented(409, "NO_SUCH_CODE_ANYWHERE")
    assert not documented(404, "TOO_MANY_EXPOSURES")  # the status is part of the claim
    # a RegistryError's code, once gone from the doc, is reported
    status, code = next((s, c) for s, c, _ in raised_codes() if c == "TOO_MANY_SANDBOXES")
    assert documented(status, code)
    assert not documented(status, code, DOC.replace("`TOO_MANY_SANDBOXES`", ""))


# -- the agent's local API ------------------------------------------------------------------


def agent_codes() -> set[tuple[int, str, str]]:
    """(status, code, where) of the codes the agent's local API raises itself: literal
    ``AgentError``/``_HTTPError`` codes (the status given, else ``status_for``'s), literal codes
    given to a ``ValidationError`` (its 400), and the shared HTTP server's."""
    from agent.errors import status_for

    found = set()
    for path in sorted((ROOT / "agent").rglob("*.py")):
        where = str(path.relative_to(ROOT))
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
                continue
            args = [a.value if isinstance(a, ast.Constant) else None for a in node.args]
            if node.func.id in ("AgentError", "_HTTPError") and isinstance(args[0], str):
                given = args[2] if len(args) > 2 else None
                status = given if isinstance(given, int) else status_for(args[0])
                found.add((status, args[0], where))
            elif node.func.id == "ValidationError" and len(args) > 1 and isinstance(args[1], str):
                found.add((hostnames.ValidationError.status, args[1], where))
    shared = ROOT / "relay" / "httpapi.py"
    found |= {(int(s), c, "relay/httpapi.py") for s, c in RAISED.findall(shared.read_text())}
    return found


def agent_documented(status: int, code: str, doc: str = AGENT_DOC) -> bool:
    section = doc.split("## Local HTTP API", 1)[1].split("### Waiting for a port", 1)[0]
    row = re.compile(rf"^\| (?:`[A-Z_]+`, )*`{code}`(?:, `[A-Z_]+`)* \| {status} \|", re.M)
    return status == 502 or bool(row.search(section))


def test_every_code_the_local_api_raises_is_in_the_agent_s_error_table() -> None:
    found = agent_codes()
    codes = {code for _, code, _ in found}
    assert {"INVALID_JSON", "FORBIDDEN", "EDGE_NOT_CONNECTED", "TOO_MANY_WATCHES"} <= codes
    assert {"INVALID_PORT", "TOO_MANY_CONNECTIONS", "REQUEST_TIMEOUT"} <= codes
    missing = [
        f"{status} {code} ({path})"
        for status, code, path in sorted(found)
        if not agent_documented(status, code)
    ]
    assert not missing, "not in docs/agent.md's error table: " + ", ".join(missing)


def test_the_agent_check_sees_a_code_missing_from_its_doc() -> None:
    assert agent_documented(409, "TOO_MANY_SANDBOXES") and agent_documented(400, "INVALID_REQUEST")
    assert not agent_documented(409, "INVALID_REQUEST") and agent_documented(502, "BAD_REPLY")
    without = re.sub(r"^\| `FORBIDDEN` [^\n]*\n", "", AGENT_DOC, flags=re.M)
    assert not agent_documented(403, "FORBIDDEN", without)
