"""The Admin gRPC service (kvctl): status, paged block listing, invariant check, sync,
eviction, pinning, sessions, the policy, drain."""

from __future__ import annotations

import math
from typing import Protocol

from kvd import __version__
from kvd.core.errors import InvalidArgument, UnknownSession
from kvd.media import TIER_CODES
from kvd.policies import DAEMON_POLICIES, make_policy
from kvd.server.codec import block_key
from kvd.server.drain import DrainResult
from kvd.server.listing import block_info, held_page
from kvd.server.metrics import tier_healths
from kvd.server.state import DaemonState, unary_rpc
from kvd.server.tenants import caller
from kvd.v1 import admin_pb2, admin_pb2_grpc


class DaemonControl(Protocol):
    """What Admin may ask of the running daemon beyond its state."""

    async def drain(self, timeout_s: float, exit: bool) -> DrainResult: ...
    async def resume(self) -> bool: ...


class AdminService(admin_pb2_grpc.AdminServicer):
    def __init__(self, state: DaemonState, control: DaemonControl) -> None:
        self.s = state
        self.control = control

    @unary_rpc
    async def Status(self, request, context):
        stats = self.s.core.stats()
        healths = tier_healths(self.s)
        who = caller()
        tiers = []
        for usage in stats.tiers:
            health = healths.get(usage.tier)
            faults = health.faults() if health is not None else []
            location, direct = "", False
            if usage.tier == "dram":
                location = str(self.s.arena.path)
            elif usage.tier == "hbm" and self.s.hbm is not None:
                location = self.s.hbm.device
            elif usage.tier == "nvme" and self.s.nvme is not None:
                location, direct = str(self.s.nvme.directory), self.s.nvme.direct_io
            tiers.append(
                admin_pb2.TierStatus(
                    tier=TIER_CODES[usage.tier],
                    capacity_bytes=usage.capacity_bytes,
                    # Use across every namespace is other tenants' business: a tenant sees capacity only.
                    used_bytes=usage.used_bytes if who.is_operator else 0,
                    blocks=usage.blocks if who.is_operator else 0,
                    location=location,
                    direct_io=direct,
                    degraded=any(f.active for f in faults),
                    faults=[
                        admin_pb2.TierFault(op=f.op, errno=f.errno, count=f.count, last_error=f.last_error, active=f.active)
                        for f in faults
                    ],
                )
            )
        return admin_pb2.StatusResponse(
            cluster=cluster_status(self.s.cluster) if self.s.cluster is not None and who.is_operator else None,
            version=__version__,
            uptime_s=self.s.clock() - self.s.started_at,
            policy=self.s.policy_name,
            tiers=tiers,
            namespaces=[
                admin_pb2.NamespaceStatus(
                    namespace=ns.name, block_tokens=ns.block_tokens, block_bytes=ns.block_bytes, blocks=held
                )
                for ns, held in stats.namespaces
                if who.allows(ns.name)
            ],
            # Node-wide counts are the operator's (a tenant's own are in its namespaces' rows).
            leases=stats.leases if who.is_operator else 0,
            write_behind_queue=stats.write_behind_pending if who.is_operator else 0,
            recovered_blocks=self.s.recovered_blocks if who.is_operator else 0,
            dropped_on_recovery=self.s.dropped_on_recovery if who.is_operator else 0,
        )

    @unary_rpc
    async def ListBlocks(self, request, context):
        records, next_token = held_page(
            self.s.core, request.namespace, request.page_size, request.page_token, caller().allows
        )
        return admin_pb2.ListBlocksResponse(blocks=[block_info(r) for r in records], next_page_token=next_token)

    @unary_rpc
    async def Check(self, request, context):
        problems = [f"core: {p}" for p in self.s.core.check()]
        problems += [f"dram: {p}" for p in self.s.arena.check()]
        if self.s.hbm is not None:
            problems += [f"hbm: {p}" for p in self.s.hbm.check()]
        if self.s.nvme is not None:
            problems += [f"nvme: {p}" for p in self.s.nvme.check()]
            # Every readable NVMe copy is in the manifest; every manifest entry is an NVMe
            # copy, readable or still landing (a batch's manifest write precedes its report).
            durable = {e.key for e in self.s.nvme.entries()}
            ready, landing = set(), set()
            for r in self.s.core.blocks():
                copy = r.copies.get("nvme")
                if copy is not None:
                    (ready if copy.ready else landing).add(block_key(r.namespace, r.hash))
            if ready - durable:
                problems.append(f"nvme: {len(ready - durable)} readable copies have no manifest entry")
            if durable - ready - landing:
                problems.append(f"nvme: {len(durable - ready - landing)} manifest entries name no NVMe copy")
        return admin_pb2.CheckResponse(ok=not problems, problems=problems)

    @unary_rpc
    async def Sync(self, request, context):
        check_timeout(request.timeout_s)
        if not self.s.core.writes_behind:
            # No write-behind (HBM on top, or --no-write-behind): a Sync writes down now
            # what has no NVMe copy, or it would report blocks durable that are not.
            self.s.core.queue_write_down()
            self.s.after_core()
        pending = await self.s.mover.flush(request.timeout_s or 60.0)
        return admin_pb2.SyncResponse(pending=pending)

    @unary_rpc
    async def ClearNamespace(self, request, context):
        # The core drops the copies and emits the events; unary_rpc's after_core publishes
        # them (Watch, ZMQ) and forgets the dropped NVMe copies' manifest entries.
        before = len(self.s.core.namespace(request.namespace).blocks)  # NOT_FOUND if unknown
        remaining = self.s.core.clear_namespace(request.namespace)
        return admin_pb2.ClearNamespaceResponse(removed=before - remaining, remaining=remaining)

    @unary_rpc
    async def Evict(self, request, context):
        core = self.s.core
        if request.all:
            if request.namespace or request.session_id:
                raise InvalidArgument("evict all takes no namespace or session")
            removed, remaining = core.evict_all()
        elif request.session_id:
            if not request.namespace:
                raise InvalidArgument("evicting a session needs its namespace")
            removed, remaining = core.evict_session(request.namespace, request.session_id)
        elif request.namespace:
            before = len(core.namespace(request.namespace).blocks)
            remaining = core.clear_namespace(request.namespace)
            removed = before - remaining
        else:
            raise InvalidArgument("evict needs a session, a namespace or all")
        return admin_pb2.EvictResponse(removed=removed, remaining=remaining)

    def _pin_hashes(self, request) -> list[int]:
        if request.session_id and request.hashes:
            raise InvalidArgument("pin either hashes or a session, not both")
        if not request.session_id:
            return list(request.hashes)
        self.s.core.namespace(request.namespace)  # NOT_FOUND for an unknown namespace first
        session = self.s.core.sessions.get(request.namespace, request.session_id)
        if session is None:
            raise UnknownSession(f"session {request.session_id!r} of {request.namespace!r} is unknown")
        if not session.chain:
            raise InvalidArgument(f"session {request.session_id!r} has no blocks yet")
        return list(dict.fromkeys(session.chain))

    @unary_rpc
    async def Pin(self, request, context):
        changed, not_held = self.s.core.pin(request.namespace, self._pin_hashes(request))
        return admin_pb2.PinResponse(changed=changed, not_held=not_held, pinned=self.s.core.pinned_count)

    @unary_rpc
    async def Unpin(self, request, context):
        changed, not_pinned = self.s.core.unpin(request.namespace, self._pin_hashes(request))
        return admin_pb2.PinResponse(changed=changed, not_held=not_pinned, pinned=self.s.core.pinned_count)

    @unary_rpc
    async def ListSessions(self, request, context):
        core = self.s.core
        if request.namespace:
            core.namespace(request.namespace)
        if request.session_id and not request.namespace:
            raise InvalidArgument("a session id needs its namespace")
        now = self.s.clock()
        sessions = [
            x
            for x in core.sessions.sessions()
            if (not request.namespace or x.namespace == request.namespace)
            and (not request.session_id or x.id == request.session_id)
            and caller().allows(x.namespace)
        ]
        if request.session_id and not sessions:
            raise UnknownSession(f"session {request.session_id!r} of {request.namespace!r} is unknown")
        sessions.sort(key=lambda x: x.last_active, reverse=True)
        out = []
        for x in sessions:
            ns = core.namespace(x.namespace)
            chain = dict.fromkeys(x.chain)
            held = sum(1 for h in chain if h in ns.visible)
            out.append(
                admin_pb2.SessionInfo(
                    namespace=x.namespace,
                    session_id=x.id,
                    state=x.state,
                    inferred=x.inferred,
                    turns=x.turns,
                    chain_blocks=len(chain),
                    held_blocks=held,
                    tool=x.tool or "",
                    expected_pause_s=x.expected_pause_s,
                    idle_s=max(0.0, now - x.last_active),
                    paused_s=max(0.0, now - x.paused_at) if x.paused_at is not None else 0.0,
                    ahead_in_s=x.expected_at - now if x.expected_at is not None else None,
                    ahead_blocks=len(x.ahead),
                )
            )
        return admin_pb2.ListSessionsResponse(sessions=out)

    @unary_rpc
    async def GetPolicy(self, request, context):
        return admin_pb2.GetPolicyResponse(policy=self.s.policy_name, available=list(DAEMON_POLICIES))

    @unary_rpc
    async def SetPolicy(self, request, context):
        if request.policy not in DAEMON_POLICIES:
            raise InvalidArgument(
                f"policy {request.policy!r} cannot run in the daemon; available: {', '.join(DAEMON_POLICIES)}"
            )
        if request.policy != self.s.policy_name:
            self.s.core.set_policy(make_policy(request.policy, self.s.core.sessions))
            self.s.policy_name = request.policy
        return admin_pb2.GetPolicyResponse(policy=self.s.policy_name, available=list(DAEMON_POLICIES))

    @unary_rpc
    async def Drain(self, request, context):
        check_timeout(request.timeout_s)
        result = await self.control.drain(request.timeout_s or 60.0, request.exit)
        return admin_pb2.DrainResponse(
            written=result.written, pending=result.pending, leases=result.leases, exiting=request.exit
        )

    @unary_rpc
    async def Resume(self, request, context):
        return admin_pb2.ResumeResponse(was_draining=await self.control.resume())


MAX_TIMEOUT_S = 3600.0  # a Sync or Drain waits at most an hour


def check_timeout(timeout_s: float) -> None:
    """A Sync's or Drain's wait: finite seconds in [0, 3600] (0: the default of 60 s)."""
    if not math.isfinite(timeout_s) or not 0 <= timeout_s <= MAX_TIMEOUT_S:
        raise InvalidArgument(f"timeout_s must be seconds in [0, {MAX_TIMEOUT_S:.0f}] (0: 60), got {timeout_s}")


def cluster_status(tier) -> admin_pb2.ClusterStatus:
    s = tier.status()
    c = s.counters
    return admin_pb2.ClusterStatus(
        state=s.state.value, state_for_s=s.since_s, reason=s.reason, master=s.master, segment_bytes=s.segment_bytes,
        published_blocks=s.published_blocks, pending_blocks=s.pending_blocks, put_blocks=c.put_blocks,
        read_blocks=c.got_blocks, corrupt_blocks=c.corrupt, timeouts=c.timeouts,
    )
