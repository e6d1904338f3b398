"""Events: every change of what the node holds, appended in order, drained by take_events().

Events out, not callbacks: the daemon drains the list after each core call and feeds the
NVMe manifest, metrics, the Watch stream and the KV-event publisher from it. ``seq``
increases by one per event over the life of a core.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from kvd.core.types import BlockOrigin, Cause
from kvd.media import TierName


class RemovalReason(StrEnum):
    """Why a tier's copy of a block went."""

    EVICTED = "evicted"  # the policy's victim, to make room (see the event's cause)
    DEMOTED = "demoted"  # its copy one tier down landed
    ORPHANED = "orphaned"  # an ancestor's last copy was evicted: no lookup can reach it
    CORRUPT = "corrupt"  # it failed its checksum
    CLEARED = "cleared"  # its namespace was cleared
    EVICTED_BY_OPERATOR = "evicted_by_operator"  # kvctl evict
    DISCARDED = "discarded"  # it never became readable (a store discarded, a transfer failed)
    GONE = "gone"  # the cluster tier no longer holds it (evicted there, or its master restarted empty)


# The reasons whose drop of a block's last copy takes its held descendants with it: a
# capacity eviction, or a copy that never became readable. An operator's eviction and a
# cleared namespace name their own blocks; orphan drops walk all descendants at once. After
# a corrupt copy the healthy descendants stay: the engine's next store of the chain writes
# the lost block alone and finds the rest held.
ORPHANING_REASONS = frozenset({RemovalReason.EVICTED, RemovalReason.DISCARDED})


@dataclass(frozen=True, slots=True)
class BlockStored:
    """A copy of a block became readable in ``tier``."""

    seq: int
    namespace: str
    hash: int
    parent: int | None
    tier: TierName
    nbytes: int
    ts: float
    session_id: str | None = None  # the session whose store made it, when known
    origin: BlockOrigin | None = None  # its tokens (and LoRA, extra keys), when the engine gave them


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    """A tier's copy of a block is gone, for ``reason``.

    ``retention_class``: the policy's class of the copy when it went (None: the policy keeps
    no classes). ``cause``: what needed the room of an evicted or demoted copy; None for
    the other reasons, which say why themselves.
    """

    seq: int
    namespace: str
    hash: int
    tier: TierName
    reason: RemovalReason
    ts: float
    retention_class: str | None = None
    cause: Cause | None = None


@dataclass(frozen=True, slots=True)
class NamespaceRegistered:
    seq: int
    namespace: str
    block_tokens: int
    block_bytes: int
    ts: float


@dataclass(frozen=True, slots=True)
class NamespaceCleared:
    """Every block of ``namespace`` was dropped from every tier (its geometry stays)."""

    seq: int
    namespace: str
    ts: float


@dataclass(frozen=True, slots=True)
class SessionChanged:
    """A session entered ``state`` (active, idle, tool_pause, ended); ``tool`` while paused."""

    seq: int
    namespace: str
    session_id: str
    state: str
    tool: str | None
    ts: float


Event = BlockStored | BlockRemoved | NamespaceRegistered | NamespaceCleared | SessionChanged


@dataclass
class EventLog:
    """An append-only list with a running sequence number."""

    next_seq: int = 1
    _pending: list[Event] = field(default_factory=list)

    def stored(
        self, ns: str, h: int, parent: int | None, tier: TierName, nbytes: int, ts: float, session_id: str | None = None,
        origin: BlockOrigin | None = None,
    ) -> None:
        self._pending.append(BlockStored(self.next_seq, ns, h, parent, tier, nbytes, ts, session_id, origin))
        self.next_seq += 1

    def removed(
        self, ns: str, h: int, tier: TierName, reason: RemovalReason, ts: float, retention_class: str | None = None,
        cause: Cause | None = None,
    ) -> None:
        self._pending.append(BlockRemoved(self.next_seq, ns, h, tier, reason, ts, retention_class, cause))
        self.next_seq += 1

    def registered(self, ns: str, block_tokens: int, block_bytes: int, ts: float) -> None:
        self._pending.append(NamespaceRegistered(self.next_seq, ns, block_tokens, block_bytes, ts))
        self.next_seq += 1

    def cleared(self, ns: str, ts: float) -> None:
        self._pending.append(NamespaceCleared(self.next_seq, ns, ts))
        self.next_seq += 1

    def session_changed(self, ns: str, session_id: str, state: str, tool: str | None, ts: float) -> None:
        self._pending.append(SessionChanged(self.next_seq, ns, session_id, state, tool, ts))
        self.next_seq += 1

    def take(self) -> list[Event]:
        events, self._pending = self._pending, []
        return events
