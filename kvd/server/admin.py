"""The Admin gRPC service (kvctl): status, paged block listing, invariant check, sync, clear."""

from __future__ import annotations

from kvd import __version__
from kvd.core.errors import InvalidArgument
from kvd.server.codec import block_key
from kvd.server.listing import block_info, held_page
from kvd.server.state import DaemonState, unary_rpc
from kvd.tiers import TIER_CODES
from kvd.v1 import admin_pb2, admin_pb2_grpc


class AdminService(admin_pb2_grpc.AdminServicer):
    def __init__(self, state: DaemonState) -> None:
        self.s = state

    @unary_rpc
    async def Status(self, request, context):
        stats = self.s.core.stats()
        tiers = []
        for usage in stats.tiers:
            location, direct = "", False
            if usage.tier == "dram":
                location = str(self.s.arena.path)
            elif usage.tier == "nvme" and self.s.nvme is not None:
                location, direct = str(self.s.nvme.directory), self.s.nvme.direct_io
            tiers.append(
                admin_pb2.TierStatus(
                    tier=TIER_CODES[usage.tier],
                    capacity_bytes=usage.capacity_bytes,
                    used_bytes=usage.used_bytes,
                    blocks=usage.blocks,
                    location=location,
                    direct_io=direct,
                )
            )
        return admin_pb2.StatusResponse(
            version=__version__,
            uptime_s=self.s.clock() - self.s.started_at,
            policy=self.s.policy_name,
            tiers=tiers,
            namespaces=[
                admin_pb2.NamespaceStatus(
                    namespace=ns.name, block_tokens=ns.block_tokens, block_bytes=ns.block_bytes, blocks=held
                )
                for ns, held in stats.namespaces
            ],
            leases=stats.leases,
            write_behind_queue=stats.write_behind_pending,
            recovered_blocks=self.s.recovered_blocks,
            dropped_on_recovery=self.s.dropped_on_recovery,
        )

    @unary_rpc
    async def ListBlocks(self, request, context):
        records, next_token = held_page(self.s.core, request.namespace, request.page_size, request.page_token)
        return admin_pb2.ListBlocksResponse(blocks=[block_info(r) for r in records], next_page_token=next_token)

    @unary_rpc
    async def Check(self, request, context):
        problems = [f"core: {p}" for p in self.s.core.check()]
        problems += [f"dram: {p}" for p in self.s.arena.check()]
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
        if request.timeout_s < 0:
            raise InvalidArgument("timeout_s must not be negative")
        deadline = self.s.clock() + (request.timeout_s or 60.0)
        mover = self.s.mover
        mover.syncs_waiting += 1
        try:
            while self.s.core.write_behind_pending and self.s.clock() < deadline:
                await mover.wait_progress(mover.batches_done, max(0.0, deadline - self.s.clock()))
        finally:
            mover.syncs_waiting -= 1
        return admin_pb2.SyncResponse(pending=self.s.core.write_behind_pending)

    @unary_rpc
    async def ClearNamespace(self, request, context):
        # The core drops the copies and emits the events; unary_rpc's after_core publishes
        # them (Watch, ZMQ) and forgets the dropped NVMe copies' manifest entries.
        before = len(self.s.core.namespace(request.namespace).blocks)  # NOT_FOUND if unknown
        remaining = self.s.core.clear_namespace(request.namespace)
        return admin_pb2.ClearNamespaceResponse(removed=before - remaining, remaining=remaining)
