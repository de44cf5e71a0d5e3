"""The one exception family of lstm-serve.

Each error names its gRPC status code by *name* (`code`), so the engine can raise these without
importing grpc; `service/status.py` is the one place that turns them into gRPC statuses.
"""

from __future__ import annotations


class LstmServeError(Exception):
    """Base of every error the service reports to a client."""

    code: str = "INTERNAL"


class ModelNotFound(LstmServeError):
    """No such model name or version in the repository."""

    code = "NOT_FOUND"


class InvalidInput(LstmServeError):
    """A request field has a value the model cannot take; the message names field and value."""

    code = "INVALID_ARGUMENT"


class NotStreamable(LstmServeError):
    """A bidirectional model was asked for a streaming session."""

    code = "FAILED_PRECONDITION"


class ProtocolError(LstmServeError):
    """A stream's messages came in an order the protocol does not allow."""

    code = "FAILED_PRECONDITION"


class SessionNotFound(LstmServeError):
    """No session has this id (never issued, or ended)."""

    code = "NOT_FOUND"


class SessionExpired(SessionNotFound):
    """The session was freed after being idle longer than the idle timeout."""

    code = "NOT_FOUND"


class SessionMoved(LstmServeError):
    """Another replica advanced this session in the shared store: this copy was stale.
    ABORTED: a concurrency conflict; resume the session (it is current again) and resend."""

    code = "ABORTED"


class Overloaded(LstmServeError):
    """The server holds its maximum number of sessions."""

    code = "RESOURCE_EXHAUSTED"


class Unavailable(LstmServeError):
    """The server cannot take this request now (models still loading)."""

    code = "UNAVAILABLE"


class Draining(Unavailable):
    """The server is shutting down and refuses new work."""

    code = "UNAVAILABLE"


class SnapshotInvalid(InvalidInput):
    """A session snapshot that cannot be verified: unknown key, bad signature, bad contents."""

    code = "INVALID_ARGUMENT"


class SnapshotMismatch(LstmServeError):
    """A valid snapshot for a model version this replica does not serve, or another state shape."""

    code = "FAILED_PRECONDITION"


class SnapshotsDisabled(LstmServeError):
    """Snapshots were asked for, but this server has no snapshot key (--snapshot-key)."""

    code = "FAILED_PRECONDITION"


class ConfigError(ValueError):
    """The server configuration is invalid (raised at start-up, never sent to a client)."""


class SessionReplaced(SessionMoved):
    """A newer copy of the session was restored on this server beside the one in use."""

    code = "ABORTED"


class VersionRetired(Unavailable):
    """The session's model version was unloaded; open a new session on a served version."""

    code = "UNAVAILABLE"


class ModelLoadFailed(LstmServeError):
    """A model version could not be loaded (its reason is kept and reported)."""

    code = "UNAVAILABLE"


class MalformedRequest(InvalidInput):
    """A request's bytes do not parse as its protobuf message type."""

    code = "INVALID_ARGUMENT"


class BudgetExceeded(Overloaded):
    """A request asks for more work than one request may (--max-request-row-steps)."""

    code = "RESOURCE_EXHAUSTED"


class SequenceGap(LstmServeError):
    """A chunk or reset whose seq is not the next one (last applied + 1): nothing is applied."""

    code = "FAILED_PRECONDITION"


class AttachedElsewhere(LstmServeError):
    """The session was taken over by another stream (a later resume or restore): this stream's
    messages are not applied any more."""

    code = "ABORTED"


class SnapshotRefused(LstmServeError):
    """A valid snapshot that may not be restored: older than a copy known here or in the shared
    store, expired, or of a session that ended."""

    code = "FAILED_PRECONDITION"


class AlreadyApplied(LstmServeError):
    """A resend of a message older than the last applied one: its result is not kept."""

    code = "ALREADY_EXISTS"
