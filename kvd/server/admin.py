"""The Admin gRPC service (kvctl): status, paged block listing, invariant check, sync."""

from __future__ import annotations

import heapq

from kvd import __version__
from kvd.core.errors import InvalidArgument
from kvd.server.codec import block_key, parse_block_key
from kvd.server.engine import TIER_CODE
from kvd.server.state import DaemonState, unary_rpc
from kvd.v1 import admin_pb2, admin_pb2_grpc

DEFAULT_PAGE = 1000
MAX_PAGE = 100_000


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
                    tier=TIER_CODE[usage.tier],
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
        page = request.page_size or DEFAULT_PAGE
        if page > MAX_PAGE:
            raise InvalidArgument(f"page_size must be at most {MAX_PAGE}")
        after = b""
        if request.page_token:
            try:
                after = bytes.fromhex(request.page_token)
                parse_block_key(after)
            except ValueError:
                raise InvalidArgument("page_token is not one this daemon issued") from None
        # One pass, keeping only the page's worth of smallest keys (no full sort per page).
        keyed = (
            (key, r)
            for r in self.s.core.blocks(request.namespace or None)
            if r.fastest_ready() and (key := block_key(r.namespace, r.hash)) > after
        )
        chosen = heapq.nsmallest(page + 1, keyed, key=lambda kr: kr[0])
        more = len(chosen) > page
        chosen = chosen[:page]
        resp = admin_pb2.ListBlocksResponse(next_page_token=chosen[-1][0].hex() if more else "")
        for _, r in chosen:
            info = resp.blocks.add(namespace=r.namespace, hash=r.hash, nbytes=r.nbytes)
            if r.parent is not None:
                info.parent = r.parent
            info.tiers.extend(TIER_CODE[t] for t in r.ready_tiers())
        return resp

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
