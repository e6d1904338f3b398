"""How the daemon names blocks and namespaces in the NVMe manifest (opaque to the tier).

Block key: UTF-8 namespace, a NUL, the 64-bit hash big-endian (so keys sort by namespace,
then hash). Block meta: empty for a chain's first block, else the parent's 8-byte hash.
Namespace meta key: ``ns/`` + name -> JSON geometry.
"""

from __future__ import annotations

import json

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


def block_meta(parent: int | None) -> bytes:
    return b"" if parent is None else parent.to_bytes(8, "big")


def parse_block_meta(meta: bytes) -> int | None:
    if not meta:
        return None
    if len(meta) != 8:
        raise ValueError(f"malformed block meta {meta!r}")
    return int.from_bytes(meta, "big")


def namespace_key(name: str) -> bytes:
    return NAMESPACE_PREFIX + name.encode()


def namespace_value(block_tokens: int, block_bytes: int) -> bytes:
    return json.dumps({"block_tokens": block_tokens, "block_bytes": block_bytes}).encode()


def parse_namespace(key: bytes, value: bytes) -> tuple[str, int, int]:
    name = key[len(NAMESPACE_PREFIX):].decode()
    geometry = json.loads(value)
    return name, int(geometry["block_tokens"]), int(geometry["block_bytes"])
