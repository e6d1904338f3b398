"""Races between slow or vanishing clients and the daemon's leases, transfers and tiers.

Each test drives a real `kvd serve` process into the window where a wrong byte could be
served or a slot leaked, and checks that neither happens.
"""

from __future__ import annotations

import os
import threading

import grpc
import pytest

from kvd.client import Client
from kvd.v1 import engine_pb2, engine_pb2_grpc, types_pb2

pytestmark = pytest.mark.timeout(120)

BLOCK = 64 << 10
NS = "races"


def nvme_only(d, n: int, seed: int) -> tuple[list[int], list[bytes]]:
    """Store ``n`` blocks, get them durable, then push them out of DRAM (1 MiB = 16 blocks)."""
    hashes = [seed + i for i in range(n)]
    blocks = [os.urandom(BLOCK) for _ in range(n)]
    filler = [seed + 10_000 + i for i in range(32)]
    with d.client() as c:
        c.register_namespace(NS, 16, BLOCK)
        c.store(NS, hashes, blocks)
        assert c.sync() == 0
        c.store(NS, filler, [os.urandom(BLOCK)] * len(filler))
        assert c.sync() == 0
        assert c.lookup(NS, hashes) == ["nvme"] * n
    return hashes, blocks


def test_inline_chunks_after_the_lease_expired_write_nothing(daemon_factory, wait_until):
    d = daemon_factory(dram="1MiB", extra=["--lease-seconds", "1"]).start()
    victim = os.urandom(BLOCK)
    with d.client() as c:
        c.register_namespace(NS, 16, BLOCK)
        assert c.store(NS, [1], [victim]) == 1

    def stalled_stream():
        header = engine_pb2.StoreInlineHeader(namespace=NS, blocks=[types_pb2.BlockSpec(hash=2, nbytes=BLOCK)])
        yield engine_pb2.StoreInlineRequest(header=header)
        with d.client() as c:  # stall until the daemon has granted, then expired, our lease
            wait_until(lambda: c.status().leases == 1, timeout=30, what="the header's lease")
            wait_until(lambda: c.status().leases == 0, timeout=30, what="the lease to expire")
        chunk = engine_pb2.BlockChunk(index=0, offset=0, data=b"\xab" * BLOCK)
        yield engine_pb2.StoreInlineRequest(chunk=chunk)

    with grpc.insecure_channel(d.address) as channel:
        with pytest.raises(grpc.RpcError) as err:
            engine_pb2_grpc.EngineStub(channel).StoreInline(stalled_stream(), timeout=60)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "expired" in err.value.details()
    with d.client() as c:
        assert c.lookup(NS, [2]) == []
        assert c.load(NS, [1]) == [victim]
        assert c.check() == []


def test_cancelled_loads_leave_no_promotion_behind(daemon_factory, wait_until):
    d = daemon_factory(dram="1MiB", extra=["--lease-seconds", "1"]).start()
    hashes, blocks = nvme_only(d, 12, seed=100)
    with grpc.insecure_channel(d.address) as channel:
        stub = engine_pb2_grpc.EngineStub(channel)
        for deadline in (0.001, 0.003, 0.01, 0.03):  # cancel at various points of the load
            try:
                stub.PrepareLoad(engine_pb2.PrepareLoadRequest(namespace=NS, hashes=hashes), timeout=deadline)
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    with d.client() as c:
        wait_until(lambda: c.status().leases == 0, timeout=30, what="abandoned leases to expire")
        assert c.load(NS, hashes) == blocks  # every block is readable: nothing stuck in flight
        assert c.check() == []


def test_concurrent_loads_of_one_nvme_prefix_all_get_the_bytes(daemon_factory):
    d = daemon_factory(dram="1MiB").start()
    hashes, blocks = nvme_only(d, 6, seed=200)
    results: list[list[bytes | None]] = []
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def load():
        try:
            with Client(d.address) as c:
                start.wait()
                results.append(c.load(NS, hashes))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert results == [blocks] * 4
    with d.client() as c:
        assert c.load(NS, hashes + hashes[:2]) == blocks + blocks[:2]  # a hash twice in one load
        assert c.check() == []


def test_a_block_bigger_than_a_slab_is_refused_at_registration(daemon_factory):
    d = daemon_factory(dram="8MiB", nvme="32MiB").start()  # the fixture's slabs are 64 MiB
    with d.client() as c:
        with pytest.raises(Exception) as err:
            c.register_namespace("huge", 16, 16 << 20)
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "do not fit" in err.value.details
        assert [n.name for n in c.status().namespaces] == []


def test_restart_with_tiers_too_small_for_a_namespace_drops_it_and_serves_the_rest(daemon_factory):
    d = daemon_factory(dram="8MiB", nvme="32MiB").start()
    small, big = os.urandom(4096), os.urandom(4 << 20)
    with d.client() as c:
        c.register_namespace("small", 16, 4096)
        c.register_namespace("big", 16, 4 << 20)
        c.store("small", [1], [small])
        c.store("big", [1], [big])
        assert c.sync() == 0
    d.kill()
    d.args[d.args.index("--dram-bytes") + 1] = "2MiB"  # now too small for the big blocks
    d.start()
    with d.client() as c:
        assert [n.name for n in c.status().namespaces] == ["small"]
        assert c.load("small", [1]) == [small]
        assert c.check() == []
    assert "cannot be restored" in d.log()
