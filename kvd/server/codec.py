"""How the daemon names blocks and namespaces in the NVMe manifest (opaque to the tier).

Block key: UTF-8 namespace, a NUL, the 64-bit hash big-endian (so keys sort by namespace,
then hash). Block meta, for a block without tokens: empty for a chain's first block, else
the parent's 8-byte hash. For a block with tokens: ``ORIGIN_TAG`` and the msgpack array
``[parent or nil, token_ids (bin, uint32 LE), lora_name or nil, extra_keys (bin) or nil]``,
never 0 or 8 bytes long (at least one token), so the two forms never read as each other.
Namespace meta key: ``ns/`` + name -> JSON geometry.
"""

from __future__ import annotations

import json

import msgspec

from kvd.core.types import BlockOrigin

NAMESPACE_PREFIX = b"ns/"


def block_key(namespace: str, h: int) -> bytes:
    return namespace.encode() + b"\0" + h.to_bytes(8, "big")


def parse_block_key(key: bytes) -> tuple[str, int]:
    # The hash is the last 8 bytes and may itself contain NULs: split by position.
    if len(key) < 10 or key[-9] != 0:
        raise ValueError(f"malformed block key {key!r}")
    try:
        namespace = key[:-9].decode()
    except UnicodeDecodeError:
        raise ValueError(f"malformed block key {key!r}") from None
    return namespace, int.from_bytes(key[-8:], "big")


ORIGIN_TAG = b"\x01"


def block_meta(parent: int | None, origin: BlockOrigin | None = None) -> bytes:
    if origin is None:
        return b"" if parent is None else parent.to_bytes(8, "big")
    return ORIGIN_TAG + _encode([parent, origin.token_ids, origin.lora_name, origin.extra_keys])


def parse_block_meta(meta: bytes) -> tuple[int | None, BlockOrigin | None]:
    """``(parent, origin)`` of a block's manifest meta; ValueError when malformed."""
    if not meta:
        return None, None
    if len(meta) == 8:
        return int.from_bytes(meta, "big"), None
    if meta[:1] != ORIGIN_TAG:
        raise ValueError(f"malformed block meta {meta[:16]!r}")
    try:
        parent, tokens, lora, extra = msgspec.msgpack.decode(meta[1:])
        if not isinstance(tokens, bytes) or not tokens or len(tokens) % 4:
            raise ValueError("token ids")
        return parent, BlockOrigin(tokens, lora, extra)
    except (msgspec.DecodeError, ValueError, TypeError) as exc:
        raise ValueError(f"malformed block meta ({exc})") from None


def namespace_key(name: str) -> bytes:
    return NAMESPACE_PREFIX + name.encode()


def namespace_value(block_tokens: int, block_bytes: int) -> bytes:
    return json.dumps({"block_tokens": block_tokens, "block_bytes": block_bytes}).encode()


def parse_namespace(key: bytes, value: bytes) -> tuple[str, int, int]:
    name = key[len(NAMESPACE_PREFIX):].decode()
    geometry = json.loads(value)
    return name, int(geometry["block_tokens"]), int(geometry["block_bytes"])


_encode = msgspec.msgpack.Encoder().encode
