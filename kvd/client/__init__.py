"""The Python client of a kvd daemon: ``kvd.client.Client(address)``."""

from kvd.client.channel import TlsFiles
from kvd.client.client import Client, ClientError, default_address
from kvd.client.results import (
    BlockInfo,
    ClusterInfo,
    DrainResult,
    NamespaceInfo,
    PinResult,
    Score,
    SessionInfo,
    Snapshot,
    Status,
    TierFault,
    TierInfo,
    ViewEvent,
    WatchBatch,
)

__all__ = [
    "BlockInfo",
    "Client",
    "ClientError",
    "ClusterInfo",
    "DrainResult",
    "NamespaceInfo",
    "PinResult",
    "Score",
    "SessionInfo",
    "Snapshot",
    "Status",
    "TierFault",
    "TierInfo",
    "TlsFiles",
    "ViewEvent",
    "WatchBatch",
    "default_address",
]
