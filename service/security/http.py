"""The HTTP/REST front's side of security: the aiohttp middleware naming the caller, and TLS.

`auth_middleware(authenticator)`: every route but the health endpoints needs a bearer token
(`Authorization: Bearer TOKEN`) or, with --principal-from-cert, a verified client certificate;
otherwise 401 `{"error": ...}` with `WWW-Authenticate: Bearer`, unknown routes and methods too
(what exists is not told before authentication). The handler runs with
principal.CALLER set (the middleware runs in the request's task). `ssl_context(files)`: the
SSLContext the HTTP port listens with, following certificate rotation (service/security/tls.py).
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Awaitable, Callable

from aiohttp import web

from service import metrics, principal
from service.security.auth import Authenticator, Unauthenticated
from service.security.tls import CertificateFiles

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Middleware = Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]
OPEN_PATHS = frozenset({"/v2/health/live", "/v2/health/ready"})  # Kubernetes probes


def peer_common_name(request: web.Request) -> str | None:
    """The CN of the verified client certificate of the request's connection, if any."""
    transport = request.transport
    cert = transport.get_extra_info("peercert") if transport is not None else None
    for rdn in (cert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


def is_open(request: web.Request) -> bool:
    """Whether the router matched an open health route. Decided on the route, not the decoded
    path: `/v2/health%2Flive` decodes to an open path but matches no route, and must answer 401
    (as every unknown route does before authentication), not 404."""
    info = request.match_info
    if info.http_exception is not None:  # 404 or 405: no route of this path and method
        return False
    resource = info.route.resource
    return resource is not None and resource.canonical in OPEN_PATHS


def unauthorized(message: str) -> web.Response:
    """401 in the protocol's error form, with the challenge RFC 6750 asks for."""
    return web.json_response(
        {"error": message}, status=401, headers={"WWW-Authenticate": 'Bearer realm="lstm-serve"'}
    )


def auth_middleware(auth: Authenticator) -> Middleware:
    """An aiohttp middleware: authenticate, then run the handler as that principal."""

    @web.middleware
    async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
        # Open only as sent and as routed: an encoded path (/v2/health%2Flive) or another method
        # is no health route, and is answered 401 like any route without credentials.
        if request.rel_url.raw_path in OPEN_PATHS and is_open(request):
            return await handler(request)
        try:
            caller = auth.authenticate(
                request.headers.get("Authorization"), peer_common_name(request)
            )
        except Unauthenticated as exc:
            metrics.AUTH_FAILURES.labels(metrics.PROTOCOL_KSERVE_HTTP, exc.reason).inc()
            log.warning("unauthenticated", extra={"fields": {
                "path": request.rel_url.raw_path[:64], "reason": exc.reason,
                "peer": request.remote, "detail": str(exc),
            }})  # fmt: skip
            return unauthorized(str(exc))
        metrics.CALLER_REQUESTS.labels(auth.label(caller), metrics.PROTOCOL_KSERVE_HTTP).inc()
        token = principal.CALLER.set(caller)
        try:
            return await handler(request)
        finally:
            principal.CALLER.reset(token)

    return authenticate


def ssl_context(files: CertificateFiles | None) -> ssl.SSLContext | None:
    """The HTTP port's SSLContext (None: plaintext): HTTP/1.1, certificates that follow rotation,
    client certificates required when --tls-client-ca is set."""
    return None if files is None else files.ssl_context()
