"""The cluster tier's health: its states and transitions, as a table (no I/O).

- ``joining``: not in the cluster yet (the master was unreachable at start, or the tier
  rejoins after a failure it could not ride out); lookups and loads use the node's own
  tiers only, and puts wait.
- ``up``: lookups continue into the cluster, loads read from it, puts run.
- ``down``: a call failed or timed out; the node serves from its own tiers and probes the
  master until it answers, then audits what it published (a restarted master has lost it).

Each change of state is one log line and one metric update (the tier's caller does both
with what :meth:`ClusterHealth.observe` returns).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class ClusterState(StrEnum):
    JOINING = "joining"
    UP = "up"
    DOWN = "down"


class Signal(StrEnum):
    JOINED = "joined"  # the backend mounted this node's segment
    FAILED = "failed"  # a call failed or timed out
    ANSWERED = "answered"  # a call or probe reached the master


J, U, D = ClusterState.JOINING, ClusterState.UP, ClusterState.DOWN
TRANSITIONS: dict[tuple[ClusterState, Signal], ClusterState] = {
    (J, Signal.JOINED): U,
    (J, Signal.FAILED): J,
    (J, Signal.ANSWERED): J,  # a probe answered, but the segment is not mounted yet
    (U, Signal.JOINED): U,
    (U, Signal.FAILED): D,
    (U, Signal.ANSWERED): U,
    (D, Signal.JOINED): U,
    (D, Signal.FAILED): D,
    (D, Signal.ANSWERED): U,
}


JOINING_REASON = "not joined yet"


@dataclass
class ClusterHealth:
    """The current state, since when (seconds on the caller's clock), and why."""

    state: ClusterState = ClusterState.JOINING
    since: float = 0.0
    reason: str = JOINING_REASON
    changes: int = 0

    def observe(self, signal: Signal, now: float, reason: str = "") -> ClusterState | None:
        """Apply ``signal``; the new state when it changed, else None (a failure that keeps
        the state still becomes its reason: the latest is what an operator needs)."""
        new = TRANSITIONS[(self.state, signal)]
        if new is self.state:
            if signal is Signal.FAILED and reason:
                self.reason = reason
            return None
        self.state, self.since, self.reason = new, now, reason or signal.value
        self.changes += 1
        return new

    @property
    def up(self) -> bool:
        return self.state is ClusterState.UP
