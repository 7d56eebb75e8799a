"""tunneld configuration: defaults < TOML file < environment (TUNNELD_*) < command-line flags."""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import socket
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Final

from protocol.hostnames import is_dns_name


class ConfigError(Exception):
    """Bad configuration: the CLI prints the message and exits with status 2."""


@dataclass(slots=True)
class Config:
    # Preview URLs: {port}-{sandbox}-{token}.{domain}
    domain: str = "localhost"
    scheme: str = "http"  # scheme printed in preview URLs (https when a TLS proxy/LB fronts us)
    url_port: int | None = None  # port printed in URLs; None = the public port
    tokens: bool = True  # False only on trusted networks: {port}-{sandbox}.{domain}
    # Listeners
    public_host: str = "127.0.0.1"
    public_port: int = 8080
    agent_host: str = "127.0.0.1"
    agent_port: int = 7000
    admin_host: str = "127.0.0.1"
    admin_port: int = 7070
    # SO_REUSEPORT on the three listeners: several processes listen on one port and the kernel
    # spreads new connections over them. Set for the workers of `tunneld serve --workers N`.
    reuse_port: bool = False
    # Processes: 1 = one event loop (this process); N > 1 = a supervisor and N worker processes
    # (tunneld/supervisor.py), which share state through a Redis store. "auto" = the core count.
    workers: int = 1
    # Secrets (from env or files, never argv)
    admin_token: str = ""
    secret: str = ""  # HMAC key that derives agent tokens: token = HMAC(secret, sandbox_id)
    # Agent listener TLS (optional)
    tls_cert: str = ""
    tls_key: str = ""
    # Public listener TLS (tunneld/tls.py): the default pair, then more pairs chosen by SNI
    # (TOML: [[public_tls]] tables with cert and key; env TUNNELD_PUBLIC_TLS_EXTRA="c:k,c:k").
    # With a certificate, scheme defaults to https. Re-read on SIGHUP.
    public_tls_cert: str = ""
    public_tls_key: str = ""
    public_tls_extra: tuple[tuple[str, str], ...] = ()
    public_redirect_port: int = 0  # plain-HTTP listener answering 308 to https; 0 = off
    # HTTP/2 on the HTTPS listener (ALPN h2 offered before http/1.1; tunneld/h2public.py) and
    # the concurrent streams one HTTP/2 connection may have open (SETTINGS_MAX_CONCURRENT_STREAMS).
    public_h2: bool = True
    h2_max_streams: int = 100
    # Admin API over TLS (optional; re-read on SIGHUP)
    admin_tls_cert: str = ""
    admin_tls_key: str = ""
    # Plaintext (TCP, ws://) agent links from non-loopback peers; TLS is what detects corruption
    allow_plaintext_agents: bool = False
    # Behaviour
    parser: str = "auto"  # request-head parser: auto | httptools | h11
    head_timeout: float = 10.0  # seconds to receive a request head (slowloris bound)
    idle_timeout: float = 3600.0  # close public connections silent both ways this long; 0 = never
    keepalive_timeout: float = 75.0  # close a public connection idle between requests (nginx: 75)
    max_connections: int = 10000  # public connections in total (then 503 TOO_MANY_CONNECTIONS)
    max_connections_per_ip: int = 256  # public connections per client IP (then 503)
    control_timeout: float = 5.0  # seconds to wait for the agent's ack of expose/unexpose
    handshake_timeout: float = 10.0  # seconds for an agent to send hello after connecting
    # Agent connections not authenticated yet (TLS handshake and hello), all peers together;
    # past it a new agent connection is closed at once.
    max_pending_agents: int = 1024
    grace_period: float = 30.0  # SIGTERM: seconds to let live streams finish
    max_streams: int = 32768  # concurrent connections per agent session (then 503 SANDBOX_BUSY)
    heartbeat_interval: float = 10.0
    dead_timeout: float = 15.0
    # Control requests (expose, unexpose, list) an agent may send: a token bucket per session.
    # Past it requests get a RATE_LIMITED error; far past it the session is closed.
    control_rate: float = 20.0  # per second, sustained
    control_burst: int = 100
    # Admission control (token buckets; past them a 429 with Retry-After, counted in metrics).
    # Preview 404s (wrong token, unknown host) per client IP: slows token guessing; the
    # requests that find their URL are never counted.
    miss_rate: float = 10.0
    miss_burst: int = 50
    # New streams (client connections) per second per sandbox session.
    stream_rate: float = 10000.0
    stream_burst: int = 20000
    # Admin API requests per second: the clients with the admin token together, and those
    # without it together (a budget of its own, so they cannot spend the token holder's).
    admin_rate: float = 1000.0
    admin_burst: int = 2000
    # Admin API connections per client IP (of 256 in all; then 503 TOO_MANY_CONNECTIONS), so
    # that one peer cannot hold them all.
    admin_max_connections_per_ip: int = 64
    log_level: str = "info"
    log_format: str = "text"  # or "json": one object per line (tunneld/logs.py)
    access_log: bool = False
    # Request inspection (tunneld/inspect.py; on per sandbox or per exposure, never by default):
    # records kept per sandbox, body bytes kept per request and per response, all records of
    # this node together (bytes), and credentials headers replaced by "[redacted]".
    inspect_max_requests: int = 100
    inspect_body_bytes: int = 16 * 1024
    inspect_max_bytes: int = 64 * 1024 * 1024
    inspect_redact: bool = True
    # Durable exposures (tunneld/store.py). EdgeServer built directly keeps them in memory;
    # `tunneld serve` opens this store: sqlite in state_dir ("" = $STATE_DIRECTORY under
    # systemd, else ~/.local/state/tunneld), memory (gone at exit), or a Redis URL shared by
    # several edges (redis://host:port/db, rediss://, unix:///path; tunneld/redis_store.py).
    store: str = "sqlite"
    state_dir: str = ""
    max_exposures_per_sandbox: int = 128  # then 409 TOO_MANY_EXPOSURES
    # Sandboxes holding exposures on this edge (with a Redis store: as this node's view of it
    # counts them); an expose that would add one more is 409 TOO_MANY_SANDBOXES.
    max_sandboxes: int = 100_000
    # Cluster (a Redis store: several nodes share exposures; tunneld/cluster.py). Each node
    # listens for node-to-node links on node_host:node_port and registers node_advertise
    # (default node_host:port) for the others to dial; links use TLS when tls_cert is set
    # (the agent listener's certificate), checked against node_tls_ca by the dialing node.
    node_id: str = ""  # "" = {hostname}-{pid}-{random}: a restarted node is a new node
    node_host: str = "127.0.0.1"
    node_port: int = 7071
    node_advertise: str = ""  # host:port other nodes dial; "" = node_host and the bound port
    node_tls_ca: str = ""  # CA file for other nodes' certificates ("" = plain TCP links)
    lease_s: float = 15.0  # ownership lease of a sandbox's agent session, renewed every lease/3
    # Nodes of one host (workers) pass a public connection's socket to its owner instead of
    # relaying it over a node link (tunneld/handover.py); false: always the node link.
    handover: bool = True
    # Public raw TCP and TLS passthrough exposures (tunneld/tcpexpose.py), off by default:
    # "FIRST-LAST" ports handed to protocol "tcp" exposures, one each ("" = none), and routing
    # TLS by server name on the public HTTPS port to protocol "tls" exposures.
    public_tcp_ports: str = ""
    public_tls_passthrough: bool = False

    def validate(self) -> None:
        if self.scheme not in ("http", "https"):
            raise ConfigError(f"scheme must be http or https, not {self.scheme!r}")
        if self.parser not in ("auto", "httptools", "h11"):
            raise ConfigError(f"parser must be auto, httptools or h11, not {self.parser!r}")
        if not is_dns_name(self.domain):
            # a port, a scheme, a space...: the edge would start, then every expose would be
            # refused (INVALID_DOMAIN) or print a URL no client can use
            raise ConfigError(
                f"invalid domain {self.domain!r}: a DNS name is labels of a-z, 0-9 and '-' "
                "(1-63 each, not starting or ending with '-') joined by dots, with no port, "
                "scheme or path"
            )
        for name in ("public_host", "agent_host", "admin_host", "node_host"):
            check_listen_host(name, getattr(self, name))
        if not self.admin_token:
            raise ConfigError(
                "no admin token: set TUNNELD_ADMIN_TOKEN or admin_token_file in the config file"
            )
        if not self.secret:
            raise ConfigError(
                "no agent secret: set TUNNELD_SECRET or secret_file in the config file"
            )
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("tls_cert and tls_key go together")
        if not 1 <= self.h2_max_streams <= 1000:
            raise ConfigError(f"h2_max_streams must be 1-1000, not {self.h2_max_streams}")
        for what in ("public_tls", "admin_tls"):
            if bool(getattr(self, f"{what}_cert")) != bool(getattr(self, f"{what}_key")):
                raise ConfigError(f"{what}_cert and {what}_key go together")
        if self.public_tls_extra and not self.public_tls_cert:
            raise ConfigError("[[public_tls]] pairs need public_tls_cert/public_tls_key first")
        if self.public_redirect_port and not self.public_tls_cert:
            raise ConfigError("public_redirect_port redirects to HTTPS: set public_tls_cert")
        self._check_certificates()
        if not 0.2 <= self.heartbeat_interval < self.dead_timeout:
            # faster than 5 PINGs a second would trip the agents' PING budget (10/s)
            raise ConfigError(
                "heartbeat_interval must be at least 0.2 s and below dead_timeout "
                f"(got {self.heartbeat_interval} and {self.dead_timeout})"
            )
        if not 0 < self.control_rate < math.inf or self.control_burst < 1:
            raise ConfigError(
                "control_rate must be > 0 and finite and control_burst at least 1, "
                f"not {self.control_rate} and {self.control_burst}"
            )
        for kind in ("miss", "stream", "admin"):
            rate, burst = getattr(self, f"{kind}_rate"), getattr(self, f"{kind}_burst")
            if not 0 < rate < math.inf or burst < 1:
                # nan would pass "> 0" and then refill every bucket whole: no limit at all
                raise ConfigError(
                    f"{kind}_rate must be > 0 and finite and {kind}_burst at least 1, "
                    f"not {rate} and {burst}"
                )
        if self.log_level.lower() not in ("debug", "info", "warning", "error"):
            # any other name would fall back to info without a word (logging has no such level)
            raise ConfigError(
                f"log_level must be debug, info, warning or error, not {self.log_level!r}"
            )
        if self.max_streams < 1:
            # 0 would pass the start and then fail every agent's session as it connects
            raise ConfigError(f"max_streams must be at least 1, not {self.max_streams}")
        if self.log_format not in ("text", "json"):
            raise ConfigError(f"log_format must be text or json, not {self.log_format!r}")
        self._check_durations()
        if not 1 <= self.inspect_max_requests <= 100_000:
            raise ConfigError(
                f"inspect_max_requests must be 1-100000, not {self.inspect_max_requests}"
            )
        if not 0 <= self.inspect_body_bytes <= 16 * 1024 * 1024:
            raise ConfigError(f"inspect_body_bytes must be 0-16 MiB, not {self.inspect_body_bytes}")
        if self.inspect_max_bytes < 1024 * 1024:
            raise ConfigError(
                f"inspect_max_bytes must be at least 1 MiB, not {self.inspect_max_bytes}"
            )
        if self.max_connections < 1 or self.max_connections_per_ip < 1:
            raise ConfigError("max_connections and max_connections_per_ip must be at least 1")
        if self.max_pending_agents < 1:
            raise ConfigError(
                f"max_pending_agents must be at least 1, not {self.max_pending_agents}"
            )
        if not 1 <= self.admin_max_connections_per_ip <= ADMIN_MAX_CONNECTIONS:
            raise ConfigError(
                f"admin_max_connections_per_ip must be 1-{ADMIN_MAX_CONNECTIONS}, "
                f"not {self.admin_max_connections_per_ip}"
            )
        self.store = check_store(self.store)
        if not 1 <= self.max_exposures_per_sandbox <= 1024:
            # 1024: the most exposures one control message may list (protocol/control.py)
            raise ConfigError(
                f"max_exposures_per_sandbox must be 1-1024, not {self.max_exposures_per_sandbox}"
            )
        if self.max_sandboxes < 1:
            raise ConfigError(f"max_sandboxes must be at least 1, not {self.max_sandboxes}")
        if not 1.0 <= self.lease_s <= 300.0:
            raise ConfigError(f"lease_s must be 1-300 seconds, not {self.lease_s}")
        if self.node_advertise and self.node_advertise.rpartition(":")[2].isdigit() is False:
            raise ConfigError(f"node_advertise must be host:port, not {self.node_advertise!r}")
        if not 1 <= self.workers <= MAX_WORKERS:
            raise ConfigError(f"workers must be 1-{MAX_WORKERS} or auto, not {self.workers}")
        # workers > 1 with sqlite or memory: the supervisor runs a private redis-server for them
        # (tunneld/private_redis.py)
        for name in (
            "public_port",
            "agent_port",
            "admin_port",
            "node_port",
            "public_redirect_port",
            "url_port",
        ):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 65535:
                raise ConfigError(f"{name} must be 0-65535, not {value}")
        self._check_public_tcp()

    def _check_durations(self) -> None:
        """Seconds settings: a number, finite, and positive (or 0 where 0 means something)."""
        for name in (
            "head_timeout",
            "keepalive_timeout",
            "control_timeout",
            "handshake_timeout",
            "dead_timeout",
        ):
            value = getattr(self, name)
            if not 0 < value < math.inf:  # nan fails too
                raise ConfigError(f"{name} must be a number of seconds > 0, not {value}")
        for name in ("grace_period", "idle_timeout"):
            value = getattr(self, name)
            if not 0 <= value < math.inf:
                raise ConfigError(f"{name} must be a number of seconds >= 0, not {value}")

    def _check_public_tcp(self) -> None:
        from .tcpexpose import parse_port_range

        if self.public_tcp_ports:
            try:
                ports = parse_port_range(self.public_tcp_ports)
            except ValueError as exc:
                raise ConfigError(f"public_tcp_ports: {exc}") from None
            for name in ("public_port", "agent_port", "admin_port", "public_redirect_port"):
                if getattr(self, name) in ports:
                    raise ConfigError(f"public_tcp_ports must not include {name}")
        if self.public_tls_passthrough and not self.public_tls_cert:
            raise ConfigError(
                "public_tls_passthrough routes on the public HTTPS port: set public_tls_cert"
            )

    def _check_certificates(self) -> None:
        """Load every TLS pair once (readable, key matches): a bad file stops the start, or a
        reload, with a message naming it."""
        from .tls import load_pair, public_pairs

        for cert, key in public_pairs(self):
            load_pair(cert, key, "public_tls")
        if self.tls_cert:
            load_pair(self.tls_cert, self.tls_key, "tls")
        if self.admin_tls_cert:
            load_pair(self.admin_tls_cert, self.admin_tls_key, "admin_tls")


def parse_tls_pairs(value: object) -> tuple[tuple[str, str], ...]:
    """``[[public_tls]]`` tables ({cert, key}), or "cert:key,cert:key" from the environment."""
    if isinstance(value, str):
        items: list[object] = [p for p in (s.strip() for s in value.split(",")) if p]
        pairs = []
        for item in items:
            cert, sep, key = str(item).partition(":")
            if not (cert and sep and key):
                raise ConfigError(f"public_tls_extra: expected cert:key, not {item!r}")
            pairs.append((cert, key))
        return tuple(pairs)
    if isinstance(value, list):
        pairs = []
        for table in value:
            if not isinstance(table, dict) or set(table) != {"cert", "key"}:
                raise ConfigError(
                    "[[public_tls]]: each table holds exactly cert = ... and key = ..."
                )
            pairs.append((str(table["cert"]), str(table["key"])))
        return tuple(pairs)
    if isinstance(value, tuple):
        return value  # already parsed (overrides)
    raise ConfigError(f"public_tls: invalid value {value!r}")


# The admin API's connections in all (tunneld/admin.py); admin_max_connections_per_ip is at most it.
ADMIN_MAX_CONNECTIONS: Final = 256

# More worker processes than this is a typo, not a machine: one worker per core is the point.
MAX_WORKERS: Final = 1024


def parse_workers(value: object) -> int:
    """``workers`` from a flag, the environment or the config file: a count or ``auto`` (the
    number of cores). The range is checked by :meth:`Config.validate`."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text == "auto":
        return os.cpu_count() or 1
    if text.isdigit():
        return int(text)
    raise ConfigError(f"workers must be a number of processes or auto, not {value!r}")


def check_listen_host(name: str, value: str) -> None:
    """``value`` is an IP address, a host name or "" (every interface, IPv4 and IPv6: see
    tunneld/listen.py), else ConfigError: a port, a scheme or brackets would only fail at bind,
    as a name that does not resolve. A well-formed name that does not resolve does fail there
    (exit 1, naming the listener): DNS may only be down for now."""
    if value == "":
        return
    try:
        ipaddress.ip_address(value)
        return
    except ValueError:
        pass
    if value.replace(".", "").isdigit():  # 999.1.1.1 is no address, nor a name; 127.1 is one
        try:
            socket.inet_aton(value)
            return
        except OSError:
            pass
    if value.replace(".", "").isdigit() or not is_dns_name(value):
        raise ConfigError(
            f"{name} must be an IP address or a host name, not {value!r} (no port, scheme or "
            'brackets; "" for every interface)'
        )


def check_store(value: str) -> str:
    """``value`` if it names a store (sqlite, memory, or a Redis URL), else ConfigError."""
    if value in ("sqlite", "memory"):
        return value
    if "://" in value:
        from .redis_store import parse_redis_url

        try:
            parse_redis_url(value)
        except ValueError as exc:
            raise ConfigError(f"store: {exc}") from None
        return value
    from .redis_store import redact

    raise ConfigError(
        f"store must be sqlite or memory or a Redis URL (redis://host:port/db, rediss://..., "
        f"unix:///path/redis.sock), not {redact(value)!r}"
    )


_FIELD_TYPES = {f.name: f.type for f in fields(Config)}


def _coerce(name: str, value: Any) -> Any:
    kind = str(_FIELD_TYPES[name])
    if name == "workers":
        return parse_workers(value)
    if name == "public_tls_extra":
        return parse_tls_pairs(value)
    try:
        if kind == "bool":
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if kind == "int":
            return int(value)
        if kind == "int | None":
            return None if value in (None, "", "none") else int(value)
        if kind == "float":
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: invalid value {value!r} (expected {kind})") from None


def _toml_typed(path: str, key: str, value: Any) -> Any:
    """A TOML value of the setting's type: TOML has types, so `domain = 5` or `port = "80"` or
    `port = true` is a mistake to report, not a value to convert."""
    if key == "workers":  # a number or "auto" (parse_workers)
        return value
    kind = str(_FIELD_TYPES[key])
    expected: tuple[type, ...] | None = {
        "str": (str,),
        "bool": (bool,),
        "int": (int,),
        "int | None": (int,),
        "float": (int, float),
    }.get(kind)
    wrong_bool = isinstance(value, bool) and kind != "bool"
    if expected is not None and (wrong_bool or not isinstance(value, expected)):
        shown = {"str": "a string", "bool": "true or false", "float": "a number"}.get(
            kind, "an integer"
        )
        raise ConfigError(f"config file {path}: {key} must be {shown}, not {value!r}")
    return value


def _read_secret_file(path: object, what: str) -> str:
    if not isinstance(path, str) or not path:
        raise ConfigError(f"{what} must be the path of a file (a string), not {path!r}")
    try:
        return Path(path).read_text().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} file {path}: {exc.strerror}") from None


def load_config(
    path: str | None = None,
    overrides: dict[str, Any] | None = None,
    environ: dict[str, str] | None = None,
) -> Config:
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    if path:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path}: {exc}") from None
        for key, value in data.items():
            if key in ("admin_token_file", "secret_file"):
                values[key.removesuffix("_file")] = _read_secret_file(value, key)
            elif key in ("admin_token", "secret"):
                raise ConfigError(
                    f"config file {path}: put {key} in a file ({key}_file = ...) or the environment"
                )
            elif key == "public_tls":
                values["public_tls_extra"] = parse_tls_pairs(value)
            elif key in _FIELD_TYPES:
                values[key] = _coerce(key, _toml_typed(path, key, value))
            else:
                raise ConfigError(f"config file {path}: unknown setting {key!r}")
    for name in _FIELD_TYPES:
        env_value = env.get(f"TUNNELD_{name.upper()}")
        if env_value is not None:
            values[name] = _coerce(name, env_value)
    for name in ("admin_token", "secret"):
        # The environment beats the config file; a direct value beats a file named in the env.
        file_value = env.get(f"TUNNELD_{name.upper()}_FILE")
        if file_value and env.get(f"TUNNELD_{name.upper()}") is None:
            values[name] = _read_secret_file(file_value, name)
    for name, value in (overrides or {}).items():
        if value is not None:
            values[name] = _coerce(name, value)
    if "state_dir" in values and not str(values["state_dir"]).strip():
        # "" is how Config says "not set"; set to "" (an unset variable in a unit file, say) it
        # would put the database in the default place, not where the operator meant
        raise ConfigError(
            "state_dir is empty: set a directory, or leave it out for the default "
            "($STATE_DIRECTORY under systemd, else ~/.local/state/tunneld)"
        )
    if values.get("public_tls_cert") and values.get("scheme") is None:
        values["scheme"] = "https"  # preview URLs say what the listener serves, unless set
    config = dataclasses.replace(Config(), **values)
    config.validate()
    return config
