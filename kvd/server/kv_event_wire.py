"""KV events on the wire: vLLM's event schema, in the encoding a consumer reads.

Two encodings of the same events (``kvd serve --kv-events-encoding``):

- ``array`` (the default): every event a positional msgpack array, its tag first —
  ``["BlockStored", block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium,
  lora_name, extra_keys, group_idx, kv_cache_spec_kind, kv_cache_spec_sliding_window,
  locality, ownership, session_id, ...]``, ``["BlockRemoved", block_hashes, medium, ...]``.
  llm-d's KV indexer decodes events this way (by position, with length guards).
- ``map``: every event a map tagged ``"type"``, fields equal to their default left out —
  the bytes vLLM 0.33's own encoder writes for the same events.

The field names, order and defaults are vLLM 0.33's (``vllm/distributed/kv_events.py``),
unused ones included, because the bytes depend on them. A batch is always the array
``[ts, events, data_parallel_rank]``.

Which kvd events become which wire events, and with which parent, is decided by
:func:`wire_events`: a ``BlockStored`` carries its blocks' tokens only when every ancestor
of its first block was published with tokens too (a consumer that keys blocks by tokens
must know the parent), else it is a tokenless location update without a parent.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from enum import StrEnum

import msgspec

from kvd.core import events as kvd_events
from kvd.core.types import BlockOrigin


class Encoding(StrEnum):
    ARRAY = "array"
    MAP = "map"


# Each tier's medium: llm-d lower-cases it and weights pods by it (kvCacheBackendConfigs,
# where a medium it has no weight for weighs 1.0, as much as GPU). The cluster tier's is a
# name of its own, CLUSTER, so that it can be given its own (lower) weight; llm-d keeps any
# string as the entry's tier. Only the node that put a block into the cluster announces it,
# so llm-d lists it for that node's pods alone (docs/kv-events.md).
MEDIUM = {"hbm": "GPU", "dram": "CPU", "nvme": "NVME", "cluster": "CLUSTER"}

_STORED_FIELDS = [
    ("block_hashes", list[int]),  # vLLM: ExternalBlockHash = bytes | int; kvd's hashes are ints
    ("parent_block_hash", int | None),
    ("token_ids", list[int]),
    ("block_size", int),
    ("lora_id", int | None),
    ("medium", str | None),
    ("lora_name", str | None),
    ("extra_keys", list[msgspec.Raw | None] | None, None),  # each block's, as the engine encoded it
    ("group_idx", int | None, None),
    ("kv_cache_spec_kind", str | None, None),
    ("kv_cache_spec_sliding_window", int | None, None),
    ("locality", str | None, None),
    ("ownership", str | None, None),
    ("session_id", str | None, None),
    ("lookahead_token_ids", list[list[int]] | None, None),
]
_REMOVED_FIELDS = [
    ("block_hashes", list[int]),
    ("medium", str | None),
    ("group_idx", int | None, None),
    ("locality", str | None, None),
    ("ownership", str | None, None),
]


def _family(array_like: bool) -> tuple[type, type, type]:
    options = {"array_like": array_like, "tag": True, "omit_defaults": True, "gc": False}
    stored = msgspec.defstruct("BlockStored", _STORED_FIELDS, **options)
    removed = msgspec.defstruct("BlockRemoved", _REMOVED_FIELDS, **options)
    batch = msgspec.defstruct(
        "KVEventBatch",
        [("ts", float), ("events", list[stored | removed]), ("data_parallel_rank", int | None, None)],
        array_like=True, omit_defaults=True, gc=False,
    )
    return stored, removed, batch


STRUCTS = {Encoding.ARRAY: _family(True), Encoding.MAP: _family(False)}


class Group:
    """One wire event in the making: consecutive kvd events of one chain, tier and session."""

    __slots__ = ("stored", "medium", "hashes", "parent", "tokens", "extra", "lora_name", "session_id", "block_size")

    def __init__(self, stored: bool, medium: str, block_size: int) -> None:
        self.stored = stored
        self.medium = medium
        self.block_size = block_size
        self.hashes: list[int] = []
        self.parent: int | None = None
        self.tokens: list[int] | None = None  # None: a tokenless location update
        self.extra: list[bytes | None] = []
        self.lora_name: str | None = None
        self.session_id: str | None = None

    def encodable(self, encoding: Encoding):
        stored, removed, _ = STRUCTS[encoding]
        if not self.stored:
            return removed(block_hashes=self.hashes, medium=self.medium)
        extra = [None if e is None else msgspec.Raw(e) for e in self.extra] if any(self.extra) else None
        return stored(
            block_hashes=self.hashes,
            parent_block_hash=self.parent,
            token_ids=self.tokens or [],
            block_size=self.block_size,
            lora_id=None,
            medium=self.medium,
            lora_name=self.lora_name,
            extra_keys=extra,
            session_id=self.session_id,
        )


class Keyable:
    """Which held blocks a token-keyed consumer can key: a block with tokens whose parent is
    None or keyable. ``origin_of(namespace, hash)`` gives a held block's origin (None: held
    without tokens) or raises KeyError (not held). Answers are memoized per instance: make
    one per publication."""

    def __init__(self, origin_of: Callable[[str, int], tuple[BlockOrigin | None, int | None]]) -> None:
        self._origin_of = origin_of
        self._memo: dict[tuple[str, int], bool] = {}

    def __call__(self, namespace: str, h: int | None) -> bool:
        if h is None:
            return True
        walked = []
        answer = True
        while h is not None:
            key = (namespace, h)
            if key in self._memo:
                answer = self._memo[key]
                break
            walked.append(key)
            try:
                origin, parent = self._origin_of(namespace, h)
            except KeyError:
                answer = False
                break
            if origin is None:
                answer = False
                break
            h = parent
        for key in walked:
            self._memo[key] = answer
        return answer


def wire_events(
    events: Iterable[kvd_events.Event], block_tokens: Callable[[str], int], keyable: Callable[[str, int | None], bool]
) -> dict[str, list[Group]]:
    """kvd events -> wire events per namespace, in order of first appearance.

    Stores of one chain (each block's parent the previous hash) in one tier by one session,
    all with tokens or all without, share one ``BlockStored``; consecutive removals from one
    tier share one ``BlockRemoved``. A ``BlockStored`` with tokens names its first block's
    parent, which ``keyable`` vouches for; a chain whose parent it does not goes out as a
    tokenless location update with no parent (a consumer that knows the hashes from the
    engine's own events still learns the tier). Namespace clears are never sent: a consumer
    (llm-d) clears a whole pod on ``AllBlocksCleared``; the clear's removals precede it.
    Registrations and session changes have no wire form.
    """
    out: dict[str, list[Group]] = {}
    for e in events:
        if isinstance(e, kvd_events.BlockStored):
            batch = out.setdefault(e.namespace, [])
            medium = MEDIUM[e.tier]
            origin = e.origin
            last = batch[-1] if batch else None
            continues = (
                last is not None
                and last.stored
                and last.medium == medium
                and last.session_id == e.session_id
                and e.parent == last.hashes[-1]
            )
            if origin is None:
                tokens = False
            elif continues and last.tokens is not None:
                tokens = True  # its parent goes out with tokens just before it
            else:
                tokens = keyable(e.namespace, e.parent)
            if continues and (last.tokens is not None) == tokens and (not tokens or last.lora_name == origin.lora_name):
                group = last
            else:
                group = Group(True, medium, block_tokens(e.namespace))
                group.session_id = e.session_id
                if tokens:
                    group.parent = e.parent
                    group.tokens = []
                    group.lora_name = origin.lora_name
                batch.append(group)
            group.hashes.append(e.hash)
            if tokens:
                group.tokens.extend(origin.tokens())
                group.extra.append(origin.extra_keys)
        elif isinstance(e, kvd_events.BlockRemoved):
            batch = out.setdefault(e.namespace, [])
            medium = MEDIUM[e.tier]
            last = batch[-1] if batch else None
            if last is None or last.stored or last.medium != medium:
                last = Group(False, medium, 0)
                batch.append(last)
            last.hashes.append(e.hash)
    return out


def encode_batch(encoding: Encoding, ts: float, groups: list[Group], encode: Callable[[object], bytes]) -> bytes:
    """One message's payload: ``[ts, events, 0]`` (rank 0: kvd is one publisher)."""
    _, _, batch = STRUCTS[encoding]
    return encode(batch(ts, [g.encodable(encoding) for g in groups], 0))
