"""A tier's health: the faults its medium reported, and whether the tier is degraded.

Every tier owns one :class:`TierHealth`. The tier (or the daemon, for faults it sees first,
such as a DRAM arena with no free slot) calls :meth:`TierHealth.fault` when an operation
fails and :meth:`TierHealth.ok` when one succeeds. From that it keeps:

- a count per ``(op, errno)``, told to listeners at once (the daemon's metrics counter);
- **degraded**: a tier is degraded from a fault of ``op`` until ``clear_after`` operations of
  that same ``op`` have succeeded in a row since the last such fault (8 by default); then it
  recovers by itself. A tier that keeps failing stays degraded; nothing else clears it but a
  restart (counts start at zero in a new process);
- **one log line per fault kind**: the first fault of each ``(op, errno)`` is logged at ERROR;
  the same fault again is only counted until ``op`` recovers, so a disk failing every write
  logs once, not once per block or per retry. Recovery is logged at WARNING.

``op`` names: ``write``, ``read``, ``sync``, ``manifest`` (NVMe), ``allocate`` (DRAM).
``errno`` is the errno's name (``EIO``, ``ENOSPC``) or ``checksum`` for bytes that do not
match the checksum recorded when they were written.

Thread safety: the NVMe tier reports from I/O threads; every method takes a lock. Listeners
run outside it, on the reporting thread.
"""

from __future__ import annotations

import errno as errnos
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("kvd.tiers.health")

CLEAR_AFTER = 8  # successes of an op, in a row, that clear its fault
CHECKSUM = "checksum"  # the errno label of a checksum mismatch


@dataclass(frozen=True, slots=True)
class FaultRecord:
    """Faults of one ``(op, errno)`` since the process started."""

    op: str
    errno: str
    count: int
    last_error: str  # the last one's message
    active: bool  # its op has not yet recovered (the tier is degraded by it)


def errno_name(exc: BaseException) -> str:
    """The label of an exception: its errno's name, ``checksum``, or the exception's type."""
    code = getattr(exc, "errno", None)
    if isinstance(code, int):
        return errnos.errorcode.get(code, str(code))
    if type(exc).__name__ == "CorruptBlockError":
        return CHECKSUM
    return type(exc).__name__


class TierHealth:
    """Faults and the degraded state of the tier named ``tier`` (see the module docstring)."""

    def __init__(self, tier: str, clear_after: int = CLEAR_AFTER) -> None:
        if clear_after < 1:
            raise ValueError(f"clear_after must be at least 1, got {clear_after}")
        self.tier = tier
        self.clear_after = clear_after
        self.listeners: list[Callable[[str, str, str], None]] = []  # (tier, op, errno) per fault
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, str], int] = {}
        self._last: dict[tuple[str, str], str] = {}
        self._failing: dict[str, int] = {}  # op -> successes in a row since its last fault
        self._logged: set[tuple[str, str]] = set()  # kinds logged since their op last recovered

    def fault(self, op: str, error: BaseException | str, detail: str = "") -> None:
        """Record one failed ``op``. ``error`` is the exception, or an errno label."""
        label = error if isinstance(error, str) else errno_name(error)
        message = detail or (str(error) if not isinstance(error, str) else label)
        key = (op, label)
        with self._lock:
            self._counts[key] = self._counts.get(key, 0) + 1
            self._last[key] = message
            self._failing[op] = 0
            first = key not in self._logged
            self._logged.add(key)
        if first:
            log.error(
                "%s %s fault (%s): %s; the %s tier is degraded (further %s %s faults are counted in "
                "kvd_tier_faults_total, not logged, until %d %s operations succeed in a row)",
                self.tier, op, label, message, self.tier, op, label, self.clear_after, op,
            )
        for listener in list(self.listeners):
            listener(self.tier, op, label)

    def ok(self, op: str, times: int = 1) -> None:
        """Record ``times`` successful ``op`` operations."""
        with self._lock:
            streak = self._failing.get(op)
            if streak is None:
                return
            streak += times
            if streak < self.clear_after:
                self._failing[op] = streak
                return
            del self._failing[op]
            self._logged = {k for k in self._logged if k[0] != op}
            still = sorted(self._failing)
        log.warning(
            "%s %s recovered: %d operations succeeded in a row%s",
            self.tier, op, streak, f"; still degraded by {', '.join(still)}" if still else "",
        )

    @property
    def degraded(self) -> bool:
        with self._lock:
            return bool(self._failing)

    def failing_ops(self) -> list[str]:
        """The ops whose last fault has not yet been followed by ``clear_after`` successes."""
        with self._lock:
            return sorted(self._failing)

    def faults(self) -> list[FaultRecord]:
        """Every fault kind seen, ordered by op then errno."""
        with self._lock:
            return [
                FaultRecord(op, label, n, self._last[op, label], op in self._failing)
                for (op, label), n in sorted(self._counts.items())
            ]
