"""docs/sdk.md's API table gives every call's signature with its defaults (the client's
``timeout=10.0``, ``max_response_size=8 MiB``, wait_for_port's ``interval=0.5`` and
``timeout=30.0``, ws_connect's ``max_message_size=16 MiB`` ...): each is the code's, parameter
for parameter (names, keyword-only marker, defaults), and the TypeScript aliases are the same
functions. A new parameter must reach the table, a changed default the doc."""

from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path
from typing import Any

import pytest

from tunneld.client import ExposedPort, Sandbox, SandboxInfo, TunnelClient, ValidationError

DOC = Path(__file__).resolve().parents[2] / "docs" / "sdk.md"


def documented_rows() -> list[tuple[str, str, str]]:
    """(object, method, parameter list, alias) of the API table's rows."""
    section = DOC.read_text("utf-8").split("## API", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        match = re.match(r"^\| `(?:await )?(\w+)(?:\.(\w+))?\((.*?)\)`.*?\| (?:`(\w+)`)? *\|", line)
        if match:
            owner, method, params, alias = match.groups()
            name = owner if method is None else f"{owner}.{method}"
            rows.append((name, params, alias or ""))
    return rows


def target(name: str) -> Any:
    if name == "TunnelClient":
        return TunnelClient.__init__
    owner, method = name.split(".")
    return getattr({"client": TunnelClient, "sb": Sandbox}[owner], method)


def documented_signature(params: str) -> inspect.Signature:
    source = re.sub(r"(\d+) MiB", r"(\1 * 1024 * 1024)", params)
    source = re.sub(r"\bid\b", "sandbox_id", source)  # client.sandbox(id)
    namespace: dict[str, Any] = {}
    exec(f"def f({source}): pass", namespace)  # the doc's own parameter list
    return inspect.signature(namespace["f"])


def shape(signature: inspect.Signature) -> list[tuple[str, object, object]]:
    return [(p.name, p.kind, p.default) for p in signature.parameters.values() if p.name != "self"]


ROWS = documented_rows()
pytestmark = pytest.mark.anyio


def test_the_table_lists_every_public_call() -> None:
    names = {name for name, _, _ in ROWS}
    public = {f"sb.{n}" for n in dir(Sandbox) if not n.startswith("_") and n[0].islower()}
    public |= {f"client.{n}" for n in dir(TunnelClient) if not n.startswith("_")}
    public -= {"sb.id", "client.base_url", "client.timeout", "client.aclose"}  # no calls
    public -= {f"sb.{alias}" for _, _, alias in ROWS if alias}
    assert names - {"TunnelClient"} == public


@pytest.mark.parametrize(("name", "params", "alias"), ROWS, ids=[row[0] for row in ROWS])
def test_each_signature_is_the_documented_one(name: str, params: str, alias: str) -> None:
    function = target(name)
    assert shape(inspect.signature(function)) == shape(documented_signature(params))
    if alias:
        assert getattr(Sandbox, alias) is function


def test_the_dataclasses_fields_are_the_documented_ones() -> None:
    """'ExposedPort(port: int, exposed_at: str, name: str | None, protocol: str, ...)',
    'SandboxInfo(id: str, connected: bool, ports: tuple[ExposedPort, ...])'."""
    text = DOC.read_text("utf-8")
    for cls in (ExposedPort, SandboxInfo):
        match = re.search(rf"`{cls.__name__}\((.*?)\)`", text)
        assert match, cls
        documented = re.findall(r"(\w+): ([^,]+(?:, \.\.\.\])?)", match.group(1))
        assert [(f.name, f.type) for f in dataclasses.fields(cls)] == documented


async def test_a_bad_exposure_option_is_refused_before_any_request(refused_url: str) -> None:
    client = TunnelClient(refused_url, "token")  # nothing listens: a request would fail
    sb = client.sandbox("sb1")
    for options in ({"protocol": "sctp"}, {"proxy_protocol": 1}, {"inspect": "yes"}):
        with pytest.raises(ValidationError) as info:
            await sb.expose_port(8000, **options)
        assert info.value.status is None, options
