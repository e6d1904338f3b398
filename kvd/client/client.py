"""kvd.client.Client: the Python client of a kvd daemon.

Local clients map the daemon's shared-memory arena and copy block bytes straight into and
out of its slots; only slot offsets and leases travel over gRPC. When the arena cannot be
mapped (another host, another container without the shm mount, permissions) the client
sends the bytes inline over gRPC streams instead. ``Client.shared_memory`` says which.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grpc

from kvd.client import arena_io
from kvd.client.channel import TlsFiles, open_channel
from kvd.client.results import (
    TIER_NAME,
    BlockInfo,
    DrainResult,
    NamespaceInfo,
    PinResult,
    Score,
    SessionInfo,
    SessionState,
    Snapshot,
    Status,
    TierFault,
    TierInfo,
    WatchBatch,
    _block_info,
    _cluster_info,
    _view_event,
)
from kvd.tiers.dram import HEADER_BYTES, ArenaMapping, open_arena
from kvd.tiers.hbm_share import OpenedPool, PoolHandle
from kvd.v1 import admin_pb2, admin_pb2_grpc, engine_pb2, engine_pb2_grpc, types_pb2, view_pb2, view_pb2_grpc

DEFAULT_SOCKET = "var/kvd.sock"
MAX_MESSAGE_BYTES = 256 << 20
log = logging.getLogger("kvd.client")
_CHAIN = object()  # parents omitted: each block's parent is the previous hash in the list

SlotCopy = Callable[[Any, list[int], list[int]], None]
"""``copy(pages, indexes, offsets)``: move block ``indexes[i]`` (a position in the call's
hashes) to or from ``pages[offsets[i] : offsets[i] + block_bytes]``; ``pages`` is the mapped
arena's data pages (a writable memoryview) or, for blocks in the daemon's HBM tier, its pool
(a 1-D uint8 torch tensor on the pool's device), valid only during the call. A batch may
call it once for each."""


class ClientError(Exception):
    """A daemon call failed: ``code`` is the gRPC status code, ``details`` its message."""

    def __init__(self, code: grpc.StatusCode, details: str, request_id: str | None = None) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.request_id = request_id  # the daemon's id of the failed call, as in its logs


SESSION_EVENT_KINDS = {
    "turn_start": engine_pb2.TURN_START,
    "turn_end": engine_pb2.TURN_END,
    "tool_pause": engine_pb2.TOOL_PAUSE,
    "tool_resume": engine_pb2.TOOL_RESUME,
    "session_end": engine_pb2.SESSION_END,
    "turn_ahead": engine_pb2.TURN_AHEAD,
}


def default_address() -> str:
    """``KVD_ADDR`` if set, else the default socket of `make serve` (./var/kvd.sock)."""
    return os.environ.get("KVD_ADDR") or f"unix://{os.path.abspath(DEFAULT_SOCKET)}"


def _request_id(exc: grpc.RpcError) -> str | None:
    trailing = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    return next((v for k, v in trailing or () if k == "x-request-id"), None)


def _u64(values: Sequence[int], what: str) -> list[int]:
    out = list(values)
    for v in out:
        if not isinstance(v, int) or not 0 <= v < 1 << 64:
            raise ValueError(f"{what} must be 64-bit unsigned integers, got {v!r}")
    return out


def _block_specs(
    hashes: list[int],
    parents: Sequence[int | None] | None,
    sizes: list[int],
    token_ids: Sequence[Sequence[int]] | None = None,
    extra_keys: Sequence[bytes | None] | None = None,
) -> list:
    """BlockSpecs of a store: ``parents`` omitted, each block's parent is the previous hash;
    ``token_ids`` and ``extra_keys``, when given, one entry per block."""
    if parents is None:
        parents = [None, *hashes[:-1]]
    for what, values in (("parents", parents), ("token_ids", token_ids), ("extra_keys", extra_keys)):
        if values is not None and len(values) != len(hashes):
            raise ValueError(f"{len(hashes)} hashes but {len(values)} {what}")
    specs = []
    for i, (h, p, n) in enumerate(zip(hashes, parents, sizes)):
        spec = types_pb2.BlockSpec(hash=h, nbytes=n)
        if p is not None:
            spec.parent = _u64([p], "parents")[0]
        if token_ids is not None:
            spec.token_ids.extend(token_ids[i])
        if extra_keys is not None and extra_keys[i]:
            spec.extra_keys = extra_keys[i]
        specs.append(spec)
    return specs


class Client:
    """A connection to one kvd daemon. Thread-safe for concurrent calls; close() when done."""

    def __init__(
        self,
        address: str | None = None,
        *,
        shared_memory: bool | None = None,
        timeout: float = 60.0,
        batch_bytes: int = 64 << 20,
        pipeline_depth: int = 2,
        token: str | None = None,
        tls: TlsFiles | None = None,
    ) -> None:
        """``shared_memory``: None tries the arena and falls back to inline; True requires it.
        ``token``: a bearer token sent with every call: the daemon's admin token (Admin calls
        over TCP need it), or a tenant's (a daemon with tenants needs one); ``tls``:
        CA and optional client certificate for a daemon serving TCP with TLS."""
        self.address = address or default_address()
        self.timeout = timeout
        self.batch_bytes = batch_bytes
        if pipeline_depth < 1:
            raise ValueError("pipeline_depth must be at least 1")
        self.pipeline_depth = pipeline_depth
        options = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ]
        self._raw_channel, self._channel = open_channel(self.address, token=token, tls=tls, options=options)
        self._engine = engine_pb2_grpc.EngineStub(self._channel)
        self._admin = admin_pb2_grpc.AdminStub(self._channel)
        self._view = view_pb2_grpc.ViewStub(self._channel)
        self._want_shm = shared_memory
        self._block_bytes: dict[str, int] = {}
        self._arena: ArenaMapping | None = None
        self._hbm: OpenedPool | None = None  # the daemon's HBM pool, when it has one
        self._top_bytes = 0  # size of the daemon's top tier (from GetArena; 0: not asked)
        self._shm_checked = False

    # -- lifecycle ------------------------------------------------------------------------
    def close(self) -> None:
        self._unmap()
        self._raw_channel.close()

    def _unmap(self) -> None:
        if self._hbm is not None:
            self._hbm.close()
            self._hbm = None
        if self._arena is not None:
            self._arena.close()
            self._arena = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Block until the daemon answers; ClientError(UNAVAILABLE) after ``timeout`` seconds."""
        try:
            grpc.channel_ready_future(self._raw_channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise ClientError(grpc.StatusCode.UNAVAILABLE, f"no kvd daemon answers at {self.address}") from None

    def serving(self) -> bool:
        """Whether the daemon serves stores and loads (gRPC health SERVING), False while it is
        drained or stopping."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        reply = self._call(health_pb2_grpc.HealthStub(self._channel).Check, health_pb2.HealthCheckRequest())
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    @property
    def shared_memory(self) -> bool:
        """Whether block bytes go through the mapped arena (True) or inline over gRPC."""
        self._ensure_arena()
        return self._arena is not None

    # -- engine API -----------------------------------------------------------------------
    def register_namespace(
        self, name: str, block_tokens: int, block_bytes: int, model_name: str | None = None, pod_id: str | None = None
    ) -> bool:
        """Register a namespace's geometry; True when it is new. An engine names the model it
        serves and its pod's id as the router's scheduler knows it: the daemon's KV events
        for the namespace then go to that pod's topic too (``kv@<pod_id>@<model_name>``)."""
        req = engine_pb2.RegisterNamespaceRequest(
            namespace=name, block_tokens=block_tokens, block_bytes=block_bytes,
            model_name=model_name or "", pod_id=pod_id or "",
        )
        created = self._call(self._engine.RegisterNamespace, req).created
        self._block_bytes[name] = block_bytes
        return created

    def lookup(self, namespace: str, hashes: Sequence[int], session_id: str | None = None) -> list[str]:
        """Tier names (``"dram"``/``"nvme"``) of the longest held prefix; [] if the first is missing.

        With ``session_id`` the lookup also marks that session's turn as started.
        """
        req = engine_pb2.LookupRequest(namespace=namespace, hashes=hashes, session_id=session_id or "")
        tiers: list[str] = []
        for run in self._call(self._engine.Lookup, req).runs:
            tiers += [TIER_NAME[run.tier]] * run.blocks
        return tiers

    def store(
        self,
        namespace: str,
        hashes: Sequence[int],
        blocks: Sequence[bytes | bytearray | memoryview],
        parents: Sequence[int | None] | None = None,
        session_id: str | None = None,
        token_ids: Sequence[Sequence[int]] | None = None,
        lora_name: str | None = None,
        extra_keys: Sequence[bytes | None] | None = None,
    ) -> int:
        """Store blocks; returns how many were written (the rest were already held, or lay
        behind a block that went while they were stored: no lookup could reach them).

        ``parents``: each block's parent hash (None for a chain's first block); omitted, each
        block's parent is the previous hash in the list. ``token_ids``: each block's tokens
        (the namespace's tokens per block), kept with it and published with its KV events;
        ``lora_name`` and ``extra_keys`` (each block's engine extra keys as one msgpack
        array, or None) go with them.
        """
        hashes = _u64(hashes, "hashes")
        if len(blocks) != len(hashes):
            raise ValueError(f"{len(hashes)} hashes but {len(blocks)} blocks")
        specs = _block_specs(hashes, parents, [memoryview(b).nbytes for b in blocks], token_ids, extra_keys)
        shm = self._ensure_arena()
        ranges = list(self._batches([s.nbytes for s in specs]))
        if shm:

            def fill(arena: ArenaMapping, lo: int, slots) -> None:
                arena_io.fill(arena, self._pool, slots, blocks[lo : lo + len(slots)])

            return self._store_shm(namespace, specs, fill, ranges, session_id, lora_name)
        return sum(
            self._store_inline(namespace, specs[lo:hi], blocks[lo:hi], session_id, lora_name) for lo, hi in ranges
        )

    def load(self, namespace: str, hashes: Sequence[int]) -> list[bytes | None]:
        """Each block's bytes, or None where the daemon does not hold it (or it failed its checksum)."""
        hashes = _u64(hashes, "hashes")
        shm = self._ensure_arena()
        ranges = list(self._batches([self._namespace_block_bytes(namespace)] * len(hashes)))
        if shm:

            def drain(arena: ArenaMapping, lo: int, slots) -> list:
                return [arena_io.read(arena, self._pool, s.slot, s.nbytes) if s.found else None for s in slots]

            return self._load_shm(namespace, hashes, ranges, drain, missing=None)
        out: list[bytes | None] = []
        for lo, hi in ranges:
            out += self._load_inline(namespace, hashes[lo:hi])
        return out

    def load_into(self, namespace: str, hashes: Sequence[int], outs: Sequence[memoryview | bytearray]) -> list[bool]:
        """Copy each block into the matching writable buffer; True where it was found."""
        hashes = _u64(hashes, "hashes")
        if len(outs) != len(hashes):
            raise ValueError(f"{len(hashes)} hashes but {len(outs)} buffers")
        shm = self._ensure_arena()
        ranges = list(self._batches([memoryview(o).nbytes for o in outs]))
        if shm:

            def drain(arena: ArenaMapping, lo: int, slots) -> list[bool]:
                return arena_io.drain_into(arena, self._pool, slots, outs[lo : lo + len(slots)])

            return self._load_shm(namespace, hashes, ranges, drain)
        found: list[bool] = []
        for lo, hi in ranges:
            for data, buf in zip(self._load_inline(namespace, hashes[lo:hi]), outs[lo:hi]):
                if data is not None:
                    memoryview(buf).cast("B")[: len(data)] = data
                found.append(data is not None)
        return found

    def arena_pages(self) -> memoryview | None:
        """The mapped arena's data pages (what :meth:`store_slots`/:meth:`load_slots` hand
        their copy functions), or None when block bytes go inline. Drop the view before
        :meth:`close` (an unmap with live views is a BufferError)."""
        if not self._ensure_arena():
            return None
        return self._arena.view(HEADER_BYTES, self._arena.capacity_bytes)

    def store_slots(
        self,
        namespace: str,
        hashes: Sequence[int],
        block_bytes: int,
        copy: SlotCopy,
        parents: Sequence[int | None] | None = None,
        session_id: str | None = None,
        token_ids: Sequence[Sequence[int]] | None = None,
        lora_name: str | None = None,
        extra_keys: Sequence[bytes | None] | None = None,
    ) -> int:
        """Store ``block_bytes``-byte blocks whose bytes ``copy`` writes straight into the
        arena slots PrepareStore grants (no buffer of the caller's in between); it is called
        once per batch, with only the blocks the daemon does not hold yet. Returns how many
        were written. Needs the arena: FAILED_PRECONDITION without it (use :meth:`store`).
        ``token_ids``, ``lora_name``, ``extra_keys``: as for :meth:`store`."""
        hashes = _u64(hashes, "hashes")
        if block_bytes <= 0:
            raise ValueError(f"block_bytes must be positive, got {block_bytes}")
        specs = _block_specs(hashes, parents, [block_bytes] * len(hashes), token_ids, extra_keys)
        self._require_arena()

        def fill(arena: ArenaMapping, lo: int, slots) -> None:
            arena_io.copy_slots(arena, self._pool, copy, [(lo + i, s.slot) for i, s in enumerate(slots) if s.write])

        ranges = list(self._batches([block_bytes] * len(hashes)))
        return self._store_shm(namespace, specs, fill, ranges, session_id, lora_name)

    def load_slots(self, namespace: str, hashes: Sequence[int], block_bytes: int, copy: SlotCopy) -> list[bool]:
        """Load blocks by letting ``copy`` read them straight from the arena slots PrepareLoad
        pins (called once per batch with the blocks found); True where a block was found and
        its lease held to the end (False: missing, failed its checksum, or its lease expired
        while copying, so what ``copy`` read cannot be trusted). Needs the arena, as
        :meth:`store_slots`."""
        hashes = _u64(hashes, "hashes")
        if block_bytes <= 0:
            raise ValueError(f"block_bytes must be positive, got {block_bytes}")
        self._require_arena()

        def drain(arena: ArenaMapping, lo: int, slots) -> list[bool]:
            arena_io.copy_slots(arena, self._pool, copy, [(lo + i, s.slot) for i, s in enumerate(slots) if s.found])
            return [s.found for s in slots]

        return self._load_shm(namespace, hashes, list(self._batches([block_bytes] * len(hashes))), drain)

    def session_event(
        self,
        namespace: str,
        session_id: str,
        kind: str,
        hashes: Sequence[int] = (),
        tool: str | None = None,
        expected_pause_s: float | None = None,
        arrives_in_s: float | None = None,
    ) -> SessionState:
        """Tell the daemon what a session is doing. ``kind``: turn_start (with the prompt's
        ``hashes``), turn_end, tool_pause (``tool``, optional ``expected_pause_s``),
        tool_resume, session_end, turn_ahead (the next turn's ``hashes``, arriving in
        ``arrives_in_s`` seconds). turn_ahead and session_end may name the session by its
        hashes alone (``session_id=""``). Returns the session's state after the event (an
        empty state: no live session continues those hashes)."""
        enum = SESSION_EVENT_KINDS.get(kind)
        if enum is None:
            raise ValueError(f"unknown session event {kind!r}; known: {', '.join(SESSION_EVENT_KINDS)}")
        req = engine_pb2.SessionEventRequest(
            namespace=namespace, session_id=session_id, kind=enum, hashes=_u64(hashes, "hashes"), tool=tool or ""
        )
        if expected_pause_s is not None:
            req.expected_pause_s = expected_pause_s
        if arrives_in_s is not None:
            req.arrives_in_s = arrives_in_s
        r = self._call(self._engine.SessionEvent, req)
        return SessionState(r.state, r.turns)

    def expect_turn(
        self, namespace: str, session_id: str, hashes: Sequence[int], arrives_in_s: float
    ) -> SessionState:
        """Announce a session's next turn: its prompt's ``hashes`` arrive in ``arrives_in_s``
        seconds (what a router or an agent framework knows before the turn is sent). The
        daemon moves the blocks it holds of that prompt up ahead of the turn."""
        return self.session_event(namespace, session_id, "turn_ahead", hashes, arrives_in_s=arrives_in_s)

    # -- admin API ------------------------------------------------------------------------
    def status(self) -> Status:
        r = self._call(self._admin.Status, admin_pb2.StatusRequest())
        return Status(
            version=r.version,
            uptime_s=r.uptime_s,
            policy=r.policy,
            tiers=[
                TierInfo(
                    TIER_NAME[t.tier], t.capacity_bytes, t.used_bytes, t.blocks, t.location, t.direct_io, t.degraded,
                    [TierFault(f.op, f.errno, f.count, f.last_error, f.active) for f in t.faults],
                )
                for t in r.tiers
            ],
            namespaces=[NamespaceInfo(n.namespace, n.block_tokens, n.block_bytes, n.blocks) for n in r.namespaces],
            leases=r.leases,
            write_behind_queue=r.write_behind_queue,
            recovered_blocks=r.recovered_blocks,
            dropped_on_recovery=r.dropped_on_recovery,
            cluster=_cluster_info(r.cluster) if r.HasField("cluster") else None,
        )

    def list_blocks(self, namespace: str | None = None, page_size: int = 1000) -> Iterator[BlockInfo]:
        token = ""
        while True:
            req = admin_pb2.ListBlocksRequest(namespace=namespace or "", page_size=page_size, page_token=token)
            r = self._call(self._admin.ListBlocks, req)
            for b in r.blocks:
                yield _block_info(b)
            token = r.next_page_token
            if not token:
                return

    # -- view API -------------------------------------------------------------------------
    def watch(
        self,
        from_seq: int = 0,
        epoch: bytes = b"",
        namespace: str | None = None,
        with_cleared: bool = False,
        with_sessions: bool = False,
    ) -> Iterator[WatchBatch]:
        """The daemon's events from ``from_seq`` (0: from now), as they happen; ends after a
        ``resync`` batch. Cleared-namespace and session events come only when asked for.
        Close the iterator (or the client) to stop."""
        req = view_pb2.WatchRequest(
            from_seq=from_seq,
            epoch=epoch,
            namespace=namespace or "",
            with_cleared=with_cleared,
            with_sessions=with_sessions,
        )
        try:
            for r in self._view.Watch(req):
                yield WatchBatch(r.epoch, [_view_event(e) for e in r.events], r.resync, r.next_seq)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.CANCELLED:
                return
            raise ClientError(exc.code(), exc.details() or "") from None

    def snapshot(self, namespace: str | None = None, page_size: int = 1000) -> Snapshot:
        """Every held block (all pages) and the sequence number the first page was taken at."""
        blocks: list[BlockInfo] = []
        token, first = "", None
        while True:
            req = view_pb2.SnapshotRequest(namespace=namespace or "", page_size=page_size, page_token=token)
            r = self._call(self._view.Snapshot, req)
            first = first or r
            blocks += [_block_info(b) for b in r.blocks]
            token = r.next_page_token
            if not token:
                return Snapshot(
                    first.epoch, first.as_of_seq, blocks, {n.namespace: n.block_tokens for n in first.namespaces}
                )

    def score(self, namespace: str, hashes: Sequence[int]) -> Score:
        """How much of ``hashes``' prefix the daemon holds, per tier, and its load time."""
        r = self._call(self._view.Score, view_pb2.ScoreRequest(namespace=namespace, hashes=hashes))
        by_tier = {TIER_NAME[t.tier]: t.blocks for t in r.by_tier}
        return Score(r.matched_blocks, r.matched_tokens, by_tier, r.estimated_load_s)

    def clear_namespace(self, namespace: str) -> tuple[int, int]:
        """Drop every block of ``namespace`` that nothing uses; (removed, still held)."""
        r = self._call(self._admin.ClearNamespace, admin_pb2.ClearNamespaceRequest(namespace=namespace))
        return r.removed, r.remaining

    def check(self) -> list[str]:
        """The daemon's invariant violations; empty when healthy."""
        return list(self._call(self._admin.Check, admin_pb2.CheckRequest()).problems)

    def sync(self, timeout_s: float = 60.0) -> int:
        """Wait until every committed block has a durable NVMe copy; returns blocks still pending."""
        req = admin_pb2.SyncRequest(timeout_s=timeout_s)
        return self._call(self._admin.Sync, req, timeout=timeout_s + self.timeout).pending

    # -- operator API (kvctl) ---------------------------------------------------------------
    def evict(
        self, namespace: str | None = None, session_id: str | None = None, all: bool = False
    ) -> tuple[int, int]:
        """Drop a session's own blocks (``namespace`` + ``session_id``), a namespace's, or
        ``all``; (removed, still held because in use)."""
        req = admin_pb2.EvictRequest(namespace=namespace or "", session_id=session_id or "", all=all)
        r = self._call(self._admin.Evict, req)
        return r.removed, r.remaining

    def pin(self, namespace: str, hashes: Sequence[int] = (), session_id: str | None = None) -> PinResult:
        """Keep held blocks in place whatever the policy says: ``hashes``, or a session's chain."""
        req = admin_pb2.PinRequest(namespace=namespace, hashes=_u64(hashes, "hashes"), session_id=session_id or "")
        r = self._call(self._admin.Pin, req)
        return PinResult(r.changed, r.not_held, r.pinned)

    def unpin(self, namespace: str, hashes: Sequence[int] = (), session_id: str | None = None) -> PinResult:
        """Let the policy decide about these blocks again (``not_held``: were not pinned)."""
        req = admin_pb2.PinRequest(namespace=namespace, hashes=_u64(hashes, "hashes"), session_id=session_id or "")
        r = self._call(self._admin.Unpin, req)
        return PinResult(r.changed, r.not_held, r.pinned)

    def sessions(self, namespace: str | None = None, session_id: str | None = None) -> list[SessionInfo]:
        """Sessions the daemon knows, most recently active first (one, with ``session_id``)."""
        req = admin_pb2.ListSessionsRequest(namespace=namespace or "", session_id=session_id or "")
        return [
            SessionInfo(
                x.namespace, x.session_id, x.state, x.inferred, x.turns, x.chain_blocks, x.held_blocks,
                x.tool or None, x.expected_pause_s if x.HasField("expected_pause_s") else None, x.idle_s,
                x.paused_s if x.state == "tool_pause" else None,
                x.ahead_in_s if x.HasField("ahead_in_s") else None, x.ahead_blocks,
            )
            for x in self._call(self._admin.ListSessions, req).sessions
        ]

    def policy(self) -> tuple[str, list[str]]:
        """(the retention policy in use, the policies the daemon can switch to)."""
        r = self._call(self._admin.GetPolicy, admin_pb2.GetPolicyRequest())
        return r.policy, list(r.available)

    def set_policy(self, name: str) -> str:
        """Switch the retention policy at run time; returns the policy now in use."""
        return self._call(self._admin.SetPolicy, admin_pb2.SetPolicyRequest(policy=name)).policy

    def drain(self, timeout_s: float = 60.0, exit: bool = False) -> DrainResult:
        """Stop new stores and loads, let leases finish, write kept blocks to NVMe; with
        ``exit`` the daemon then exits 0 (as on SIGTERM), else it stays drained until resume()."""
        req = admin_pb2.DrainRequest(timeout_s=timeout_s, exit=exit)
        r = self._call(self._admin.Drain, req, timeout=timeout_s + self.timeout)
        return DrainResult(r.written, r.pending, r.leases, r.exiting)

    def resume(self) -> bool:
        """Serve again after drain(); True when the daemon was draining."""
        return self._call(self._admin.Resume, admin_pb2.ResumeRequest()).was_draining

    # -- internals ------------------------------------------------------------------------
    def _call(self, method, request, timeout: float | None = None):
        try:
            return method(request, timeout=timeout or self.timeout)
        except grpc.RpcError as exc:
            raise ClientError(exc.code(), exc.details() or "", _request_id(exc)) from None

    def _batches(self, sizes: list[int]) -> Iterator[tuple[int, int]]:
        """Index ranges whose bytes stay under the batch size (at least one block each).

        Once GetArena has told the size of the daemon's top tier (the arena, or the HBM pool
        when it has one: stores land and loads are pinned there), a batch is also at most
        1/(pipeline_depth + 1) of it: that many batches are leased at once (mapped or
        inline), and they must fit beside each other.
        """
        cap = self.batch_bytes
        if self._top_bytes:
            cap = min(cap, self._top_bytes // (self.pipeline_depth + 1))
        lo, acc = 0, 0
        for i, size in enumerate(sizes):
            if i > lo and acc + size > cap:
                yield lo, i
                lo, acc = i, 0
            acc += size
        if lo < len(sizes):
            yield lo, len(sizes)

    def _namespace_block_bytes(self, namespace: str) -> int:
        """A namespace's block size: known from register_namespace, else asked of the daemon
        through the View API (a snapshot page of one block carries the geometry; the Admin
        API would need the admin token over TCP)."""
        if namespace not in self._block_bytes:
            try:
                page = self._call(self._view.Snapshot, view_pb2.SnapshotRequest(namespace=namespace, page_size=1))
            except ClientError as exc:
                if exc.code != grpc.StatusCode.NOT_FOUND:
                    raise
                return 1  # an unknown namespace: the first batch gets the daemon's NOT_FOUND
            for ns in page.namespaces:
                self._block_bytes[ns.namespace] = ns.block_bytes
        return self._block_bytes.get(namespace, 1)

    def _ensure_arena(self, arena_id: bytes | None = None) -> bool:
        """Map the daemon's arena if we can (and it is the one ``arena_id`` names)."""
        if self._arena is not None and (arena_id is None or self._arena.arena_id == arena_id):
            return True
        if self._shm_checked and self._arena is None and arena_id is None:
            return False
        self._shm_checked = True
        self._unmap()
        if self._want_shm is False:
            return False
        try:
            info = self._call(self._engine.GetArena, engine_pb2.GetArenaRequest())
        except ClientError as exc:
            # A tenant of a daemon that serves tenants: the arena holds every tenant's
            # bytes, so its bytes go inline.
            if exc.code != grpc.StatusCode.PERMISSION_DENIED or self._want_shm:
                raise
            return False
        self._top_bytes = info.hbm.capacity_bytes if info.HasField("hbm") else info.file_bytes - HEADER_BYTES
        try:
            self._arena = open_arena(info.path, expected_arena_id=info.arena_id)
        except (OSError, ValueError) as exc:
            if self._want_shm:
                raise ClientError(grpc.StatusCode.FAILED_PRECONDITION, f"cannot map the arena: {exc}") from None
            return False
        if info.HasField("hbm"):
            h = info.hbm
            try:
                self._hbm = OpenedPool(PoolHandle(h.kind, h.capacity_bytes, h.pool_id, h.path, h.ipc_handle, h.pci_bus_id))
            except Exception as exc:  # noqa: BLE001 - CUDA's errors are RuntimeErrors of their own
                # Stores land in HBM and loads read there: without the pool the local path
                # cannot reach the blocks, so the bytes go inline (the daemon copies).
                self._unmap()
                if self._want_shm:
                    raise ClientError(
                        grpc.StatusCode.FAILED_PRECONDITION, f"cannot open the daemon's HBM pool: {exc}"
                    ) from None
                log.warning("kvd: cannot open the daemon's HBM pool, block bytes go inline over gRPC: %s", exc)
                return False
        return arena_id is None or self._arena.arena_id == arena_id

    # -- slot bytes: the arena (DRAM slots) or the HBM pool ---------------------------------
    def _pool(self):
        if self._hbm is None:
            raise ClientError(grpc.StatusCode.INTERNAL, "the daemon granted an HBM slot but announced no HBM pool")
        return self._hbm.tensor

    def _result(self, future):
        try:
            return future.result()
        except grpc.RpcError as exc:
            raise ClientError(exc.code(), exc.details() or "") from None

    def _require_arena(self) -> None:
        if not self._ensure_arena():
            raise ClientError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"the arena of the daemon at {self.address} is not mapped (block bytes go inline)",
            )

    def _arena_for(self, arena_id: bytes) -> ArenaMapping:
        if not self._ensure_arena(arena_id):
            raise ClientError(grpc.StatusCode.UNAVAILABLE, "the daemon's arena changed and cannot be mapped")
        return self._arena

    def _store_shm(self, namespace, specs, fill, ranges, session_id, lora_name=None) -> int:
        """Pipelined: the next ``pipeline_depth`` batches' PrepareStore calls are in flight while
        this batch's bytes are copied (``fill(arena, lo, slots)``: the batch starting at index
        ``lo``), so the daemon allocates (and evicts) ahead of the copy.

        At most ``pipeline_depth + 1`` batches hold slots at once: a batch's commit has
        landed before the batch ``pipeline_depth + 1`` after it is prepared.
        """

        def prepare(lo: int, hi: int):
            req = engine_pb2.PrepareStoreRequest(
                namespace=namespace, blocks=specs[lo:hi], session_id=session_id or "", lora_name=lora_name or ""
            )
            return self._engine.PrepareStore.future(req, timeout=self.timeout)

        def commit(lease_id: str, abort: bool = False):
            req = engine_pb2.CommitStoreRequest(lease_id=lease_id, abort=abort)
            return self._engine.CommitStore.future(req, timeout=self.timeout)

        committed = 0
        commits: deque = deque()
        pending = deque(prepare(*r) for r in ranges[: self.pipeline_depth])
        try:
            for i, (lo, _hi) in enumerate(ranges):
                grant = self._result(pending.popleft())
                try:
                    fill(self._arena_for(grant.arena_id), lo, grant.slots)
                except BaseException:
                    commits.append(commit(grant.lease_id, abort=True))
                    raise
                commits.append(commit(grant.lease_id))
                # The previous batch's commit had a whole copy to land: settle it, then
                # prepare ahead (so at most pipeline_depth + 1 batches hold slots).
                while len(commits) > 1:
                    committed += self._result(commits.popleft()).committed
                if i + self.pipeline_depth < len(ranges):
                    pending.append(prepare(*ranges[i + self.pipeline_depth]))
        finally:
            for future in pending:  # an error left prepared batches behind: give them back
                try:
                    commits.append(commit(self._result(future).lease_id, abort=True))
                except ClientError:
                    pass
            results = [self._result(f) for f in commits]
        return committed + sum(r.committed for r in results)

    def _load_shm(self, namespace, hashes, ranges, drain, missing=False) -> list:
        """Pipelined like _store_shm: the next PrepareLoads (promotions from NVMe) run while this
        batch is copied (``drain(arena, lo, slots)`` returns the batch's results), and at most
        ``pipeline_depth + 1`` batches are pinned at once. A block whose lease expired while it
        was copied reads as ``missing``."""

        def prepare(lo: int, hi: int):
            req = engine_pb2.PrepareLoadRequest(namespace=namespace, hashes=hashes[lo:hi])
            return self._engine.PrepareLoad.future(req, timeout=self.timeout)

        def complete(lease_id: str):
            req = engine_pb2.CompleteLoadRequest(lease_id=lease_id)
            return self._engine.CompleteLoad.future(req, timeout=self.timeout)

        result: list = []

        def settle(lo: int, hi: int, future) -> None:
            try:
                self._result(future)
            except ClientError as exc:
                if exc.code != grpc.StatusCode.NOT_FOUND:
                    raise
                # The lease expired while we copied: the slots may have been reused, so what
                # we read cannot be trusted. Report those blocks as missing.
                for j in range(lo, min(hi, len(result))):
                    result[j] = missing

        completes: deque = deque()  # (lo, hi, CompleteLoad future)
        pending = deque(prepare(*r) for r in ranges[: self.pipeline_depth])
        try:
            for i, (lo, hi) in enumerate(ranges):
                grant = self._result(pending.popleft())
                try:
                    result += drain(self._arena_for(grant.arena_id), lo, grant.slots)
                finally:
                    completes.append((lo, hi, complete(grant.lease_id)))
                while len(completes) > 1:  # as in _store_shm: settle the previous, then prepare
                    settle(*completes.popleft())
                if i + self.pipeline_depth < len(ranges):
                    pending.append(prepare(*ranges[i + self.pipeline_depth]))
        finally:
            for future in pending:  # an error left prepared batches behind: release them
                try:
                    completes.append((0, 0, complete(self._result(future).lease_id)))
                except ClientError:
                    pass
            while completes:
                settle(*completes.popleft())
        return result

    def _store_inline(self, namespace, specs, blocks, session_id, lora_name=None) -> int:
        chunk = 1 << 20

        def requests():
            header = engine_pb2.StoreInlineHeader(
                namespace=namespace, blocks=specs, session_id=session_id or "", lora_name=lora_name or ""
            )
            yield engine_pb2.StoreInlineRequest(header=header)
            for index, block in enumerate(blocks):
                data = memoryview(block).cast("B")
                for offset in range(0, data.nbytes, chunk):
                    part = engine_pb2.BlockChunk(index=index, offset=offset, data=bytes(data[offset : offset + chunk]))
                    yield engine_pb2.StoreInlineRequest(chunk=part)

        return self._call(self._engine.StoreInline, requests()).stored

    def _load_inline(self, namespace, hashes) -> list[bytes | None]:
        req = engine_pb2.LoadInlineRequest(namespace=namespace, hashes=hashes)
        parts: list[list[bytes] | None] = [None] * len(hashes)
        try:
            for msg in self._engine.LoadInline(req, timeout=self.timeout):
                if msg.found:
                    if parts[msg.index] is None:
                        parts[msg.index] = []
                    parts[msg.index].append(msg.data)
        except grpc.RpcError as exc:
            raise ClientError(exc.code(), exc.details() or "") from None
        return [b"".join(p) if p is not None else None for p in parts]
