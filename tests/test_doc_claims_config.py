"""docs/operations.md, "Running tunneld" and "Configuration": every claim of the settings table
checked against tunneld/config.py and ``tunneld serve``'s own parser.

The table is read from the document itself, so a row added, removed or changed there is checked
here without editing this file: each setting exists in ``Config`` with the documented default, is
read from ``TUNNELD_<SETTING>``, and has exactly the documented command-line flag (and no flag
where the table says "—"). The ranges the table states are the ones ``Config.validate`` enforces.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tunneld import cli
from tunneld.config import Config, ConfigError, load_config
from tunneld.store import default_state_dir

DOC = Path(__file__).parent.parent / "docs" / "operations.md"
SECRETS = {"TUNNELD_ADMIN_TOKEN": "a", "TUNNELD_SECRET": "s"}
DEFAULTS = Config()


def _rows() -> list[tuple[str, str, str, str]]:
    text = DOC.read_text()
    start = text.index("| Setting (TOML / `TUNNELD_")
    block = text[start : text.index("\n\n", start)]
    rows = []
    for line in block.splitlines()[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        assert len(cells) == 4, line
        rows.append((cells[0], cells[1], cells[2], cells[3]))
    return rows


ROWS = _rows()


def _ticked(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def _keys(cell: str) -> list[str]:
    if cell.startswith("`[[public_tls]]`"):
        return ["public_tls_extra"]
    return _ticked(cell)


# Defaults the table states in words: what the words mean in Config (and, for state_dir, where
# the empty value leads).
WORDED_DEFAULTS: dict[str, tuple[str, Any]] = {
    "url_port": ("= `public_port`", None),
    "admin_token": ("(required)", ""),
    "secret": ("(required)", ""),
    "tls_cert": ("unset", ""),
    "public_tls_cert": ("unset", ""),
    "admin_tls_cert": ("unset", ""),
    "public_tls_extra": ("none", ()),
    "public_tcp_ports": ("unset (off)", ""),
    "state_dir": ("`$STATE_DIRECTORY`, else `~/.local/state/tunneld`", ""),
    "node_id": ("`{hostname}-{pid}-{random}`", ""),
    "node_advertise": ("`node_host:{bound port}`", ""),
    "node_tls_ca": ("unset", ""),
}


def _documented_value(text: str, default: Any) -> Any:
    if isinstance(default, bool):
        return {"true": True, "false": False}[text]
    return type(default)(text)


def test_every_setting_of_config_py_has_a_row() -> None:
    """ "All settings live in tunneld/config.py": and the table names every one of them."""
    documented = {key for cell, _, _, _ in ROWS for key in _keys(cell)}
    assert {f.name for f in dataclasses.fields(Config)} - documented == set()


@pytest.mark.parametrize("row", ROWS, ids=[r[0][:40] for r in ROWS])
def test_documented_default_is_the_default(row: tuple[str, str, str, str]) -> None:
    cell, _, default_cell, _ = row
    keys = _keys(cell)
    assert keys and all(k in Config.__dataclass_fields__ for k in keys), cell
    if keys[0] in WORDED_DEFAULTS:
        words, value = WORDED_DEFAULTS[keys[0]]
        assert default_cell == words
        assert all(getattr(DEFAULTS, k) == value for k in keys)
        return
    values = _ticked(default_cell)
    assert len(values) == len(keys), (keys, default_cell)
    for key, text in zip(keys, values, strict=True):
        expected = getattr(DEFAULTS, key)
        assert _documented_value(text, expected) == expected, key


def test_worded_defaults_mean_what_they_say() -> None:
    config = load_config(None, environ=SECRETS)
    assert config.url_port is None  # the URL then carries the public port (tests/e2e)
    assert default_state_dir({"STATE_DIRECTORY": "/var/lib/tunneld"}) == Path("/var/lib/tunneld")
    assert default_state_dir({"HOME": "/h"}) == Path.home() / ".local/state/tunneld"
    with pytest.raises(ConfigError, match="no admin token"):
        load_config(None, environ={"TUNNELD_SECRET": "s"})
    with pytest.raises(ConfigError, match="no agent secret"):
        load_config(None, environ={"TUNNELD_ADMIN_TOKEN": "a"})


def _serve_options() -> dict[str, argparse.Action]:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    serve = sub.choices["serve"]
    return {opt: a for a in serve._actions for opt in a.option_strings}


def _sample(key: str, action: argparse.Action) -> tuple[list[str], Any]:
    """Arguments that set ``key`` through ``action`` and the value they set."""
    if action.nargs == 0:
        return [], action.const
    if action.choices:
        value = list(action.choices)[-1]
        return [value], value
    samples = {"store": "memory", "workers": "2", "public_tcp_ports": "20000-20010"}
    text = samples.get(key, "1" if action.type in (int, float) else "x")
    kind = type(getattr(DEFAULTS, key))
    value: Any = int(text) if key == "workers" else text
    if action.type is float or kind is float:
        value = float(text)
    elif action.type is int:
        value = int(text)
    return [text], value


@pytest.mark.parametrize("row", ROWS, ids=[r[0][:40] for r in ROWS])
def test_documented_flag_sets_the_setting(row: tuple[str, str, str, str]) -> None:
    cell, flag_cell, _, _ = row
    keys = _keys(cell)
    options = _serve_options()
    flags = _ticked(flag_cell)
    if not flags:  # "—": no flag for this setting
        assert flag_cell.startswith("—")
        for key in keys:
            assert "--" + key.replace("_", "-") not in options, key
        return
    assert len(flags) == len(keys), row
    for key, flag in zip(keys, flags, strict=True):
        assert flag in options, f"{flag} is not a flag of tunneld serve"
        extra, value = _sample(key, options[flag])
        args = cli.build_parser().parse_args(["serve", flag, *extra])
        assert cli._overrides(args)[key] == value, (flag, key)


def test_every_serve_flag_is_documented() -> None:
    text = DOC.read_text()
    options = _serve_options()
    hidden = {"-h", "--help", "--worker-index", "-c"}
    undocumented = {o for o in options if o not in hidden and f"`{o}" not in text}
    assert undocumented == set()


def test_every_flag_appears_in_serve_help() -> None:
    """``tunneld serve --help`` (a real process) lists the documented flags."""
    out = subprocess.run(
        [str(Path(sys.executable).parent / "tunneld"), "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0
    flags = {f for _, cell, _, _ in ROWS for f in _ticked(cell)}
    assert flags and {f for f in flags if f not in out.stdout} == set()
    assert "--config" in out.stdout and "--ports-file" in out.stdout


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A certificate (``*.localhost``) and its key, as files."""
    import trustme

    directory = tmp_path_factory.mktemp("pair")
    cert = trustme.CA().issue_cert("*.localhost")
    cert.cert_chain_pems[0].write_to_path(str(directory / "c.pem"))
    cert.private_key_pem.write_to_path(str(directory / "c.key"))
    return str(directory / "c.pem"), str(directory / "c.key")


@pytest.mark.parametrize("row", ROWS, ids=[r[0][:40] for r in ROWS])
def test_environment_variable_sets_the_setting(
    row: tuple[str, str, str, str], pair: tuple[str, str]
) -> None:
    """Every setting is read from ``TUNNELD_<SETTING>`` (the table's first column); the
    settings of one row together, since some go in pairs."""
    cert, key = pair
    by_kind = {"str": "x", "int": "1", "int | None": "1", "float": "12.5", "bool": "yes"}
    parsed = {"str": "x", "int": 1, "int | None": 1, "float": 12.5, "bool": True}
    special: dict[str, tuple[str, Any]] = {
        "domain": ("example.org", "example.org"),
        "scheme": ("https", "https"),
        "parser": ("h11", "h11"),
        "log_level": ("debug", "debug"),
        "log_format": ("json", "json"),
        "store": ("memory", "memory"),
        "node_advertise": ("h:1", "h:1"),
        "public_tcp_ports": ("20000-20010", "20000-20010"),
        "workers": ("1", 1),
        "heartbeat_interval": ("1.5", 1.5),
        "h2_max_streams": ("7", 7),
        "inspect_max_requests": ("7", 7),
        "inspect_max_bytes": (str(2 << 20), 2 << 20),
        "lease_s": ("20", 20.0),
        "max_exposures_per_sandbox": ("7", 7),
        "public_redirect_port": ("8081", 8081),
        "tls_cert": (cert, cert),
        "tls_key": (key, key),
        "public_tls_cert": (cert, cert),
        "public_tls_key": (key, key),
        "admin_tls_cert": (cert, cert),
        "admin_tls_key": (key, key),
        "public_tls_extra": (f"{cert}:{key}", ((cert, key),)),
    }
    # settings that only make sense with a public certificate
    env = dict(SECRETS)
    if row[0].startswith(("`public_redirect_port`", "`public_tls_passthrough`", "`[[public")):
        env.update(TUNNELD_PUBLIC_TLS_CERT=cert, TUNNELD_PUBLIC_TLS_KEY=key)
    expected = {}
    for name in _keys(row[0]):
        kind = str(Config.__dataclass_fields__[name].type)
        text, value = special.get(name, (by_kind.get(kind, "x"), parsed.get(kind)))
        env[f"TUNNELD_{name.upper()}"] = text
        expected[name] = value
    config = load_config(None, environ=env)
    assert {name: getattr(config, name) for name in expected} == expected


@pytest.mark.parametrize("text", ["1", "true", "yes", "on", "TRUE", "On"])
def test_booleans_from_the_environment_true(text: str) -> None:
    assert load_config(None, environ={**SECRETS, "TUNNELD_ACCESS_LOG": text}).access_log is True


@pytest.mark.parametrize("text", ["0", "false", "no", "off"])
def test_booleans_from_the_environment_false(text: str) -> None:
    env = {**SECRETS, "TUNNELD_TOKENS": text}
    assert load_config(None, environ=env).tokens is False


def test_booleans_from_the_environment_other_values_are_refused() -> None:
    with pytest.raises(ConfigError, match="access_log: invalid value 'maybe'"):
        load_config(None, environ={**SECRETS, "TUNNELD_ACCESS_LOG": "maybe"})


# The ranges the table's "Meaning" column states: the bounds accepted, one step past refused.
RANGES = [
    ("h2_max_streams", 1, 1000, 0, 1001),
    ("inspect_max_requests", 1, 100_000, 0, 100_001),
    ("inspect_body_bytes", 0, 16 * 1024 * 1024, -1, 16 * 1024 * 1024 + 1),
    ("inspect_max_bytes", 1024 * 1024, None, 1024 * 1024 - 1, None),
    ("max_exposures_per_sandbox", 1, 1024, 0, 1025),
    ("lease_s", 1.0, 300.0, 0.99, 300.5),
    ("heartbeat_interval", 0.2, 14.9, 0.19, 15.0),  # below dead_timeout (15)
    ("admin_max_connections_per_ip", 1, 256, 0, 257),
    ("max_pending_agents", 1, None, 0, None),
]


@pytest.mark.parametrize("key, low, high, below, above", RANGES, ids=[r[0] for r in RANGES])
def test_documented_ranges_are_enforced(
    key: str, low: Any, high: Any, below: Any, above: Any
) -> None:
    row = next(r for r in ROWS if _keys(r[0]) == [key])
    meaning = row[3].replace(",", "")
    for bound in (low, high):
        if bound is not None and not isinstance(bound, float):
            shown = f"{bound // (1024 * 1024)} MiB" if bound >= 1024 * 1024 else str(bound)
            assert shown in meaning, (key, shown, meaning)
        if bound is not None:
            config = load_config(None, {key: bound}, environ=SECRETS)
            assert getattr(config, key) == bound
    for bad in (below, above):
        if bad is not None:
            with pytest.raises(ConfigError, match=key):
                load_config(None, {key: bad}, environ=SECRETS)


def test_scheme_defaults_to_https_with_a_public_certificate(tmp_path: Path) -> None:
    """ "`scheme` then defaults to `https`": unless it is set."""
    import trustme

    cert = trustme.CA().issue_cert("*.localhost")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "c.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "c.key"))
    pair = {"public_tls_cert": str(tmp_path / "c.pem"), "public_tls_key": str(tmp_path / "c.key")}
    assert load_config(None, pair, environ=SECRETS).scheme == "https"
    assert load_config(None, {**pair, "scheme": "http"}, environ=SECRETS).scheme == "http"
    assert load_config(None, environ=SECRETS).scheme == "http"


def test_precedence_defaults_file_environment_flags(tmp_path: Path) -> None:
    toml = tmp_path / "t.toml"
    toml.write_text("grace_period = 1.0\nhead_timeout = 2.0\nidle_timeout = 3.0\n")
    env = {**SECRETS, "TUNNELD_GRACE_PERIOD": "4.0", "TUNNELD_HEAD_TIMEOUT": "5.0"}
    config = load_config(str(toml), {"grace_period": 6.0}, environ=env)
    assert (config.grace_period, config.head_timeout, config.idle_timeout) == (6.0, 5.0, 3.0)
    assert config.keepalive_timeout == DEFAULTS.keepalive_timeout


def test_secrets_order_variable_then_file_variable_then_config_key(tmp_path: Path) -> None:
    """Secrets: the variable beats everything; a ``TUNNELD_*_FILE`` variable beats the config
    file's ``*_file`` key (the environment beats the file, as for every setting)."""
    (tmp_path / "conf-secret").write_text("  from-config-key \n")
    (tmp_path / "env-secret").write_text("from-env-file\n")
    toml = tmp_path / "t.toml"
    toml.write_text(f'secret_file = "{tmp_path / "conf-secret"}"\n')
    base = {"TUNNELD_ADMIN_TOKEN": "a"}
    assert load_config(str(toml), environ=base).secret == "from-config-key"  # stripped
    env = {**base, "TUNNELD_SECRET_FILE": str(tmp_path / "env-secret")}
    assert load_config(str(toml), environ=env).secret == "from-env-file"
    env["TUNNELD_SECRET"] = "direct"
    assert load_config(str(toml), environ=env).secret == "direct"
    toml.write_text('secret = "inline"\n')
    with pytest.raises(ConfigError, match="put secret in a file"):
        load_config(str(toml), environ=env)


def _tunneld(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(Path(sys.executable).parent / "tunneld"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )


def _clean_env(**extra: str) -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNNELD_")}
    env.update(extra)
    return env


def test_configuration_errors_exit_2_with_the_documented_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('admin_token = "x"\n')
    out = _tunneld("serve", "-c", str(bad), env=_clean_env())
    assert out.returncode == 2
    assert out.stderr == (
        f"tunneld: configuration error: config file {bad}: put admin_token in a file "
        "(admin_token_file = ...) or the environment\n"
    )
    out = _tunneld("serve", env=_clean_env(TUNNELD_HEAD_TIMEOUT="abc", **SECRETS))
    assert out.returncode == 2
    assert out.stderr == (
        "tunneld: configuration error: head_timeout: invalid value 'abc' (expected float)\n"
    )


def test_a_listener_that_cannot_be_bound_exits_1(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = _tunneld(
            "serve", "--store", "memory", "--public-port", "0", "--agent-port", "0",
            "--admin-port", str(port),
            env=_clean_env(**SECRETS),
        )  # fmt: skip
    assert out.returncode == 1, out.stderr
    assert "cannot start" in out.stderr and "Traceback" not in out.stderr
