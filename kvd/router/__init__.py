"""kvd.router: a cache view over many kvd daemons, to send a request where its prefix lives."""

from kvd.router.index import BlockIndex, MemoryIndex, NodeMatch
from kvd.router.redis_index import RedisIndex
from kvd.router.view import DEFAULT_TIER_WEIGHTS, GlobalView, NodeScore, RouteScore

__all__ = [
    "DEFAULT_TIER_WEIGHTS",
    "BlockIndex",
    "GlobalView",
    "MemoryIndex",
    "NodeMatch",
    "NodeScore",
    "RedisIndex",
    "RouteScore",
]
