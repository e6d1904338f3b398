"""The vLLM-format KV-event publisher: `kvd serve --kv-events ENDPOINT` (off by default).

kvd's events go out exactly as vLLM 0.33's ``ZmqEventPublisher`` sends its own, so a
consumer of vLLM's KV events (llm-d's indexer, vLLM's example subscriber) consumes kvd too:

- a ZMQ PUB socket sends multipart messages ``(topic, seq, payload)``: ``seq`` is the batch's
  sequence number, 8 bytes big-endian, from 0 at every start of the daemon, one per message;
- ``payload`` is a msgpack ``KVEventBatch``: the array ``[ts, events, data_parallel_rank]``
  (``ts`` unix seconds as a float64, rank always 0), each event a map tagged ``"type"``:
  ``BlockStored`` (``block_hashes``, ``parent_block_hash``, ``token_ids``, ``block_size``,
  ``lora_id``, ``medium``, ``lora_name``, then ``session_id`` when known), ``BlockRemoved``
  (``block_hashes``, ``medium``) or ``AllBlocksCleared``; fields in vLLM's declaration order,
  those equal to their default left out (msgspec ``omit_defaults``). The msgspec structs
  below declare vLLM 0.33's fields, order and defaults, unused ones included, because the
  encoder's bytes depend on them (BlockStored may have 16 entries, its 15 fields and the
  tag, more than a fixmap holds, so it always gets a map16 header): the bytes are the ones
  vLLM's own encoder writes for the same events, which tests/test_kv_events.py checks with
  vLLM's classes;
- ``medium`` names the tier: ``GPU`` (hbm), ``CPU`` (dram), ``STORAGE`` (nvme);
- the topic is ``kv@<pod>@<namespace>``, the form llm-d's indexer parses (pod, model name):
  kvd's namespace takes the place of vLLM's served model name, and ``lora_id``/``lora_name``
  stay null (a namespace already includes its LoRA). One message carries one namespace's
  events, so one core call's events become one message per namespace they touch;
- an optional ROUTER socket (``--kv-events-replay``) answers a request ``(identity, "",
  start_seq)`` with every buffered message from ``start_seq`` on, as ``(identity, "", topic,
  seq, payload)``, then ``(identity, "", "", -1, "")``; the last ``--kv-events-buffer``
  messages (default 10,000) are kept.

kvd does not know token ids: ``token_ids`` is always empty, and ``block_size`` is the
namespace's tokens per block. Registrations and session changes have no vLLM form and are
not sent. Consecutive stores of one chain (same tier and session) share one BlockStored, and
consecutive removals from one tier one BlockRemoved, as vLLM groups its own.

Sends never wait: PUB drops a message for a subscriber whose queue (``SNDHWM``) is full, as
vLLM's does, and that subscriber sees a gap in ``seq`` to replay. Everything runs on the
daemon's event loop thread; the replay socket is served by an asyncio task.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable

import msgspec
import zmq
import zmq.asyncio

from kvd.core import events as kvd_events

log = logging.getLogger("kvd.kv_events")


# -- vLLM 0.33's wire schema (vllm/distributed/kv_events.py): names, order, defaults ------------


class KVCacheEvent(msgspec.Struct, omit_defaults=True, gc=False, tag=True):
    """A map tagged ``"type"`` with the class name; fields equal to their default left out."""


class BlockStored(KVCacheEvent):
    block_hashes: list[int]  # vLLM: ExternalBlockHash = bytes | int; kvd's hashes are ints
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None
    locality: str | None = None
    ownership: str | None = None
    session_id: str | None = None
    lookahead_token_ids: list[list[int]] | None = None


class BlockRemoved(KVCacheEvent):
    block_hashes: list[int]
    medium: str | None
    group_idx: int | None = None
    locality: str | None = None
    ownership: str | None = None


class AllBlocksCleared(KVCacheEvent):
    pass


class KVEventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """``[ts, events, data_parallel_rank]``."""

    ts: float
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]
    data_parallel_rank: int | None = None

MEDIUM = {"hbm": "GPU", "dram": "CPU", "nvme": "STORAGE"}  # vLLM's MEDIUM_* names per tier
END_SEQ = (-1).to_bytes(8, "big", signed=True)  # the replay's end marker, as vLLM sends it
PUB_HWM = 100_000  # messages queued per subscriber before PUB drops (vLLM's default hwm)
REPLAY_YIELD_EVERY = 256  # replay messages sent between two turns of the event loop


def is_bind_endpoint(endpoint: str) -> bool:
    """vLLM's rule: a wildcard (``tcp://*:5557``, ``::``), ``ipc://`` or ``inproc://`` endpoint
    is bound; any other (``tcp://indexer:5557``) is connected to, so kvd can push into a
    central indexer that binds its SUB socket, as vLLM pods do."""
    return "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://"))


def vllm_events(
    events: Iterable[kvd_events.Event], block_tokens: Callable[[str], int]
) -> dict[str, list[KVCacheEvent]]:
    """kvd events -> vLLM events, per namespace in order of first appearance.

    Each list keeps the order of its namespace's events. ``block_tokens(namespace)`` gives
    ``block_size``. Registrations and session changes have no vLLM form and are left out.
    """
    out: dict[str, list[KVCacheEvent]] = {}
    for e in events:
        if isinstance(e, kvd_events.BlockStored):
            batch = out.setdefault(e.namespace, [])
            last = batch[-1] if batch else None
            medium = MEDIUM[e.tier]
            if (
                isinstance(last, BlockStored)
                and last.medium == medium
                and last.session_id == e.session_id
                and e.parent == last.block_hashes[-1]
            ):
                last.block_hashes.append(e.hash)  # the chain goes on: one event, as vLLM's
                continue
            batch.append(
                BlockStored(
                    block_hashes=[e.hash],
                    parent_block_hash=e.parent,
                    token_ids=[],
                    block_size=block_tokens(e.namespace),
                    lora_id=None,
                    medium=medium,
                    lora_name=None,
                    session_id=e.session_id,
                )
            )
        elif isinstance(e, kvd_events.BlockRemoved):
            batch = out.setdefault(e.namespace, [])
            last = batch[-1] if batch else None
            medium = MEDIUM[e.tier]
            if isinstance(last, BlockRemoved) and last.medium == medium:
                last.block_hashes.append(e.hash)
                continue
            batch.append(BlockRemoved(block_hashes=[e.hash], medium=medium))
        elif isinstance(e, kvd_events.NamespaceCleared):
            out.setdefault(e.namespace, []).append(AllBlocksCleared())
    return out


class KvEventPublisher:
    """PUB (and optional replay ROUTER) sockets publishing kvd's events in vLLM's format.

    ``publish`` is called from the event loop thread after each core call; ``start`` and
    ``close`` with the daemon. ``buffer_batches`` bounds the replay buffer (messages).
    """

    def __init__(
        self,
        endpoint: str,
        pod: str,
        block_tokens: Callable[[str], int],
        replay_endpoint: str | None = None,
        buffer_batches: int = 10_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.endpoint = endpoint
        self.replay_endpoint = replay_endpoint
        self.pod = pod
        self.block_tokens = block_tokens
        self.clock = clock
        self.next_seq = 0
        self.dropped_errors = 0  # messages a send error lost (logged; a subscriber sees the gap)
        self._buffer: deque[tuple[int, bytes, bytes]] = deque(maxlen=buffer_batches)  # (seq, topic, payload)
        self._encode = msgspec.msgpack.Encoder().encode
        self._ctx: zmq.Context | None = None
        self._pub: zmq.Socket | None = None
        self._replay: zmq.asyncio.Socket | None = None
        self._replay_task: asyncio.Task | None = None

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
            "publishing vLLM KV events on %s (topic kv@%s@<namespace>)%s",
            self.endpoint,
            self.pod,
            f", replay on {self.replay_endpoint}" if self.replay_endpoint else "",
        )

    def publish(self, events: list[kvd_events.Event]) -> None:
        """Send ``events`` (one core call's) as one message per namespace. Never blocks and
        never raises: the caller is the daemon's event loop, after every RPC."""
        if self._pub is None:
            return
        per_namespace = vllm_events(events, self.block_tokens)
        if not per_namespace:
            return
        ts = self.clock()
        for namespace, batch in per_namespace.items():
            topic = f"kv@{self.pod}@{namespace}".encode()
            payload = self._encode(KVEventBatch(ts, batch, 0))  # rank 0: kvd is one publisher
            seq = self.next_seq
            self.next_seq += 1
            self._buffer.append((seq, topic, payload))  # replayable even if this send fails
            try:
                self._pub.send_multipart((topic, seq.to_bytes(8, "big"), payload), flags=zmq.NOBLOCK)
            except zmq.ZMQError as exc:  # PUB drops rather than block; anything else is logged
                self.dropped_errors += 1
                log.warning("kv-events: message %d not sent: %s", seq, exc)

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
        """Stop serving replays, then close the sockets (pending messages are dropped)."""
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
