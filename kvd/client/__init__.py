"""The Python client of a kvd daemon: ``kvd.client.Client(address)``."""

from kvd.client.client import (
    BlockInfo,
    Client,
    ClientError,
    NamespaceInfo,
    Score,
    Snapshot,
    Status,
    TierInfo,
    ViewEvent,
    WatchBatch,
    default_address,
)

__all__ = [
    "BlockInfo",
    "Client",
    "ClientError",
    "NamespaceInfo",
    "Score",
    "Snapshot",
    "Status",
    "TierInfo",
    "ViewEvent",
    "WatchBatch",
    "default_address",
]
