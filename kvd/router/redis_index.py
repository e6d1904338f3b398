"""A BlockIndex in Redis or Valkey, for a fleet whose index outgrows one router process.

Layout (every key under ``prefix``): one set per (node, namespace, tier) whose members are
the 8-byte big-endian hashes held there, and per node a set naming those keys (so a node
can be dropped). A match asks the (node, tier) sets about the request's hashes with pipelined
SMISMEMBER (Redis >= 6.2), a chunk at a time, and walks the answers locally.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from kvd.media import TIER_NAMES
from kvd.router.index import BlockIndex, NodeMatch


class RedisIndex(BlockIndex):
    def __init__(self, client, prefix: str = "kvd:", chunk: int = 1024) -> None:
        """``client``: a ``redis.Redis`` (or Valkey) connection; thread-safe through its pool.
        ``chunk``: hashes asked per round trip."""
        self.r = client
        self.prefix = prefix
        self.chunk = chunk

    def _key(self, node: str, namespace: str, tier: str) -> str:
        return f"{self.prefix}b:{node}\x00{namespace}\x00{tier}"

    def _node_keys(self, node: str) -> str:
        return f"{self.prefix}k:{node}"

    def _nodes(self) -> str:
        return f"{self.prefix}nodes"

    def apply(self, node, stored, removed) -> None:
        adds: dict[str, list[bytes]] = {}
        for namespace, h, tier in stored:
            adds.setdefault(self._key(node, namespace, tier), []).append(h.to_bytes(8, "big"))
        rems: dict[str, list[bytes]] = {}
        for namespace, h, tier in removed:
            rems.setdefault(self._key(node, namespace, tier), []).append(h.to_bytes(8, "big"))
        if not adds and not rems:
            return
        pipe = self.r.pipeline(transaction=False)
        if adds:
            pipe.sadd(self._nodes(), node)
            pipe.sadd(self._node_keys(node), *adds)
        for key, members in adds.items():
            pipe.sadd(key, *members)
        for key, members in rems.items():
            pipe.srem(key, *members)
        pipe.execute()

    def drop_node(self, node: str) -> None:
        keys = [k.decode() for k in self.r.smembers(self._node_keys(node))]
        pipe = self.r.pipeline(transaction=True)
        if keys:
            pipe.delete(*keys)
        pipe.delete(self._node_keys(node))
        pipe.srem(self._nodes(), node)
        pipe.execute()

    def drop_namespace(self, node: str, namespace: str) -> None:
        keys = [self._key(node, namespace, tier) for tier in TIER_NAMES]
        pipe = self.r.pipeline(transaction=True)
        pipe.delete(*keys)
        pipe.srem(self._node_keys(node), *keys)
        pipe.execute()

    def match(self, namespace: str, hashes: Sequence[int], nodes: Iterable[str] | None = None) -> dict[str, NodeMatch]:
        """Asks in chunks of ``chunk`` hashes, and only the (node, tier) sets that exist and
        whose node's prefix is still unbroken: most nodes drop out after the first chunk."""
        if not hashes:
            return {}
        wanted = [n.decode() for n in self.r.smembers(self._nodes())] if nodes is None else list(nodes)
        pipe = self.r.pipeline(transaction=False)
        for node in wanted:
            pipe.smembers(self._node_keys(node))
        existing = pipe.execute()
        sets: dict[str, list[tuple[str, str]]] = {}  # node -> [(tier, key)], fastest first
        for node, keys in zip(wanted, existing):
            names = {k.decode() for k in keys}
            tiers = [(t, self._key(node, namespace, t)) for t in TIER_NAMES]
            tiers = [(t, k) for t, k in tiers if k in names]
            if tiers:
                sets[node] = tiers
        matches = {node: NodeMatch() for node in sets}
        alive = set(sets)
        for lo in range(0, len(hashes), self.chunk):
            if not alive:
                break
            members = [h.to_bytes(8, "big") for h in hashes[lo : lo + self.chunk]]
            order = sorted(alive)
            pipe = self.r.pipeline(transaction=False)
            for node in order:
                for _, key in sets[node]:
                    pipe.smismember(key, members)
            answers = iter(pipe.execute())
            for node in order:
                tiers = [t for t, _ in sets[node]]
                held = np.array([next(answers) for _ in tiers], dtype=bool)  # (tiers, hashes)
                anywhere = held.any(axis=0)
                n = anywhere.size if anywhere.all() else int(anywhere.argmin())  # first miss
                if n < len(members):
                    alive.discard(node)
                if n:
                    fastest = np.bincount(held[:, :n].argmax(axis=0), minlength=len(tiers))
                    m = matches[node]
                    m.blocks += n
                    for tier, count in zip(tiers, fastest.tolist()):
                        if count:
                            m.by_tier[tier] = m.by_tier.get(tier, 0) + count
        return {node: m for node, m in matches.items() if m.blocks}

    def blocks_of(self, node: str) -> set[tuple[str, int, str]]:
        out = set()
        for key in self.r.smembers(self._node_keys(node)):
            _, namespace, tier = key.decode()[len(self.prefix) + 2 :].split("\x00")
            out |= {(namespace, int.from_bytes(m, "big"), tier) for m in self.r.smembers(key)}
        return out
