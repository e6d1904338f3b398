"""Fault injection for tests and chaos runs: a :class:`FileIO` that fails by rule.

:class:`FaultyIO` wraps the real file layer (:class:`kvd.tiers.io.OsFileIO`) and, for the
calls a :class:`FaultRule` matches, does what a failing disk does: raise ENOSPC or EIO, write
only part of a block (a torn write, acknowledged or not), take its time (a slow disk), or
fail a manifest write. Everything else passes through untouched. It is a test facility: the
daemon only builds one from ``kvd serve --fault-plan FILE`` with ``KVD_ALLOW_FAULTS=1`` set.

A plan is JSON: ``{"rules": [RULE, ...]}``, each rule an object with the fields of
:class:`FaultRule` (unknown fields are an error)::

    {"rules": [
      {"op": "write", "errno": "ENOSPC"},                               every data write
      {"op": "read", "errno": "EIO", "file": "slab-0000.dat",
       "offset": 0, "length": 1048576, "times": 1},                    one read of that range
      {"op": "write", "torn_bytes": 4096, "times": 1},                 a lost write, acknowledged
      {"op": "write", "delay_s": 0.5},                                 a slow disk
      {"op": "manifest", "errno": "EIO", "after": 2}                   manifest writes after two
    ]}

Matching: a call matches a rule when the op is the same and every filter given matches
(``file``: the slab file's name; ``offset``/``length``: the call's byte range overlaps that
range of the file). A rule lets its first ``after`` matching calls through, then acts on the
next ``times`` (all of them when ``times`` is absent). Rules are tried in order and the first
one that acts on a call is the only one that does. Units: bytes and seconds.
"""

from __future__ import annotations

import errno as errnos
import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

from rocksdict import Rdict, WriteBatch, WriteOptions

from kvd.tiers.io import REAL_IO, FileIO, Views

OPS = ("write", "read", "sync", "manifest")
_ALIGN = 4096  # a torn write keeps whole 4 KiB sectors (direct I/O writes nothing smaller)


@dataclass(frozen=True)
class FaultRule:
    """What to do to which calls; see the module docstring. At least one effect
    (``errno``, ``torn_bytes``, ``delay_s``, ``bytes_per_s``) must be given."""

    op: str  # write, read, sync (fdatasync/fsync of a slab), manifest (a RocksDB write batch)
    errno: str | None = None  # raise OSError with this errno (a name: "EIO", "ENOSPC")
    after: int = 0  # matching calls let through before the rule acts
    times: int | None = None  # matching calls it acts on; None: every one after ``after``
    file: str | None = None  # only calls on the slab file of this name
    offset: int | None = None  # only calls whose byte range overlaps [offset, offset + length)
    length: int | None = None
    torn_bytes: int | None = None  # write: only the first N bytes reach the file, then the
    # errno is raised; without an errno the full length is reported written (a lost write)
    delay_s: float = 0.0  # seconds added to each call it acts on
    bytes_per_s: float | None = None  # the calls it acts on share this bandwidth, one at a
    # time, as on one slow disk: a call of N bytes holds the "disk" for N / bytes_per_s

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"op must be one of {', '.join(OPS)}, got {self.op!r}")
        if self.errno is not None and not isinstance(getattr(errnos, str(self.errno), None), int):
            raise ValueError(f"errno must be an errno name such as EIO or ENOSPC, got {self.errno!r}")
        for name in ("after", "times", "offset", "length", "torn_bytes"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if self.times == 0:
            raise ValueError("times must be at least 1 (leave it out for every call)")
        for name in ("delay_s", "bytes_per_s"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float) or value < 0):
                raise ValueError(f"{name} must be a non-negative number, got {value!r}")
        if self.bytes_per_s == 0:
            raise ValueError("bytes_per_s must be positive")
        if (self.offset is None) != (self.length is None):
            raise ValueError("offset and length go together")
        if self.op == "manifest" and (self.file is not None or self.offset is not None):
            raise ValueError("a manifest rule takes no file or offset")
        if self.op == "sync" and self.offset is not None:
            raise ValueError("a sync rule takes no offset (it syncs a whole file)")
        if self.torn_bytes is not None:
            if self.op != "write":
                raise ValueError("torn_bytes is for write rules")
            if self.torn_bytes % _ALIGN:
                raise ValueError(f"torn_bytes must be a multiple of {_ALIGN}, got {self.torn_bytes}")
        if self.errno is None and self.torn_bytes is None and not self.delay_s and self.bytes_per_s is None:
            raise ValueError("a rule needs an effect: errno, torn_bytes, delay_s or bytes_per_s")

    def matches(self, op: str, file: str | None, offset: int | None, nbytes: int) -> bool:
        if op != self.op or (self.file is not None and file != self.file):
            return False
        if self.offset is None or offset is None:
            return True
        return offset < self.offset + self.length and self.offset < offset + max(nbytes, 1)

    def error(self, what: str) -> OSError:
        code = getattr(errnos, self.errno)
        return OSError(code, f"{os.strerror(code)} (injected fault: {what})")


@dataclass(frozen=True)
class FaultPlan:
    rules: tuple[FaultRule, ...]

    @classmethod
    def from_json(cls, text: str, source: str = "fault plan") -> FaultPlan:
        """Parse a plan. Raises ValueError naming ``source``, the rule and the field."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{source}: not valid JSON: {exc}") from None
        if not isinstance(data, dict) or set(data) != {"rules"} or not isinstance(data["rules"], list):
            raise ValueError(f'{source}: expected {{"rules": [...]}}')
        known = {f.name for f in fields(FaultRule)}
        rules = []
        for i, raw in enumerate(data["rules"]):
            if not isinstance(raw, dict):
                raise ValueError(f"{source}: rule {i} is not an object")
            unknown = sorted(set(raw) - known)
            if unknown:
                raise ValueError(f"{source}: rule {i}: unknown field {unknown[0]!r}; known: {', '.join(sorted(known))}")
            if "op" not in raw:
                raise ValueError(f"{source}: rule {i}: no op")
            try:
                rules.append(FaultRule(**raw))
            except ValueError as exc:
                raise ValueError(f"{source}: rule {i}: {exc}") from None
        return cls(tuple(rules))

    @classmethod
    def load(cls, path: str | os.PathLike) -> FaultPlan:
        """Read and parse a plan file; ValueError naming the file when it cannot."""
        try:
            text = Path(path).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"fault plan {path}: cannot read it: {exc}") from None
        return cls.from_json(text, f"fault plan {path}")


def _prefix(views: Views, nbytes: int) -> list[memoryview]:
    """The first ``nbytes`` of ``views``, as views."""
    out = []
    for v in views:
        if nbytes <= 0:
            break
        out.append(v[:nbytes])
        nbytes -= min(nbytes, v.nbytes)
    return out


class FaultyIO:
    """A :class:`FileIO` that applies a :class:`FaultPlan` to the calls of ``inner``.

    Thread safe (rule counters are locked; the I/O itself runs unlocked). ``sleep`` is how
    delays pass (``time.sleep``; a test of this class may count instead).
    """

    def __init__(
        self, plan: FaultPlan, inner: FileIO = REAL_IO, sleep: Callable[[float], None] = time.sleep
    ) -> None:
        self.plan = plan
        self.inner = inner
        self.sleep = sleep
        self._lock = threading.Lock()
        self._disk = threading.Lock()  # held through a bandwidth delay: one transfer at a time
        self._names: dict[int, str] = {}  # fd -> the file's name, for the ``file`` filter
        self._matched = [0] * len(plan.rules)
        self._acted = [0] * len(plan.rules)

    def acted(self, index: int) -> int:
        """Calls rule ``index`` acted on so far."""
        with self._lock:
            return self._acted[index]

    def _rule(self, op: str, fd: int | None, offset: int | None, nbytes: int) -> FaultRule | None:
        with self._lock:
            name = self._names.get(fd) if fd is not None else None
            for i, rule in enumerate(self.plan.rules):
                if not rule.matches(op, name, offset, nbytes):
                    continue
                self._matched[i] += 1
                if self._matched[i] <= rule.after:
                    continue
                if rule.times is not None and self._acted[i] >= rule.times:
                    continue
                self._acted[i] += 1
                return rule
        return None

    def _delay(self, rule: FaultRule, nbytes: int) -> None:
        if rule.delay_s > 0:
            self.sleep(rule.delay_s)  # latency: calls wait side by side
        if rule.bytes_per_s:
            with self._disk:  # bandwidth: calls queue for the one "disk"
                self.sleep(nbytes / rule.bytes_per_s)

    # -- FileIO ---------------------------------------------------------------------------
    def open(self, path: str | os.PathLike, flags: int, mode: int = 0o600) -> int:
        fd = self.inner.open(path, flags, mode)
        with self._lock:
            self._names[fd] = Path(path).name
        return fd

    def close(self, fd: int) -> None:
        with self._lock:
            self._names.pop(fd, None)
        self.inner.close(fd)

    def pwritev(self, fd: int, views: Views, offset: int) -> int:
        nbytes = sum(v.nbytes for v in views)
        rule = self._rule("write", fd, offset, nbytes)
        if rule is None:
            return self.inner.pwritev(fd, views, offset)
        self._delay(rule, nbytes)
        if rule.torn_bytes is not None:
            keep = min(rule.torn_bytes, nbytes)
            done = self.inner.pwritev(fd, _prefix(views, keep), offset) if keep else 0
            if rule.errno is not None:
                raise rule.error(f"torn write: {done} of {nbytes} bytes at {offset}")
            return nbytes  # the disk says it wrote everything: only a checksum can tell
        if rule.errno is not None:
            raise rule.error(f"write of {nbytes} bytes at {offset}")
        return self.inner.pwritev(fd, views, offset)

    def preadv(self, fd: int, views: Views, offset: int) -> int:
        nbytes = sum(v.nbytes for v in views)
        rule = self._rule("read", fd, offset, nbytes)
        if rule is not None:
            self._delay(rule, nbytes)
            if rule.errno is not None:
                raise rule.error(f"read of {nbytes} bytes at {offset}")
        return self.inner.preadv(fd, views, offset)

    def _sync(self, fd: int, real: Callable[[int], None]) -> None:
        rule = self._rule("sync", fd, None, 0)
        if rule is not None:
            self._delay(rule, 0)
            if rule.errno is not None:
                raise rule.error("sync")
        real(fd)

    def fdatasync(self, fd: int) -> None:
        self._sync(fd, self.inner.fdatasync)

    def fsync(self, fd: int) -> None:
        self._sync(fd, self.inner.fsync)

    def write_batch(self, db: Rdict, batch: WriteBatch, options: WriteOptions | None = None) -> None:
        rule = self._rule("manifest", None, None, 0)
        if rule is not None:
            self._delay(rule, 0)
            if rule.errno is not None:
                raise rule.error("manifest write")
        self.inner.write_batch(db, batch, options)
