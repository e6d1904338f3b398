"""The daemon's logs: human text or one JSON object per line, with the request id of the RPC
a line was written for.

A request id is the caller's ``x-request-id`` metadata when it sends a sane one (so an
engine's own id follows the request into kvd's logs), else one kvd makes up. It is set for
the duration of each RPC (a context variable: every RPC runs in its own task), stamped on
every log record written meanwhile, and returned to the caller in the trailing metadata of
a failed call.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time
import uuid

LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
REQUEST_ID_HEADER = "x-request-id"
_SANE_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("kvd_request_id", default=None)


def new_request_id(metadata) -> str:
    """The caller's ``x-request-id`` when sane (1-64 of ``[A-Za-z0-9._:-]``), else a new one."""
    for key, value in metadata or ():
        if key == REQUEST_ID_HEADER and isinstance(value, str) and _SANE_ID.fullmatch(value):
            return value
    return uuid.uuid4().hex[:16]


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (RFC 3339, UTC, ms), level, logger, msg, then request_id,
    the record's ``extra`` fields that kvd sets (method, code), and exc (a traceback) if any."""

    EXTRA = ("method", "code", "peer")

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        out = {"ts": ts, "level": record.levelname, "logger": record.name, "msg": record.getMessage()}
        if getattr(record, "request_id", None):
            out["request_id"] = record.request_id
        for key in self.EXTRA:
            value = getattr(record, key, None)
            if value is not None:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        rid = getattr(record, "request_id", None)
        return f"{line} [request {rid}]" if rid else line


def configure(level: str = "INFO", fmt: str = "text") -> None:
    """Send every log record to stderr in ``fmt``; replaces handlers set before."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"--log-format must be one of {', '.join(LOG_FORMATS)}, got {fmt!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(_RequestIdFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
