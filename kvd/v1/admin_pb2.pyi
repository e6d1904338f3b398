from kvd.v1 import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TierStatus(_message.Message):
    __slots__ = ("tier", "capacity_bytes", "used_bytes", "blocks", "location", "direct_io", "degraded", "faults")
    TIER_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    LOCATION_FIELD_NUMBER: _ClassVar[int]
    DIRECT_IO_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_FIELD_NUMBER: _ClassVar[int]
    FAULTS_FIELD_NUMBER: _ClassVar[int]
    tier: _types_pb2.Tier
    capacity_bytes: int
    used_bytes: int
    blocks: int
    location: str
    direct_io: bool
    degraded: bool
    faults: _containers.RepeatedCompositeFieldContainer[TierFault]
    def __init__(self, tier: _Optional[_Union[_types_pb2.Tier, str]] = ..., capacity_bytes: _Optional[int] = ..., used_bytes: _Optional[int] = ..., blocks: _Optional[int] = ..., location: _Optional[str] = ..., direct_io: _Optional[bool] = ..., degraded: _Optional[bool] = ..., faults: _Optional[_Iterable[_Union[TierFault, _Mapping]]] = ...) -> None: ...

class TierFault(_message.Message):
    __slots__ = ("op", "errno", "count", "last_error", "active")
    OP_FIELD_NUMBER: _ClassVar[int]
    ERRNO_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    op: str
    errno: str
    count: int
    last_error: str
    active: bool
    def __init__(self, op: _Optional[str] = ..., errno: _Optional[str] = ..., count: _Optional[int] = ..., last_error: _Optional[str] = ..., active: _Optional[bool] = ...) -> None: ...

class NamespaceStatus(_message.Message):
    __slots__ = ("namespace", "block_tokens", "block_bytes", "blocks")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    BLOCK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_BYTES_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    block_tokens: int
    block_bytes: int
    blocks: int
    def __init__(self, namespace: _Optional[str] = ..., block_tokens: _Optional[int] = ..., block_bytes: _Optional[int] = ..., blocks: _Optional[int] = ...) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("version", "uptime_s", "policy", "tiers", "namespaces", "leases", "write_behind_queue", "recovered_blocks", "dropped_on_recovery", "cluster")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    NAMESPACES_FIELD_NUMBER: _ClassVar[int]
    LEASES_FIELD_NUMBER: _ClassVar[int]
    WRITE_BEHIND_QUEUE_FIELD_NUMBER: _ClassVar[int]
    RECOVERED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_ON_RECOVERY_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    version: str
    uptime_s: float
    policy: str
    tiers: _containers.RepeatedCompositeFieldContainer[TierStatus]
    namespaces: _containers.RepeatedCompositeFieldContainer[NamespaceStatus]
    leases: int
    write_behind_queue: int
    recovered_blocks: int
    dropped_on_recovery: int
    cluster: ClusterStatus
    def __init__(self, version: _Optional[str] = ..., uptime_s: _Optional[float] = ..., policy: _Optional[str] = ..., tiers: _Optional[_Iterable[_Union[TierStatus, _Mapping]]] = ..., namespaces: _Optional[_Iterable[_Union[NamespaceStatus, _Mapping]]] = ..., leases: _Optional[int] = ..., write_behind_queue: _Optional[int] = ..., recovered_blocks: _Optional[int] = ..., dropped_on_recovery: _Optional[int] = ..., cluster: _Optional[_Union[ClusterStatus, _Mapping]] = ...) -> None: ...

class ClusterStatus(_message.Message):
    __slots__ = ("state", "state_for_s", "reason", "master", "segment_bytes", "published_blocks", "pending_blocks", "put_blocks", "read_blocks", "corrupt_blocks", "timeouts")
    STATE_FIELD_NUMBER: _ClassVar[int]
    STATE_FOR_S_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MASTER_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    PUBLISHED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    PENDING_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    PUT_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    READ_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    CORRUPT_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    TIMEOUTS_FIELD_NUMBER: _ClassVar[int]
    state: str
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
    def __init__(self, state: _Optional[str] = ..., state_for_s: _Optional[float] = ..., reason: _Optional[str] = ..., master: _Optional[str] = ..., segment_bytes: _Optional[int] = ..., published_blocks: _Optional[int] = ..., pending_blocks: _Optional[int] = ..., put_blocks: _Optional[int] = ..., read_blocks: _Optional[int] = ..., corrupt_blocks: _Optional[int] = ..., timeouts: _Optional[int] = ...) -> None: ...

class ListBlocksRequest(_message.Message):
    __slots__ = ("namespace", "page_size", "page_token")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    page_size: int
    page_token: str
    def __init__(self, namespace: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListBlocksResponse(_message.Message):
    __slots__ = ("blocks", "next_page_token")
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    blocks: _containers.RepeatedCompositeFieldContainer[_types_pb2.BlockInfo]
    next_page_token: str
    def __init__(self, blocks: _Optional[_Iterable[_Union[_types_pb2.BlockInfo, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class CheckRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CheckResponse(_message.Message):
    __slots__ = ("ok", "problems")
    OK_FIELD_NUMBER: _ClassVar[int]
    PROBLEMS_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    problems: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, ok: _Optional[bool] = ..., problems: _Optional[_Iterable[str]] = ...) -> None: ...

class SyncRequest(_message.Message):
    __slots__ = ("timeout_s",)
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    timeout_s: float
    def __init__(self, timeout_s: _Optional[float] = ...) -> None: ...

class SyncResponse(_message.Message):
    __slots__ = ("pending",)
    PENDING_FIELD_NUMBER: _ClassVar[int]
    pending: int
    def __init__(self, pending: _Optional[int] = ...) -> None: ...

class ClearNamespaceRequest(_message.Message):
    __slots__ = ("namespace",)
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    def __init__(self, namespace: _Optional[str] = ...) -> None: ...

class ClearNamespaceResponse(_message.Message):
    __slots__ = ("removed", "remaining")
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    REMAINING_FIELD_NUMBER: _ClassVar[int]
    removed: int
    remaining: int
    def __init__(self, removed: _Optional[int] = ..., remaining: _Optional[int] = ...) -> None: ...

class EvictRequest(_message.Message):
    __slots__ = ("namespace", "session_id", "all")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    ALL_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    session_id: str
    all: bool
    def __init__(self, namespace: _Optional[str] = ..., session_id: _Optional[str] = ..., all: _Optional[bool] = ...) -> None: ...

class EvictResponse(_message.Message):
    __slots__ = ("removed", "remaining")
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    REMAINING_FIELD_NUMBER: _ClassVar[int]
    removed: int
    remaining: int
    def __init__(self, removed: _Optional[int] = ..., remaining: _Optional[int] = ...) -> None: ...

class PinRequest(_message.Message):
    __slots__ = ("namespace", "hashes", "session_id")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    HASHES_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    hashes: _containers.RepeatedScalarFieldContainer[int]
    session_id: str
    def __init__(self, namespace: _Optional[str] = ..., hashes: _Optional[_Iterable[int]] = ..., session_id: _Optional[str] = ...) -> None: ...

class PinResponse(_message.Message):
    __slots__ = ("changed", "not_held", "pinned")
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    NOT_HELD_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    changed: int
    not_held: int
    pinned: int
    def __init__(self, changed: _Optional[int] = ..., not_held: _Optional[int] = ..., pinned: _Optional[int] = ...) -> None: ...

class ListSessionsRequest(_message.Message):
    __slots__ = ("namespace", "session_id")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    session_id: str
    def __init__(self, namespace: _Optional[str] = ..., session_id: _Optional[str] = ...) -> None: ...

class SessionInfo(_message.Message):
    __slots__ = ("namespace", "session_id", "state", "inferred", "turns", "chain_blocks", "held_blocks", "tool", "expected_pause_s", "idle_s", "paused_s", "ahead_in_s", "ahead_blocks")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    INFERRED_FIELD_NUMBER: _ClassVar[int]
    TURNS_FIELD_NUMBER: _ClassVar[int]
    CHAIN_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    HELD_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    TOOL_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_PAUSE_S_FIELD_NUMBER: _ClassVar[int]
    IDLE_S_FIELD_NUMBER: _ClassVar[int]
    PAUSED_S_FIELD_NUMBER: _ClassVar[int]
    AHEAD_IN_S_FIELD_NUMBER: _ClassVar[int]
    AHEAD_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    session_id: str
    state: str
    inferred: bool
    turns: int
    chain_blocks: int
    held_blocks: int
    tool: str
    expected_pause_s: float
    idle_s: float
    paused_s: float
    ahead_in_s: float
    ahead_blocks: int
    def __init__(self, namespace: _Optional[str] = ..., session_id: _Optional[str] = ..., state: _Optional[str] = ..., inferred: _Optional[bool] = ..., turns: _Optional[int] = ..., chain_blocks: _Optional[int] = ..., held_blocks: _Optional[int] = ..., tool: _Optional[str] = ..., expected_pause_s: _Optional[float] = ..., idle_s: _Optional[float] = ..., paused_s: _Optional[float] = ..., ahead_in_s: _Optional[float] = ..., ahead_blocks: _Optional[int] = ...) -> None: ...

class ListSessionsResponse(_message.Message):
    __slots__ = ("sessions",)
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    sessions: _containers.RepeatedCompositeFieldContainer[SessionInfo]
    def __init__(self, sessions: _Optional[_Iterable[_Union[SessionInfo, _Mapping]]] = ...) -> None: ...

class GetPolicyRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetPolicyResponse(_message.Message):
    __slots__ = ("policy", "available")
    POLICY_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    policy: str
    available: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, policy: _Optional[str] = ..., available: _Optional[_Iterable[str]] = ...) -> None: ...

class SetPolicyRequest(_message.Message):
    __slots__ = ("policy",)
    POLICY_FIELD_NUMBER: _ClassVar[int]
    policy: str
    def __init__(self, policy: _Optional[str] = ...) -> None: ...

class DrainRequest(_message.Message):
    __slots__ = ("timeout_s", "exit")
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    EXIT_FIELD_NUMBER: _ClassVar[int]
    timeout_s: float
    exit: bool
    def __init__(self, timeout_s: _Optional[float] = ..., exit: _Optional[bool] = ...) -> None: ...

class DrainResponse(_message.Message):
    __slots__ = ("written", "pending", "leases", "exiting")
    WRITTEN_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    LEASES_FIELD_NUMBER: _ClassVar[int]
    EXITING_FIELD_NUMBER: _ClassVar[int]
    written: int
    pending: int
    leases: int
    exiting: bool
    def __init__(self, written: _Optional[int] = ..., pending: _Optional[int] = ..., leases: _Optional[int] = ..., exiting: _Optional[bool] = ...) -> None: ...

class ResumeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ResumeResponse(_message.Message):
    __slots__ = ("was_draining",)
    WAS_DRAINING_FIELD_NUMBER: _ClassVar[int]
    was_draining: bool
    def __init__(self, was_draining: _Optional[bool] = ...) -> None: ...
