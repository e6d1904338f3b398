"""Errors the core raises for bad requests. The server maps each to one gRPC status."""


class KvdError(Exception):
    """Base of the core's request errors; ``code`` names the gRPC status it maps to."""

    code = "INTERNAL"


class InvalidArgument(KvdError):
    code = "INVALID_ARGUMENT"


class UnknownNamespace(KvdError):
    code = "NOT_FOUND"


class UnknownLease(KvdError):
    """The lease id is unknown: never issued, already completed, or expired."""

    code = "NOT_FOUND"


class GeometryConflict(KvdError):
    code = "FAILED_PRECONDITION"


class NoSpace(KvdError):
    """No tier has room that is not protected by a lease."""

    code = "RESOURCE_EXHAUSTED"


class UnknownSession(KvdError):
    code = "NOT_FOUND"


class SessionStateError(KvdError):
    """A session event that the session's state does not allow (e.g. resume when not paused)."""

    code = "FAILED_PRECONDITION"


class Unavailable(KvdError):
    """The daemon is draining: it takes no new stores or loads until resumed or restarted."""

    code = "UNAVAILABLE"
