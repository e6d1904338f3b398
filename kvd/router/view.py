"""GlobalView: follows many daemons' Watch streams and scores a request's prefix per node.

One feed (a thread) per daemon: it reads a Snapshot, then the Watch stream from the
snapshot's sequence number, applying every event to a shared :class:`BlockIndex` in the
order the daemon made them (a namespace cleared drops the node's blocks of it). When the
stream says ``resync`` (the daemon restarted, or this feed fell out of its event buffer),
the feed forgets the node's entries and starts over from a new snapshot. A daemon that
cannot be reached is left out of scores until its feed is back (the cluster blocks it
announced still count for the others: the cluster tier is not its to serve); a node removed
from the view takes its entries, cluster announcements included, with it
(:mod:`kvd.router.index` says why).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import grpc

from kvd.client import Client, ClientError
from kvd.client.channel import TlsFiles, open_channel
from kvd.media import TIER_BY_CODE
from kvd.router.index import BlockIndex, MemoryIndex
from kvd.v1 import view_pb2, view_pb2_grpc

log = logging.getLogger("kvd.router")

# A block's score by the tier it is read from. The cluster's follows from its load cost per
# byte next to NVMe's (kvd.server.view.load_s_per_byte's defaults: a 3.3 GB/s TCP get then
# DRAM->HBM, 0.34 ns/B, against NVMe->DRAM at 6 GB/s then DRAM->HBM, 0.21 ns/B):
# NVMe's weight times 0.21/0.34 is 0.3. Still above 0: reading it beats a prefill.
DEFAULT_TIER_WEIGHTS = {"hbm": 1.0, "dram": 0.8, "nvme": 0.5, "cluster": 0.3}


@dataclass(frozen=True)
class NodeScore:
    node: str
    matched_blocks: int
    tokens_by_tier: dict[str, int]
    score: float  # sum over matched blocks of their tier's weight


@dataclass(frozen=True)
class RouteScore:
    """``best``: the highest-scoring node among those that hold a block of their matched
    prefix in their own tiers; None when none does (no node can read the first block, or
    every node reads its prefix from the cluster alone: then the cluster's blocks are every
    node's alike and favour none, and the caller's own choice, ``route``'s ``fallback``,
    decides). ``nodes``: every node that can read a prefix, cluster-only ones included."""

    best: str | None
    nodes: dict[str, NodeScore]


class _Feed:
    """One daemon's stream into the index, run by a thread until stopped."""

    def __init__(
        self, address: str, index: BlockIndex, changed: threading.Condition, retry_s: float, tls: TlsFiles | None,
        token: str | None = None,
    ) -> None:
        self.address = address
        self.tls = tls
        self.token = token
        self.index = index
        self.changed = changed
        self.retry_s = retry_s
        self.epoch = b""
        self.next_seq = 0
        self.connected = False
        self.block_tokens: dict[str, int] = {}
        self._stop = threading.Event()
        self._client: Client | None = None
        self._channel: grpc.Channel | None = None
        self._thread = threading.Thread(target=self._run, name=f"kvd-feed-{address}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        for conn in (self._client, self._channel):
            if conn is not None:
                conn.close()  # ends a Watch stream blocked in another thread
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                raw, calls = open_channel(self.address, token=self.token, tls=self.tls)
                with Client(self.address, shared_memory=False, tls=self.tls, token=self.token) as client, raw as channel:
                    self._client, self._channel = client, channel
                    if self._stop.is_set():
                        return
                    self._follow(client, view_pb2_grpc.ViewStub(calls))
            except (ClientError, ValueError) as exc:
                if self._stop.is_set():
                    return
                log.info("feed %s: %s; retrying in %.1fs", self.address, exc, self.retry_s)
            except grpc.RpcError as exc:
                if self._stop.is_set():
                    return
                log.info("feed %s: %s; retrying in %.1fs", self.address, exc.code().name, self.retry_s)
            finally:
                self._client = self._channel = None
                self._set(connected=False)
            self._stop.wait(self.retry_s)

    def _follow(self, client: Client, view: view_pb2_grpc.ViewStub) -> None:
        # The Watch stub is called directly (not Client.watch) to ask for the cleared kind,
        # and to turn events into index entries without an object per event.
        while not self._stop.is_set():
            if not self.epoch:
                self._resync(client, view)
            request = view_pb2.WatchRequest(from_seq=self.next_seq, epoch=self.epoch, with_cleared=True)
            try:
                for batch in view.Watch(request):
                    if batch.resync:
                        self.epoch = b""
                        break
                    self._apply(batch.events)
                    self._set(connected=True, next_seq=batch.next_seq)
                else:
                    return  # the stream ended (the daemon stopped or the channel was closed)
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.CANCELLED:
                    return  # stop() closed the channel
                raise

    def _apply(self, events) -> None:
        """Apply one Watch batch in order. ``BlockIndex.apply`` adds before it removes, so a
        run of stores that follows removals (a copy dropped, then stored again) is applied
        after them, and a cleared namespace after everything before it."""
        stored: list[tuple[str, int, str]] = []
        removed: list[tuple[str, int, str]] = []
        for e in events:
            kind = e.WhichOneof("kind")
            if kind == "stored":
                if removed:
                    self.index.apply(self.address, stored, removed)
                    stored, removed = [], []
                stored.append((e.stored.namespace, e.stored.hash, TIER_BY_CODE[e.stored.tier]))
            elif kind == "removed":
                removed.append((e.removed.namespace, e.removed.hash, TIER_BY_CODE[e.removed.tier]))
            elif kind == "registered":
                self.block_tokens[e.registered.namespace] = e.registered.block_tokens
            elif kind == "cleared":
                self.index.apply(self.address, stored, removed)
                stored, removed = [], []
                self.index.drop_namespace(self.address, e.cleared.namespace)
        self.index.apply(self.address, stored, removed)

    def _resync(self, client: Client, view: view_pb2_grpc.ViewStub) -> None:
        """Replace the node's entries with its Snapshot (every page; the stub, not
        Client.snapshot, so that every tier the wire names, the cluster's included, is read
        by ``TIER_BY_CODE``)."""
        entries: list[tuple[str, int, str]] = []
        token, first = "", None
        while True:
            r = view.Snapshot(view_pb2.SnapshotRequest(page_token=token), timeout=client.timeout)
            first = first or r
            entries += [(b.namespace, b.hash, TIER_BY_CODE[t]) for b in r.blocks for t in b.tiers]
            token = r.next_page_token
            if not token:
                break
        self.block_tokens = {n.namespace: n.block_tokens for n in first.namespaces}
        self.index.drop_node(self.address)
        self.index.apply(self.address, entries, ())
        self.epoch = first.epoch
        self._set(connected=True, next_seq=first.as_of_seq)

    def _set(self, connected: bool, next_seq: int | None = None) -> None:
        with self.changed:
            self.connected = connected
            if next_seq is not None:
                self.next_seq = next_seq
            self.changed.notify_all()


class GlobalView:
    """The blocks of many kvd daemons, kept current from their event streams.

    ``tier_weights``: the score of a block by the fastest tier a node reads it from: its
    own tiers, else ``cluster`` (every node reads a cluster block, whichever node announced
    it); a tier left out weighs 0. ``DEFAULT_TIER_WEIGHTS`` by default.
    ``index``: where the view keeps its entries (in memory by default).
    """

    def __init__(
        self,
        addresses: Iterable[str] = (),
        tier_weights: dict[str, float] | None = None,
        index: BlockIndex | None = None,
        retry_s: float = 0.5,
        tls: TlsFiles | None = None,
        token: str | None = None,
    ) -> None:
        """``tls``: the CA (and client certificate, for mutual TLS) of daemons serving TCP
        with TLS; None: plain connections (unix sockets, --tcp-insecure). ``token``: the
        bearer token of daemons that serve tenants (the admin token sees every namespace; a
        tenant's, its own)."""
        self.tls = tls
        self.token = token
        self.tier_weights = dict(DEFAULT_TIER_WEIGHTS if tier_weights is None else tier_weights)
        self.index = index if index is not None else MemoryIndex()
        self.retry_s = retry_s
        self._changed = threading.Condition()
        self._feeds: dict[str, _Feed] = {}
        self._tellers: dict[str, Client] = {}  # node -> the client that announces turns to it
        for address in addresses:
            self.add_node(address)

    def add_node(self, address: str) -> None:
        if address in self._feeds:
            raise ValueError(f"{address} is already in the view")
        self._feeds[address] = _Feed(address, self.index, self._changed, self.retry_s, self.tls, self.token)

    def remove_node(self, address: str) -> None:
        """Stop following a daemon and forget what it holds."""
        feed = self._feeds.pop(address)
        feed.stop()
        teller = self._tellers.pop(address, None)
        if teller is not None:
            teller.close()
        self.index.drop_node(address)

    def nodes(self) -> list[str]:
        return list(self._feeds)

    def connected(self, address: str) -> bool:
        return self._feeds[address].connected

    def wait_connected(self, timeout: float = 10.0) -> bool:
        """Wait until every node's feed has its snapshot (True), or ``timeout`` seconds (False:
        the nodes not reached are left out of scores until they are)."""
        with self._changed:
            return self._changed.wait_for(lambda: all(f.connected for f in self._feeds.values()), timeout)

    def wait_for(self, address: str, epoch: bytes, seq: int, timeout: float = 30.0) -> bool:
        """Wait until the view has applied a daemon's events up to ``seq`` of ``epoch``."""
        feed = self._feeds[address]
        with self._changed:
            return self._changed.wait_for(
                lambda: feed.connected and feed.epoch == epoch and feed.next_seq >= seq, timeout
            )

    def score(self, namespace: str, hashes: Sequence[int]) -> RouteScore:
        """Per connected node, the prefix it can read (tokens by tier: its own tiers, then
        ``cluster`` for blocks it reads from the cluster) and its weighted score."""
        live = [a for a, f in self._feeds.items() if f.connected]
        nodes: dict[str, NodeScore] = {}
        matches = self.index.match(namespace, hashes, live)
        for address, match in matches.items():
            tokens = self._feeds[address].block_tokens.get(namespace, 0)
            nodes[address] = NodeScore(
                address,
                match.blocks,
                {str(tier): n * tokens for tier, n in match.by_tier.items()},  # plain names, as printed
                sum(n * self.tier_weights.get(tier, 0.0) for tier, n in match.by_tier.items()),
            )
        holders = [nodes[a] for a, m in matches.items() if m.own_blocks]
        best = max(holders, key=lambda s: (s.score, s.matched_blocks), default=None)
        return RouteScore(best.node if best else None, nodes)

    def route(
        self,
        namespace: str,
        hashes: Sequence[int],
        session_id: str = "",
        arrives_in_s: float = 0.0,
        fallback: str | None = None,
    ) -> RouteScore:
        """Score a request and tell the node it goes to that it is coming: the best node
        (or ``fallback`` when none holds its first block) gets a ``turn_ahead`` with the
        prompt's hashes, arriving in ``arrives_in_s`` seconds, and moves what it holds of
        them up before the request is sent. ``session_id``: the request's session (empty:
        the node finds it by the hashes). The route stands whether or not the node could
        be told (:meth:`announce`)."""
        route = self.score(namespace, hashes)
        node = route.best or fallback
        if node is not None:
            self.announce(node, namespace, hashes, session_id, arrives_in_s)
        return route

    def announce(
        self, node: str, namespace: str, hashes: Sequence[int], session_id: str = "", arrives_in_s: float = 0.0
    ) -> bool:
        """Send ``node`` a ``turn_ahead`` for a request; False when it could not be told (a
        failure is logged at debug level: an announcement is a hint)."""
        teller = self._tellers.get(node)
        if teller is None:
            teller = self._tellers[node] = Client(node, shared_memory=False, tls=self.tls, token=self.token)
        try:
            teller.expect_turn(namespace, session_id, hashes, arrives_in_s)
        except ClientError as exc:
            log.debug("could not announce a turn of %r to %s: %s", session_id, node, exc)
            return False
        return True

    def close(self) -> None:
        for address in list(self._feeds):
            self._feeds.pop(address).stop()
        for address in list(self._tellers):
            self._tellers.pop(address).close()

    def __enter__(self) -> GlobalView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
