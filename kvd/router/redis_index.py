"""A BlockIndex in Redis or Valkey, for a fleet whose index outgrows one router process.

Layout (every key under ``prefix``): one set per (node, namespace, tier) whose members are
the 8-byte big-endian hashes held there (the cluster tier's: the blocks the node announced
it put into the cluster), per node a set naming those keys (so a node can be dropped), and
per namespace a set naming its nodes' cluster sets (so a match finds every announcement
without listing every node). A match asks the (node, tier) sets and the namespace's cluster
sets about the request's hashes with pipelined SMISMEMBER (Redis >= 6.2), a chunk at a time,
and walks the answers locally. The semantics are :class:`kvd.router.index.BlockIndex`'s.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from kvd.media import ALL_TIERS, CLUSTER, TIER_NAMES
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

    def _parse(self, key: str) -> tuple[str, str, str]:
        """(node, namespace, tier) of a ``_key``."""
        node, namespace, tier = key[len(self.prefix) + 2 :].split("\x00")
        return node, namespace, tier

    def _node_keys(self, node: str) -> str:
        return f"{self.prefix}k:{node}"

    def _cluster_keys(self, namespace: str) -> str:
        return f"{self.prefix}c:{namespace}"

    def _nodes(self) -> str:
        return f"{self.prefix}nodes"

    def apply(self, node, stored, removed) -> None:
        adds: dict[str, list[bytes]] = {}
        announced: dict[str, str] = {}  # a cluster set added to -> its namespace
        for namespace, h, tier in stored:
            key = self._key(node, namespace, tier)
            adds.setdefault(key, []).append(h.to_bytes(8, "big"))
            if tier == CLUSTER:
                announced[key] = namespace
        rems: dict[str, list[bytes]] = {}
        for namespace, h, tier in removed:
            rems.setdefault(self._key(node, namespace, tier), []).append(h.to_bytes(8, "big"))
        if not adds and not rems:
            return
        pipe = self.r.pipeline(transaction=False)
        if adds:
            pipe.sadd(self._nodes(), node)
            pipe.sadd(self._node_keys(node), *adds)
        for key, namespace in announced.items():
            pipe.sadd(self._cluster_keys(namespace), key)
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
        for key in keys:
            _, namespace, tier = self._parse(key)
            if tier == CLUSTER:
                pipe.srem(self._cluster_keys(namespace), key)
        pipe.delete(self._node_keys(node))
        pipe.srem(self._nodes(), node)
        pipe.execute()

    def drop_namespace(self, node: str, namespace: str) -> None:
        keys = [self._key(node, namespace, tier) for tier in ALL_TIERS]
        pipe = self.r.pipeline(transaction=True)
        pipe.delete(*keys)
        pipe.srem(self._node_keys(node), *keys)
        pipe.srem(self._cluster_keys(namespace), self._key(node, namespace, CLUSTER))
        pipe.execute()

    def match(self, namespace: str, hashes: Sequence[int], nodes: Iterable[str] | None = None) -> dict[str, NodeMatch]:
        """Asks in chunks of ``chunk`` hashes, and only the (node, tier) sets that exist and
        whose node's prefix is still unbroken: most nodes drop out after the first chunk.
        The namespace's cluster sets are asked once a chunk, for every node."""
        if not hashes:
            return {}
        wanted = [n.decode() for n in self.r.smembers(self._nodes())] if nodes is None else list(nodes)
        pipe = self.r.pipeline(transaction=False)
        for node in wanted:
            pipe.smembers(self._node_keys(node))
        pipe.smembers(self._cluster_keys(namespace))
        *existing, cluster_sets = pipe.execute()
        cluster_keys = sorted(k.decode() for k in cluster_sets)
        sets: dict[str, list[tuple[str, str]]] = {}  # node -> [(tier, key)] of its own tiers, fastest first
        for node, keys in zip(wanted, existing):
            names = {k.decode() for k in keys}
            tiers = [(t, self._key(node, namespace, t)) for t in TIER_NAMES]
            tiers = [(t, k) for t, k in tiers if k in names]
            if tiers or cluster_keys:  # with cluster blocks, every node may read a prefix
                sets[node] = tiers
        matches = {node: NodeMatch() for node in sets}
        alive = set(sets)
        for lo in range(0, len(hashes), self.chunk):
            if not alive:
                break
            members = [h.to_bytes(8, "big") for h in hashes[lo : lo + self.chunk]]
            order = sorted(alive)
            pipe = self.r.pipeline(transaction=False)
            for key in cluster_keys:
                pipe.smismember(key, members)
            for node in order:
                for _, key in sets[node]:
                    pipe.smismember(key, members)
            answers = iter(pipe.execute())
            shared = [np.array([next(answers) for _ in cluster_keys], dtype=bool).any(axis=0)] if cluster_keys else []
            for node in order:
                tiers = [t for t, _ in sets[node]]
                rows = [next(answers) for _ in tiers]
                held = np.array(rows + shared, dtype=bool)  # (tiers [+ cluster], hashes), fastest first
                tiers += [CLUSTER] * len(shared)
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
            _, namespace, tier = self._parse(key.decode())
            out |= {(namespace, int.from_bytes(m, "big"), tier) for m in self.r.smembers(key)}
        return out
