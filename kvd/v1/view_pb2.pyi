from kvd.v1 import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WatchRequest(_message.Message):
    __slots__ = ("from_seq", "epoch", "namespace", "with_cleared", "with_sessions")
    FROM_SEQ_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    WITH_CLEARED_FIELD_NUMBER: _ClassVar[int]
    WITH_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    from_seq: int
    epoch: bytes
    namespace: str
    with_cleared: bool
    with_sessions: bool
    def __init__(self, from_seq: _Optional[int] = ..., epoch: _Optional[bytes] = ..., namespace: _Optional[str] = ..., with_cleared: _Optional[bool] = ..., with_sessions: _Optional[bool] = ...) -> None: ...

class BlockStoredEvent(_message.Message):
    __slots__ = ("namespace", "hash", "parent", "tier", "nbytes", "session_id")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    HASH_FIELD_NUMBER: _ClassVar[int]
    PARENT_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    hash: int
    parent: int
    tier: _types_pb2.Tier
    nbytes: int
    session_id: str
    def __init__(self, namespace: _Optional[str] = ..., hash: _Optional[int] = ..., parent: _Optional[int] = ..., tier: _Optional[_Union[_types_pb2.Tier, str]] = ..., nbytes: _Optional[int] = ..., session_id: _Optional[str] = ...) -> None: ...

class BlockRemovedEvent(_message.Message):
    __slots__ = ("namespace", "hash", "tier", "reason")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    HASH_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    hash: int
    tier: _types_pb2.Tier
    reason: str
    def __init__(self, namespace: _Optional[str] = ..., hash: _Optional[int] = ..., tier: _Optional[_Union[_types_pb2.Tier, str]] = ..., reason: _Optional[str] = ...) -> None: ...

class NamespaceRegisteredEvent(_message.Message):
    __slots__ = ("namespace", "block_tokens", "block_bytes")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    BLOCK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_BYTES_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    block_tokens: int
    block_bytes: int
    def __init__(self, namespace: _Optional[str] = ..., block_tokens: _Optional[int] = ..., block_bytes: _Optional[int] = ...) -> None: ...

class NamespaceClearedEvent(_message.Message):
    __slots__ = ("namespace",)
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    def __init__(self, namespace: _Optional[str] = ...) -> None: ...

class SessionChangedEvent(_message.Message):
    __slots__ = ("namespace", "session_id", "state", "tool")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    TOOL_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    session_id: str
    state: str
    tool: str
    def __init__(self, namespace: _Optional[str] = ..., session_id: _Optional[str] = ..., state: _Optional[str] = ..., tool: _Optional[str] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("seq", "unix_time", "stored", "removed", "registered", "cleared", "session")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    UNIX_TIME_FIELD_NUMBER: _ClassVar[int]
    STORED_FIELD_NUMBER: _ClassVar[int]
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    REGISTERED_FIELD_NUMBER: _ClassVar[int]
    CLEARED_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    seq: int
    unix_time: float
    stored: BlockStoredEvent
    removed: BlockRemovedEvent
    registered: NamespaceRegisteredEvent
    cleared: NamespaceClearedEvent
    session: SessionChangedEvent
    def __init__(self, seq: _Optional[int] = ..., unix_time: _Optional[float] = ..., stored: _Optional[_Union[BlockStoredEvent, _Mapping]] = ..., removed: _Optional[_Union[BlockRemovedEvent, _Mapping]] = ..., registered: _Optional[_Union[NamespaceRegisteredEvent, _Mapping]] = ..., cleared: _Optional[_Union[NamespaceClearedEvent, _Mapping]] = ..., session: _Optional[_Union[SessionChangedEvent, _Mapping]] = ...) -> None: ...

class WatchResponse(_message.Message):
    __slots__ = ("epoch", "events", "resync", "next_seq")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    RESYNC_FIELD_NUMBER: _ClassVar[int]
    NEXT_SEQ_FIELD_NUMBER: _ClassVar[int]
    epoch: bytes
    events: _containers.RepeatedCompositeFieldContainer[Event]
    resync: bool
    next_seq: int
    def __init__(self, epoch: _Optional[bytes] = ..., events: _Optional[_Iterable[_Union[Event, _Mapping]]] = ..., resync: _Optional[bool] = ..., next_seq: _Optional[int] = ...) -> None: ...

class SnapshotRequest(_message.Message):
    __slots__ = ("namespace", "page_size", "page_token")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    page_size: int
    page_token: str
    def __init__(self, namespace: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class SnapshotResponse(_message.Message):
    __slots__ = ("epoch", "as_of_seq", "blocks", "next_page_token", "namespaces")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    AS_OF_SEQ_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    NAMESPACES_FIELD_NUMBER: _ClassVar[int]
    epoch: bytes
    as_of_seq: int
    blocks: _containers.RepeatedCompositeFieldContainer[_types_pb2.BlockInfo]
    next_page_token: str
    namespaces: _containers.RepeatedCompositeFieldContainer[NamespaceGeometry]
    def __init__(self, epoch: _Optional[bytes] = ..., as_of_seq: _Optional[int] = ..., blocks: _Optional[_Iterable[_Union[_types_pb2.BlockInfo, _Mapping]]] = ..., next_page_token: _Optional[str] = ..., namespaces: _Optional[_Iterable[_Union[NamespaceGeometry, _Mapping]]] = ...) -> None: ...

class NamespaceGeometry(_message.Message):
    __slots__ = ("namespace", "block_tokens", "block_bytes")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    BLOCK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_BYTES_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    block_tokens: int
    block_bytes: int
    def __init__(self, namespace: _Optional[str] = ..., block_tokens: _Optional[int] = ..., block_bytes: _Optional[int] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("namespace", "hashes")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    HASHES_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    hashes: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, namespace: _Optional[str] = ..., hashes: _Optional[_Iterable[int]] = ...) -> None: ...

class TierBlocks(_message.Message):
    __slots__ = ("tier", "blocks")
    TIER_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    tier: _types_pb2.Tier
    blocks: int
    def __init__(self, tier: _Optional[_Union[_types_pb2.Tier, str]] = ..., blocks: _Optional[int] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("matched_blocks", "matched_tokens", "by_tier", "estimated_load_s")
    MATCHED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    MATCHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    BY_TIER_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_LOAD_S_FIELD_NUMBER: _ClassVar[int]
    matched_blocks: int
    matched_tokens: int
    by_tier: _containers.RepeatedCompositeFieldContainer[TierBlocks]
    estimated_load_s: float
    def __init__(self, matched_blocks: _Optional[int] = ..., matched_tokens: _Optional[int] = ..., by_tier: _Optional[_Iterable[_Union[TierBlocks, _Mapping]]] = ..., estimated_load_s: _Optional[float] = ...) -> None: ...
