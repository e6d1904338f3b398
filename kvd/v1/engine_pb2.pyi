from kvd.v1 import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SessionEventKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SESSION_EVENT_UNSPECIFIED: _ClassVar[SessionEventKind]
    TURN_START: _ClassVar[SessionEventKind]
    TURN_END: _ClassVar[SessionEventKind]
    TOOL_PAUSE: _ClassVar[SessionEventKind]
    TOOL_RESUME: _ClassVar[SessionEventKind]
    SESSION_END: _ClassVar[SessionEventKind]
    TURN_AHEAD: _ClassVar[SessionEventKind]
SESSION_EVENT_UNSPECIFIED: SessionEventKind
TURN_START: SessionEventKind
TURN_END: SessionEventKind
TOOL_PAUSE: SessionEventKind
TOOL_RESUME: SessionEventKind
SESSION_END: SessionEventKind
TURN_AHEAD: SessionEventKind

class SessionEventRequest(_message.Message):
    __slots__ = ("namespace", "session_id", "kind", "hashes", "tool", "expected_pause_s", "arrives_in_s")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    HASHES_FIELD_NUMBER: _ClassVar[int]
    TOOL_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_PAUSE_S_FIELD_NUMBER: _ClassVar[int]
    ARRIVES_IN_S_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    session_id: str
    kind: SessionEventKind
    hashes: _containers.RepeatedScalarFieldContainer[int]
    tool: str
    expected_pause_s: float
    arrives_in_s: float
    def __init__(self, namespace: _Optional[str] = ..., session_id: _Optional[str] = ..., kind: _Optional[_Union[SessionEventKind, str]] = ..., hashes: _Optional[_Iterable[int]] = ..., tool: _Optional[str] = ..., expected_pause_s: _Optional[float] = ..., arrives_in_s: _Optional[float] = ...) -> None: ...

class SessionEventResponse(_message.Message):
    __slots__ = ("state", "turns")
    STATE_FIELD_NUMBER: _ClassVar[int]
    TURNS_FIELD_NUMBER: _ClassVar[int]
    state: str
    turns: int
    def __init__(self, state: _Optional[str] = ..., turns: _Optional[int] = ...) -> None: ...

class RegisterNamespaceRequest(_message.Message):
    __slots__ = ("namespace", "block_tokens", "block_bytes", "model_name", "pod_id")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    BLOCK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_BYTES_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    POD_ID_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    block_tokens: int
    block_bytes: int
    model_name: str
    pod_id: str
    def __init__(self, namespace: _Optional[str] = ..., block_tokens: _Optional[int] = ..., block_bytes: _Optional[int] = ..., model_name: _Optional[str] = ..., pod_id: _Optional[str] = ...) -> None: ...

class RegisterNamespaceResponse(_message.Message):
    __slots__ = ("created",)
    CREATED_FIELD_NUMBER: _ClassVar[int]
    created: bool
    def __init__(self, created: _Optional[bool] = ...) -> None: ...

class GetArenaRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetArenaResponse(_message.Message):
    __slots__ = ("path", "arena_id", "file_bytes", "page_bytes", "hbm")
    PATH_FIELD_NUMBER: _ClassVar[int]
    ARENA_ID_FIELD_NUMBER: _ClassVar[int]
    FILE_BYTES_FIELD_NUMBER: _ClassVar[int]
    PAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    HBM_FIELD_NUMBER: _ClassVar[int]
    path: str
    arena_id: bytes
    file_bytes: int
    page_bytes: int
    hbm: HbmPool
    def __init__(self, path: _Optional[str] = ..., arena_id: _Optional[bytes] = ..., file_bytes: _Optional[int] = ..., page_bytes: _Optional[int] = ..., hbm: _Optional[_Union[HbmPool, _Mapping]] = ...) -> None: ...

class HbmPool(_message.Message):
    __slots__ = ("kind", "capacity_bytes", "pool_id", "path", "ipc_handle", "pci_bus_id")
    KIND_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    POOL_ID_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    IPC_HANDLE_FIELD_NUMBER: _ClassVar[int]
    PCI_BUS_ID_FIELD_NUMBER: _ClassVar[int]
    kind: str
    capacity_bytes: int
    pool_id: bytes
    path: str
    ipc_handle: bytes
    pci_bus_id: str
    def __init__(self, kind: _Optional[str] = ..., capacity_bytes: _Optional[int] = ..., pool_id: _Optional[bytes] = ..., path: _Optional[str] = ..., ipc_handle: _Optional[bytes] = ..., pci_bus_id: _Optional[str] = ...) -> None: ...

class LookupRequest(_message.Message):
    __slots__ = ("namespace", "hashes", "session_id")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    HASHES_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    hashes: _containers.RepeatedScalarFieldContainer[int]
    session_id: str
    def __init__(self, namespace: _Optional[str] = ..., hashes: _Optional[_Iterable[int]] = ..., session_id: _Optional[str] = ...) -> None: ...

class TierRun(_message.Message):
    __slots__ = ("tier", "blocks")
    TIER_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    tier: _types_pb2.Tier
    blocks: int
    def __init__(self, tier: _Optional[_Union[_types_pb2.Tier, str]] = ..., blocks: _Optional[int] = ...) -> None: ...

class LookupResponse(_message.Message):
    __slots__ = ("runs",)
    RUNS_FIELD_NUMBER: _ClassVar[int]
    runs: _containers.RepeatedCompositeFieldContainer[TierRun]
    def __init__(self, runs: _Optional[_Iterable[_Union[TierRun, _Mapping]]] = ...) -> None: ...

class PrepareStoreRequest(_message.Message):
    __slots__ = ("namespace", "blocks", "lease_seconds", "session_id", "lora_name")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    LEASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    LORA_NAME_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    blocks: _containers.RepeatedCompositeFieldContainer[_types_pb2.BlockSpec]
    lease_seconds: int
    session_id: str
    lora_name: str
    def __init__(self, namespace: _Optional[str] = ..., blocks: _Optional[_Iterable[_Union[_types_pb2.BlockSpec, _Mapping]]] = ..., lease_seconds: _Optional[int] = ..., session_id: _Optional[str] = ..., lora_name: _Optional[str] = ...) -> None: ...

class StoreSlot(_message.Message):
    __slots__ = ("write", "slot")
    WRITE_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    write: bool
    slot: _types_pb2.SlotRef
    def __init__(self, write: _Optional[bool] = ..., slot: _Optional[_Union[_types_pb2.SlotRef, _Mapping]] = ...) -> None: ...

class PrepareStoreResponse(_message.Message):
    __slots__ = ("lease_id", "slots", "lease_seconds", "arena_id")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    LEASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ARENA_ID_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    slots: _containers.RepeatedCompositeFieldContainer[StoreSlot]
    lease_seconds: float
    arena_id: bytes
    def __init__(self, lease_id: _Optional[str] = ..., slots: _Optional[_Iterable[_Union[StoreSlot, _Mapping]]] = ..., lease_seconds: _Optional[float] = ..., arena_id: _Optional[bytes] = ...) -> None: ...

class CommitStoreRequest(_message.Message):
    __slots__ = ("lease_id", "failed", "abort")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    ABORT_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    failed: _containers.RepeatedScalarFieldContainer[int]
    abort: bool
    def __init__(self, lease_id: _Optional[str] = ..., failed: _Optional[_Iterable[int]] = ..., abort: _Optional[bool] = ...) -> None: ...

class CommitStoreResponse(_message.Message):
    __slots__ = ("committed",)
    COMMITTED_FIELD_NUMBER: _ClassVar[int]
    committed: int
    def __init__(self, committed: _Optional[int] = ...) -> None: ...

class PrepareLoadRequest(_message.Message):
    __slots__ = ("namespace", "hashes", "lease_seconds", "session_id")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    HASHES_FIELD_NUMBER: _ClassVar[int]
    LEASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    hashes: _containers.RepeatedScalarFieldContainer[int]
    lease_seconds: int
    session_id: str
    def __init__(self, namespace: _Optional[str] = ..., hashes: _Optional[_Iterable[int]] = ..., lease_seconds: _Optional[int] = ..., session_id: _Optional[str] = ...) -> None: ...

class LoadSlot(_message.Message):
    __slots__ = ("found", "slot", "nbytes")
    FOUND_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    found: bool
    slot: _types_pb2.SlotRef
    nbytes: int
    def __init__(self, found: _Optional[bool] = ..., slot: _Optional[_Union[_types_pb2.SlotRef, _Mapping]] = ..., nbytes: _Optional[int] = ...) -> None: ...

class PrepareLoadResponse(_message.Message):
    __slots__ = ("lease_id", "slots", "lease_seconds", "arena_id")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    LEASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ARENA_ID_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    slots: _containers.RepeatedCompositeFieldContainer[LoadSlot]
    lease_seconds: float
    arena_id: bytes
    def __init__(self, lease_id: _Optional[str] = ..., slots: _Optional[_Iterable[_Union[LoadSlot, _Mapping]]] = ..., lease_seconds: _Optional[float] = ..., arena_id: _Optional[bytes] = ...) -> None: ...

class CompleteLoadRequest(_message.Message):
    __slots__ = ("lease_id",)
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    def __init__(self, lease_id: _Optional[str] = ...) -> None: ...

class CompleteLoadResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StoreInlineHeader(_message.Message):
    __slots__ = ("namespace", "blocks", "session_id", "lora_name")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    LORA_NAME_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    blocks: _containers.RepeatedCompositeFieldContainer[_types_pb2.BlockSpec]
    session_id: str
    lora_name: str
    def __init__(self, namespace: _Optional[str] = ..., blocks: _Optional[_Iterable[_Union[_types_pb2.BlockSpec, _Mapping]]] = ..., session_id: _Optional[str] = ..., lora_name: _Optional[str] = ...) -> None: ...

class BlockChunk(_message.Message):
    __slots__ = ("index", "offset", "data")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    index: int
    offset: int
    data: bytes
    def __init__(self, index: _Optional[int] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class StoreInlineRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: StoreInlineHeader
    chunk: BlockChunk
    def __init__(self, header: _Optional[_Union[StoreInlineHeader, _Mapping]] = ..., chunk: _Optional[_Union[BlockChunk, _Mapping]] = ...) -> None: ...

class StoreInlineResponse(_message.Message):
    __slots__ = ("stored", "present")
    STORED_FIELD_NUMBER: _ClassVar[int]
    PRESENT_FIELD_NUMBER: _ClassVar[int]
    stored: int
    present: int
    def __init__(self, stored: _Optional[int] = ..., present: _Optional[int] = ...) -> None: ...

class LoadInlineRequest(_message.Message):
    __slots__ = ("namespace", "hashes", "session_id")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    HASHES_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    hashes: _containers.RepeatedScalarFieldContainer[int]
    session_id: str
    def __init__(self, namespace: _Optional[str] = ..., hashes: _Optional[_Iterable[int]] = ..., session_id: _Optional[str] = ...) -> None: ...

class LoadInlineResponse(_message.Message):
    __slots__ = ("index", "found", "nbytes", "offset", "data")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    FOUND_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    index: int
    found: bool
    nbytes: int
    offset: int
    data: bytes
    def __init__(self, index: _Optional[int] = ..., found: _Optional[bool] = ..., nbytes: _Optional[int] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...
