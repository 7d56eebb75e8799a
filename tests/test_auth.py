"""Agent tokens (v1, and v2 with an expiry) and the plaintext agent-link rule, without sockets."""

from __future__ import annotations

import subprocess
import time

import pytest

from tests.e2e.procs import BIN
from tunneld.auth import (
    agent_token,
    is_loopback_peer,
    parse_ttl,
    plaintext_refusal,
    token_expiry,
    verify_agent_token,
)

SECRET = "s3cret"


def test_v1_tokens_are_unchanged() -> None:
    # The value documented in docs/operations.md: minted tokens must keep verifying.
    assert agent_token("s3cret", "sb1") == "32VLFLcz4zPi4Oqf6j8aGGTuvEYDXkDMYou6X9f6nts"
    assert verify_agent_token(SECRET, "sb1", agent_token(SECRET, "sb1"))
    assert token_expiry(agent_token(SECRET, "sb1")) is None


def test_v2_token_carries_its_expiry_and_verifies_until_then() -> None:
    now = 1_800_000_000
    token = agent_token(SECRET, "sb1", expires_at=now + 3600)
    assert token.startswith(f"v2.{now + 3600}.")
    assert token_expiry(token) == now + 3600
    assert verify_agent_token(SECRET, "sb1", token, now=now)
    assert verify_agent_token(SECRET, "sb1", token, now=now + 3599)
    assert not verify_agent_token(SECRET, "sb1", token, now=now + 3600)
    assert not verify_agent_token(SECRET, "sb2", token, now=now)
    assert not verify_agent_token("other", "sb1", token, now=now)


@pytest.mark.parametrize(
    "mangle",
    [
        lambda t: t.replace("v2.", "v3.", 1),
        lambda t: "v2.9" + t[3:],  # a later expiry with the old MAC
        lambda t: t[:-1] + ("A" if t[-1] != "A" else "B"),
        lambda t: t + ".x",
        lambda t: "v2..",
        lambda t: "v2.١٢٣." + t.rsplit(".", 1)[1],  # non-ASCII digits are not an expiry
        lambda t: "v2.+5." + t.rsplit(".", 1)[1],
        lambda t: "v2." + "9" * 40 + "." + t.rsplit(".", 1)[1],
        lambda t: "",
        lambda t: "é" * 10,
    ],
)
def test_mangled_v2_tokens_are_refused(mangle) -> None:
    now = 1_800_000_000
    token = mangle(agent_token(SECRET, "sb1", expires_at=now + 3600))
    assert not verify_agent_token(SECRET, "sb1", token, now=now)


def test_v1_token_does_not_expire() -> None:
    assert verify_agent_token(SECRET, "sb1", agent_token(SECRET, "sb1"), now=4_000_000_000)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90", 90), ("90s", 90), ("15m", 900), ("24h", 86400), ("7d", 604800), ("1H", 3600)],
)
def test_parse_ttl(text: str, seconds: int) -> None:
    assert parse_ttl(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "0h", "-1h", "h", "1w", "1.5h", "\uff12h", "1e3", " 1h"])
def test_parse_ttl_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_ttl(text)


def test_token_cli_ttl_mints_an_expiring_token() -> None:
    env = {"TUNNELD_SECRET": SECRET, "PATH": "/usr/bin:/bin"}
    before = int(time.time())
    out = subprocess.run(
        [str(BIN / "tunneld"), "token", "sb1", "--ttl", "24h"],
        env=env,
        capture_output=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    token = out.stdout.decode().strip()
    expiry = token_expiry(token)
    assert expiry is not None and before + 86400 <= expiry <= int(time.time()) + 86400
    assert verify_agent_token(SECRET, "sb1", token)
    bad = subprocess.run(
        [str(BIN / "tunneld"), "token", "sb1", "--ttl", "soon"],
        env=env,
        capture_output=True,
        timeout=30,
    )
    assert bad.returncode == 2 and b"--ttl" in bad.stderr and b"Traceback" not in bad.stderr


@pytest.mark.parametrize(
    ("peer", "loopback"),
    [
        (("127.0.0.1", 5000), True),
        (("127.8.9.10", 5000), True),
        (("::1", 5000, 0, 0), True),
        (("::ffff:127.0.0.1", 5000, 0, 0), True),
        (("10.1.2.3", 5000), False),
        (("192.168.0.7", 5000), False),
        (("::ffff:10.1.2.3", 5000, 0, 0), False),
        (("2001:db8::1", 5000, 0, 0), False),
        (("0.0.0.0", 5000), False),
        (("localhost", 5000), False),  # peers are addresses; a name is not trusted
        (None, False),
        ("", False),
        (("not an address", 1), False),
    ],
)
def test_is_loopback_peer(peer, loopback: bool) -> None:
    assert is_loopback_peer(peer) is loopback


def test_plaintext_agent_links_only_from_loopback_unless_allowed() -> None:
    remote = ("10.1.2.3", 40000)
    local = ("127.0.0.1", 40000)
    refusal = plaintext_refusal(remote, tls=False, allowed=False)
    assert refusal is not None and "10.1.2.3" in refusal and "TLS" in refusal
    assert plaintext_refusal(remote, tls=True, allowed=False) is None
    assert plaintext_refusal(remote, tls=False, allowed=True) is None
    assert plaintext_refusal(local, tls=False, allowed=False) is None
