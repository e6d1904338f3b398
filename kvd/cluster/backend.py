"""The cluster store's interface, and its Mooncake Store implementation.

Every call blocks (the daemon runs them on the cluster tier's own threads) and answers per
key: the backend reports, the tier decides. A key's value is gathered from (put) or
scattered into (get) a list of ``(address, length)`` buffers, each in memory registered
with :meth:`ClusterBackend.register` (the DRAM arena, the tier's header buffers), so block
bytes move between the arena and the cluster without a copy in Python.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger("kvd.cluster")

Parts = list[tuple[int, int]]  # (address, length) buffers of one value, in order


class ClusterBackend(Protocol):
    def exists(self, keys: list[str]) -> list[int]:
        """Per key: 1 present, 0 absent, negative an error code."""

    def put(self, keys: list[str], parts: list[Parts]) -> list[int]:
        """Per key: 0 stored (or already there), negative an error code."""

    def get(self, keys: list[str], parts: list[Parts]) -> list[int]:
        """Per key: the bytes read (the value's length), negative an error code (absent
        included)."""

    def remove(self, keys: list[str]) -> list[int]:
        """Per key: 0 removed, negative an error code (absent included)."""

    def register(self, address: int, length: int) -> None:
        """Make ``length`` bytes at ``address`` usable as a part. Raises OSError."""

    def healthy(self) -> bool:
        """Whether the store reaches its master now."""

    def close(self) -> None: ...


@dataclass(frozen=True)
class MooncakeConfig:
    """How to join a Mooncake Store cluster. ``segment_bytes``: this node's contribution to
    the cluster's memory; ``host``: the address other nodes reach this node's segment at."""

    master: str  # HOST:PORT of mooncake_master
    metadata: str  # the transfer engine's metadata server: http://HOST:PORT/metadata, or etcd://...
    segment_bytes: int
    host: str = "127.0.0.1"
    protocol: str = "tcp"  # or "rdma"
    rdma_devices: str = ""  # empty: the engine's choice
    replicas: int = 2  # copies of each value, on distinct nodes' segments where possible
    local_buffer_bytes: int = 16 << 20  # the client's own transfer buffer


class MooncakeBackend:
    """:class:`ClusterBackend` over ``mooncake.store.MooncakeDistributedStore``.

    Constructing it joins the cluster (mounts this node's segment); OSError when that fails,
    for the caller to retry later.
    """

    def __init__(self, config: MooncakeConfig) -> None:
        try:
            from mooncake.store import MooncakeDistributedStore, ReplicateConfig
        except ImportError as exc:  # an optional extra of the daemon
            raise OSError(f"the cluster tier needs Mooncake Store (pip install 'kvd[cluster]'): {exc}") from None
        self._store = MooncakeDistributedStore()
        rc = self._store.setup(
            config.host, config.metadata, config.segment_bytes, config.local_buffer_bytes,
            config.protocol, config.rdma_devices, config.master,
        )
        if rc != 0:
            self._store.close()
            raise OSError(f"joining the Mooncake cluster at {config.master} failed (code {rc})")
        self._replicate = ReplicateConfig()
        self._replicate.replica_num = config.replicas

    def exists(self, keys: list[str]) -> list[int]:
        return list(self._store.batch_is_exist(keys))

    def put(self, keys: list[str], parts: list[Parts]) -> list[int]:
        ptrs = [[a for a, _ in p] for p in parts]
        sizes = [[n for _, n in p] for p in parts]
        return list(self._store.batch_put_from_multi_buffers(keys, ptrs, sizes, self._replicate))

    def get(self, keys: list[str], parts: list[Parts]) -> list[int]:
        ptrs = [[a for a, _ in p] for p in parts]
        sizes = [[n for _, n in p] for p in parts]
        return list(self._store.batch_get_into_multi_buffers(keys, ptrs, sizes))

    def remove(self, keys: list[str]) -> list[int]:
        return list(self._store.batch_remove(keys))

    def register(self, address: int, length: int) -> None:
        rc = self._store.register_buffer(address, length)
        if rc != 0:
            raise OSError(f"registering {length} bytes with the Mooncake transfer engine failed (code {rc})")

    def healthy(self) -> bool:
        return self._store.health_check() == 0

    def close(self) -> None:
        self._store.close()
