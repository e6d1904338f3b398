"""What the connector tells of the blocks it saves: their origin, for kvd's own KV events, and
``BlockStored`` for vLLM's KV-event stream.

vLLM's scheduler publishes its own block pool's events (medium ``GPU``) and, after them, what
its connector's ``take_events()`` returns, in the same ``KVEventBatch`` (ZMQ, when
``--kv-events-config`` enables them). kvd's connector reports the blocks it saved to the
daemon, once the worker has confirmed the save, as vLLM's own ``BlockStored`` with medium
``CPU`` (kvd's DRAM tier, where a store lands): the same block hashes, parent, token ids,
extra keys, LoRA and session fields vLLM's block pool would publish for those blocks, so an
indexer that follows vLLM (llm-d's) learns that this engine's node holds them off-GPU too.

What it does not report, and why: removals and tier moves. The daemon evicts and demotes
blocks on its own policy, at any time, without telling the engine; the connector learns of
a loss only when a later load fails, and a failed load does not say whether the block was
dropped or the call failed (timeout, an expired lease). ``kvd serve --kv-events`` publishes
every store, demotion and removal from the daemon itself, in the same format; use it (and not
these events) where removals matter. Blocks another engine stored are not reported either:
the engine that stored them did.

Units: ``block_size`` and indexes count tokens and blocks of the request (block ``i`` holds
tokens ``[i*block_size, (i+1)*block_size)``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec
from vllm.distributed.kv_events import MEDIUM_CPU, BlockStored
from vllm.v1.core.kv_cache_utils import generate_block_hash_extra_keys, maybe_convert_block_hash, to_event_extra_keys

from kvd.connector.plan import SaveOrigin

if TYPE_CHECKING:
    from vllm.v1.request import Request

_encode = msgspec.msgpack.Encoder().encode

KVD_MEDIUM = MEDIUM_CPU  # a store lands in kvd's DRAM tier (a host shared-memory arena)


def save_origin(request: Request, first: int, count: int, block_size: int, extra: list | None) -> SaveOrigin:
    """What the request's blocks ``[first, first + count)`` were computed from, for kvd to keep
    and publish: each block's tokens, the LoRA adapter, and each block's extra keys
    (``extra``, from :func:`event_extra_keys`; each sent as one msgpack array, None where a
    block has none)."""
    tokens = request.all_token_ids
    start = first * block_size
    token_ids = [list(tokens[lo : lo + block_size]) for lo in range(start, start + count * block_size, block_size)]
    lora = request.lora_request
    return SaveOrigin(
        token_ids=token_ids,
        lora_name=lora.name if lora else None,
        extra_keys=None if extra is None else [None if k is None else _encode(list(k)) for k in extra],
    )


def event_extra_keys(request: Request, first: int, count: int, block_size: int) -> list | None:
    """The extra keys of the request's blocks ``[first, first + count)`` as vLLM's block pool
    publishes them (one entry a block), or None."""
    start, end = first * block_size, (first + count) * block_size
    extra = []
    for lo in range(start, end, block_size):
        keys, _ = generate_block_hash_extra_keys(request, lo, lo + block_size, 0)
        extra.append(keys)
    return to_event_extra_keys(extra)


def stored_event(
    request: Request, first: int, count: int, block_size: int, session_id: str | None, extra: list | None = ...
) -> BlockStored:
    """``BlockStored`` for the request's blocks ``[first, first + count)``, as vLLM's block pool
    words it for a block it caches (hash format per ``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES``),
    with medium ``CPU``. The blocks' tokens must be known (they are once saved). ``extra``:
    their :func:`event_extra_keys`, when the caller has them already."""
    if count <= 0 or first < 0 or first + count > len(request.block_hashes):
        raise ValueError(
            f"request {request.request_id}: blocks [{first}, {first + count}) of its "
            f"{len(request.block_hashes)} hashed blocks"
        )
    hashes = [maybe_convert_block_hash(h) for h in request.block_hashes[first : first + count]]
    parent = maybe_convert_block_hash(request.block_hashes[first - 1]) if first else None
    start, end = first * block_size, (first + count) * block_size
    lora = request.lora_request
    return BlockStored(
        block_hashes=hashes,
        parent_block_hash=parent,
        token_ids=list(request.all_token_ids[start:end]),
        block_size=block_size,
        lora_id=lora.adapter_id if lora else None,
        medium=KVD_MEDIUM,
        lora_name=lora.name if lora else None,
        extra_keys=event_extra_keys(request, first, count, block_size) if extra is ... else extra,
        group_idx=0,  # the connector serves single-group models only
        session_id=session_id,
    )
