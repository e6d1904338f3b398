"""What the client's calls return: typed results, and their making from kvd.v1 messages."""

from __future__ import annotations

from dataclasses import dataclass, field

from kvd.media import TIER_CODES

TIER_NAME = {code: str(tier) for tier, code in TIER_CODES.items()}  # wire code -> "hbm", ..., "cluster"


@dataclass(frozen=True)
class SessionState:
    state: str  # active, idle, tool_pause, ended
    turns: int


@dataclass(frozen=True)
class TierFault:
    """Faults of one kind in one tier since the daemon started (docs/reliability.md)."""

    op: str  # write, read, sync, manifest (NVMe); allocate (DRAM)
    errno: str  # EIO, ENOSPC, ... or checksum
    count: int
    last_error: str
    active: bool  # still degrades the tier


@dataclass(frozen=True)
class TierInfo:
    name: str
    capacity_bytes: int
    used_bytes: int
    blocks: int
    location: str
    direct_io: bool
    degraded: bool = False  # a fault the tier has not yet recovered from
    faults: list[TierFault] = field(default_factory=list)


@dataclass(frozen=True)
class NamespaceInfo:
    name: str
    block_tokens: int
    block_bytes: int
    blocks: int


@dataclass(frozen=True)
class Status:
    version: str
    uptime_s: float
    policy: str
    tiers: list[TierInfo]
    namespaces: list[NamespaceInfo]
    leases: int
    write_behind_queue: int
    recovered_blocks: int
    dropped_on_recovery: int
    cluster: ClusterInfo | None = None  # without --cluster-master: None


@dataclass(frozen=True)
class ClusterInfo:
    """The cluster tier as the daemon sees it (kvd.v1 ClusterStatus); seconds, bytes, blocks."""

    state: str  # joining, up, down
    state_for_s: float
    reason: str
    master: str
    segment_bytes: int
    published_blocks: int
    pending_blocks: int
    put_blocks: int
    read_blocks: int
    corrupt_blocks: int
    timeouts: int


@dataclass(frozen=True)
class SessionInfo:
    """A session as the daemon sees it; seconds on the daemon's clock."""

    namespace: str
    session_id: str
    state: str  # active, idle, tool_pause, ended
    inferred: bool  # kvd inferred it from chains (no hint named it)
    turns: int
    chain_blocks: int
    held_blocks: int
    tool: str | None
    expected_pause_s: float | None
    idle_s: float
    paused_s: float | None  # tool_pause only
    ahead_in_s: float | None = None  # an announced turn: seconds until it arrives (negative: late)
    ahead_blocks: int = 0  # an announced turn: its prompt's blocks


@dataclass(frozen=True)
class PinResult:
    changed: int  # blocks pinned (or unpinned) by the call
    not_held: int  # hashes not held (pin) or not pinned (unpin)
    pinned: int  # blocks pinned in all afterwards


@dataclass(frozen=True)
class DrainResult:
    written: int  # blocks written to NVMe by the drain
    pending: int  # kept blocks still without an NVMe copy
    leases: int  # leases still open when it returned
    exiting: bool


@dataclass(frozen=True)
class BlockInfo:
    namespace: str
    hash: int
    parent: int | None
    nbytes: int
    tiers: list[str]


@dataclass(frozen=True)
class ViewEvent:
    """One change of what the daemon holds. ``kind``: stored, removed, registered, cleared
    (a namespace emptied) or session (a session's state changed)."""

    seq: int
    unix_time: float
    kind: str
    namespace: str
    hash: int | None = None
    parent: int | None = None
    tier: str | None = None
    nbytes: int | None = None
    reason: str | None = None
    block_tokens: int | None = None
    block_bytes: int | None = None
    session_id: str | None = None
    state: str | None = None
    tool: str | None = None


@dataclass(frozen=True)
class WatchBatch:
    """A Watch message: events, or ``resync`` (snapshot, then watch from its as_of_seq)."""

    epoch: bytes
    events: list[ViewEvent]
    resync: bool
    next_seq: int


@dataclass(frozen=True)
class Snapshot:
    epoch: bytes
    as_of_seq: int
    blocks: list[BlockInfo]
    block_tokens: dict[str, int]  # tokens per block of each namespace in the snapshot


@dataclass(frozen=True)
class Score:
    matched_blocks: int
    matched_tokens: int
    by_tier: dict[str, int]
    estimated_load_s: float


def _view_event(e) -> ViewEvent:
    kind = e.WhichOneof("kind")
    body = getattr(e, kind)
    if kind == "stored":
        parent = body.parent if body.HasField("parent") else None
        return ViewEvent(
            e.seq, e.unix_time, kind, body.namespace, body.hash, parent, TIER_NAME[body.tier], body.nbytes,
            session_id=body.session_id or None,
        )
    if kind == "removed":
        return ViewEvent(e.seq, e.unix_time, kind, body.namespace, body.hash, tier=TIER_NAME[body.tier], reason=body.reason)
    if kind == "cleared":
        return ViewEvent(e.seq, e.unix_time, kind, body.namespace)
    if kind == "session":
        return ViewEvent(
            e.seq, e.unix_time, kind, body.namespace, session_id=body.session_id, state=body.state, tool=body.tool or None
        )
    return ViewEvent(
        e.seq, e.unix_time, kind, body.namespace, block_tokens=body.block_tokens, block_bytes=body.block_bytes
    )


def _cluster_info(c) -> ClusterInfo:
    return ClusterInfo(
        c.state, c.state_for_s, c.reason, c.master, c.segment_bytes, c.published_blocks, c.pending_blocks,
        c.put_blocks, c.read_blocks, c.corrupt_blocks, c.timeouts,
    )


def _block_info(b) -> BlockInfo:
    parent = b.parent if b.HasField("parent") else None
    return BlockInfo(b.namespace, b.hash, parent, b.nbytes, [TIER_NAME[t] for t in b.tiers])
