"""tunneld configuration precedence: defaults < TOML file < environment < command-line flags."""

from __future__ import annotations

import pytest

from tunneld.config import ConfigError, load_config


def _write(path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_precedence(tmp_path) -> None:
    admin_file = _write(tmp_path / "admin", "from-file\n")
    secret_file = _write(tmp_path / "secret", "file-secret\n")
    env_admin_file = _write(tmp_path / "admin-env", "from-env-file\n")
    toml = _write(
        tmp_path / "t.toml",
        f'domain = "file.example"\npublic_port = 9000\nadmin_token_file = "{admin_file}"\n'
        f'secret_file = "{secret_file}"\nhead_timeout = 3\n',
    )
    config = load_config(toml, environ={})
    assert (config.domain, config.public_port, config.admin_token, config.head_timeout) == (
        "file.example",
        9000,
        "from-file",
        3.0,
    )
    env = {"TUNNELD_PUBLIC_PORT": "9001", "TUNNELD_ADMIN_TOKEN_FILE": env_admin_file}
    config = load_config(toml, environ=env)
    assert (config.public_port, config.admin_token) == (9001, "from-env-file")
    env["TUNNELD_ADMIN_TOKEN"] = "direct"
    config = load_config(toml, {"public_port": 9002, "domain": None}, environ=env)
    assert (config.public_port, config.admin_token, config.domain) == (
        9002,
        "direct",
        "file.example",
    )


@pytest.mark.parametrize(
    "text, message",
    [
        ('admin_token = "inline"\n', "put admin_token in a file"),
        ("nope = 1\n", "unknown setting 'nope'"),
        ("public_port = 'x'\n", "public_port must be an integer, not 'x'"),
        # TOML has types: a value of another type is a mistake, not something to convert
        ("domain = 5\n", "domain must be a string, not 5"),
        ("public_port = '80'\n", "public_port must be an integer, not '80'"),
        ("public_port = true\n", "public_port must be an integer, not True"),
        ("access_log = 'yes'\n", "access_log must be true or false, not 'yes'"),
        ("grace_period = '5'\n", "grace_period must be a number, not '5'"),
        ("grace_period = false\n", "grace_period must be a number, not False"),
        ("scheme = 'ftp'\n", "scheme must be http or https"),
        ("public_port = 70000\n", "public_port must be 0-65535"),
        ("[broken\n", "config file"),
        ("heartbeat_interval = 0.01\n", "heartbeat_interval must be at least 0.2 s"),
        ("heartbeat_interval = 20.0\n", "and below dead_timeout"),
        ("control_rate = 0\n", "control_rate must be > 0"),
    ],
)
def test_errors_are_clear(tmp_path, text: str, message: str) -> None:
    toml = _write(tmp_path / "t.toml", text)
    with pytest.raises(ConfigError) as info:
        load_config(toml, environ={"TUNNELD_ADMIN_TOKEN": "a", "TUNNELD_SECRET": "b"})
    assert message in str(info.value)


def test_toml_numbers_and_workers_auto_are_fine(tmp_path) -> None:
    toml = _write(tmp_path / "t.toml", "grace_period = 5\nworkers = 'auto'\ntokens = false\n")
    config = load_config(toml, environ={"TUNNELD_ADMIN_TOKEN": "a", "TUNNELD_SECRET": "b"})
    assert (config.grace_period, config.tokens) == (5.0, False) and config.workers >= 1


def test_missing_secrets(tmp_path) -> None:
    with pytest.raises(ConfigError, match="no admin token"):
        load_config(None, environ={"TUNNELD_SECRET": "b"})
    with pytest.raises(ConfigError, match="no agent secret"):
        load_config(None, environ={"TUNNELD_ADMIN_TOKEN": "a"})
    with pytest.raises(ConfigError, match="cannot read admin_token file"):
        load_config(
            None,
            environ={"TUNNELD_ADMIN_TOKEN_FILE": str(tmp_path / "nope"), "TUNNELD_SECRET": "b"},
        )


def test_the_example_config_names_every_setting_and_loads(tmp_path) -> None:
    """deploy/tunneld.toml.example is "a commented example with every key" (operations.md):
    every setting appears, set or commented out; every key set in it is one tunneld knows;
    and it loads as is, once its two secret files exist."""
    import dataclasses
    import re
    import tomllib
    from pathlib import Path

    from tunneld.config import Config

    example = Path(__file__).parent.parent / "deploy" / "tunneld.toml.example"
    text = example.read_text()
    settings = {f.name for f in dataclasses.fields(Config)} - {"admin_token", "secret"}
    named = set(re.findall(r"^#? ?([a-z_0-9]+)\s*=", text, re.MULTILINE))
    assert settings - named == set()
    data = tomllib.loads(text)
    assert set(data) <= settings | {"admin_token_file", "secret_file", "public_tls"}
    (tmp_path / "admin-token").write_text("a\n")
    (tmp_path / "secret").write_text("s\n")
    local = text.replace("/run/credentials/tunneld.service/", f"{tmp_path}/")
    (tmp_path / "tunneld.toml").write_text(local)
    config = load_config(str(tmp_path / "tunneld.toml"), environ={})
    assert (config.admin_token, config.secret) == ("a", "s")
    assert config.domain == "preview.example.com" and config.inspect_redact is True
