"""Error paths of a real `kvd serve` process: each bad request gets its exact gRPC status,
and afterwards the daemon still serves and every block stored before is still intact.

Requests the Python client would never send go through the raw generated stubs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager

import grpc
import pytest

from kvd.client import Client, ClientError
from kvd.tiers.dram import open_arena
from kvd.v1 import admin_pb2, admin_pb2_grpc, engine_pb2, engine_pb2_grpc, types_pb2

pytestmark = pytest.mark.timeout(120)

BLOCK = 64 << 10
NS = "errs"
TOKENS = 16
CODE = grpc.StatusCode


# -- helpers ----------------------------------------------------------------------------------


@contextmanager
def stubs(d):
    """Raw Engine and Admin stubs on a fresh channel to daemon ``d``."""
    with grpc.insecure_channel(d.address) as channel:
        yield engine_pb2_grpc.EngineStub(channel), admin_pb2_grpc.AdminStub(channel)


def rpc_code(call, *args, **kwargs) -> grpc.StatusCode:
    """The status code a raw stub call fails with (AssertionError if it succeeds)."""
    kwargs.setdefault("timeout", 10)
    try:
        result = call(*args, **kwargs)
        if hasattr(result, "__iter__") and not hasattr(result, "ByteSize"):
            list(result)  # a server-streaming call fails while it is read
    except grpc.RpcError as exc:
        return exc.code()
    raise AssertionError(f"{call} succeeded")


def client_code(call, *args) -> grpc.StatusCode:
    with pytest.raises(ClientError) as err:
        call(*args)
    return err.value.code


def specs(hashes, nbytes=BLOCK, parents=None):
    parents = parents if parents is not None else [None] * len(hashes)
    out = []
    for h, p in zip(hashes, parents):
        spec = types_pb2.BlockSpec(hash=h, nbytes=nbytes)
        if p is not None:
            spec.parent = p
        out.append(spec)
    return out


def dram_used(client: Client) -> int:
    return next(t.used_bytes for t in client.status().tiers if t.name == "dram")


class Baseline:
    """Blocks stored before the errors, and the check that they are all still intact."""

    def __init__(self, d, n: int = 8, namespace: str = NS, sync: bool = True) -> None:
        self.d = d
        self.namespace = namespace
        self.hashes = [0x1000 + i for i in range(n)]
        self.blocks = [os.urandom(BLOCK) for _ in range(n)]
        with d.client() as c:
            c.register_namespace(namespace, TOKENS, BLOCK)
            assert c.store(namespace, self.hashes, self.blocks) == n
            if sync:
                assert c.sync() == 0

    def assert_intact(self) -> None:
        """Still serving, over both data paths; no leases left; invariants hold."""
        for shm in (True, False):
            with self.d.client(shared_memory=shm) as c:
                assert c.lookup(self.namespace, self.hashes) == ["dram"] * len(self.hashes)
                assert c.load(self.namespace, self.hashes) == self.blocks
        with self.d.client() as c:
            st = c.status()
            assert st.leases == 0
            assert c.check() == []
        assert self.d.proc.poll() is None, "the daemon exited"


@pytest.fixture
def small(daemon_factory):
    return daemon_factory(dram="8MiB", nvme="32MiB").start()


# -- NOT_FOUND: unknown namespace ----------------------------------------------------------------


def test_unknown_namespace_is_not_found(small):
    base = Baseline(small)
    for shm in (True, False):
        with small.client(shared_memory=shm) as c:
            assert client_code(c.lookup, "nope", [1, 2]) == CODE.NOT_FOUND
            assert client_code(c.store, "nope", [1], [os.urandom(BLOCK)]) == CODE.NOT_FOUND
            assert client_code(c.load, "nope", [1]) == CODE.NOT_FOUND
            assert client_code(c.load_into, "nope", [1], [bytearray(BLOCK)]) == CODE.NOT_FOUND
    with stubs(small) as (engine, _):
        assert rpc_code(engine.Lookup, engine_pb2.LookupRequest(namespace="nope", hashes=[1])) == CODE.NOT_FOUND
        req = engine_pb2.PrepareStoreRequest(namespace="nope", blocks=specs([1]))
        assert rpc_code(engine.PrepareStore, req) == CODE.NOT_FOUND
        assert rpc_code(engine.PrepareLoad, engine_pb2.PrepareLoadRequest(namespace="nope", hashes=[1])) == CODE.NOT_FOUND
        req = engine_pb2.LoadInlineRequest(namespace="nope", hashes=[1])
        assert rpc_code(engine.LoadInline, req) == CODE.NOT_FOUND
        header = engine_pb2.StoreInlineHeader(namespace="nope", blocks=specs([1]))
        stream = iter([engine_pb2.StoreInlineRequest(header=header)])
        assert rpc_code(engine.StoreInline, stream) == CODE.NOT_FOUND
    base.assert_intact()


# -- INVALID_ARGUMENT: malformed stores -----------------------------------------------------------


def test_malformed_stores_are_invalid_argument_and_store_nothing(small):
    base = Baseline(small)
    new = [0xA0, 0xA1, 0xA2]
    good = [os.urandom(BLOCK) for _ in new]
    with small.client() as c:
        used = dram_used(c)
    for shm in (True, False):
        with small.client(shared_memory=shm) as c:
            # One block of the wrong size spoils the whole (all-or-nothing) store.
            wrong_size = [good[0], os.urandom(BLOCK - 4096), good[2]]
            assert client_code(c.store, NS, new, wrong_size) == CODE.INVALID_ARGUMENT
            assert client_code(c.store, NS, [0xA0, 0xA1, 0xA0], good) == CODE.INVALID_ARGUMENT
            assert client_code(c.store, NS, [0xA0], good[:1], [0xA0]) == CODE.INVALID_ARGUMENT  # own parent
            assert c.lookup(NS, new[:1]) == []
            assert c.load(NS, new) == [None, None, None]
    with stubs(small) as (engine, admin):
        assert rpc_code(engine.PrepareStore, engine_pb2.PrepareStoreRequest(namespace=NS)) == CODE.INVALID_ARGUMENT
        empty = engine_pb2.StoreInlineRequest(header=engine_pb2.StoreInlineHeader(namespace=NS))
        assert rpc_code(engine.StoreInline, iter([empty])) == CODE.INVALID_ARGUMENT
        for bad in (-1.0, float("nan"), float("inf"), 3601.0):
            assert rpc_code(admin.Sync, admin_pb2.SyncRequest(timeout_s=bad)) == CODE.INVALID_ARGUMENT, bad
            assert rpc_code(admin.Drain, admin_pb2.DrainRequest(timeout_s=bad)) == CODE.INVALID_ARGUMENT, bad
        # A cycle of parents, in one store or through a held block, stores nothing.
        cyc = [types_pb2.BlockSpec(hash=0xB1, parent=0xB2, nbytes=BLOCK), types_pb2.BlockSpec(hash=0xB2, parent=0xB1, nbytes=BLOCK)]
        assert rpc_code(engine.PrepareStore, engine_pb2.PrepareStoreRequest(namespace=NS, blocks=cyc)) == CODE.INVALID_ARGUMENT
        # Names with control or bidi-override characters are refused, as are overlong ones.
        for name in ("a\x00b", "evil\u202etxt", "x" * 257, ""):
            req = engine_pb2.RegisterNamespaceRequest(namespace=name, block_tokens=16, block_bytes=BLOCK)
            assert rpc_code(engine.RegisterNamespace, req) == CODE.INVALID_ARGUMENT, name
            req = engine_pb2.SessionEventRequest(namespace=NS, session_id=name, kind=engine_pb2.TURN_START, hashes=[1])
            assert rpc_code(engine.SessionEvent, req) == CODE.INVALID_ARGUMENT, name
        req = engine_pb2.SessionEventRequest(namespace=NS, session_id="s-ok", kind=engine_pb2.TURN_START, hashes=[1])
        engine.SessionEvent(req, timeout=10)
        req = engine_pb2.SessionEventRequest(namespace=NS, session_id="s-ok", kind=engine_pb2.TOOL_PAUSE, tool="rm\x1b[2J")
        assert rpc_code(engine.SessionEvent, req) == CODE.INVALID_ARGUMENT
        assert rpc_code(admin.ListBlocks, admin_pb2.ListBlocksRequest(page_token="zz")) == CODE.INVALID_ARGUMENT
        assert rpc_code(admin.ListBlocks, admin_pb2.ListBlocksRequest(page_size=10**6)) == CODE.INVALID_ARGUMENT
        stats = admin.Status(admin_pb2.StatusRequest(), timeout=10)
        assert stats.leases == 0
    with small.client() as c:
        assert dram_used(c) == used
        assert c.store(NS, new, good) == 3  # the same blocks, well-formed, are accepted
        assert c.load(NS, new) == good
    base.assert_intact()


def test_lease_errors_via_raw_stubs(small):
    base = Baseline(small)
    hashes = [0xB0, 0xB1, 0xB2]
    blocks = [os.urandom(BLOCK) for _ in hashes]
    with stubs(small) as (engine, _), small.client() as c:
        assert rpc_code(engine.CommitStore, engine_pb2.CommitStoreRequest(lease_id="no-such-lease")) == CODE.NOT_FOUND
        assert rpc_code(engine.CompleteLoad, engine_pb2.CompleteLoadRequest(lease_id="no-such-lease")) == CODE.NOT_FOUND

        grant = engine.PrepareStore(
            engine_pb2.PrepareStoreRequest(namespace=NS, blocks=specs(hashes), lease_seconds=100_000), timeout=10
        )
        assert 0 < grant.lease_seconds <= 600  # capped
        assert [s.write for s in grant.slots] == [True] * 3
        arena = open_arena(engine.GetArena(engine_pb2.GetArenaRequest(), timeout=10).path, grant.arena_id)
        try:
            for slot, data in zip(grant.slots, blocks):
                arena.view(slot.slot.offset, BLOCK)[:] = data
        finally:
            arena.close()
        # Out-of-range "failed" indexes are refused and the lease stays intact.
        bad = engine_pb2.CommitStoreRequest(lease_id=grant.lease_id, failed=[3])
        assert rpc_code(engine.CommitStore, bad) == CODE.INVALID_ARGUMENT
        assert c.status().leases == 1
        assert c.lookup(NS, hashes) == []
        reply = engine.CommitStore(engine_pb2.CommitStoreRequest(lease_id=grant.lease_id, failed=[1]), timeout=10)
        assert reply.committed == 2
        assert c.load(NS, hashes) == [blocks[0], None, blocks[2]]  # the failed one was discarded
        again = engine_pb2.CommitStoreRequest(lease_id=grant.lease_id)
        assert rpc_code(engine.CommitStore, again) == CODE.NOT_FOUND  # a lease commits once

        load = engine.PrepareLoad(engine_pb2.PrepareLoadRequest(namespace=NS, hashes=hashes), timeout=10)
        assert [s.found for s in load.slots] == [True, False, True]
        engine.CompleteLoad(engine_pb2.CompleteLoadRequest(lease_id=load.lease_id), timeout=10)
        done = engine_pb2.CompleteLoadRequest(lease_id=load.lease_id)
        assert rpc_code(engine.CompleteLoad, done) == CODE.NOT_FOUND
        assert rpc_code(engine.CommitStore, engine_pb2.CommitStoreRequest(lease_id=load.lease_id)) == CODE.NOT_FOUND
    base.assert_intact()


def chunk(index: int, offset: int, data: bytes) -> engine_pb2.StoreInlineRequest:
    return engine_pb2.StoreInlineRequest(chunk=engine_pb2.BlockChunk(index=index, offset=offset, data=data))


def header(hashes) -> engine_pb2.StoreInlineRequest:
    return engine_pb2.StoreInlineRequest(header=engine_pb2.StoreInlineHeader(namespace=NS, blocks=specs(hashes)))


def test_store_inline_stream_errors_store_nothing(small):
    base = Baseline(small)
    hashes = [0xC0, 0xC1]
    data = [os.urandom(BLOCK) for _ in hashes]
    full = [chunk(0, 0, data[0]), chunk(1, 0, data[1])]
    streams = {
        "no header": [chunk(0, 0, data[0])],
        "empty stream": [],
        "two headers": [header(hashes), header(hashes), *full],
        "short block": [header(hashes), chunk(0, 0, data[0]), chunk(1, 0, data[1][: BLOCK // 2])],
        "block never sent": [header(hashes), chunk(0, 0, data[0])],
        "index out of range": [header(hashes), *full, chunk(2, 0, b"x")],
        "gap in a block": [header(hashes), chunk(0, 0, data[0][:4096]), chunk(0, 8192, data[0][8192:])],
        "too many bytes": [header(hashes), *full, chunk(1, BLOCK, b"x")],
    }
    with stubs(small) as (engine, _), small.client() as c:
        used = dram_used(c)
        for what, messages in streams.items():
            assert rpc_code(engine.StoreInline, iter(messages)) == CODE.INVALID_ARGUMENT, what
            assert c.lookup(NS, hashes[:1]) == [], what
            assert c.load(NS, hashes) == [None, None], what
            assert (c.status().leases, dram_used(c)) == (0, used), what
        reply = engine.StoreInline(iter([header(hashes), *full]), timeout=10)
        assert (reply.stored, reply.present) == (2, 0)
        assert c.load(NS, hashes) == data
    base.assert_intact()


# -- FAILED_PRECONDITION: geometry --------------------------------------------------------------


def test_conflicting_geometry_is_failed_precondition_across_restarts(small):
    base = Baseline(small)
    with small.client() as c:
        assert client_code(c.register_namespace, NS, TOKENS, BLOCK * 2) == CODE.FAILED_PRECONDITION
        assert client_code(c.register_namespace, NS, TOKENS + 1, BLOCK) == CODE.FAILED_PRECONDITION
        assert client_code(c.register_namespace, "", TOKENS, BLOCK) == CODE.INVALID_ARGUMENT
        assert client_code(c.register_namespace, "zero", TOKENS, 0) == CODE.INVALID_ARGUMENT
        assert client_code(c.register_namespace, "zero", 0, BLOCK) == CODE.INVALID_ARGUMENT
        assert c.register_namespace(NS, TOKENS, BLOCK) is False
        assert [(n.name, n.block_tokens, n.block_bytes) for n in c.status().namespaces] == [(NS, TOKENS, BLOCK)]
    base.assert_intact()
    small.kill()
    small.start()
    with small.client() as c:  # the geometry is durable, and so is the conflict
        assert client_code(c.register_namespace, NS, TOKENS, BLOCK * 2) == CODE.FAILED_PRECONDITION
        assert c.load(NS, base.hashes) == base.blocks


# -- RESOURCE_EXHAUSTED: every slot leased ------------------------------------------------------


def test_resource_exhausted_when_every_slot_is_leased(daemon_factory):
    d = daemon_factory(dram="256KiB", nvme="0").start()  # 4 slots, no NVMe tier
    base = Baseline(d, n=4, sync=False)
    newcomer = os.urandom(BLOCK)
    with d.client() as c, d.client(shared_memory=False) as inline, stubs(d) as (engine, _):
        assert [t.name for t in c.status().tiers] == ["dram"]
        assert c.sync() == 0  # nothing to write down without NVMe
        # More blocks than DRAM holds, in one PrepareStore: refused at once, nothing changes.
        # (Client.store would split it into batches that fit, each evicting older blocks.)
        five = [0xE0 + i for i in range(5)]
        prepare = engine_pb2.PrepareStoreRequest(namespace=NS, blocks=specs(five))
        assert rpc_code(engine.PrepareStore, prepare) == CODE.RESOURCE_EXHAUSTED
        assert c.lookup(NS, five) == []
        assert c.load(NS, base.hashes) == base.blocks

        # Half of DRAM pinned, a store needing more than the other half: refused before
        # evicting anything (evicting the unpinned half and then failing would lose it).
        half = engine.PrepareLoad(engine_pb2.PrepareLoadRequest(namespace=NS, hashes=base.hashes[:2]), timeout=10)
        three = [0xE8, 0xE9, 0xEA]
        prepare = engine_pb2.PrepareStoreRequest(namespace=NS, blocks=specs(three))
        assert rpc_code(engine.PrepareStore, prepare) == CODE.RESOURCE_EXHAUSTED
        assert c.lookup(NS, base.hashes) == ["dram"] * 4
        assert c.load(NS, base.hashes) == base.blocks
        engine.CompleteLoad(engine_pb2.CompleteLoadRequest(lease_id=half.lease_id), timeout=10)

        pin = engine.PrepareLoad(engine_pb2.PrepareLoadRequest(namespace=NS, hashes=base.hashes), timeout=10)
        assert [s.found for s in pin.slots] == [True] * 4
        assert client_code(c.store, NS, [0xD0], [newcomer]) == CODE.RESOURCE_EXHAUSTED
        assert client_code(inline.store, NS, [0xD0], [newcomer]) == CODE.RESOURCE_EXHAUSTED
        assert c.lookup(NS, [0xD0]) == []
        # Pinned blocks still load, through either path (loads share the pins).
        assert c.load(NS, base.hashes) == base.blocks
        assert inline.load(NS, base.hashes) == base.blocks
        assert c.check() == []

        engine.CompleteLoad(engine_pb2.CompleteLoadRequest(lease_id=pin.lease_id), timeout=10)
        assert c.store(NS, [0xD0], [newcomer]) == 1  # one unpinned block made room
        assert c.load(NS, [0xD0]) == [newcomer]
        st = c.status()
        assert (st.tiers[0].blocks, st.leases) == (4, 0)
        loaded = c.load(NS, base.hashes)
        assert sum(b is None for b in loaded) == 1  # exactly one evicted (no lower tier)
        assert all(b is None or b == want for b, want in zip(loaded, base.blocks))
        assert c.check() == []


# -- leases of a client that went away ---------------------------------------------------------

DYING_CLIENT = r"""
import os, sys
import grpc
from kvd.tiers.dram import open_arena
from kvd.v1 import engine_pb2, engine_pb2_grpc, types_pb2

addr, ns, nbytes, hashes = sys.argv[1], sys.argv[2], int(sys.argv[3]), [int(h) for h in sys.argv[4:]]
engine = engine_pb2_grpc.EngineStub(grpc.insecure_channel(addr))
blocks = [types_pb2.BlockSpec(hash=h, nbytes=nbytes) for h in hashes]
grant = engine.PrepareStore(engine_pb2.PrepareStoreRequest(namespace=ns, blocks=blocks), timeout=10)
arena = open_arena(engine.GetArena(engine_pb2.GetArenaRequest(), timeout=10).path, grant.arena_id)
arena.view(grant.slots[0].slot.offset, nbytes)[:] = os.urandom(nbytes)  # half-way through
print(grant.lease_id, flush=True)
os._exit(0)  # dies between prepare and commit
"""


def test_client_dying_between_prepare_and_commit_leaves_nothing(daemon_factory, wait_until):
    d = daemon_factory(dram="8MiB", nvme="32MiB", extra=["--lease-seconds", "2"]).start()
    base = Baseline(d)
    raw_hashes = [0xF0, 0xF1]
    dead_hashes = [0xF8, 0xF9, 0xFA]
    with d.client() as c, stubs(d) as (engine, _):
        used = dram_used(c)
        # 1. A child process that prepares (the daemon's default lease, 2 s), writes part of
        #    a block into the arena, and dies.
        child = subprocess.run(
            [sys.executable, "-c", DYING_CLIENT, d.address, NS, str(BLOCK), *map(str, dead_hashes)],
            capture_output=True, text=True, timeout=60,
        )
        assert child.returncode == 0, child.stderr
        dead_lease = child.stdout.strip()
        # 2. In-process: a prepare with an explicit 1 s lease that nobody commits.
        grant = engine.PrepareStore(
            engine_pb2.PrepareStoreRequest(namespace=NS, blocks=specs(raw_hashes), lease_seconds=1), timeout=10
        )
        assert 0 < grant.lease_seconds <= 1
        # 3. A load lease never completed.
        pin = engine.PrepareLoad(
            engine_pb2.PrepareLoadRequest(namespace=NS, hashes=base.hashes, lease_seconds=1), timeout=10
        )
        assert [s.found for s in pin.slots] == [True] * len(base.hashes)

        st = c.status()
        assert st.leases == 3
        assert dram_used(c) == used + 5 * BLOCK
        for hashes in (raw_hashes, dead_hashes):
            assert c.lookup(NS, hashes) == []
            assert c.load(NS, hashes) == [None] * len(hashes)

        wait_until(lambda: c.status().leases == 0, timeout=15, what="the leases to expire")
        assert c.check() == []
        for hashes in (raw_hashes, dead_hashes):
            assert c.lookup(NS, hashes) == []
        # The expired stores' slots come back (after a quarantine of one more lease period,
        # in case their writer was only stalled).
        wait_until(lambda: dram_used(c) == used, timeout=15, what="the leased DRAM to be freed")
        assert c.check() == []
        for lease_id in (grant.lease_id, dead_lease):
            late = engine_pb2.CommitStoreRequest(lease_id=lease_id)
            assert rpc_code(engine.CommitStore, late) == CODE.NOT_FOUND
        done = engine_pb2.CompleteLoadRequest(lease_id=pin.lease_id)
        assert rpc_code(engine.CompleteLoad, done) == CODE.NOT_FOUND

        # The same hashes can be stored now, and load back as stored.
        again = [os.urandom(BLOCK) for _ in raw_hashes + dead_hashes]
        assert c.store(NS, raw_hashes + dead_hashes, again) == 5
        assert c.load(NS, raw_hashes + dead_hashes) == again
        assert c.sync() == 0
    base.assert_intact()


# -- client-side argument errors ----------------------------------------------------------------


def test_client_rejects_bad_hashes_and_lengths_before_any_rpc(small):
    base = Baseline(small)
    block = os.urandom(BLOCK)
    for shm in (True, False):
        with small.client(shared_memory=shm) as c:
            for bad in (-1, 1 << 64, "7", 1.0, None):
                with pytest.raises(ValueError):
                    c.store(NS, [bad], [block])
                with pytest.raises(ValueError):
                    c.load(NS, [bad])
                with pytest.raises(ValueError):
                    c.load_into(NS, [bad], [bytearray(BLOCK)])
                if bad is not None:
                    with pytest.raises(ValueError):
                        c.store(NS, [5], [block], parents=[bad])
            for bad in (-1, 1 << 64):
                with pytest.raises(ValueError):
                    c.lookup(NS, [bad])
            with pytest.raises(ValueError):
                c.store(NS, [5, 6], [block])
            with pytest.raises(ValueError):
                c.store(NS, [5], [block, block])
            with pytest.raises(ValueError):
                c.store(NS, [5, 6], [block, block], parents=[None])
            with pytest.raises(ValueError):
                c.load_into(NS, [5, 6], [bytearray(BLOCK)])
            assert c.lookup(NS, [5]) == []
    with pytest.raises(ValueError):
        Client("not-an-address")
    with small.client() as c:
        assert sum(n.blocks for n in c.status().namespaces) == len(base.hashes)
    base.assert_intact()


# -- command-line errors -----------------------------------------------------------------------


def test_kvctl_without_a_daemon_exits_1_with_one_line(daemon_factory, kvctl, tmp_path):
    d = daemon_factory(dram="1MiB", nvme="0").start()
    d.kill()  # leaves its socket file behind, with nothing listening
    assert d.socket.exists()
    for address in (d.address, f"unix://{tmp_path}/missing.sock"):
        r = kvctl(address, "--timeout", "1", "status")
        assert r.returncode == 1
        assert r.stdout == ""
        lines = r.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("kvctl: unavailable:"), r.stderr
    r = kvctl(d.address, "no-such-command")
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1, r.stderr
    d.start()  # the stale socket does not stop a new daemon
    r = kvctl(d, "check")
    assert (r.returncode, r.stdout) == (0, "ok: yes\nproblems: -\n")


@pytest.mark.parametrize(
    "args",
    [
        ["--dram-bytes", "12XB"],
        ["--dram-bytes", "1"],
        ["--nvme-bytes", "-5MiB"],
        ["--lease-seconds", "0"],
        ["--tcp", "localhost"],
        ["--policy", "no-such-policy"],
    ],
)
def test_kvd_serve_bad_flags_exit_2_with_one_line(tmp_path, args):
    r = subprocess.run(
        [sys.executable, "-m", "kvd.cli.kvd_main", "serve", "--socket", str(tmp_path / "s.sock"),
         "--nvme-dir", str(tmp_path / "nvme"), "--shm-dir", str(tmp_path / "shm"), *args],
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 2, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvd serve: "), r.stderr
    assert r.stdout == ""
    assert not (tmp_path / "s.sock").exists()
