"""A hand-written cluster backend for unit tests: a dict of values in this process, read and
written through raw addresses as Mooncake's are, with switches to fail."""

from __future__ import annotations

import ctypes
import threading

from kvd.cluster.backend import Parts

RPC_FAIL = -900  # what Mooncake answers per key while its master is unreachable
NOT_FOUND = -704


class FakeCluster:
    """The shared store: what every FakeBackend connected to it reads and writes."""

    def __init__(self) -> None:
        self.values: dict[str, bytes] = {}
        self.down = False  # every call answers RPC_FAIL, healthy() is False
        self.refuse_join = False  # connecting raises OSError
        self.fail_puts = False  # puts answer RPC_FAIL while healthy() stays True
        self.hold_gets: threading.Event | None = None  # gets wait for it to be set (a hung peer)
        self.hold_close: threading.Event | None = None  # close waits for it (a client stuck leaving)
        self.removed: list[str] = []
        self.registered: list[tuple[int, int]] = []

    def connect(self) -> FakeBackend:
        if self.refuse_join:
            raise OSError("joining the Mooncake cluster at fake failed (code -1)")
        return FakeBackend(self)

    def corrupt(self, key: str, at: int = -1) -> None:
        """Flip one byte of ``key``'s value (the last by default: a block byte)."""
        raw = bytearray(self.values[key])
        raw[at] ^= 0xFF
        self.values[key] = bytes(raw)


class FakeBackend:
    def __init__(self, cluster: FakeCluster) -> None:
        self.c = cluster
        self.closed = False

    def exists(self, keys: list[str]) -> list[int]:
        if self.c.down:
            return [RPC_FAIL] * len(keys)
        return [int(k in self.c.values) for k in keys]

    def put(self, keys: list[str], parts: list[Parts]) -> list[int]:
        if self.c.down or self.c.fail_puts:
            return [RPC_FAIL] * len(keys)
        for key, p in zip(keys, parts, strict=True):
            self.c.values[key] = b"".join(ctypes.string_at(a, n) for a, n in p)
        return [0] * len(keys)

    def get(self, keys: list[str], parts: list[Parts]) -> list[int]:
        if self.c.hold_gets is not None:
            self.c.hold_gets.wait(30)
        if self.c.down:
            return [RPC_FAIL] * len(keys)
        out = []
        for key, p in zip(keys, parts, strict=True):
            value = self.c.values.get(key)
            if value is None:
                out.append(NOT_FOUND)
                continue
            offset = 0
            for address, n in p:
                chunk = value[offset : offset + n]
                ctypes.memmove(address, chunk, len(chunk))
                offset += n
            out.append(len(value))
        return out

    def remove(self, keys: list[str]) -> list[int]:
        self.c.removed += keys
        return [0 if self.c.values.pop(k, None) is not None else NOT_FOUND for k in keys]

    def register(self, address: int, length: int) -> None:
        self.c.registered.append((address, length))

    def healthy(self) -> bool:
        return not self.c.down

    def close(self) -> None:
        if self.c.hold_close is not None:
            self.c.hold_close.wait(30)
        self.closed = True
