"""Where the shared session store is: its URL forms, and the redis-py client each one gets.

    redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]           one Redis (rediss:// for TLS)
    unix://[[USER]:PASSWORD@]/PATH/redis.sock[?db=DB]    one Redis on a Unix socket
    redis+sentinel://[[USER]:PASSWORD@]HOST:PORT[,HOST:PORT...]/MASTER[/DB]
                                                         the master Sentinel names (it follows
                                                         failovers; rediss+sentinel:// for TLS)
    redis+cluster://[[USER]:PASSWORD@]HOST:PORT[,HOST:PORT...]
                                                         a Redis Cluster (rediss+cluster://)

The password is better given by `--session-store-password-file` or
LSTM_SERVE_SESSION_STORE_PASSWORD than in the URL (either way it is never printed); it
authenticates to the Redis nodes, not to the sentinels (Sentinel itself runs without a password;
the NetworkPolicy of the deploy overlay is what keeps others out). TLS material comes from
`--session-store-tls-ca/-cert/-key` (files), not from URL parameters. No gRPC here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

SINGLE, SENTINEL, CLUSTER = "single", "sentinel", "cluster"
SCHEMES = {
    "redis": (SINGLE, False),
    "rediss": (SINGLE, True),
    "unix": (SINGLE, False),
    "redis+sentinel": (SENTINEL, False),
    "rediss+sentinel": (SENTINEL, True),
    "redis+cluster": (CLUSTER, False),
    "rediss+cluster": (CLUSTER, True),
}
DEFAULT_PORTS = {SINGLE: 6379, SENTINEL: 26379, CLUSTER: 6379}
# Connections per pod (per node with Cluster). redis-py's default pools hold 100 and fail at
# once beyond it (MaxConnectionsError), which a pod taking over a killed one's sessions exceeds;
# one Redis gets a pool that waits (within the operation's deadline) instead.
MAX_CONNECTIONS = 512


@dataclass(frozen=True)
class StoreTarget:
    """A parsed store URL."""

    kind: str
    tls: bool
    url: str = field(repr=False)  # the URL as given (single Redis: redis-py parses it)
    nodes: tuple[tuple[str, int], ...] = ()
    master: str = ""
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class StoreOptions:
    """How to reach the store: the deadline of one operation and the credentials."""

    timeout_s: float = 1.0
    password: str | None = field(default=None, repr=False)  # overrides the URL's
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""


def parse_store_url(url: str) -> StoreTarget:
    """The store a URL names; ValueError (naming the part) if it is not one of the forms."""
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES or "://" not in url:
        raise ValueError(f"scheme {parts.scheme!r} is not one of {sorted(SCHEMES)}")
    kind, tls = SCHEMES[parts.scheme]
    netloc = parts.netloc
    creds, _, hosts = netloc.rpartition("@")
    username = password = None
    if creds:
        user, _, pw = creds.partition(":")
        username, password = unquote(user) or None, unquote(pw) or None
    if kind == SINGLE:
        return StoreTarget(kind, tls, url, username=username, password=password)
    nodes = tuple(_node(h, DEFAULT_PORTS[kind]) for h in hosts.split(",") if h)
    if not nodes:
        raise ValueError(f"{parts.scheme}:// names no HOST:PORT")
    path = [p for p in parts.path.split("/") if p]
    master, db = "", 0
    if kind == SENTINEL:
        if not path or len(path) > 2:
            raise ValueError(f"{parts.scheme}:// needs /MASTER_NAME[/DB] after the sentinels")
        master = unquote(path[0])
        db = _db(path[1]) if len(path) == 2 else 0
    elif path:
        raise ValueError("redis+cluster:// takes no /DB (a cluster has database 0 only)")
    return StoreTarget(kind, tls, url, nodes, master, db, username, password)


def _node(text: str, default_port: int) -> tuple[str, int]:
    host, _, port = text.rpartition(":") if ":" in text else (text, "", "")
    if not host:
        raise ValueError(f"node {text[:64]!r} is not HOST:PORT")
    try:
        return host.strip("[]"), int(port) if port else default_port
    except ValueError:
        raise ValueError(f"node {text[:64]!r}: port {port[:16]!r} is not a number") from None


def _db(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"database {text[:16]!r} is not a number") from None


def _retry() -> Retry:
    """A failed connection or a timeout is retried twice, after 10 and 20 ms (capped at 200 ms);
    the operation's deadline (StoreOptions.timeout_s) bounds it all."""
    return Retry(ExponentialBackoff(cap=0.2, base=0.01), 2)


def _common(target: StoreTarget, options: StoreOptions) -> dict[str, Any]:
    timeout = options.timeout_s
    kwargs: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": _retry(),
        "retry_on_error": [RedisConnectionError, RedisTimeoutError],
        "health_check_interval": 30,
        "decode_responses": False,
    }
    password = options.password or target.password
    if password:
        kwargs["password"] = password
    if target.username:
        kwargs["username"] = target.username
    if target.tls:
        kwargs.update(_tls(options))
    return kwargs


def _tls(options: StoreOptions) -> dict[str, Any]:
    tls: dict[str, Any] = {"ssl_cert_reqs": "required"}
    if options.tls_ca:
        tls["ssl_ca_certs"] = options.tls_ca
    if options.tls_cert:
        tls["ssl_certfile"] = options.tls_cert
        tls["ssl_keyfile"] = options.tls_key
    return tls


def connect(target: StoreTarget, options: StoreOptions) -> Any:
    """The redis-py asyncio client for `target` (a Redis or a RedisCluster; lazy: nothing is
    contacted until the first command)."""
    kwargs = _common(target, options)
    if target.kind == SINGLE:
        pool = aioredis.BlockingConnectionPool.from_url(
            target.url, max_connections=MAX_CONNECTIONS, timeout=options.timeout_s, **kwargs
        )
        return aioredis.Redis(connection_pool=pool)
    if target.kind == CLUSTER:
        kwargs.pop("retry_on_error")
        kwargs.pop("health_check_interval")
        nodes = [ClusterNode(host, port) for host, port in target.nodes]
        return RedisCluster(startup_nodes=nodes, max_connections=MAX_CONNECTIONS, **kwargs)
    sentinel_kwargs: dict[str, Any] = {
        "socket_timeout": options.timeout_s,
        "socket_connect_timeout": options.timeout_s,
    }
    if target.tls:
        sentinel_kwargs.update({"ssl": True, **_tls(options)})
        kwargs["ssl"] = True
    sentinel = Sentinel(list(target.nodes), sentinel_kwargs=sentinel_kwargs, **kwargs)
    return sentinel.master_for(target.master, db=target.db, max_connections=MAX_CONNECTIONS)
