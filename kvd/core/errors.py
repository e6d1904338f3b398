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


MAX_NAME_LEN = 256  # characters of a namespace, session or tool name


def check_name(kind: str, name: str, max_len: int = MAX_NAME_LEN) -> None:
    """A namespace, session or tool name is 1..``max_len`` printable characters: no control,
    format (bidi overrides, zero-width) or separator characters but the space, so that what
    kvctl, logs and events print is what was named. InvalidArgument otherwise."""
    if not name or len(name) > max_len:
        raise InvalidArgument(f"a {kind} name must be 1..{max_len} characters")
    if not name.isprintable():
        bad = next(c for c in name if not c.isprintable())
        raise InvalidArgument(f"a {kind} name must be printable text; it has U+{ord(bad):04X}")
