"""Who is calling: the principal of the RPC or HTTP request being served.

A front's authentication (service/security/) sets it for the request's task before the handler
runs; the session layer and the engine read it where ownership and quotas are decided. Without
authentication every caller is ANONYMOUS (one principal, the global limits).
"""

from __future__ import annotations

from contextvars import ContextVar

ANONYMOUS = "anonymous"
CALLER: ContextVar[str] = ContextVar("lstm_serve_caller", default=ANONYMOUS)


def current() -> str:
    """The principal of the request being served (ANONYMOUS without authentication)."""
    return CALLER.get()
