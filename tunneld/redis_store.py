"""The Redis store: exposures shared by several edges, a change feed, ownership leases, nodes.

Theory of operation
-------------------
Several tunneld nodes (event loops, on one host or many) share one Redis (or Valkey). Each node
keeps the registry's in-memory view as before: routing never waits on Redis. Redis holds the
exposures every node serves, tells the other nodes about each change, and holds the runtime
facts a cluster needs: which node owns a sandbox's agent session (a lease with a fencing epoch)
and which nodes are alive (records with a TTL).

Keys, under a prefix (``tunneld`` unless the URL says ``?prefix=NAME``; one Redis can hold
several clusters this way):

==================================  =============================================================
``{prefix}:exp:{sandbox_id}``       hash, field port -> JSON record ``{"created_at": 1.5,
                                    "token": "...", "name": null}`` (``created_at`` first, always;
                                    options only when set: ``"protocol"``, ``"proxy_protocol"``,
                                    ``"inspect"``, ``"public_port"``)
``{prefix}:sandboxes``              set of the sandbox ids that have a hash: its size is the
                                    count ``max_sandboxes`` caps
``{prefix}:changes``                pub/sub channel: one JSON message per change (below)
``{prefix}:owner:{sandbox_id}``     string ``"{epoch} {node_id}"`` with the lease as its TTL
``{prefix}:epochs``                 hash, sandbox_id -> last epoch handed out (never expires)
``{prefix}:node:{node_id}``         string, the node's JSON info, with a TTL
``{prefix}:nodes``                  set of node ids (members whose record expired are pruned)
``{prefix}:tcp_ports``              hash, public TCP port -> ``"{sandbox_id} {port} {unix time}"``:
                                    the claim of a ``tcp`` exposure on it (``claim_public_port``)
==================================  =============================================================

Every write is one Lua script (atomic, and one round trip) that changes the keys and PUBLISHes
the change: ``{"node": id, "op": "put", "sandbox_id", "port", "record"}``, ``"op": "delete"``,
or ``"op": "owner"`` with ``"owner": [node_id, epoch]`` or ``null`` (released). ``node`` is the
writer's id: a node ignores its own echoes. Lease expiry is not published (Redis does not tell
without keyspace notifications): a reader that cares asks :meth:`RedisStore.owner`. A put keeps
the ``created_at`` of an existing record, as every store does. ``max_sandboxes`` is enforced
by Redis, not by each node's view: the registry's put (:meth:`RedisStore.put_capped`) is
refused by its own script, nothing written nor published, when the sandbox is new to
``{prefix}:sandboxes`` and the set already holds the cap; nodes racing first exposes of
different sandboxes thus never take the cluster past the cap, and a delete that removes a
sandbox's last exposure frees its slot in the same script. The scripts build key names only
from their KEYS, except node pruning: a single Redis (or a primary with replicas), not Redis
Cluster.

Change feed. :meth:`RedisStore.watch` starts one background task that subscribes to the channel
on a connection of its own, then reads a full snapshot (every exposure and lease) and delivers it
as :class:`Resync`; after that, other nodes' changes as :class:`ExposurePut`,
:class:`ExposureDeleted` and :class:`OwnerChanged`, in Redis's order. Pub/sub loses whatever is
published while a subscriber is away, so after any loss of the connection (an error, or no
answer to the PING sent every ``ping_interval`` seconds: a hung Redis looks alive to TCP) the task
reconnects with jittered exponential backoff and delivers a fresh :class:`Resync`; it subscribes
before it reads, so nothing published in between is missed (a change may arrive twice: applying
one again changes nothing). The loss and the return of Redis are logged once each, not per try.
:meth:`RedisStore.caught_up` publishes a marker (op ``sync``, which nodes ignore as a change)
and waits for it to come back through this node's subscription: every change published before
it has then been applied (a node asks this before answering 404 for a URL it does not know).

Failures never hang a caller. Every command has a socket timeout (``timeout``, 2 s by default,
``?timeout=SECONDS`` in the URL) and an overall deadline; a broken pooled connection is retried
once (a Redis restart leaves every pooled connection dead), a timeout is not. Any failure raises
:class:`~tunneld.store.StoreError`, which the registry answers as 503 ``STORE_UNAVAILABLE``;
sessions already attached keep serving from the in-memory view meanwhile. A timeout is
ambiguous (a hung Redis that resumes still runs what it had read), so the echo of a write that
failed is delivered to its own node rather than ignored: the node's view follows what Redis
finally holds, as the other nodes' views do. A failed write is "nothing changed"
(``StoreError.outcome_unknown`` false) only when the connection pool says it never had a
connection to be sent on, or when it was one script call (or one command) that Redis refused
before running any of it, on every try: an error reply LOADING, MISCONF, NOPERM, READONLY, OOM,
NOREPLICAS, BUSY or NOSCRIPT (``_REFUSALS``; the message keeps Redis's words and adds what they
mean: "connected to a replica"...). Redis checks a script's commands against the ACL only as
they run, undoing none, so every write script checks its commands first (``_ACL_CHECK``). The
exception text cannot tell the rest: redis-py has no class for "could not connect", and after
its retry the exception is the reconnect's even when the first try reached Redis (see
``_Attempt``).

Durability. A put returns once Redis has applied it in memory. It survives a Redis crash only
if Redis writes its append-only file: ``appendonly yes`` with ``appendfsync always`` (each write
fsynced before Redis replies: a 2xx expose is on disk, as with SQLite), or ``appendfsync
everysec`` (the default: up to about a second of acknowledged writes can be lost in a crash or a
power loss). Redis 7.0 (Debian 12's) has no ``WAITAOF`` (7.2+), so tunneld cannot ask Redis to
confirm the fsync of a write: the guarantee is exactly what Redis's configuration gives, and
tunneld cannot check it beyond reading ``CONFIG GET`` (it warns at start when ``appendonly`` is
off). Replicas are asynchronous: a failover to a replica can lose the last writes either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import re
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Final, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit

import orjson
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    BusyLoadingError,
    NoPermissionError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError

from .store import StoredExposure, StoreError

__all__ = [
    "DEFAULT_PREFIX",
    "DEFAULT_TIMEOUT",
    "Change",
    "ExposureDeleted",
    "ExposurePut",
    "OwnerChanged",
    "RedisStore",
    "RedisURL",
    "Resync",
    "is_redis_url",
    "parse_redis_url",
]

log = logging.getLogger("tunneld.store")

REDIS_SCHEMES: Final = ("redis", "rediss", "unix")
DEFAULT_PREFIX: Final = "tunneld"
# Socket timeout of every command: long enough for a loaded Redis on a LAN (sub-millisecond
# normally), short enough that an admin request answers 503 well before a client gives up.
DEFAULT_TIMEOUT: Final = 2.0
MAX_TIMEOUT: Final = 60.0
# The feed PINGs its subscription this often; no answer within ping_interval + timeout = lost.
DEFAULT_PING_INTERVAL: Final = 1.0
# Reconnect backoff of the feed: from MIN to MAX seconds, doubling, each wait jittered (50-100 %).
BACKOFF_MIN: Final = 0.1
BACKOFF_MAX: Final = 5.0
# Connections one node opens for commands (the feed has one more): plenty for pipelined
# sub-millisecond commands, and 100 nodes stay far below Redis's default maxclients (10,000).
MAX_CONNECTIONS: Final = 32
# Sandboxes read per pipeline round trip when loading everything.
LOAD_CHUNK: Final = 500
# A whole snapshot (start-up, resync) is many commands: each still has the socket timeout, the
# whole gets this much (100,000 exposures load in well under a second on loopback).
LOAD_DEADLINE: Final = 60.0
_PREFIX_RE: Final = re.compile(r"[A-Za-z0-9_.:-]{1,64}")

T = TypeVar("T")


# -- URLs ------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class RedisURL:
    url: str  # what redis-py gets: our own query options removed
    location: str  # for logs and messages: the URL without its password
    prefix: str
    timeout: float


def is_redis_url(value: str) -> bool:
    return value.split("://", 1)[0].lower() in REDIS_SCHEMES and "://" in value


def parse_redis_url(value: str) -> RedisURL:
    """Check a ``redis://``, ``rediss://`` or ``unix://`` URL; ValueError says what is wrong.

    Our options ride in the query (``prefix``, ``timeout``); every other query option goes to
    redis-py unchanged (``db`` for unix sockets, ``ssl_cert_reqs`` for rediss...).
    """
    parts = urlsplit(value)
    scheme = parts.scheme.lower()
    if scheme not in REDIS_SCHEMES or "://" not in value:
        raise ValueError(
            f"not a Redis URL: {redact(value)!r} (redis://host:port/db, rediss://..., "
            "unix:///path/to/redis.sock)"
        )
    if scheme == "unix":
        if not parts.path:
            raise ValueError(f"{redact(value)}: a unix:// URL needs the socket path")
    else:
        if not parts.hostname:
            raise ValueError(f"{redact(value)}: the URL needs a host (redis://host:port/db)")
        try:
            parts.port  # noqa: B018 - raises on a bad port
        except ValueError:
            raise ValueError(f"{redact(value)}: bad port") from None
        db = parts.path.strip("/")
        if db and not db.isdigit():
            raise ValueError(f"{redact(value)}: the database must be a number, not {db!r}")
    prefix, timeout = DEFAULT_PREFIX, DEFAULT_TIMEOUT
    rest: list[tuple[str, str]] = []
    for key, val in parse_qsl(parts.query, keep_blank_values=True):
        if key == "prefix":
            if not _PREFIX_RE.fullmatch(val):
                raise ValueError(f"prefix must be 1-64 of A-Z a-z 0-9 _ . : -, not {val!r}")
            prefix = val
        elif key == "timeout":
            try:
                timeout = float(val)
            except ValueError:
                timeout = -1.0
            if not 0 < timeout <= MAX_TIMEOUT:
                raise ValueError(f"timeout must be a number of seconds in (0, 60], not {val!r}")
        else:
            rest.append((key, val))
    query = urlencode(rest, safe="/")  # ssl_ca_certs=/etc/... stays readable in messages
    # by hand: urlunsplit drops the "//" of an empty netloc (unix:///path -> unix:/path)
    clean = f"{parts.scheme}://{parts.netloc}{parts.path}" + (f"?{query}" if query else "")
    return RedisURL(clean, redact(clean), prefix, timeout)


def redact(url: str) -> str:
    """``url`` without its password (user names stay: they help to tell accounts apart)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rsplit("@", 1)[1]
    query = f"?{parts.query}" if parts.query else ""
    return f"{parts.scheme}://{user}:***@{host}{parts.path}{query}"


# -- the feed's events -----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ExposurePut:
    """Another node stored ``record`` (created_at as stored: an existing one's is kept)."""

    node: str
    record: StoredExposure


@dataclass(frozen=True, slots=True)
class ExposureDeleted:
    node: str
    sandbox_id: str
    port: int


@dataclass(frozen=True, slots=True)
class OwnerChanged:
    """``owner`` (node id, epoch) claimed the sandbox, or None: its owner released it."""

    node: str
    sandbox_id: str
    owner: tuple[str, int] | None


@dataclass(frozen=True, slots=True)
class Resync:
    """Everything Redis holds now: replace the view with it (after a (re)subscription)."""

    records: list[StoredExposure]
    owners: dict[str, tuple[str, int]]


Change = ExposurePut | ExposureDeleted | OwnerChanged | Resync


# -- scripts ---------------------------------------------------------------------------------------
# Every write script starts with this: Redis checks a script's commands against the user's ACL
# one by one as they run, and does not undo the earlier ones when a later one is refused (a
# user may HSET the hash but not SADD the set, or not PUBLISH to the channel: the record would
# be stored half-way, and no node told). So each command a script may write with is checked
# before its first write (redis.acl_check_cmd, Redis 7.0+; Redis 6 has none, and there a script
# can still be cut short by the ACL), and a refusal is a NOPERM reply, nothing written.
_ACL_CHECK: Final = """
local function denied(...)
  if redis.acl_check_cmd and not redis.acl_check_cmd(...) then
    local args = {...}
    return {err = "NOPERM this user has no permissions to run the '" .. string.lower(args[1])
      .. "' command on " .. args[2]}
  end
end
"""
# KEYS: exposure hash, sandboxes set. ARGV: sandbox id, port, created_at (JSON number), the
# record's JSON after created_at, channel, message head (the message up to "record":), and
# optionally max_sandboxes: a sandbox not in the set yet (its first exposure) is then refused,
# nothing written nor published, when the set already holds that many; the answer is then how
# many it holds (a number), else the record stored (a string).
_PUT_LUA: Final = (
    _ACL_CHECK
    + """
local refused = denied('HSET', KEYS[1], ARGV[2], '') or denied('SADD', KEYS[2], ARGV[1])
  or denied('PUBLISH', ARGV[5], '')
if refused then return refused end
local cap = tonumber(ARGV[7])
if cap and redis.call('SISMEMBER', KEYS[2], ARGV[1]) == 0 then
  local held = redis.call('SCARD', KEYS[2])
  if held >= cap then return held end
end
local created = ARGV[3]
local old = redis.call('HGET', KEYS[1], ARGV[2])
if old then
  local kept = string.match(old, '^{"created_at":([^,]+),')
  if kept then created = kept end
end
local value = '{"created_at":' .. created .. ',' .. ARGV[4]
redis.call('HSET', KEYS[1], ARGV[2], value)
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('PUBLISH', ARGV[5], ARGV[6] .. value .. '}')
return value
"""
)
# KEYS: exposure hash, sandboxes set. ARGV: sandbox id, port, channel, message. The sandbox
# leaves the set with its last exposure: the set's size is the count max_sandboxes caps.
_DELETE_LUA: Final = (
    _ACL_CHECK
    + """
local refused = denied('HDEL', KEYS[1], ARGV[2]) or denied('SREM', KEYS[2], ARGV[1])
  or denied('PUBLISH', ARGV[3], '')
if refused then return refused end
if redis.call('HDEL', KEYS[1], ARGV[2]) == 0 then return 0 end
if redis.call('EXISTS', KEYS[1]) == 0 then redis.call('SREM', KEYS[2], ARGV[1]) end
redis.call('PUBLISH', ARGV[3], ARGV[4])
return 1
"""
)
# KEYS: exposure hash, sandboxes set. ARGV: sandbox id. A member without a hash (its last field
# removed by hand: HDEL) leaves the set, so it no longer counts against max_sandboxes.
_PRUNE_LUA: Final = """
if redis.call('EXISTS', KEYS[1]) == 0 then return redis.call('SREM', KEYS[2], ARGV[1]) end
return 0
"""
# KEYS: owner key, epochs hash. ARGV: sandbox id, node id, lease ms, channel, message head.
_CLAIM_LUA: Final = (
    _ACL_CHECK
    + """
local refused = denied('HINCRBY', KEYS[2], ARGV[1], '1') or denied('SET', KEYS[1], '')
  or denied('PUBLISH', ARGV[4], '')
if refused then return refused end
local epoch = redis.call('HINCRBY', KEYS[2], ARGV[1], 1)
redis.call('SET', KEYS[1], epoch .. ' ' .. ARGV[2], 'PX', ARGV[3])
redis.call('PUBLISH', ARGV[4], ARGV[5] .. epoch .. ']}')
return epoch
"""
)
# KEYS: owner key. ARGV: "epoch node", lease ms.
_RENEW_LUA: Final = (
    _ACL_CHECK
    + """
local refused = denied('PEXPIRE', KEYS[1], '1')
if refused then return refused end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""
)
# KEYS: owner key. ARGV: "epoch node", channel, message.
_RELEASE_LUA: Final = (
    _ACL_CHECK
    + """
local refused = denied('DEL', KEYS[1]) or denied('PUBLISH', ARGV[2], '')
if refused then return refused end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', ARGV[2], ARGV[3])
  return 1
end
return 0
"""
)
# Public TCP port claims. KEYS: the tcp_ports hash. ARGV: port, the claim seen (or ""), the new
# claim. Compare-and-set: taken only when the field still holds what the caller saw.
_CLAIM_PORT_LUA: Final = (
    _ACL_CHECK
    + """
local refused = denied('HSET', KEYS[1], ARGV[1], '')
if refused then return refused end
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if (cur or '') ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
return 1
"""
)
# KEYS: the tcp_ports hash. ARGV: port, "{sandbox_id} {port} " (the claim's prefix).
_RELEASE_PORT_LUA: Final = (
    _ACL_CHECK
    + """
local refused = denied('HDEL', KEYS[1], ARGV[1])
if refused then return refused end
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur and string.sub(cur, 1, string.len(ARGV[2])) == ARGV[2] then
  redis.call('HDEL', KEYS[1], ARGV[1])
  return 1
end
return 0
"""
)
# close(): how many times the feed task is cancelled (waiting `timeout` each) before it is left.
FEED_STOP_ATTEMPTS: Final = 3
# A claim whose exposure is not stored with that port (a node died between claim and store, or
# a release was lost) is stale after this long, and another exposure may take the port.
PORT_CLAIM_GRACE: Final = 60.0
# KEYS: node key, nodes set. ARGV: node id, info JSON, ttl ms.
_REGISTER_NODE_LUA: Final = (
    _ACL_CHECK
    + """
local refused = denied('SET', KEYS[1], '') or denied('SADD', KEYS[2], ARGV[1])
if refused then return refused end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('SADD', KEYS[2], ARGV[1])
return 1
"""
)
# KEYS: nodes set. ARGV: node key prefix. Returns id, info, id, info... pruning expired ones.
_NODES_LUA: Final = """
local out = {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local info = redis.call('GET', ARGV[1] .. id)
  if info then
    out[#out + 1] = id
    out[#out + 1] = info
  else
    redis.call('SREM', KEYS[1], id)
  end
end
return out
"""


def default_node_id() -> str:
    """Unique per process and start: host, pid and a random part (a restarted node is new)."""
    host = socket.gethostname().split(".")[0] or "host"
    return f"{host}-{os.getpid()}-{secrets.token_hex(3)}"


# Redis's refusals of a command before it runs any of it, by error code (the reply's first word;
# redis-py strips it from the text of the classes it has), each with what it tells an operator.
# A script is refused before it starts or at its first write, never half-way: READONLY, OOM
# past maxmemory, MISCONF and NOREPLICAS are checked at a script's first write (every write
# script here only reads before it), an ACL at the call itself, and inside the script before
# its first write (``_ACL_CHECK``). NOSCRIPT: redis-py loads the script and sends it again; one
# that still surfaces did not run. BUSY: someone else's script runs past busy-reply-threshold;
# ours was not started. LOADING: Redis is reading its data after a restart (redis-py's
# BusyLoadingError, a ConnectionError: retried once, refused again).
_REFUSALS: Final = {
    "LOADING": "Redis is loading its data; try again",
    "MISCONF": "Redis refuses writes: its snapshot (RDB) is failing",
    "NOPERM": "the Redis user lacks permission for {command}",
    "READONLY": "connected to a replica",
    "OOM": "Redis is out of memory (maxmemory)",
    "NOREPLICAS": "Redis has fewer replicas than min-replicas-to-write",
    "BUSY": "a script is running in Redis past busy-reply-threshold; try again",
    "NOSCRIPT": "",
}
# The codes redis-py turns into classes (redis-py 5 keeps no ``status_code``).
_CODE_OF_CLASS: Final[tuple[tuple[type[RedisError], str], ...]] = (
    (BusyLoadingError, "LOADING"),
    (ReadOnlyError, "READONLY"),
    (OutOfMemoryError, "OOM"),
    (NoPermissionError, "NOPERM"),
    (NoScriptError, "NOSCRIPT"),
)
_NOPERM_RE: Final = re.compile(r"'([a-z|]+)' command(?: on (\S+))?", re.IGNORECASE)


def _error_code(exc: BaseException) -> str | None:
    """The error code of a Redis error reply (``exc``), or None when it is not one."""
    if not isinstance(exc, (ResponseError, BusyLoadingError)):
        return None
    code = getattr(exc, "status_code", None)
    if isinstance(code, str) and code:
        return code
    for kind, code in _CODE_OF_CLASS:
        if isinstance(exc, kind):
            return code
    word = str(exc).partition(" ")[0]
    return word if word.isalpha() and word.isupper() else None


def _refusal(exc: BaseException) -> str | None:
    """The code of ``exc`` when it is Redis refusing a command before running any of it."""
    code = _error_code(exc)
    return code if code in _REFUSALS else None


def _refusal_hint(exc: BaseException) -> str:
    code = _refusal(exc)
    if code is None or not _REFUSALS[code]:
        return ""
    text = str(exc)
    if code == "MISCONF" and "AOF" in text:
        return "; Redis refuses writes: writing its append-only file (AOF) fails"
    if code != "NOPERM":
        return f"; {_REFUSALS[code]}"
    named = _NOPERM_RE.search(text)
    if named is not None:
        command = named[1].upper() + (f" on {named[2]}" if named[2] else "")
    elif "channel" in text:
        command = "the change channel (PUBLISH)"
    elif "key" in text:
        command = "the keys it writes (its ACL key patterns)"
    else:
        command = "this command"
    return "; " + _REFUSALS[code].format(command=command)


class _Attempt:
    """What one store call (:meth:`RedisStore._call`) did, as the connection pool and the retry
    saw it: how many connections it took to send on (``connections``), whether taking one failed
    (``unconnected``), and how many tries failed, retried or given up, other than by Redis
    refusing the command (``unsure_tries``: a lost reply, a broken connection, a timeout).
    Until a call has a connection nothing of it can reach Redis."""

    __slots__ = ("connections", "unconnected", "unsure_tries")

    def __init__(self) -> None:
        self.connections = 0
        self.unconnected = False
        self.unsure_tries = 0

    def nothing_applied(self, exc: BaseException, one_command: bool) -> bool:
        """Whether the call, failed with ``exc``, certainly changed nothing in Redis: it never
        had a connection to send on, or it is ``one_command`` (a script call, whose NOSCRIPT
        redis-py answers by loading it and sending it again) that Redis refused before running
        it, on every try (LOADING is retried). Anything else (a command that may have been sent
        and then lost, a try lost before a refusal, a refusal after other commands, a failure
        this store did not see) may still be applied: the safe answer."""
        if self.connections == 0:
            return self.unconnected
        return one_command and self.unsure_tries == 0 and _refusal(exc) is not None


_ATTEMPT: Final[ContextVar[_Attempt | None]] = ContextVar("tunneld_redis_attempt", default=None)


class _Pool(aioredis.BlockingConnectionPool):
    """The command pool, telling the current store call (``_ATTEMPT``) whether it got a
    connection. The exception alone cannot say: redis-py has no class for "could not connect"
    (a ``ConnectionError`` whose message says "connecting to"), and when its retry reconnects
    after a command was sent on a connection that then broke, the exception raised is the
    reconnect's (say, connection refused), though Redis may have applied the command."""

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        attempt = _ATTEMPT.get()
        try:
            connection = await super().get_connection(*args, **kwargs)  # type: ignore[no-untyped-call]
            writer = getattr(connection, "_writer", None)
            if writer is not None and writer.transport.is_closing():
                # A pooled connection the server dropped: on Python 3.12+ writing on it raises
                # AttributeError, not a ConnectionError (CPython gh-136234: writelines() lacks
                # write()'s check). Disconnected, it reconnects or fails with a ConnectionError.
                await connection.disconnect(nowait=True)
        except BaseException:  # refused, timed out, no free connection in time, cancelled
            if attempt is not None:
                attempt.unconnected = True
            raise
        if attempt is not None:
            attempt.connections += 1
        return connection


class _Retry(Retry):
    """redis-py's retry, counting for the current store call (``_ATTEMPT``) the tries that
    failed other than by a refusal: after a retry, the exception raised is the last try's,
    whatever an earlier one sent, so a refusal then proves nothing about the first unless the
    first was refused too (LOADING, a ConnectionError to redis-py, is retried)."""

    async def call_with_retry(
        self,
        do: Callable[[], Awaitable[T]],
        fail: Callable[..., Any],
        is_retryable: Callable[[Exception], bool] | None = None,
        with_failure_count: bool = False,
    ) -> T:
        attempt = _ATTEMPT.get()
        if attempt is None:
            return await super().call_with_retry(do, fail, is_retryable, with_failure_count)

        def counted(error: Exception, *args: Any) -> Any:
            if _refusal(error) is None:
                attempt.unsure_tries += 1
            return fail(error, *args)

        return await super().call_with_retry(do, counted, is_retryable, with_failure_count)


def _caused_by(exc: BaseException, kind: type[BaseException]) -> bool:
    """Whether ``exc`` or an exception it was raised from (or while handling) is a ``kind``:
    redis-py wraps the socket's error in its own ``ConnectionError``, naming it only in text."""
    seen: BaseException | None = exc
    for _ in range(8):  # a chain is short; a cycle must not loop
        if seen is None:
            return False
        if isinstance(seen, kind):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError) and not str(exc):
        return "timed out"
    text = str(exc)
    code = _error_code(exc)
    if code is not None and not text.startswith(code):
        text = f"{code} {text}"  # Redis's own words: redis-py strips the code of its classes
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class RedisStore:
    """Exposures, leases and node records in Redis (see the module docstring)."""

    kind = "redis"

    def __init__(
        self,
        url: str,
        *,
        node_id: str | None = None,
        prefix: str | None = None,
        timeout: float | None = None,
        ping_interval: float = DEFAULT_PING_INTERVAL,
    ) -> None:
        """``url``: see :func:`parse_redis_url` (ValueError when it is not usable). Nothing
        connects here: the first command does (the edge's start-up ``load_all``)."""
        parsed = parse_redis_url(url)
        self.location = parsed.location
        self.node_id = node_id or default_node_id()
        self.prefix = prefix if prefix is not None else parsed.prefix
        self.timeout = timeout if timeout is not None else parsed.timeout
        self.ping_interval = ping_interval
        # Socket timeout per command; one retry on a broken pooled connection can double it.
        self._deadline = 2 * self.timeout + 0.5
        options: dict[str, Any] = {
            "socket_timeout": self.timeout,
            "socket_connect_timeout": self.timeout,
            "health_check_interval": 0,
        }
        # Typed Any: redis-py's stubs cannot know that decode_responses is off (bytes back).
        # A blocking pool: a burst of writes (1,000 concurrent exposes) queues for a connection
        # within the deadline instead of failing with "too many connections".
        pool = _Pool.from_url(
            parsed.url,
            max_connections=MAX_CONNECTIONS,
            timeout=self._deadline,
            retry=_Retry(NoBackoff(), 1, (RedisConnectionError,)),
            **options,
        )
        self._client: Any = aioredis.Redis.from_pool(pool)  # closing the client closes the pool
        # The feed's own client never retries: a reconnect must be seen, to resync after it.
        self._feed_client: Any = aioredis.Redis.from_url(
            parsed.url, retry=Retry(NoBackoff(), 0), **options
        )
        p = self.prefix
        self.channel = f"{p}:changes"
        self.sandboxes_key = f"{p}:sandboxes"
        self.epochs_key = f"{p}:epochs"
        self.nodes_key = f"{p}:nodes"
        self._put_script = self._client.register_script(_PUT_LUA)
        self._delete_script = self._client.register_script(_DELETE_LUA)
        self._prune_script = self._client.register_script(_PRUNE_LUA)
        self._claim_script = self._client.register_script(_CLAIM_LUA)
        self._renew_script = self._client.register_script(_RENEW_LUA)
        self._release_script = self._client.register_script(_RELEASE_LUA)
        self._register_node_script = self._client.register_script(_REGISTER_NODE_LUA)
        self._nodes_script = self._client.register_script(_NODES_LUA)
        self._claim_port_script = self._client.register_script(_CLAIM_PORT_LUA)
        self._release_port_script = self._client.register_script(_RELEASE_PORT_LUA)
        self._callbacks: list[Callable[[Change], None]] = []
        self._feed: asyncio.Task[None] | None = None
        self._closed = False
        # Writes that failed with an unknown outcome (a timeout: Redis may still apply them when
        # it recovers). Their echo is delivered, not ignored, so this node's view follows Redis.
        self._uncertain: set[tuple[str, int]] = set()
        self.feed_connected = False  # the feed is subscribed and has delivered its Resync
        self.resyncs = 0  # Resync events delivered so far (tests and metrics)
        self._resync_wanted = False  # a subscriber fell behind: resubscribe and resync
        # caught_up(): markers this node published, waiting to come back through the feed
        self._markers: dict[int, asyncio.Future[None]] = {}
        self._next_marker = 0

    @classmethod
    def from_url(cls, url: str, **options: Any) -> RedisStore:
        try:
            return cls(url, **options)
        except ValueError as exc:
            raise StoreError(f"store: {exc}") from None

    # -- key names -------------------------------------------------------------------------------
    def exposure_key(self, sandbox_id: str) -> str:
        return f"{self.prefix}:exp:{sandbox_id}"

    @property
    def tcp_ports_key(self) -> str:
        return f"{self.prefix}:tcp_ports"

    def owner_key(self, sandbox_id: str) -> str:
        return f"{self.prefix}:owner:{sandbox_id}"

    def node_key(self, node_id: str) -> str:
        return f"{self.prefix}:node:{node_id}"

    # -- calls -----------------------------------------------------------------------------------
    async def _call(
        self, what: str, operation: Awaitable[T], deadline: float = 0.0, one_command: bool = False
    ) -> T:
        """Await a Redis operation within the deadline; any failure is a StoreError, with
        ``outcome_unknown`` unless nothing of it can have been applied. ``one_command``: the
        operation is one command (a script call), so a refusal of it changed nothing."""
        if self._closed:
            if asyncio.iscoroutine(operation):
                operation.close()
            raise StoreError(f"redis at {self.location}: the store is closed")
        attempt = _Attempt()
        token = _ATTEMPT.set(attempt)
        try:
            async with asyncio.timeout(deadline or self._deadline):
                return await operation
        except (RedisError, OSError, TimeoutError) as exc:
            error = StoreError(
                f"redis at {self.location}: {what} failed ({_describe(exc)}){self._hint(exc)}"
            )
            # a write that may have reached Redis may still be applied (see _write)
            error.outcome_unknown = not attempt.nothing_applied(exc, one_command)
            raise error from None
        finally:
            _ATTEMPT.reset(token)

    def _hint(self, exc: BaseException) -> str:
        refused = _refusal_hint(exc)
        if refused:
            return refused
        # A TLS handshake Redis refuses often ends in a reset, not an alert (the client's first
        # command is already on its way): say what the reset may mean.
        if not _caused_by(exc, ConnectionResetError):
            return ""
        if self.location.startswith("redis://"):
            return "; a Redis that speaks TLS only resets plaintext clients: use rediss://"
        if self.location.startswith("rediss://") and "ssl_certfile=" not in self.location:
            return (
                "; a Redis with tls-auth-clients yes resets clients without a certificate: "
                "set ssl_certfile and ssl_keyfile"
            )
        return ""

    def _head(self, op: str, sandbox_id: str, **fields: Any) -> bytes:
        """The change message up to its last value (the scripts append it and the closing)."""
        body = orjson.dumps({"node": self.node_id, "op": op, "sandbox_id": sandbox_id, **fields})
        return body[:-1] + b","

    # -- Store -----------------------------------------------------------------------------------
    async def load_all(self) -> list[StoredExposure]:
        return await self._call("reading the exposures", self._load_all(), LOAD_DEADLINE)

    async def _load_all(self) -> list[StoredExposure]:
        client = self._client
        members = sorted(m.decode() for m in await client.smembers(self.sandboxes_key))
        records: list[StoredExposure] = []
        for start in range(0, len(members), LOAD_CHUNK):
            chunk = members[start : start + LOAD_CHUNK]
            async with client.pipeline(transaction=False) as pipe:
                for sandbox_id in chunk:
                    pipe.hgetall(self.exposure_key(sandbox_id))
                hashes = await pipe.execute()
            for sandbox_id, fields in zip(chunk, hashes, strict=True):
                if not fields:  # counted, but holds nothing: see _PRUNE_LUA
                    await self._prune_script(
                        keys=[self.exposure_key(sandbox_id), self.sandboxes_key], args=[sandbox_id]
                    )
                for port in sorted(int(p) for p in fields):
                    records.append(self._decode(sandbox_id, port, fields[str(port).encode()]))
        return records

    def _decode(self, sandbox_id: str, port: int, value: bytes) -> StoredExposure:
        try:
            return _record(sandbox_id, port, orjson.loads(value))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            raise StoreError(
                f"redis at {self.location}: {self.exposure_key(sandbox_id)} port {port} holds "
                f"an unreadable record {value[:80]!r}: fix or delete it (HDEL)"
            ) from None

    async def put(self, record: StoredExposure) -> None:
        """Store ``record``, whatever the number of sandboxes (a copy of stored exposures: the
        supervisor's, at a ``--workers`` start)."""
        await self._put(record, None)

    async def put_capped(self, record: StoredExposure, max_sandboxes: int) -> int | None:
        """Store ``record`` unless it is its sandbox's first exposure and ``max_sandboxes``
        sandboxes already hold exposures in Redis: then nothing is written and the answer is how
        many do (else None). The check and the write are one script, so nodes writing first
        exposures at the same moment cannot take Redis past the cap (``Registry`` answers the
        refusal as 409 TOO_MANY_SANDBOXES)."""
        return await self._put(record, max_sandboxes)

    async def _put(self, record: StoredExposure, max_sandboxes: int | None) -> int | None:
        created = orjson.dumps(record.created_at)
        fields = record.to_json()
        for key in ("sandbox_id", "port", "created_at"):
            del fields[key]
        tail = orjson.dumps(fields)[1:]  # token, name, then the options that are set
        head = self._head("put", record.sandbox_id, port=record.port) + b'"record":'
        args: list[Any] = [record.sandbox_id, record.port, created, tail, self.channel, head]
        if max_sandboxes is not None:
            args.append(max_sandboxes)
        result = await self._write(
            record.sandbox_id,
            record.port,
            f"storing {record.sandbox_id} port {record.port}",
            self._put_script(
                keys=[self.exposure_key(record.sandbox_id), self.sandboxes_key], args=args
            ),
            refused=lambda answer: isinstance(answer, int),
        )
        return result if isinstance(result, int) else None

    async def delete(self, sandbox_id: str, port: int) -> None:
        message = orjson.dumps(
            {"node": self.node_id, "op": "delete", "sandbox_id": sandbox_id, "port": port}
        )
        await self._write(
            sandbox_id,
            port,
            f"deleting {sandbox_id} port {port}",
            self._delete_script(
                keys=[self.exposure_key(sandbox_id), self.sandboxes_key],
                args=[sandbox_id, port, self.channel, message],
            ),
        )

    async def _write(
        self,
        sandbox_id: str,
        port: int,
        what: str,
        operation: Awaitable[Any],
        refused: Callable[[Any], bool] | None = None,
    ) -> Any:
        """The script's answer. ``refused``: whether that answer says it wrote nothing (a put
        past max_sandboxes), which supersedes no earlier write whose outcome is unknown."""
        key = (sandbox_id, port)
        try:
            result = await self._call(what, operation, one_command=True)
        except StoreError as exc:
            if exc.outcome_unknown:  # a refused write supersedes nothing: an uncertain one stays
                self._uncertain.add(key)
            raise
        if refused is None or not refused(result):
            self._uncertain.discard(key)  # this write superseded the uncertain one
        return result

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        feed = self._feed
        if feed is not None:
            # Bounded: a cancel can be swallowed inside a client's read (seen as a hung test
            # teardown); it is repeated, and past the attempts the task is left behind.
            for _ in range(FEED_STOP_ATTEMPTS):
                feed.cancel()
                await asyncio.wait({feed}, timeout=self.timeout)
                if feed.done():
                    break
            else:
                log.warning(
                    "redis change feed of %s did not stop after %d cancels; left behind",
                    self.location,
                    FEED_STOP_ATTEMPTS,
                )
            if feed.done() and not feed.cancelled():
                feed.exception()  # retrieved: it ended with an error we no longer care about
        for client in (self._client, self._feed_client):
            with contextlib.suppress(RedisError, OSError, TimeoutError):
                async with asyncio.timeout(self.timeout):
                    await client.aclose()

    async def check_durability(self) -> str | None:
        """A warning when Redis is not configured to keep writes across its own crash."""
        try:
            config = await self._call(
                "reading CONFIG", self._client.config_get("append*")
            )  # may be refused (renamed CONFIG): then we cannot tell
        except StoreError:
            return None
        appendonly = config.get(b"appendonly", config.get("appendonly"))
        if appendonly in (b"no", "no"):
            return (
                f"redis at {self.location} runs with appendonly no: exposures are lost if "
                "Redis restarts; set appendonly yes and appendfsync always (docs/operations.md)"
            )
        return None

    # -- public TCP ports: one exposure per port across every node -------------------------------
    async def claim_public_port(self, public_port: int, sandbox_id: str, port: int) -> bool:
        """Take ``public_port`` for ``sandbox_id``:``port``; False when another exposure holds
        it. Nodes (workers of one host with SO_REUSEPORT, or hosts) choosing at the same moment
        get different ports. A claim is stale, and taken over, when its exposure is not stored
        with that port and it is older than PORT_CLAIM_GRACE."""
        owner = f"{sandbox_id} {port} "
        key = self.tcp_ports_key
        current = await self._call(
            "reading a public port claim", self._client.hget(key, public_port)
        )
        seen = current.decode() if current is not None else ""
        if seen and not seen.startswith(owner) and not await self._stale(seen, public_port):
            return False
        claimed = await self._call(
            f"claiming public port {public_port}",
            self._claim_port_script(
                keys=[key], args=[public_port, seen, f"{owner}{int(time.time())}"]
            ),
            one_command=True,
        )
        return bool(claimed)

    async def _stale(self, claim: str, public_port: int) -> bool:
        try:
            sandbox_id, port, since = claim.split(" ")
            if time.time() - float(since) < PORT_CLAIM_GRACE:
                return False
            value = await self._call(
                "reading a claim's exposure",
                self._client.hget(self.exposure_key(sandbox_id), int(port)),
            )
        except ValueError:
            return True  # not a claim this code writes
        if value is None:
            return True
        try:
            return bool(orjson.loads(value).get("public_port") != public_port)
        except (orjson.JSONDecodeError, AttributeError):
            return True

    async def release_public_port(self, public_port: int, sandbox_id: str, port: int) -> None:
        """Drop the claim of ``sandbox_id``:``port`` on ``public_port`` (none: nothing)."""
        await self._call(
            f"releasing public port {public_port}",
            self._release_port_script(
                keys=[self.tcp_ports_key], args=[public_port, f"{sandbox_id} {port} "]
            ),
            one_command=True,
        )

    # -- ownership leases ------------------------------------------------------------------------
    async def claim(self, sandbox_id: str, node_id: str, lease_s: float) -> int:
        """Make ``node_id`` the owner for ``lease_s`` seconds; return its fencing epoch, higher
        than any epoch handed out for the sandbox before (the newest claimant wins)."""
        head = orjson.dumps(
            {"node": node_id, "op": "owner", "sandbox_id": sandbox_id, "owner": [node_id, 0]}
        )
        head = head[: head.rindex(b"0]}")]  # the script appends the epoch
        epoch = await self._call(
            f"claiming {sandbox_id}",
            self._claim_script(
                keys=[self.owner_key(sandbox_id), self.epochs_key],
                args=[sandbox_id, node_id, _ms(lease_s), self.channel, head],
            ),
            one_command=True,
        )
        return int(epoch)

    async def renew(self, sandbox_id: str, node_id: str, epoch: int, lease_s: float) -> bool:
        """Extend the lease; False when it is gone or another claim replaced it: stop serving."""
        renewed = await self._call(
            f"renewing {sandbox_id}",
            self._renew_script(
                keys=[self.owner_key(sandbox_id)], args=[f"{epoch} {node_id}", _ms(lease_s)]
            ),
            one_command=True,
        )
        return bool(renewed)

    async def release(self, sandbox_id: str, node_id: str, epoch: int) -> bool:
        """Drop the lease if it is still ``node_id``'s at ``epoch`` (True when it was)."""
        message = orjson.dumps(
            {"node": node_id, "op": "owner", "sandbox_id": sandbox_id, "owner": None}
        )
        released = await self._call(
            f"releasing {sandbox_id}",
            self._release_script(
                keys=[self.owner_key(sandbox_id)],
                args=[f"{epoch} {node_id}", self.channel, message],
            ),
            one_command=True,
        )
        return bool(released)

    async def owner(self, sandbox_id: str) -> tuple[str, int] | None:
        value = await self._call(
            f"reading {sandbox_id}'s owner", self._client.get(self.owner_key(sandbox_id))
        )
        return _parse_owner(value)

    async def _owners(self) -> dict[str, tuple[str, int]]:
        keys: list[bytes] = [
            k async for k in self._client.scan_iter(match=f"{self.prefix}:owner:*", count=1000)
        ]
        owners: dict[str, tuple[str, int]] = {}
        cut = len(self.owner_key(""))
        for start in range(0, len(keys), LOAD_CHUNK):
            chunk = keys[start : start + LOAD_CHUNK]
            for key, value in zip(chunk, await self._client.mget(chunk), strict=True):
                owner = _parse_owner(value)
                if owner is not None:
                    owners[key.decode()[cut:]] = owner
        return owners

    # -- node records ----------------------------------------------------------------------------
    async def register_node(self, node_id: str, info: dict[str, Any], ttl_s: float) -> None:
        await self._call(
            f"registering node {node_id}",
            self._register_node_script(
                keys=[self.node_key(node_id), self.nodes_key],
                args=[node_id, orjson.dumps(info), _ms(ttl_s)],
            ),
            one_command=True,
        )

    async def renew_node(self, node_id: str, ttl_s: float) -> bool:
        """Extend the record's TTL; False when it expired meanwhile (register again)."""
        return bool(
            await self._call(
                f"renewing node {node_id}",
                self._client.pexpire(self.node_key(node_id), _ms(ttl_s)),
                one_command=True,
            )
        )

    async def unregister_node(self, node_id: str) -> None:
        async def both() -> None:
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.delete(self.node_key(node_id))
                pipe.srem(self.nodes_key, node_id)
                await pipe.execute()

        await self._call(f"unregistering node {node_id}", both())

    async def nodes(self) -> dict[str, dict[str, Any]]:
        """Every node whose record has not expired: node id -> the info it registered."""
        flat = await self._call(
            "listing nodes",
            self._nodes_script(keys=[self.nodes_key], args=[self.node_key("")]),
        )
        result: dict[str, dict[str, Any]] = {}
        for i in range(0, len(flat), 2):
            with contextlib.suppress(orjson.JSONDecodeError):
                result[flat[i].decode()] = orjson.loads(flat[i + 1])
        return result

    # -- change feed -----------------------------------------------------------------------------
    def watch(self, callback: Callable[[Change], None]) -> None:
        """Call ``callback`` on the event loop with every change of other nodes, and with a
        :class:`Resync` after each (re)subscription, the first one included. Started once; the
        task runs until :meth:`close`. A callback that raises is logged and kept."""
        self._callbacks.append(callback)
        if self._feed is None and not self._closed:
            self._feed = asyncio.get_running_loop().create_task(
                self._run_feed(), name=f"tunneld-redis-feed {self.location}"
            )

    def unwatch(self, callback: Callable[[Change], None]) -> None:
        with contextlib.suppress(ValueError):
            self._callbacks.remove(callback)

    def request_resync(self) -> None:
        """Deliver a fresh :class:`Resync` soon (a subscriber dropped changes it could not keep
        up with): the feed resubscribes and reads a new snapshot, as after a reconnect."""
        self._resync_wanted = True

    def _emit(self, change: Change) -> None:
        for callback in list(self._callbacks):
            try:
                callback(change)
            except Exception:
                log.exception("redis change feed: a subscriber failed on %s", type(change).__name__)

    async def _run_feed(self) -> None:
        loop = asyncio.get_running_loop()
        lost_at: float | None = None
        delay = 0.0
        while True:
            pubsub = self._feed_client.pubsub()
            try:
                async with asyncio.timeout(self._deadline):
                    await pubsub.subscribe(self.channel)
                    while True:  # the confirmation: from here on nothing published is missed
                        message = await pubsub.get_message(timeout=self.timeout)
                        if message is not None and message["type"] == "subscribe":
                            break
                async with asyncio.timeout(LOAD_DEADLINE):
                    records = await self._load_all()
                    owners = await self._owners()
                if lost_at is not None:
                    log.info(
                        "redis at %s is back after %.1fs: resynced %d exposures",
                        self.location,
                        loop.time() - lost_at,
                        len(records),
                    )
                lost_at, delay = None, 0.0
                self.feed_connected = True
                self.resyncs += 1
                self._emit(Resync(records, owners))
                await self._listen(pubsub)
            except asyncio.CancelledError:
                raise
            except _ResyncWanted:
                log.info("redis change feed: resubscribing for a fresh snapshot")
                continue  # at once, no backoff: Redis is fine
            except Exception as exc:  # anything: the feed must outlive every failure
                self.feed_connected = False
                if lost_at is None:
                    lost_at = loop.time()
                    log.warning(
                        "redis at %s unreachable (%s): serving the exposures in memory; "
                        "changes answer 503 STORE_UNAVAILABLE until it is back",
                        self.location,
                        _describe(exc),
                    )
                delay = min(BACKOFF_MAX, max(BACKOFF_MIN, delay * 2))
                await asyncio.sleep(random.uniform(delay / 2, delay))
            finally:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(self.timeout):
                        await pubsub.aclose()

    async def _listen(self, pubsub: Any) -> None:
        """Deliver messages until the subscription fails or stops answering PINGs (raises)."""
        loop = asyncio.get_running_loop()
        last_heard = next_ping = loop.time()
        self._resync_wanted = False  # the snapshot just delivered is that fresh one
        while True:
            if self._resync_wanted:
                raise _ResyncWanted
            message = await pubsub.get_message(timeout=max(0.0, next_ping - loop.time()) or 0.001)
            now = loop.time()
            if message is not None:
                last_heard = now
                if message["type"] == "message":
                    self._receive(message["data"])
            if now >= next_ping:
                if now - last_heard > self.ping_interval + self.timeout:
                    raise TimeoutError(f"no answer to PING for {now - last_heard:.1f}s")
                async with asyncio.timeout(self.timeout):
                    await pubsub.ping()
                next_ping = now + self.ping_interval

    async def caught_up(self, timeout: float) -> bool:
        """Wait until the change feed has delivered every change published before this call.

        A marker is published on the channel now; Redis delivers a channel's messages to each
        subscriber in the order it ran the PUBLISHes, so when the marker comes back through this
        node's subscription, every earlier change (an expose another node answered before this
        call) has been delivered, and applied: the feed applies each message before reading
        the next. False: the feed is not connected, Redis fails, or no marker within
        ``timeout`` (it is lost if the subscription reconnects meanwhile)."""
        if not self.feed_connected or self._closed:
            return False
        self._next_marker += 1
        token = self._next_marker
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._markers[token] = future
        marker = orjson.dumps({"op": "sync", "node": self.node_id, "sandbox_id": "", "n": token})
        try:
            async with asyncio.timeout(timeout):
                await self._client.publish(self.channel, marker)
                await future
        except (TimeoutError, RedisError, OSError):
            return False
        finally:
            self._markers.pop(token, None)
        return True

    def _marker(self, data: bytes) -> None:
        """One of caught_up's markers came back: it and every earlier one are through."""
        try:
            message = orjson.loads(data)
            token = int(message["n"]) if message["node"] == self.node_id else 0
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return
        for n in [n for n in self._markers if n <= token]:
            future = self._markers.pop(n)
            if not future.done():
                future.set_result(None)

    def _receive(self, data: bytes) -> None:
        if data.startswith(b'{"op":"sync"'):
            self._marker(data)  # (other nodes' markers too: not a change)
            return
        try:
            change = _parse_change(data)
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            log.warning("redis change feed: unreadable message %r (%s)", data[:120], exc)
            return
        if change is None:
            return
        if change.node == self.node_id:
            if not isinstance(change, (ExposurePut, ExposureDeleted)):
                return
            key = (
                (change.record.sandbox_id, change.record.port)
                if isinstance(change, ExposurePut)
                else (change.sandbox_id, change.port)
            )
            if key not in self._uncertain:
                return  # our own echo: the writer already has it
            self._uncertain.discard(key)
        self._emit(change)


class _ResyncWanted(Exception):
    """Internal: leave the subscription loop to resubscribe (:meth:`RedisStore.request_resync`)."""


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _record(sandbox_id: str, port: int, r: dict[str, Any]) -> StoredExposure:
    """A stored record from its JSON (KeyError/TypeError/ValueError when malformed); the
    options' values are checked by the registry like any stored record's."""
    return StoredExposure(
        sandbox_id,
        port,
        r["token"],
        r["name"],
        float(r["created_at"]),
        r.get("protocol", "http"),
        r.get("proxy_protocol", False),
        r.get("inspect", False),
        r.get("public_port"),
    )


def _parse_owner(value: bytes | None) -> tuple[str, int] | None:
    if value is None:
        return None
    epoch, _, node = value.decode().partition(" ")
    return node, int(epoch)


def _parse_change(data: bytes) -> ExposurePut | ExposureDeleted | OwnerChanged | None:
    message = orjson.loads(data)
    op = message["op"]
    node = str(message["node"])
    sandbox_id = str(message["sandbox_id"])
    if op == "put":
        return ExposurePut(node, _record(sandbox_id, int(message["port"]), message["record"]))
    if op == "delete":
        return ExposureDeleted(node, sandbox_id, int(message["port"]))
    if op == "owner":
        owner = message["owner"]
        return OwnerChanged(node, sandbox_id, None if owner is None else (owner[0], int(owner[1])))
    return None  # a newer node's message kind: not ours to act on
