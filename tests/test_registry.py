"""Unit tests of the edge's registry (tunneld/registry.py): exposures, ``match``, sessions.

``match`` decides who reaches a sandbox's port, so every way it can say yes or no is pinned
here: unknown sandbox, unexposed port, wrong token, right token, no-token mode, a token that
belongs to another port, and the constant-time compare on every path that has a token.
"""

from __future__ import annotations

import pytest

import tunneld.registry as registry_module
from tunneld.registry import Registry, RegistryError


@pytest.fixture
def reg() -> Registry:
    r = Registry()
    r.expose("sb1", 8000, name="api", token="tok_a")
    r.expose("sb1", 8001, token="tok_b")
    r.expose("sb2", 8000, token="tok_c")
    return r


@pytest.fixture
def compares(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Every token comparison the registry makes (still delegating to the real compare)."""
    seen: list[tuple[str, str]] = []
    real = registry_module.tokens_equal

    def spy(a: str, b: str) -> bool:
        seen.append((a, b))
        return real(a, b)

    monkeypatch.setattr(registry_module, "tokens_equal", spy)
    return seen


def test_match_right_token_gives_the_sandbox(reg: Registry) -> None:
    state = reg.match("sb1", 8000, "tok_a")
    assert state is not None and state is reg.get("sb1") and state.sandbox_id == "sb1"
    assert reg.match("sb1", 8001, "tok_b") is state
    assert reg.match("sb2", 8000, "tok_c") is reg.get("sb2")


@pytest.mark.parametrize(
    ("sandbox", "port", "token"),
    [
        ("nope", 8000, "tok_a"),  # unknown sandbox
        ("sb1", 8002, "tok_a"),  # port not exposed
        ("sb1", 8000, "tok_b"),  # a token of the same sandbox, but for another port
        ("sb1", 8000, "tok_c"),  # a token of another sandbox
        ("sb2", 8000, "tok_a"),  # the right token on the wrong sandbox
        ("sb1", 8000, "tok_"),  # a prefix of the right token
        ("sb1", 8000, "tok_a_"),  # the right token plus a character
        ("sb1", 8000, "TOK_A"),  # tokens are case-sensitive
        ("sb1", 8000, ""),
    ],
)
def test_match_refuses(reg: Registry, sandbox: str, port: int, token: str) -> None:
    assert reg.match(sandbox, port, token) is None


def test_match_without_tokens_needs_only_the_exposure(reg: Registry) -> None:
    assert reg.match("sb1", 8000, None) is reg.get("sb1")
    assert reg.match("sb1", 8002, None) is None
    assert reg.match("nope", 8000, None) is None


def test_match_compares_in_constant_time_on_both_refusals(
    reg: Registry, compares: list[tuple[str, str]]
) -> None:
    """A wrong token and an unexposed port both cost one constant-time compare of the given
    token, so their timing does not tell which ports are exposed."""
    assert reg.match("sb1", 8000, "wrong_token") is None
    assert compares == [("wrong_token", "tok_a")]
    compares.clear()
    assert reg.match("sb1", 8002, "wrong_token") is None
    assert len(compares) == 1 and compares[0][0] == "wrong_token"
    assert len(compares[0][1]) == len("wrong_token")
    compares.clear()
    assert reg.match("sb1", 8000, "tok_a") is not None
    assert compares == [("tok_a", "tok_a")]


def test_expose_is_idempotent_and_keeps_the_token(reg: Registry) -> None:
    again = reg.expose("sb1", 8000)
    assert again.token == "tok_a" and again.name is None  # the name is replaced, the token kept
    assert reg.expose("sb1", 8000, token="newtok").token == "newtok"
    assert reg.match("sb1", 8000, "tok_a") is None
    assert reg.match("sb1", 8000, "newtok") is not None


def test_fresh_tokens_are_generated_and_distinct() -> None:
    r = Registry()
    tokens = {r.expose("sb1", port).token for port in range(2000, 2050)}
    assert len(tokens) == 50
    assert all(len(t) == 16 for t in tokens)


def test_a_token_in_use_by_another_port_is_409(reg: Registry) -> None:
    with pytest.raises(RegistryError) as info:
        reg.expose("sb1", 8002, token="tok_a")
    assert (info.value.status, info.value.code) == (409, "TOKEN_IN_USE")
    assert "port 8000" in info.value.message
    assert reg.match("sb1", 8002, "tok_a") is None  # nothing was exposed
    # the same token on another sandbox is fine
    assert reg.expose("sb2", 8001, token="tok_a").token == "tok_a"


def test_exposures_are_sorted_and_unexpose_forgets_empty_sandboxes(reg: Registry) -> None:
    assert [e.port for e in reg.exposures("sb1")] == [8000, 8001]
    assert reg.exposures("nope") == []
    assert reg.unexpose("sb1", 8000) is True
    assert reg.unexpose("sb1", 8000) is False
    assert reg.unexpose("nope", 8000) is False
    assert reg.match("sb1", 8000, "tok_a") is None
    assert reg.unexpose("sb1", 8001) is True
    assert reg.get("sb1") is None  # no exposures, no session: forgotten
    assert [s.sandbox_id for s in reg.sandboxes()] == ["sb2"]


def test_attach_replaces_and_returns_the_old_session() -> None:
    r = Registry()
    first, second = object(), object()
    assert r.attach("sb1", first, 1.0) is None
    assert r.get("sb1") is not None and r.get("sb1").session is first
    assert r.attach("sb1", second, 2.0) is first
    state = r.get("sb1")
    assert state is not None and state.session is second and state.connected_at == 2.0


def test_detach_of_a_replaced_session_does_not_win() -> None:
    r = Registry()
    first, second = object(), object()
    r.attach("sb1", first, 1.0)
    r.attach("sb1", second, 2.0)
    r.detach("sb1", first)  # the old session closing late must not take the sandbox offline
    state = r.get("sb1")
    assert state is not None and state.session is second
    r.detach("sb1", second)
    assert r.get("sb1") is None  # offline and nothing exposed: forgotten
    r.detach("nope", second)  # unknown sandbox: no error


def test_a_sandbox_with_exposures_survives_its_session(reg: Registry) -> None:
    session = object()
    reg.attach("sb1", session, 1.0)
    reg.detach("sb1", session)
    state = reg.get("sb1")
    assert state is not None and state.session is None and state.connected_at is None
    assert reg.match("sb1", 8000, "tok_a") is state  # URLs survive reconnects
