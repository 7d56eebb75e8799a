"""docs/operations.md, "Running tunneld": a listener's host (`public_host`, `agent_host`,
`admin_host`, `node_host`) that is no IP address or host name, and an empty `state_dir`, are
configuration errors, from the TOML file, the environment and the flags alike.

Found by these tests: `public_host = "example.com:8080"` (or a scheme, or brackets) passed the
configuration check and failed only at bind, as if DNS were down (exit 1, "Name or service not
known"), and `state_dir = ""` put the database in the default place without a word, not where
the operator meant."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tunneld.config import ConfigError, load_config

SECRETS = {"TUNNELD_ADMIN_TOKEN": "a", "TUNNELD_SECRET": "b"}
HOSTS = ("public_host", "agent_host", "admin_host", "node_host")
BAD_HOSTS = [" ", "example.com:8080", "http://example.com", "[::1]", "a b", "999.1.1.1", "a..b"]
# "" is every interface, IPv4 and IPv6 (docs/operations.md; tests/test_listen.py)
GOOD = ["", "127.0.0.1", "127.1", "0.0.0.0", "::", "::1", "localhost", "edge-1.example.com", "my_h"]


@pytest.mark.parametrize("name", HOSTS)
@pytest.mark.parametrize("value", BAD_HOSTS)
def test_a_host_that_is_no_address_or_name_is_a_configuration_error(
    name: str, value: str, tmp_path: Path
) -> None:
    match = "^" + re.escape(f"{name} must be an IP address or a host name, not {value!r}")
    with pytest.raises(ConfigError, match=match):
        load_config(None, {name: value}, environ=SECRETS)
    with pytest.raises(ConfigError, match=f"^{name} must be"):
        load_config(None, environ={**SECRETS, f"TUNNELD_{name.upper()}": value})
    toml = tmp_path / "t.toml"
    toml.write_text(f"{name} = {value!r}\n".replace("'", '"'))
    with pytest.raises(ConfigError, match=f"^{name} must be"):
        load_config(str(toml), environ=SECRETS)


@pytest.mark.parametrize("value", GOOD)
def test_addresses_and_host_names_are_taken(value: str) -> None:
    for name in HOSTS:
        assert getattr(load_config(None, {name: value}, environ=SECRETS), name) == value


@pytest.mark.parametrize("value", ["", "  "])
def test_an_empty_state_dir_is_a_configuration_error(value: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^state_dir is empty: set a directory, or leave it out"):
        load_config(None, {"state_dir": value}, environ=SECRETS)
    with pytest.raises(ConfigError, match=r"^state_dir is empty"):
        load_config(None, environ={**SECRETS, "TUNNELD_STATE_DIR": value})
    toml = tmp_path / "t.toml"
    toml.write_text(f'state_dir = "{value}"\n')
    with pytest.raises(ConfigError, match=r"^state_dir is empty"):
        load_config(str(toml), environ=SECRETS)


def test_state_dir_left_out_is_the_default() -> None:
    assert load_config(None, {"state_dir": None}, environ=SECRETS).state_dir == ""
    assert load_config(None, environ={**SECRETS}).state_dir == ""
