"""Integration tests against a real `kvd serve` process: data paths, durability, recovery.

Every test starts its own daemon (fixtures in conftest.py) on a private socket, arena file
and NVMe directory, and talks to it only through the public surfaces: the Python client,
raw gRPC stubs, the `kvctl` CLI, and the files the daemon keeps on disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys

import grpc
import pytest

from kvd.client import Client
from kvd.v1 import engine_pb2, engine_pb2_grpc

pytestmark = pytest.mark.timeout(120)

BLOCK = 64 << 10  # bytes per block
NS = "llama-test"
TOKENS = 16
MiB = 1 << 20


def make_hashes(n: int, seed: int) -> list[int]:
    """``n`` distinct 64-bit hashes, including the extremes and hashes with NUL bytes."""
    rng = random.Random(seed)
    out: list[int] = [0, (1 << 64) - 1, 1, 256, 1 << 56][: min(n, 5)]
    seen = set(out)
    while len(out) < n:
        h = rng.getrandbits(64)
        if len(out) % 3 == 0:
            h &= ~(0xFF << (8 * rng.randrange(8)))  # a NUL byte somewhere in its encoding
        if h not in seen:
            seen.add(h)
            out.append(h)
    return out


def make_blocks(n: int, size: int = BLOCK) -> list[bytes]:
    return [os.urandom(size) for _ in range(n)]


def tier(status, name: str):
    (found,) = [t for t in status.tiers if t.name == name]
    return found


def in_batches(n: int, size: int):
    for lo in range(0, n, size):
        yield lo, min(n, lo + size)


def load_batched(client: Client, namespace: str, hashes: list[int], size: int) -> list[bytes | None]:
    """Load in batches small enough for a small DRAM tier (a load pins all its blocks there)."""
    out: list[bytes | None] = []
    for lo, hi in in_batches(len(hashes), size):
        out += client.load(namespace, hashes[lo:hi])
    return out


def assert_never_wrong(loaded: list[bytes | None], expected: list[bytes]) -> list[int]:
    """Every block is byte-identical or missing; returns the indexes of the missing ones."""
    assert len(loaded) == len(expected)
    wrong = [i for i, (got, want) in enumerate(zip(loaded, expected)) if got is not None and got != want]
    assert not wrong, f"blocks {wrong[:10]} loaded with wrong bytes"
    return [i for i, got in enumerate(loaded) if got is None]


def flip_bytes(path, offset: int, length: int) -> None:
    """Overwrite ``length`` bytes of ``path`` at ``offset`` with their complement, durably."""
    with open(path, "r+b") as f:
        f.seek(offset)
        data = f.read(length)
        assert len(data) == length
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in data))
        f.flush()
        os.fsync(f.fileno())


# -- 1. shared memory, 1,000 blocks, kill -9, warm restart -------------------------------------


def test_thousand_blocks_survive_kill9_and_restart(daemon_factory, kvctl):
    n = 1000
    d = daemon_factory(dram="64MiB", nvme="128MiB").start()
    hashes = make_hashes(n, seed=1)
    blocks = make_blocks(n)
    with d.client(shared_memory=True) as c:
        assert c.shared_memory
        assert c.register_namespace(NS, TOKENS, BLOCK) is True
        assert c.store(NS, hashes, blocks) == n
        assert c.store(NS, hashes, blocks) == 0  # all held already
        assert c.lookup(NS, hashes) == ["dram"] * n
        assert c.load(NS, hashes) == blocks
        assert c.sync() == 0
        st = c.status()
        assert (tier(st, "dram").blocks, tier(st, "nvme").blocks) == (n, n)
        assert st.write_behind_queue == 0 and st.leases == 0

    assert d.kill() == -signal.SIGKILL
    d.restart()

    with d.client(shared_memory=True) as c:
        st = c.status()
        assert (st.recovered_blocks, st.dropped_on_recovery) == (n, 0)
        assert c.register_namespace(NS, TOKENS, BLOCK) is False  # the namespace survived too
        assert c.lookup(NS, hashes) == ["nvme"] * n  # a fresh arena: everything is on NVMe
        loaded = c.load(NS, hashes)
        assert assert_never_wrong(loaded, blocks) == []
        assert c.lookup(NS, hashes) == ["dram"] * n  # promoted by the load
        assert c.check() == []

    r = kvctl(d, "check")
    assert (r.returncode, r.stdout, r.stderr) == (0, "ok: yes\nproblems: -\n", "")

    r = kvctl(d, "status", "-o", "json")
    assert r.returncode == 0, r.stderr
    status = json.loads(r.stdout)
    assert set(status["tiers"]) == {"dram", "nvme"}
    for name, capacity in (("dram", 64 * MiB), ("nvme", 128 * MiB)):
        t = status["tiers"][name]
        assert (t["capacity_bytes"], t["used_bytes"], t["blocks"]) == (capacity, n * BLOCK, n), name
    assert [(ns["name"], ns["block_bytes"], ns["blocks"]) for ns in status["namespaces"]] == [(NS, BLOCK, n)]
    assert (status["recovered_blocks"], status["leases"]) == (n, 0)

    r = kvctl(d, "blocks", "-o", "json")
    assert r.returncode == 0, r.stderr
    listed = json.loads(r.stdout)
    parents = dict(zip(hashes, [None, *hashes[:-1]]))
    assert [b["hash"] for b in listed] == sorted(hashes)
    assert all(b["parent"] == parents[b["hash"]] for b in listed)
    assert all(b["tiers"] == ["dram", "nvme"] and b["nbytes"] == BLOCK for b in listed)


def test_list_blocks_pages_over_hashes_with_nul_bytes(daemon_factory):
    """Page tokens are block keys; hashes with NUL bytes must not break them."""
    d = daemon_factory(dram="8MiB", nvme="32MiB").start()
    hashes = make_hashes(50, seed=2)
    with d.client() as c:
        c.register_namespace(NS, TOKENS, 4096)
        c.register_namespace("other", TOKENS, 4096)
        c.store(NS, hashes, make_blocks(50, 4096))
        c.store("other", [7], [os.urandom(4096)])
        listed = list(c.list_blocks(NS, page_size=7))
        assert [b.hash for b in listed] == sorted(hashes)
        assert len(list(c.list_blocks(page_size=3))) == 51


def test_a_client_outlives_a_daemon_restart(daemon_factory):
    """The same Client keeps working after kill -9 + restart: it maps the new arena."""
    d = daemon_factory(dram="8MiB", nvme="32MiB").start()
    hashes, blocks = make_hashes(16, seed=9), make_blocks(16)
    with d.client(shared_memory=True) as c:
        c.register_namespace(NS, TOKENS, BLOCK)
        assert c.store(NS, hashes[:8], blocks[:8]) == 8
        assert c.sync() == 0
        d.kill()
        d.start()
        assert c.load(NS, hashes[:8]) == blocks[:8]
        assert c.store(NS, hashes[8:], blocks[8:], parents=[hashes[7], *hashes[8:-1]]) == 8
        assert c.lookup(NS, hashes) == ["dram"] * 16
    with d.client(shared_memory=False) as fresh:
        assert fresh.load(NS, hashes) == blocks


# -- 2. corruption on disk ----------------------------------------------------------------------


def test_corrupt_slab_while_stopped_is_missing_never_wrong(daemon_factory, kvctl):
    n = 64
    d = daemon_factory(dram="8MiB", nvme="32MiB").start()
    hashes, blocks = make_hashes(n, seed=3), make_blocks(n)
    with d.client() as c:
        c.register_namespace(NS, TOKENS, BLOCK)
        assert c.store(NS, hashes, blocks) == n
        assert c.sync() == 0
    d.kill()

    flip_bytes(d.nvme_dir / "slab-0000.dat", 0, 1 * MiB)  # the first 16 slots' worth of bytes
    d.start()

    with d.client() as c:
        st = c.status()
        assert st.dropped_on_recovery >= 1
        assert st.recovered_blocks + st.dropped_on_recovery == n
        held = c.lookup(NS, hashes)
        loaded = c.load(NS, hashes)
        missing = assert_never_wrong(loaded, blocks)
        assert len(missing) == st.dropped_on_recovery
        assert len(held) == missing[0]  # the held prefix ends at the first missing block
        assert c.check() == []
        # The daemon serves on: the lost blocks can be stored again and all load back.
        parents = [None, *hashes[:-1]]
        lost = [hashes[i] for i in missing]
        assert c.store(NS, lost, [blocks[i] for i in missing], parents=[parents[i] for i in missing]) == len(lost)
        assert c.load(NS, hashes) == blocks
        assert c.sync() == 0
    r = kvctl(d, "check")
    assert r.returncode == 0, r.stdout + r.stderr


def test_corrupt_slab_while_running_is_missing_never_wrong(daemon_factory, kvctl):
    # LRU: which blocks still have a DRAM copy when the slab is corrupted (and so are
    # never read from it) is worked out below for LRU's order.
    n, dram_blocks = 64, 16
    d = daemon_factory(dram="1MiB", nvme="32MiB", extra=["--policy", "lru"]).start()
    hashes, blocks = make_hashes(n, seed=4), make_blocks(n)
    with d.client() as c:
        c.register_namespace(NS, TOKENS, BLOCK)
        for lo, hi in in_batches(n, 8):
            assert c.store(NS, hashes[lo:hi], blocks[lo:hi]) == hi - lo
        assert c.sync() == 0
        st = c.status()
        assert tier(st, "dram").blocks == dram_blocks and tier(st, "nvme").blocks == n
        assert c.lookup(NS, hashes).count("nvme") == n - dram_blocks

        # Garbage over half of the blocks' NVMe slots, through an ordinary descriptor while
        # the daemon has the file open: at least 32 - 16 of them have no DRAM copy.
        with open(d.nvme_dir / "slab-0000.dat", "r+b") as f:
            f.write(os.urandom(32 * BLOCK))
            f.flush()
            os.fsync(f.fileno())

        loaded = load_batched(c, NS, hashes, 8)
        missing = assert_never_wrong(loaded, blocks)
        assert len(missing) >= 32 - dram_blocks
        # A block found corrupt is gone for good, not served on a second try.
        assert all(b is None for b in load_batched(c, NS, [hashes[i] for i in missing], 8))
        assert len(c.lookup(NS, hashes)) == missing[0]
        assert c.check() == []

        # Still serving: stores and loads of other blocks (reusing the freed slots) work.
        more_h, more_b = make_hashes(70, seed=5)[-20:], make_blocks(20)
        for lo, hi in in_batches(20, 8):
            assert c.store(NS, more_h[lo:hi], more_b[lo:hi]) == hi - lo
        assert c.sync() == 0
        assert load_batched(c, NS, more_h, 8) == more_b
        assert_never_wrong(load_batched(c, NS, hashes, 8), blocks)
        durable = sum(1 for b in c.list_blocks(NS) if "nvme" in b.tiers)
    r = kvctl(d, "check")
    assert r.returncode == 0, r.stdout + r.stderr

    # The dropped blocks' manifest entries went too: a restart recovers exactly what is held.
    d.kill()
    d.start()
    with d.client() as c:
        st = c.status()
        assert (st.recovered_blocks, st.dropped_on_recovery) == (durable, 0)
        assert_never_wrong(load_batched(c, NS, hashes, 8), blocks)
        assert load_batched(c, NS, more_h, 8) == more_b
        assert c.check() == []


# -- 3. kill -9 while a client writes -------------------------------------------------------------

WRITER = r"""
import hashlib, os, random, sys
from kvd.client import Client, ClientError

addr, ns, block, batches, per, seed = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:])
rng = random.Random(seed)
client = Client(addr, timeout=20)
try:
    for b in range(batches):
        hashes = [rng.getrandbits(64) for _ in range(per)]
        blocks = [os.urandom(block) for _ in range(per)]
        digests = [hashlib.blake2b(x, digest_size=16).hexdigest() for x in blocks]
        print("attempt", b, " ".join(f"{h}:{d}" for h, d in zip(hashes, digests)), flush=True)
        client.store(ns, hashes, blocks)
        print("stored", b, flush=True)
        if b % 3 == 2:
            pending = client.sync()
            print("synced" if pending == 0 else "unsynced", b, flush=True)
    print("done", flush=True)
except ClientError as exc:
    print("error", exc.code.name, flush=True)
"""


def test_kill9_during_writes_keeps_every_synced_block(daemon_factory, kvctl):
    per, batches = 16, 40  # 40 MiB at most: the NVMe tier never has to evict
    d = daemon_factory(dram="8MiB", nvme="64MiB").start()
    with d.client() as c:
        c.register_namespace(NS, TOKENS, BLOCK)
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, d.address, NS, str(BLOCK), str(batches), str(per), "6"],
        stdout=subprocess.PIPE,
        text=True,
    )
    digests: dict[int, str] = {}  # every hash the writer tried to store -> its bytes' digest
    batch_hashes: dict[int, list[int]] = {}
    synced: set[int] = set()
    killed_after = None

    def take(line: str) -> None:
        kind, _, rest = line.strip().partition(" ")
        if kind == "attempt":
            b, _, pairs = rest.partition(" ")
            batch_hashes[int(b)] = []
            for pair in pairs.split():
                h, digest = pair.split(":")
                digests[int(h)] = digest
                batch_hashes[int(b)].append(int(h))
        elif kind == "synced":
            synced.add(int(rest))

    try:
        for line in writer.stdout:
            take(line)
            # Kill once 3 batches are synced, right after an unsynced batch was acknowledged:
            # its write-behind and the writer's next store are in flight.
            if line.startswith("stored") and len(synced) >= 3 and int(line.split()[1]) % 3 != 2:
                killed_after = int(line.split()[1])
                d.kill()
                break
        rest, _ = writer.communicate(timeout=60)
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    for line in rest.splitlines():
        take(line)
    assert killed_after is not None, "the writer finished before the daemon was killed"
    assert "done" not in rest

    d.start()
    with d.client() as c:
        durable = [h for b in sorted(synced) for h in batch_hashes[b]]
        assert len(durable) >= 3 * per
        attempted = list(digests)
        loaded = load_batched(c, NS, attempted, 64)
        got = {h: data for h, data in zip(attempted, loaded)}
        lost = [h for h in durable if got[h] is None]
        assert not lost, f"{len(lost)} blocks acknowledged by sync() were lost"
        wrong = [
            h for h, data in got.items()
            if data is not None and hashlib.blake2b(data, digest_size=16).hexdigest() != digests[h]
        ]
        assert not wrong, f"{len(wrong)} blocks loaded with wrong bytes"
        assert c.check() == []
    r = kvctl(d, "check")
    assert r.returncode == 0, r.stdout + r.stderr


# -- 4. inline streaming, mixed with shared memory ------------------------------------------------


def test_inline_and_shared_memory_clients_interoperate(daemon_factory):
    d = daemon_factory(dram="8MiB", nvme="32MiB").start()
    inline = d.client(shared_memory=False)
    shm = d.client(shared_memory=True)
    try:
        assert inline.shared_memory is False and shm.shared_memory is True
        assert inline.register_namespace(NS, TOKENS, BLOCK) is True
        assert shm.register_namespace(NS, TOKENS, BLOCK) is False

        ha, ba = make_hashes(20, seed=7)[:10], make_blocks(10)
        hb, bb = make_hashes(20, seed=7)[10:], make_blocks(10)
        assert inline.store(NS, ha, ba) == 10
        assert shm.store(NS, hb, bb) == 10
        assert shm.load(NS, ha) == ba  # stored inline, loaded through the arena
        assert inline.load(NS, hb) == bb  # stored through the arena, loaded inline
        assert inline.load(NS, ha) == ba
        assert inline.store(NS, hb, bb) == 0  # already held: nothing written
        assert inline.lookup(NS, ha) == ["dram"] * 10

        missing = 0xDEAD_BEEF_0000_0001
        assert inline.load(NS, [missing]) == [None]
        assert inline.load(NS, [ha[0], missing, hb[0]]) == [ba[0], None, bb[0]]
        bufs = [bytearray(BLOCK) for _ in range(3)]
        assert inline.load_into(NS, [hb[1], missing, ha[1]], bufs) == [True, False, True]
        assert (bytes(bufs[0]), bytes(bufs[1]), bytes(bufs[2])) == (bb[1], bytes(BLOCK), ba[1])

        # Raw LoadInline of a missing hash: one message, found=False, no data.
        with grpc.insecure_channel(d.address) as channel:
            replies = list(
                engine_pb2_grpc.EngineStub(channel).LoadInline(
                    engine_pb2.LoadInlineRequest(namespace=NS, hashes=[missing]), timeout=10
                )
            )
        assert [(r.index, r.found, r.data) for r in replies] == [(0, False, b"")]

        # Blocks bigger than one streaming chunk (1 MiB) travel in several, in both directions.
        big = int(2.5 * MiB)
        inline.register_namespace("big", TOKENS, big)
        hbig, bbig = [11, 12], make_blocks(2, big)
        assert inline.store("big", hbig[:1], bbig[:1]) == 1
        assert shm.store("big", hbig[1:], bbig[1:], parents=[11]) == 1
        assert inline.load("big", hbig) == bbig
        assert shm.load("big", hbig) == bbig
        st = shm.status()
        assert st.leases == 0
        assert shm.check() == []
    finally:
        inline.close()
        shm.close()


def test_stores_into_a_full_dram_wait_for_write_behind(daemon_factory):
    """Back-to-back stores into a DRAM whose every block is being written down: the store
    waits for write-behind to land (then evicts), it does not fail RESOURCE_EXHAUSTED."""
    n = 320  # 20 MiB through 1 MiB of DRAM
    d = daemon_factory(dram="1MiB", nvme="32MiB").start()
    hashes, blocks = make_hashes(n, seed=10), make_blocks(n)
    with d.client() as c:
        c.register_namespace(NS, TOKENS, BLOCK)
        for lo, hi in in_batches(n, 8):
            assert c.store(NS, hashes[lo:hi], blocks[lo:hi]) == hi - lo
        assert c.sync() == 0
        st = c.status()
        assert (tier(st, "dram").blocks, tier(st, "nvme").blocks) == (16, n)
        assert load_batched(c, NS, hashes, 8) == blocks
        assert c.check() == []


# -- 5. demotion and promotion without write-behind ----------------------------------------------


def test_demotion_and_promotion_without_write_behind(daemon_factory, kvctl):
    per_dram = 16  # 1 MiB of DRAM holds 16 blocks
    n = 3 * per_dram
    # LRU: the blocks expected on NVMe below are the least recently stored.
    d = daemon_factory(dram="1MiB", nvme="32MiB", extra=["--no-write-behind", "--policy", "lru"]).start()
    hashes, blocks = make_hashes(n, seed=8), make_blocks(n)
    with d.client() as c:
        c.register_namespace(NS, TOKENS, BLOCK)
        for lo, hi in in_batches(n, 4):
            assert c.store(NS, hashes[lo:hi], blocks[lo:hi]) == hi - lo
        st = c.status()
        assert tier(st, "dram").blocks == per_dram
        assert tier(st, "nvme").blocks == n - per_dram  # only what DRAM pushed out went down
        assert st.write_behind_queue == 0
        tiers = c.lookup(NS, hashes)
        assert tiers == ["nvme"] * (n - per_dram) + ["dram"] * per_dram

        assert load_batched(c, NS, hashes, 4) == blocks  # the older ones come back from NVMe
        assert c.check() == []
        assert c.lookup(NS, hashes[-4:]) == ["dram"] * 4
        # One PrepareLoad needing more DRAM than exists is refused, leaving nothing pinned;
        # Client.load cuts the same request into batches that fit.
        with grpc.insecure_channel(d.address) as channel:
            with pytest.raises(grpc.RpcError) as err:
                engine_pb2_grpc.EngineStub(channel).PrepareLoad(
                    engine_pb2.PrepareLoadRequest(namespace=NS, hashes=hashes), timeout=30
                )
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert c.status().leases == 0
        assert c.load(NS, hashes) == blocks
        assert load_batched(c, NS, hashes, 8) == blocks
        assert c.check() == []
        on_nvme = {b.hash for b in c.list_blocks(NS) if "nvme" in b.tiers}
        assert len(on_nvme) >= n - per_dram

    r = kvctl(d, "check")
    assert r.returncode == 0, r.stdout + r.stderr

    # Without write-behind only what was demoted is durable; after kill -9 those come back
    # and nothing comes back wrong.
    d.kill()
    d.start()
    with d.client() as c:
        loaded = load_batched(c, NS, hashes, 8)
        assert_never_wrong(loaded, blocks)
        back = {h for h, data in zip(hashes, loaded) if data is not None}
        assert back == on_nvme
        assert c.check() == []
