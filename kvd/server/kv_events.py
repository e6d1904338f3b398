"""The KV-event publisher: `kvd serve --kv-events ENDPOINT` (off by default).

What a router that follows vLLM's KV events (llm-d's KV indexer) needs to score this node's
engine pods by what kvd holds:

- a ZMQ PUB socket sends multipart messages ``(topic, seq, payload)``: ``seq`` is the
  message's number, 8 bytes big-endian, from 0 at every start of the daemon;
- ``topic`` is ``kv@<pod>@<model>`` for every engine pod attached to the namespace (an
  engine's ``RegisterNamespace`` names its pod and served model): each pod can read what the
  node holds, so each is told. A namespace no engine attached to goes to
  ``kv@<--kv-events-pod>@<namespace>``. An attachment is announced: the namespace's held
  blocks, parents first, go to the new topic before anything newer does;
- ``payload`` is a msgpack ``[ts, events, 0]``; events are vLLM's ``BlockStored`` /
  ``BlockRemoved`` in the ``--kv-events-encoding`` (:mod:`kvd.server.kv_event_wire`), with
  each block's tokens when the engine gave them;
- an optional ROUTER socket (``--kv-events-replay``) answers ``(identity, "", start_seq)``
  with every buffered message from ``start_seq`` on, as ``(identity, "", topic, seq,
  payload)``, then ``(identity, "", "", -1, "")``; the last ``--kv-events-buffer`` messages
  are kept.

Sends never wait: PUB drops a message for a subscriber whose queue (``SNDHWM``) is full, as
vLLM's does, and that subscriber sees a gap in ``seq`` to replay. Everything runs on the
daemon's event loop thread; announcements and the replay socket are asyncio tasks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable

import msgspec
import zmq
import zmq.asyncio

from kvd.core import events as kvd_events
from kvd.core.catalog import BlockRecord
from kvd.core.types import BlockOrigin
from kvd.media import CLUSTER, TIER_NAMES
from kvd.server.kv_event_wire import MEDIUM, Encoding, Group, Keyable, encode_batch, wire_events

log = logging.getLogger("kvd.kv_events")

END_SEQ = (-1).to_bytes(8, "big", signed=True)  # the replay's end marker, as vLLM sends it
PUB_HWM = 100_000  # messages queued per subscriber before PUB drops (vLLM's default hwm)
REPLAY_YIELD_EVERY = 256  # replay messages sent between two turns of the event loop
ANNOUNCE_BLOCKS = 1024  # blocks per message of an announcement (one turn of the loop each)
MAX_PODS = 64  # engine pods attached to one namespace; the longest-silent one goes first


def is_bind_endpoint(endpoint: str) -> bool:
    """vLLM's rule: a wildcard (``tcp://*:5557``, ``::``), ``ipc://`` or ``inproc://`` endpoint
    is bound; any other (``tcp://indexer:5557``) is connected to, so kvd can push into a
    central indexer that binds its SUB socket, as vLLM pods do."""
    return "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://"))


def chain_order(blocks: dict[int, BlockRecord]) -> list[BlockRecord]:
    """``blocks`` with every parent before its children (linear: each block is walked once)."""
    out: list[BlockRecord] = []
    placed: set[int] = set()
    for record in blocks.values():
        up: list[BlockRecord] = []
        r: BlockRecord | None = record
        while r is not None and r.hash not in placed:
            placed.add(r.hash)
            up.append(r)
            r = blocks.get(r.parent) if r.parent is not None else None
        out.extend(reversed(up))
    return out


class Holdings:
    """What the publisher reads of the core (on the event loop thread, between core calls):
    a namespace's tokens per block, its blocks, and a held block's origin and parent."""

    def __init__(self, core) -> None:
        self._core = core

    def block_tokens(self, namespace: str) -> int:
        return self._core.namespace(namespace).block_tokens

    def blocks(self, namespace: str) -> dict[int, BlockRecord]:
        return self._core.namespace(namespace).blocks

    def published(self, namespace: str) -> list[int]:
        """The namespace's blocks this node put into the cluster tier (and the cluster still
        has, as far as the node knows), in the order they landed."""
        return [h for ns, h in self._core.exports.published if ns == namespace]

    def origin_of(self, namespace: str, h: int) -> tuple[BlockOrigin | None, int | None]:
        """KeyError when the block is not held."""
        record = self._core.namespace(namespace).blocks[h]
        if record.fastest_ready() is None:
            raise KeyError(h)
        return record.origin, record.parent


class KvEventPublisher:
    """PUB (and optional replay ROUTER) sockets publishing kvd's events to the topics of the
    engine pods attached to each namespace.

    ``publish`` and ``attach`` are called from the event loop thread after core calls;
    ``start`` and ``stop`` with the daemon. ``buffer_batches`` bounds the replay buffer
    (messages); ``pod`` is the default pod of a namespace no engine attached to.
    """

    def __init__(
        self,
        endpoint: str,
        pod: str,
        holdings: Holdings,
        replay_endpoint: str | None = None,
        buffer_batches: int = 10_000,
        encoding: Encoding = Encoding.ARRAY,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.endpoint = endpoint
        self.replay_endpoint = replay_endpoint
        self.pod = pod
        self.holdings = holdings
        self.encoding = Encoding(encoding)
        self.clock = clock
        self.next_seq = 0
        self.dropped_errors = 0  # messages a send error lost (logged; a subscriber sees the gap)
        self._buffer: deque[tuple[int, bytes, bytes]] = deque(maxlen=buffer_batches)  # (seq, topic, payload)
        self._encode = msgspec.msgpack.Encoder().encode
        # namespace -> {pod: model}, oldest attachment first (re-attaching moves it last)
        self._pods: dict[str, dict[str, str]] = {}
        # topic -> payloads published while its announcement runs, sent right after it
        self._backlog: dict[bytes, list[bytes]] = {}
        self._announcing: set[asyncio.Task] = set()
        self._ctx: zmq.Context | None = None
        self._pub: zmq.Socket | None = None
        self._replay: zmq.asyncio.Socket | None = None
        self._replay_task: asyncio.Task | None = None

    # -- topics ---------------------------------------------------------------------------
    def topics(self, namespace: str) -> list[bytes]:
        """Every topic the namespace's events go to."""
        pods = self._pods.get(namespace)
        if not pods:
            return [f"kv@{self.pod}@{namespace}".encode()]
        return [f"kv@{pod}@{model}".encode() for pod, model in pods.items()]

    def attach(self, namespace: str, pod: str | None, model: str | None) -> bool:
        """An engine pod serving ``model`` reads ``namespace`` through this daemon (None:
        the daemon's pod; the namespace as the model). A new topic is announced: the
        namespace's held blocks go to it (an asyncio task) before anything newer. True when
        the topic is new. Call from the event loop."""
        pod, model = pod or self.pod, model or namespace
        pods = self._pods.setdefault(namespace, {})
        new = pods.get(pod) != model
        pods.pop(pod, None)
        pods[pod] = model  # last: the most recently attached
        if len(pods) > MAX_PODS:
            gone = next(iter(pods))
            log.warning("kv-events: namespace %r has more than %d engine pods; pod %r is no longer told", namespace,
                        MAX_PODS, gone)
            del pods[gone]
        if new and self._pub is not None:
            topic = f"kv@{pod}@{model}".encode()
            self._backlog[topic] = []
            task = asyncio.get_running_loop().create_task(self._announce(namespace, topic), name="kvd-kv-announce")
            self._announcing.add(task)
            task.add_done_callback(self._announcing.discard)
        return new

    # -- publishing -----------------------------------------------------------------------
    def publish(self, events: list[kvd_events.Event]) -> None:
        """Send ``events`` (one core call's) as one message per namespace and topic. Never
        blocks and never raises: the caller is the daemon's event loop, after every RPC."""
        if self._pub is None:
            return
        keyable = Keyable(self.holdings.origin_of)
        per_namespace = wire_events(events, self.holdings.block_tokens, keyable)
        ts = self.clock()
        for namespace, groups in per_namespace.items():
            if not groups:
                continue
            payload = encode_batch(self.encoding, ts, groups, self._encode)
            for topic in self.topics(namespace):
                backlog = self._backlog.get(topic)
                if backlog is not None:
                    backlog.append(payload)  # after the topic's announcement
                else:
                    self._send(topic, payload)

    async def _announce(self, namespace: str, topic: bytes) -> None:
        """The namespace's held blocks, parents first, ANNOUNCE_BLOCKS a message, to
        ``topic``; then the blocks this node put into the cluster tier, as location updates
        (no tokens, as the cluster's own ``BlockStored`` events go out: the tokens went with
        the node's own copies); then what was published to it meanwhile."""
        try:
            order = chain_order(self.holdings.blocks(namespace))
            keyable = Keyable(self.holdings.origin_of)
            for lo in range(0, len(order), ANNOUNCE_BLOCKS):
                events = []
                for tier in TIER_NAMES:
                    for r in order[lo : lo + ANNOUNCE_BLOCKS]:
                        copy = r.copies.get(tier)
                        if copy is not None and copy.ready:
                            events.append(kvd_events.BlockStored(0, namespace, r.hash, r.parent, tier, r.nbytes, 0.0,
                                                                 None, r.origin))
                groups = wire_events(events, self.holdings.block_tokens, keyable).get(namespace)
                if groups:
                    self._send(topic, encode_batch(self.encoding, self.clock(), groups, self._encode))
                await asyncio.sleep(0)  # a long announcement must not hold up the RPCs
            published = self.holdings.published(namespace)
            for lo in range(0, len(published), ANNOUNCE_BLOCKS):
                # One location update a message: the blocks need not form a chain (a
                # consumer maps each hash on its own), so they are not grouped by chain.
                group = Group(True, MEDIUM[CLUSTER], self.holdings.block_tokens(namespace))
                group.hashes = published[lo : lo + ANNOUNCE_BLOCKS]
                self._send(topic, encode_batch(self.encoding, self.clock(), [group], self._encode))
                await asyncio.sleep(0)
        except Exception:  # noqa: BLE001 - a namespace gone meanwhile, a bug: logged, never fatal
            log.exception("kv-events: announcing %r to %s failed", namespace, topic.decode())
        finally:
            for payload in self._backlog.pop(topic, ()):
                self._send(topic, payload)

    def _send(self, topic: bytes, payload: bytes) -> None:
        seq = self.next_seq
        self.next_seq += 1
        self._buffer.append((seq, topic, payload))  # replayable even if this send fails
        try:
            self._pub.send_multipart((topic, seq.to_bytes(8, "big"), payload), flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # PUB drops rather than block; anything else is logged
            self.dropped_errors += 1
            log.warning("kv-events: message %d not sent: %s", seq, exc)

    def start(self) -> None:
        """Open the sockets (raises OSError naming the endpoint when one cannot be used);
        with a replay endpoint, call from the running event loop."""
        self._ctx = zmq.Context()
        what = "--kv-events"
        try:
            self._pub = self._ctx.socket(zmq.PUB)
            self._pub.setsockopt(zmq.SNDHWM, PUB_HWM)
            self._pub.setsockopt(zmq.LINGER, 0)
            if is_bind_endpoint(self.endpoint):
                self._pub.bind(self.endpoint)
            else:
                self._pub.connect(self.endpoint)
            if self.replay_endpoint is not None:
                what = "--kv-events-replay"
                self._replay = zmq.asyncio.Context.shadow(self._ctx).socket(zmq.ROUTER)
                # Room for a whole replay and its end marker, as vLLM sizes its own: ZMQ may
                # count up to HWM/2 messages a peer already read, hence twice the buffer.
                self._replay.setsockopt(zmq.SNDHWM, 2 * (self._buffer.maxlen + 1))
                self._replay.setsockopt(zmq.LINGER, 0)
                self._replay.bind(self.replay_endpoint)
                self._replay_task = asyncio.get_running_loop().create_task(self._serve_replay(), name="kvd-kv-replay")
        except zmq.ZMQError as exc:
            self.close()
            endpoint = self.endpoint if what == "--kv-events" else self.replay_endpoint
            raise OSError(f"{what} {endpoint}: {exc}") from exc
        log.info(
            "publishing KV events (%s encoding) on %s (topic kv@<pod>@<model>, by default kv@%s@<namespace>)%s",
            self.encoding.value,
            self.endpoint,
            self.pod,
            f", replay on {self.replay_endpoint}" if self.replay_endpoint else "",
        )

    async def _serve_replay(self) -> None:
        """Answer replay requests until cancelled; a malformed request is logged and skipped."""
        sock = self._replay
        while True:
            frames = await sock.recv_multipart()
            if len(frames) != 3 or len(frames[2]) != 8:
                log.warning("kv-events: invalid replay request of %d frames", len(frames))
                continue
            identity, _, start = frames
            start_seq = int.from_bytes(start, "big")
            # A copy: publishing goes on (and may push old messages out) while this yields.
            for i, (seq, topic, payload) in enumerate([m for m in self._buffer if m[0] >= start_seq]):
                await sock.send_multipart((identity, b"", topic, seq.to_bytes(8, "big"), payload))
                if i % REPLAY_YIELD_EVERY == REPLAY_YIELD_EVERY - 1:
                    await asyncio.sleep(0)  # a long replay must not hold up the RPCs
            await sock.send_multipart((identity, b"", b"", END_SEQ, b""))

    async def stop(self) -> None:
        """Stop announcing and serving replays, then close the sockets (pending messages are
        dropped)."""
        for task in list(self._announcing):
            task.cancel()
        await asyncio.gather(*self._announcing, return_exceptions=True)
        if self._replay_task is not None:
            self._replay_task.cancel()
            await asyncio.gather(self._replay_task, return_exceptions=True)
            self._replay_task = None
        self.close()

    def close(self) -> None:
        for sock in (self._pub, self._replay):
            if sock is not None:
                sock.close(linger=0)
        self._pub = self._replay = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None
