"""Keys and values of the cluster tier.

A key names the namespace and the block's chained hash, so tenants (whose namespaces are
their own) never share a key: ``kvd/<namespace>/<hash, 16 hex digits>``. A value is a
40-byte header followed by the block's bytes. The header repeats the key's hash, the
block's parent and size, and carries the xxh3-64 of the bytes: a read verifies all of them,
and a value that fails is a miss (never handed to an engine).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import xxhash

KEY_PREFIX = "kvd/"
MAGIC = b"KVC1"
NO_PARENT = 1 << 0  # flags: the block is a chain's root
_HEADER = struct.Struct("<4sIQQQQ")  # magic, flags, nbytes, hash, parent, xxh3-64 of the bytes
HEADER_BYTES = _HEADER.size


def cluster_key(namespace: str, h: int) -> str:
    return f"{KEY_PREFIX}{namespace}/{h:016x}"


def cluster_keys(namespace: str, hashes) -> list[str]:
    """``cluster_key`` of each hash (a lookup's 10,000 keys: bytes.hex is twice an f-string's speed)."""
    prefix = f"{KEY_PREFIX}{namespace}/"
    return [prefix + h.to_bytes(8, "big").hex() for h in hashes]


def parse_cluster_key(key: str) -> tuple[str, int]:
    """(namespace, hash) of a key; ValueError for anything else."""
    if not key.startswith(KEY_PREFIX) or len(key) < len(KEY_PREFIX) + 18 or key[-17] != "/":
        raise ValueError(f"not a kvd cluster key: {key!r}")
    return key[len(KEY_PREFIX) : -17], int(key[-16:], 16)


@dataclass(frozen=True, slots=True)
class Header:
    """What a value says about its block."""

    hash: int
    parent: int | None
    nbytes: int
    checksum: int

    def pack(self) -> bytes:
        flags = NO_PARENT if self.parent is None else 0
        return _HEADER.pack(MAGIC, flags, self.nbytes, self.hash, self.parent or 0, self.checksum)

    @classmethod
    def of(cls, h: int, parent: int | None, data) -> Header:
        """The header of block ``h`` whose bytes are ``data`` (any buffer)."""
        view = memoryview(data)
        return cls(h, parent, view.nbytes, xxhash.xxh3_64_intdigest(view))

    @classmethod
    def unpack(cls, raw) -> Header | None:
        """The header in ``raw`` (HEADER_BYTES bytes); None when it is not one."""
        if len(raw) != HEADER_BYTES:
            return None
        magic, flags, nbytes, h, parent, checksum = _HEADER.unpack(raw)
        if magic != MAGIC or flags & ~NO_PARENT:
            return None
        return cls(h, None if flags & NO_PARENT else parent, nbytes, checksum)


def verify(raw_header, data, h: int, parent: int | None, nbytes: int, parent_known: bool = True) -> str | None:
    """Why the value read for block ``h`` (``raw_header`` and then ``data``) must not be
    served, or None when it is the block: its header names another block, parent (unless
    the reader does not know it: ``parent_known``) or size, or its bytes fail the checksum."""
    header = Header.unpack(raw_header)
    if header is None:
        return "not a kvd value"
    if (header.hash, header.nbytes) != (h, nbytes) or (parent_known and header.parent != parent):
        return "its header names another block"
    if xxhash.xxh3_64_intdigest(memoryview(data)[:nbytes]) != header.checksum:
        return "checksum mismatch"
    return None
