from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tier(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TIER_UNSPECIFIED: _ClassVar[Tier]
    TIER_HBM: _ClassVar[Tier]
    TIER_DRAM: _ClassVar[Tier]
    TIER_NVME: _ClassVar[Tier]
    TIER_CLUSTER: _ClassVar[Tier]
TIER_UNSPECIFIED: Tier
TIER_HBM: Tier
TIER_DRAM: Tier
TIER_NVME: Tier
TIER_CLUSTER: Tier

class SlotRef(_message.Message):
    __slots__ = ("offset", "length", "tier")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    offset: int
    length: int
    tier: Tier
    def __init__(self, offset: _Optional[int] = ..., length: _Optional[int] = ..., tier: _Optional[_Union[Tier, str]] = ...) -> None: ...

class BlockSpec(_message.Message):
    __slots__ = ("hash", "parent", "nbytes", "token_ids", "extra_keys")
    HASH_FIELD_NUMBER: _ClassVar[int]
    PARENT_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    EXTRA_KEYS_FIELD_NUMBER: _ClassVar[int]
    hash: int
    parent: int
    nbytes: int
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    extra_keys: bytes
    def __init__(self, hash: _Optional[int] = ..., parent: _Optional[int] = ..., nbytes: _Optional[int] = ..., token_ids: _Optional[_Iterable[int]] = ..., extra_keys: _Optional[bytes] = ...) -> None: ...

class BlockInfo(_message.Message):
    __slots__ = ("namespace", "hash", "parent", "nbytes", "tiers")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    HASH_FIELD_NUMBER: _ClassVar[int]
    PARENT_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    hash: int
    parent: int
    nbytes: int
    tiers: _containers.RepeatedScalarFieldContainer[Tier]
    def __init__(self, namespace: _Optional[str] = ..., hash: _Optional[int] = ..., parent: _Optional[int] = ..., nbytes: _Optional[int] = ..., tiers: _Optional[_Iterable[_Union[Tier, str]]] = ...) -> None: ...
