"""Callers: bearer tokens from a file (or the client certificate's CN), and the gRPC interceptor.

The token file has one `principal:token` per line (`#` comments, blank lines). Only the SHA-256
of each token is kept; a presented token's digest is compared with every stored digest by
`hmac.compare_digest` (no early exit). The file is re-read when its stamp changes (checked on
each request); a file that does not parse keeps the previous tokens (one error logged).

`Authenticator.authenticate(...)` is shared by both fronts: the gRPC interceptor below and the
aiohttp middleware (service/security/http.py). Health needs no credentials (Kubernetes probes).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import inspect
import logging
import os
import re
import threading
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from service import metrics, principal
from service.errors import ConfigError

log = logging.getLogger(__name__)

PRINCIPAL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}")  # tokens' and certificates'
PRINCIPAL_CHAR_RE = re.compile(r"[A-Za-z0-9._@+-]")
HEALTH_PREFIX = "/grpc.health.v1.Health/"
MAX_CERT_LABELS = 64  # principals from certificates counted by name; the rest as "<other>"
OTHER = "<other>"
FIRST_MESSAGE_WAIT_S = 1.0  # a refused stream waits this long for its first message
MAX_METHOD_LOGGED = 128  # an unknown method's name, as logged


class Unauthenticated(Exception):
    """No, a malformed or an unknown credential; `reason` is a metric label, str() the message.
    Neither ever contains the token."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


MISSING = Unauthenticated(
    "missing", "credentials required: send 'authorization: Bearer TOKEN' (see --auth-tokens)"
)
MALFORMED = Unauthenticated(
    "malformed", "malformed authorization: expected 'Bearer TOKEN' (one token, no spaces)"
)
UNKNOWN = Unauthenticated("unknown", "the bearer token is not valid")
NO_CERT = Unauthenticated(
    "no_certificate", "credentials required: a bearer token or a verified client certificate"
)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


def parse_tokens(text: str, source: str) -> list[tuple[bytes, str]]:
    """[(sha256(token), principal)] from the file's text; errors name the line, never the token."""
    entries: list[tuple[bytes, str]] = []
    seen: dict[bytes, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, token = line.partition(":")
        name, token = name.strip(), token.strip()
        where = f"{source} line {number}"
        if not sep or not token:
            raise ConfigError(f"{where}: expected 'principal:token'")
        if not PRINCIPAL_RE.fullmatch(name):
            raise ConfigError(
                f"{where}: principal {name[:64]!r} must be 1-64 of A-Z a-z 0-9 . _ @ + - "
                "(starting with a letter or digit)"
            )
        if any(c.isspace() for c in token) or not token.isprintable():
            raise ConfigError(f"{where}: the token of {name!r} holds spaces or control characters")
        digest = _digest(token)
        if digest in seen and seen[digest] != name:
            raise ConfigError(f"{where}: {name!r} has the same token as {seen[digest]!r}")
        seen[digest] = name
        entries.append((digest, name))
    return entries


class TokenFile:
    """--auth-tokens: the principals and their token digests, re-read when the file changes."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp = self._stat()
        self._entries = self._read()
        self._names = frozenset(name for _digest, name in self._entries)
        self._refused: tuple[int, int, int] | None = None
        self.reloads = 0

    def _stat(self) -> tuple[int, int, int]:
        try:
            st = os.stat(self.path)
        except OSError:
            return (-1, -1, -1)
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _read(self) -> list[tuple[bytes, str]]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or type(exc).__name__
            raise ConfigError(f"cannot read --auth-tokens {str(self.path)!r}: {reason}") from None
        return parse_tokens(text, f"--auth-tokens {str(self.path)!r}")

    def _refresh(self) -> list[tuple[bytes, str]]:
        stamp = self._stat()
        if stamp == self._stamp or stamp == self._refused:
            return self._entries
        with self._lock:
            if stamp == self._stamp:
                return self._entries
            try:
                entries = self._read()
            except ConfigError as exc:  # mid-rotation or a bad edit: keep the previous tokens
                self._refused = stamp
                log.error("token file not reloaded", extra={"fields": {"error": str(exc)}})
                return self._entries
            self._stamp, self._entries = stamp, entries
            self._names = frozenset(name for _digest, name in entries)
            self.reloads += 1
            log.info("token file reloaded", extra={"fields": {
                "path": str(self.path), "principals": len(self.principals()),
            }})  # fmt: skip
            return entries

    def principals(self) -> frozenset[str]:
        return self._names

    def lookup(self, token: str) -> str | None:
        """The principal whose token this is, compared in constant time against every entry."""
        presented = _digest(token)
        found = None
        for digest, name in self._refresh():
            if hmac.compare_digest(presented, digest):
                found = name
        return found


def bearer_token(header: str) -> str:
    """The token of an `authorization` value 'Bearer TOKEN' (scheme in any case)."""
    scheme, _sep, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or any(c.isspace() for c in token):
        raise MALFORMED
    return token


@dataclass(frozen=True)
class Authenticator:
    """Who a request is: its bearer token's principal, else (with --principal-from-cert) the
    verified client certificate's CN."""

    tokens: TokenFile | None
    principal_from_cert: bool = False

    def authenticate(self, authorization: str | None, cert_cn: str | None) -> str:
        if authorization is not None and self.tokens is not None:
            found = self.tokens.lookup(bearer_token(authorization))
            if found is None:
                raise UNKNOWN
            return found
        if self.principal_from_cert:
            if cert_cn:
                return certificate_principal(cert_cn)
            raise NO_CERT if self.tokens is None else MISSING
        if authorization is not None:
            raise MALFORMED
        raise MISSING

    def label(self, name: str) -> str:
        """A bounded metric label: token principals come from the file, CNs are capped."""
        if self.tokens is not None and name in self.tokens.principals():
            return name
        return _cert_label(name)


def certificate_principal(cn: str) -> str:
    """A client certificate's CN as a principal: the rules of token principals (1-64 of
    A-Z a-z 0-9 . _ @ + -, starting with a letter or digit), else Unauthenticated saying why,
    without the CN itself (it may hold newlines or bidi controls)."""
    if PRINCIPAL_RE.fullmatch(cn):
        return cn
    raise Unauthenticated(
        "bad_certificate_name",
        f"the client certificate's CN is not a valid principal: {_why_not(cn)}; a CN must be "
        "1-64 of A-Z a-z 0-9 . _ @ + - (starting with a letter or digit), or send a bearer token",
    )


def _why_not(cn: str) -> str:
    """What breaks the principal rules, naming characters by code point (U+000A), never as is."""
    if len(cn) > 64:
        return f"{len(cn)} characters (at most 64)"
    if not PRINCIPAL_RE.fullmatch(cn[0]):
        return f"it starts with U+{ord(cn[0]):04X}"
    where, bad = next((i, c) for i, c in enumerate(cn) if not PRINCIPAL_CHAR_RE.fullmatch(c))
    return f"U+{ord(bad):04X} at position {where + 1}"


_CERT_LABELS: set[str] = set()


def _cert_label(name: str) -> str:
    if name in _CERT_LABELS:
        return name
    if len(_CERT_LABELS) < MAX_CERT_LABELS:
        _CERT_LABELS.add(name)
        return name
    return OTHER


def build_authenticator(auth_tokens: str, principal_from_cert: bool) -> Authenticator | None:
    """The configured authentication; None = off (every caller is principal.ANONYMOUS)."""
    if not auth_tokens and not principal_from_cert:
        return None
    return Authenticator(TokenFile(Path(auth_tokens)) if auth_tokens else None,
                         principal_from_cert)  # fmt: skip


# -- gRPC ----------------------------------------------------------------------------------------


def _grpc_protocol(method: str) -> str:
    return metrics.PROTOCOL_KSERVE_GRPC if method.startswith("/inference.") else \
        metrics.PROTOCOL_NATIVE  # fmt: skip


# A call the native front passed through names its client certificate's CN here; believed only
# from a Unix-socket peer (the front, through --native-front-dir's private grpc.sock).
FRONT_CERT_CN = "lstm-serve-native-cert-cn-bin"


def _grpc_caller(auth: Authenticator, context: grpc.aio.ServicerContext) -> str:
    authorization, fronted = None, None
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            authorization = value if isinstance(value, str) else "<binary>"
        elif key == FRONT_CERT_CN and isinstance(value, bytes):
            fronted = value
    common_names = (context.auth_context() or {}).get("x509_common_name") or []
    if not common_names and fronted is not None and context.peer().startswith("unix:"):
        common_names = [fronted]
    cn = common_names[0].decode("utf-8", "replace") if common_names else None
    return auth.authenticate(authorization, cn)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Every RPC but health names its caller: the handler runs with principal.CALLER set (in
    the handler's own task); no or a bad credential -> UNAUTHENTICATED before the handler."""

    def __init__(self, auth: Authenticator) -> None:
        self.auth = auth

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if method.startswith(HEALTH_PREFIX):
            return handler
        if handler is None:  # the caller first: an unknown method's name cannot be probed
            return _wrapped(UNKNOWN_METHOD, self._admit(method[:MAX_METHOD_LOGGED]))
        return _wrapped(handler, self._admit(method))

    def _admit(self, method: str) -> Admit:
        protocol = _grpc_protocol(method)

        async def admit(context: grpc.aio.ServicerContext, requests: Any) -> None:
            try:
                caller = _grpc_caller(self.auth, context)
            except Unauthenticated as exc:
                metrics.AUTH_FAILURES.labels(protocol, exc.reason).inc()
                log.warning("unauthenticated", extra={"fields": {
                    "method": method, "reason": exc.reason, "peer": context.peer(),
                    "detail": str(exc),
                }})  # fmt: skip
                if requests is not None:
                    await _first_message(requests)
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
            metrics.CALLER_REQUESTS.labels(self.auth.label(caller), protocol).inc()
            principal.CALLER.set(caller)  # this RPC's task (and what it spawns) only

        return admit


Admit = Callable[[grpc.aio.ServicerContext, Any], Awaitable[None]]


async def _unimplemented(requests: Any, context: grpc.aio.ServicerContext) -> Any:
    """An unknown method, for an authenticated caller: what grpc answers without a handler
    (after the first message, as a refusal does: grpc/grpc#36066)."""
    await _first_message(requests)
    await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
    yield  # an async generator (never reached): any kind of call, raw bytes in and out


UNKNOWN_METHOD = grpc.stream_stream_rpc_method_handler(_unimplemented)


async def _first_message(requests: Any) -> None:
    """Let a streaming call's first message in (for at most FIRST_MESSAGE_WAIT_S) before the
    refusal: grpc.aio clients that write it as the server ends the call would otherwise report
    INTERNAL ("Internal error from Core", grpc/grpc#36066) instead of UNAUTHENTICATED."""
    with contextlib.suppress(Exception, asyncio.TimeoutError, StopAsyncIteration):
        await asyncio.wait_for(anext(aiter(requests)), FIRST_MESSAGE_WAIT_S)


def _wrapped(handler: grpc.RpcMethodHandler, admit: Admit) -> grpc.RpcMethodHandler:
    """The same handler with `admit(context, requests)` run first, in the handler's task."""
    if handler.request_streaming and handler.response_streaming:
        behaviour, make = handler.stream_stream, grpc.stream_stream_rpc_method_handler
    elif handler.request_streaming:
        behaviour, make = handler.stream_unary, grpc.stream_unary_rpc_method_handler
    elif handler.response_streaming:
        behaviour, make = handler.unary_stream, grpc.unary_stream_rpc_method_handler
    else:
        behaviour, make = handler.unary_unary, grpc.unary_unary_rpc_method_handler
    return make(
        _admitted(behaviour, admit, handler.request_streaming, handler.response_streaming),
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def _admitted(
    behaviour: Callable[..., Any], admit: Admit, request_streaming: bool, streaming: bool
) -> Callable[..., Any]:
    if streaming:

        async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await admit(context, request if request_streaming else None)
            result = behaviour(request, context)
            if not hasattr(result, "__aiter__"):  # a handler that writes with context.write
                await result
                return
            async with aclosing(result) as replies:
                async for reply in replies:
                    yield reply

        return stream

    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await admit(context, request if request_streaming else None)
        result = behaviour(request, context)
        return await result if inspect.isawaitable(result) else result

    return call
