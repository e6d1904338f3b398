"""The Engine gRPC service: a thin adapter from kvd.v1 messages to the core and the mover."""

from __future__ import annotations

import asyncio
import itertools

import msgspec

from kvd.core.errors import InvalidArgument, KvdError, NoSpace, UnknownLease, check_name
from kvd.core.manager import BlockSpec, StoreGrant, Wait
from kvd.core.types import MAX_BLOCK_TOKENS_KEPT, MAX_EXTRA_KEYS_BYTES, BlockOrigin
from kvd.media import CLUSTER, TIER_CODES
from kvd.server.state import DaemonState, streaming_rpc, unary_rpc
from kvd.v1 import engine_pb2, engine_pb2_grpc, types_pb2

if TIER_CODES != {
    "hbm": types_pb2.TIER_HBM, "dram": types_pb2.TIER_DRAM, "nvme": types_pb2.TIER_NVME, "cluster": types_pb2.TIER_CLUSTER
}:
    raise ImportError("kvd.tiers.TIER_CODES disagrees with the kvd.v1.Tier enum")
SESSION_KINDS = {
    engine_pb2.TURN_START: "turn_start",
    engine_pb2.TURN_END: "turn_end",
    engine_pb2.TOOL_PAUSE: "tool_pause",
    engine_pb2.TOOL_RESUME: "tool_resume",
    engine_pb2.SESSION_END: "session_end",
    engine_pb2.TURN_AHEAD: "turn_ahead",
}
ROOM_WAIT_S = 10.0  # default bound on a request's wait for DRAM room (kvd serve --room-wait-seconds)
PROMOTION_WAIT_S = 250.0  # bound on a load's wait for another load's promotion of the same blocks


def tier_runs(codes: list[int]) -> list[tuple[int, int]]:
    """Run-length encode a held prefix's tier codes: [(code, blocks), ...]."""
    if not codes:
        return []
    if codes.count(codes[0]) == len(codes):  # the common case, at C speed
        return [(codes[0], len(codes))]
    return [(code, sum(1 for _ in run)) for code, run in itertools.groupby(codes)]


def block_specs(blocks, lora_name: str = "") -> list[BlockSpec]:
    """The core's BlockSpecs of a store's ``types_pb2.BlockSpec`` list; a block that names
    its tokens gets a :class:`BlockOrigin` (with ``lora_name``, the store's). InvalidArgument
    for token ids or extra keys the events could not carry."""
    specs = []
    for i, b in enumerate(blocks):
        parent = b.parent if b.HasField("parent") else None
        origin = None
        if b.token_ids:
            if len(b.token_ids) > MAX_BLOCK_TOKENS_KEPT:
                raise InvalidArgument(f"block {i}: at most {MAX_BLOCK_TOKENS_KEPT} token ids a block are kept")
            origin = BlockOrigin.of(b.token_ids, lora_name, _extra_keys(i, b.extra_keys))
        elif b.extra_keys:
            raise InvalidArgument(f"block {i}: extra keys without token ids")
        specs.append(BlockSpec(b.hash, parent, b.nbytes, origin))
    return specs


def _extra_keys(i: int, raw: bytes) -> bytes | None:
    """``raw`` when it is one msgpack array or nil of at most MAX_EXTRA_KEYS_BYTES (events
    embed it as it is, so a malformed one would spoil a consumer's whole batch)."""
    if not raw:
        return None
    if len(raw) > MAX_EXTRA_KEYS_BYTES:
        raise InvalidArgument(f"block {i}: extra keys of {len(raw)} bytes (at most {MAX_EXTRA_KEYS_BYTES})")
    try:
        value = msgspec.msgpack.decode(raw)
    except msgspec.DecodeError as exc:
        raise InvalidArgument(f"block {i}: extra keys are not msgpack: {exc}") from None
    if value is not None and not isinstance(value, list):
        raise InvalidArgument(f"block {i}: extra keys must be a msgpack array, not {type(value).__name__}")
    return raw if value is not None else None


def slot_ref(slot, tier: int) -> types_pb2.SlotRef:
    return types_pb2.SlotRef(offset=slot.offset, length=slot.length, tier=tier)


def hbm_pool_info(pool) -> engine_pb2.HbmPool:
    h = pool.handle()
    return engine_pb2.HbmPool(
        kind=h.kind,
        capacity_bytes=h.capacity_bytes,
        pool_id=h.pool_id,
        path=h.path,
        ipc_handle=h.ipc,
        pci_bus_id=h.pci_bus_id,
    )


class EngineService(engine_pb2_grpc.EngineServicer):
    def __init__(self, state: DaemonState, room_wait_s: float = ROOM_WAIT_S) -> None:
        self.s = state
        self.room_wait_s = room_wait_s

    @unary_rpc
    async def RegisterNamespace(self, request, context):
        for kind, name in (("model", request.model_name), ("pod", request.pod_id)):
            if name:
                check_name(kind, name)
                if "@" in name:
                    raise InvalidArgument(f"a {kind} name must not contain '@' (KV-event topics are kv@<pod>@<model>)")
        created = self.s.register_namespace(request.namespace, request.block_tokens, request.block_bytes)
        if self.s.kv_events is not None and (request.model_name or request.pod_id):
            self.s.kv_events.attach(request.namespace, request.pod_id or None, request.model_name or None)
        return engine_pb2.RegisterNamespaceResponse(created=created)

    async def GetArena(self, request, context):
        arena = self.s.arena
        return engine_pb2.GetArenaResponse(
            path=str(arena.path),
            arena_id=arena.arena_id,
            file_bytes=arena.file_bytes,
            page_bytes=arena.space.page_bytes,
            hbm=hbm_pool_info(self.s.hbm) if self.s.hbm is not None else None,
        )

    @property
    def _top_code(self) -> int:
        return TIER_CODES[self.s.core.top]

    @unary_rpc
    async def Lookup(self, request, context):
        codes = self.s.core.lookup_codes(request.namespace, request.hashes, request.session_id or None)
        if request.session_id:
            self.s.after_core()  # the session's state may have changed
        runs = tier_runs(codes)
        held = len(codes)
        if self.s.cluster is not None and held < len(request.hashes):
            # Past the node's own prefix, the cluster may hold the chain on.
            more = await self.s.cluster.extend(request.namespace, request.hashes, held)
            if more:
                runs.append((TIER_CODES[CLUSTER], more))
                held += more
        if self.s.metrics is not None:
            self.s.metrics.looked_up(runs, len(request.hashes) - held)
        return engine_pb2.LookupResponse(runs=[engine_pb2.TierRun(tier=t, blocks=n) for t, n in runs])

    @unary_rpc
    async def PrepareStore(self, request, context):
        grant = await self.prepare_store(
            request.namespace, block_specs(request.blocks, request.lora_name), request.lease_seconds,
            request.session_id or None,
        )
        return engine_pb2.PrepareStoreResponse(
            lease_id=grant.lease_id,
            lease_seconds=grant.expires_at - self.s.clock(),
            arena_id=self.s.arena.arena_id,
            slots=[
                engine_pb2.StoreSlot(write=True, slot=slot_ref(s, self._top_code))
                if s
                else engine_pb2.StoreSlot(write=False)
                for s in grant.slots
            ],
        )

    async def prepare_store(
        self, namespace: str, specs: list[BlockSpec], lease_seconds: float, session_id: str | None = None
    ) -> StoreGrant:
        """PrepareStore, waiting (bounded) while the mover makes room."""
        self.s.require_serving()
        return await self._with_room(
            lambda: self.s.core.prepare_store(namespace, specs, lease_seconds, session_id=session_id),
            namespace, len(specs),
        )

    async def _with_room(self, attempt, namespace: str, blocks: int):
        """Run a core call that may answer Wait (demotions or write-behind under way),
        retrying as the mover lands batches, for at most ``room_wait_s`` seconds; then
        RESOURCE_EXHAUSTED. This is the backpressure of a disk slower than the stores: the
        wait is bounded, and so is what waits (the request's blocks are not read meanwhile).

        A refusal for want of room in the top tier (DRAM, or HBM when present) is its
        ``allocate`` fault (ENOSPC, for DRAM's health) unless the request could not fit even
        in an empty tier (the client's error, not a fault).
        """
        mover, health = self.s.mover, getattr(self.s.top_tier, "health", None)
        mover.foreground()
        deadline = self.s.clock() + self.room_wait_s
        try:
            while True:
                seen = mover.batches_done
                result = attempt()
                self.s.after_core()
                if not isinstance(result, Wait):
                    if health is not None:
                        health.ok("allocate")
                    return result
                left = deadline - self.s.clock()
                if left <= 0:
                    top = self.s.core.top
                    behind = "writes to NVMe are not keeping up with demotions" if top == "dram" else (
                        "demotions to DRAM are not keeping up"
                    )
                    raise NoSpace(
                        f"no {top.upper()} room after waiting {self.room_wait_s:g} s: {behind} "
                        f"({self.s.core.write_behind_pending} blocks queued for NVMe); retry later"
                    )
                await mover.wait_progress(seen, left)
        except NoSpace as exc:
            if health is not None and self._could_fit(namespace, blocks):
                health.fault("allocate", "ENOSPC", str(exc))
            raise

    def _could_fit(self, namespace: str, blocks: int) -> bool:
        """Whether ``blocks`` blocks of ``namespace`` fit in an empty top tier."""
        try:
            block_bytes = self.s.core.namespace(namespace).block_bytes
        except KvdError:
            return False
        top = self.s.top_tier
        return blocks * top.slot_bytes(block_bytes) <= top.capacity_bytes

    @unary_rpc
    async def CommitStore(self, request, context):
        committed = self.s.core.commit_store(request.lease_id, request.failed, request.abort)
        self.s.after_core()
        return engine_pb2.CommitStoreResponse(committed=committed)

    @unary_rpc
    async def PrepareLoad(self, request, context):
        lease_id, expires_at = await self.prepare_load(request.namespace, request.hashes, request.lease_seconds)
        slots = self.s.core.load_slots(lease_id)
        return engine_pb2.PrepareLoadResponse(
            lease_id=lease_id,
            lease_seconds=expires_at - self.s.clock(),
            arena_id=self.s.arena.arena_id,
            slots=[
                engine_pb2.LoadSlot(found=True, slot=slot_ref(s[0], self._top_code), nbytes=s[1])
                if s
                else engine_pb2.LoadSlot()
                for s in slots
            ],
        )

    async def prepare_load(self, namespace: str, hashes, lease_seconds: float) -> tuple[str, float]:
        """PrepareLoad: pin DRAM copies, promoting NVMe-only blocks first (bounded wait), and
        bringing the blocks past the held prefix that the cluster tier holds into DRAM.

        The promotions run in a task of their own that a cancelled request does not cancel:
        every transfer the core planned is reported back, whatever happens to the caller.
        """
        self.s.require_serving()
        if self.s.cluster is not None:
            await self.s.cluster.fetch(namespace, hashes, self.prepare_store)
        grant = await self._with_room(
            lambda: self.s.core.prepare_load(namespace, hashes, lease_seconds), namespace, len(hashes)
        )
        if self.s.metrics is not None:
            self.s.metrics.loaded(namespace, hashes, grant.found)
        if grant.promotions:
            await asyncio.shield(asyncio.ensure_future(self.s.mover.promote(grant.promotions)))
        if grant.awaiting:
            await self.s.mover.wait_landed(grant.awaiting, PROMOTION_WAIT_S)
        return grant.lease_id, grant.expires_at

    @unary_rpc
    async def CompleteLoad(self, request, context):
        self.s.core.complete_load(request.lease_id)
        self.s.after_core()
        return engine_pb2.CompleteLoadResponse()

    @unary_rpc
    async def StoreInline(self, request_iterator, context):
        header = None
        grant = None
        received: list[int] = []
        try:
            async for part in request_iterator:
                if part.HasField("header"):
                    if header is not None:
                        raise InvalidArgument("a second header in one StoreInline stream")
                    header = part.header
                    specs = block_specs(header.blocks, header.lora_name)
                    grant = await self.prepare_store(header.namespace, specs, 0, header.session_id or None)
                    received = [0] * len(specs)
                    continue
                if grant is None:
                    raise InvalidArgument("StoreInline must start with a header")
                chunk = part.chunk
                if not self.s.core.lease_alive(grant.lease_id):
                    # Its slots may belong to other blocks by now: never write into them.
                    raise UnknownLease("the store's lease expired while its bytes were streaming")
                self._write_chunk(grant, specs, received, chunk.index, chunk.offset, chunk.data)
            if grant is None:
                raise InvalidArgument("StoreInline stream carried no header")
            short = [
                i for i, slot in enumerate(grant.slots) if slot is not None and received[i] != specs[i].nbytes
            ]
            if short:
                raise InvalidArgument(
                    f"blocks {short[:8]} did not receive exactly their {specs[short[0]].nbytes} bytes"
                )
        except BaseException:
            if grant is not None and self.s.core.lease_alive(grant.lease_id):
                self.s.core.commit_store(grant.lease_id, abort=True)
                self.s.after_core()
            raise
        stored = self.s.core.commit_store(grant.lease_id)
        self.s.after_core()
        return engine_pb2.StoreInlineResponse(stored=stored, present=sum(1 for s in grant.slots if s is None))

    def _write_chunk(self, grant: StoreGrant, specs, received: list[int], index: int, offset: int, data: bytes):
        if not 0 <= index < len(specs):
            raise InvalidArgument(f"chunk for block {index}, but the header has {len(specs)} blocks")
        slot = grant.slots[index]
        if offset != received[index]:
            raise InvalidArgument(f"block {index}: chunk at byte {offset}, expected {received[index]}")
        if offset + len(data) > specs[index].nbytes:
            raise InvalidArgument(f"block {index}: more than its {specs[index].nbytes} bytes")
        received[index] += len(data)
        if slot is None:
            return  # already held: the bytes are not needed
        self.s.write_slot(slot, offset, data)

    @unary_rpc
    async def SessionEvent(self, request, context):
        kind = SESSION_KINDS.get(request.kind)
        if kind is None:
            raise InvalidArgument(f"unknown session event kind {request.kind}")
        session = self.s.core.session_event(
            request.namespace,
            request.session_id,
            kind,
            request.hashes,
            tool=request.tool or None,
            expected_s=_expected_s(request, kind),
        )
        self.s.after_core()
        if kind == "turn_ahead" and self.s.mover is not None:
            self.s.mover.wake()  # its blocks move up now, not at the mover's next round
        if session is None:
            return engine_pb2.SessionEventResponse()  # named by hashes that no live session continues
        return engine_pb2.SessionEventResponse(state=session.state, turns=session.turns)

    @streaming_rpc
    async def LoadInline(self, request, context):
        lease_id, _ = await self.prepare_load(request.namespace, request.hashes, 0)
        try:
            for index, found in enumerate(self.s.core.load_slots(lease_id)):
                if found is None:
                    yield engine_pb2.LoadInlineResponse(index=index, found=False)
                    continue
                slot, nbytes = found
                for offset in range(0, nbytes, self.s.chunk_bytes):
                    if not self.s.core.lease_alive(lease_id):
                        # The slots may hold other blocks by now: stop rather than send them.
                        raise UnknownLease("the load's lease expired while its bytes were streaming")
                    n = min(self.s.chunk_bytes, nbytes - offset)
                    data = self.s.slot_bytes(slot, offset, n)
                    yield engine_pb2.LoadInlineResponse(
                        index=index, found=True, nbytes=nbytes, offset=offset, data=data
                    )
        finally:
            if self.s.core.lease_alive(lease_id):
                self.s.core.complete_load(lease_id)
                self.s.after_core()


def _expected_s(request, kind: str) -> float | None:
    """The event's seconds: a tool pause's expected length, a turn's arrival from now."""
    field = "arrives_in_s" if kind == "turn_ahead" else "expected_pause_s"
    return getattr(request, field) if request.HasField(field) else None
