"""Fault injection: the NVMe tier's file layer fails the way disks do, through the
FileIO seam (kvd.tiers.io / kvd.tiers.faults), and a DRAM arena fills with leased blocks.

Per fault, against a real `kvd serve` process: the daemon keeps serving what is healthy, a
block whose copy is bad is reported missing (never wrong bytes), `kvctl status` shows the
tier degraded, `kvd_tier_faults_total` counts the fault, and the log names it once. Unit
tests pin the rules, the plan parser and the degraded/recovered bookkeeping.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys

import grpc
import pytest
from test_daemon_integration import assert_never_wrong, make_blocks, make_hashes
from test_metrics import Scrape, free_port, scrape_text

from kvd.client import ClientError
from kvd.media import Slot
from kvd.tiers import CorruptBlockError
from kvd.tiers.faults import FaultPlan, FaultRule, FaultyIO
from kvd.tiers.health import CLEAR_AFTER, TierHealth
from kvd.tiers.nvme import NvmeStore
from kvd.v1 import engine_pb2, engine_pb2_grpc, types_pb2

pytestmark = pytest.mark.timeout(120)

NS = "faults"
TOKENS = 16
BLOCK = 64 << 10
PAGE = 4096


# -- units: rules, plans, the health record -----------------------------------------------------


@pytest.mark.parametrize(
    "text, message",
    [
        ("[]", 'expected {"rules": [...]}'),
        ("{", "not valid JSON"),
        ('{"rules": [{"op": "write"}]}', "rule 0: a rule needs an effect"),
        ('{"rules": [{"op": "erase", "errno": "EIO"}]}', "rule 0: op must be one of write, read, sync, manifest"),
        ('{"rules": [{"op": "write", "errno": "EWHAT"}]}', "rule 0: errno must be an errno name"),
        ('{"rules": [{"op": "write", "errno": "EIO", "size": 1}]}', "rule 0: unknown field 'size'"),
        ('{"rules": [{"errno": "EIO"}]}', "rule 0: no op"),
        ('{"rules": [{"op": "write", "torn_bytes": 100}]}', "torn_bytes must be a multiple of 4096"),
        ('{"rules": [{"op": "read", "torn_bytes": 4096}]}', "torn_bytes is for write rules"),
        ('{"rules": [{"op": "read", "errno": "EIO", "offset": 0}]}', "offset and length go together"),
        ('{"rules": [{"op": "manifest", "errno": "EIO", "file": "x"}]}', "a manifest rule takes no file"),
        ('{"rules": [{"op": "write", "errno": "EIO", "times": 0}]}', "times must be at least 1"),
        ('{"rules": [{"op": "write", "errno": "EIO", "after": -1}]}', "after must be a non-negative integer"),
        ('{"rules": [{"op": "write", "delay_s": "1"}]}', "delay_s must be a non-negative number"),
    ],
)
def test_bad_plans_are_refused_naming_the_rule_and_field(text, message):
    with pytest.raises(ValueError, match="plan") as info:
        FaultPlan.from_json(text, "plan")
    assert message in str(info.value)


def _store(tmp_path, *rules: FaultRule, health: TierHealth | None = None) -> tuple[NvmeStore, FaultyIO]:
    io = FaultyIO(FaultPlan(rules), sleep=lambda s: None)
    store = NvmeStore(tmp_path / "nvme", 16 * PAGE, slab_bytes=8 * PAGE, io=io, health=health)
    store.recover()
    return store, io


def test_rules_act_after_n_calls_for_m_times_on_matching_files_and_ranges(tmp_path):
    # Slab 1 only, the range of its second page, after one matching call, twice.
    rule = FaultRule("write", "EIO", after=1, times=2, file="slab-0001.dat", offset=PAGE, length=PAGE)
    store, io = _store(tmp_path, rule)
    with store:
        a, b = Slot(8 * PAGE, PAGE), Slot(9 * PAGE, PAGE)  # slab 1, pages 0 and 1
        other = Slot(PAGE, PAGE)  # slab 0, page 1: another file
        for slot in (a, b, other):
            store.space.reserve(slot)
        store.write(b, b"x" * PAGE)  # matching call 1: let through (after=1)
        store.write(a, b"a" * PAGE)  # outside the range: not matching
        store.write(other, b"o" * PAGE)  # another file: not matching
        for _ in range(2):
            with pytest.raises(OSError) as info:
                store.write(b, b"y" * PAGE)
            assert info.value.errno == errno.EIO and "injected fault" in str(info.value)
        store.write(b, b"z" * PAGE)  # times=2 spent
        out = bytearray(PAGE)
        store.read_into(b, PAGE, out)
        assert bytes(out) == b"z" * PAGE and io.acted(0) == 2


def test_enospc_degrades_logs_once_and_clears_after_successes(tmp_path, caplog):
    health = TierHealth("nvme")
    seen = []
    health.listeners.append(lambda *labels: seen.append(labels))
    store, _ = _store(tmp_path, FaultRule("write", "ENOSPC", times=5), health=health)
    caplog.set_level(logging.INFO, logger="kvd.tiers.health")
    with store:
        slot = store.allocate(PAGE)
        for _ in range(5):
            with pytest.raises(OSError):
                store.write(slot, b"d" * PAGE)
        with pytest.raises(CorruptBlockError):  # a failed write left nothing readable
            store.read_into(slot, PAGE, bytearray(PAGE))
        assert health.degraded and health.failing_ops() == ["write"]
        assert seen == [("nvme", "write", "ENOSPC")] * 5
        (fault,) = health.faults()
        assert (fault.op, fault.errno, fault.count, fault.active) == ("write", "ENOSPC", 5, True)
        for i in range(CLEAR_AFTER):
            assert health.degraded, i
            store.write(slot, b"d" * PAGE)
        assert not health.degraded and health.faults()[0].active is False
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "nvme write fault (ENOSPC)" in errors[0].getMessage()
    assert any("nvme write recovered" in r.getMessage() for r in caplog.records)


def test_acknowledged_torn_write_is_caught_by_the_checksum(tmp_path):
    store, _ = _store(tmp_path, FaultRule("write", torn_bytes=PAGE, times=1))
    with store:
        slot = store.allocate(4 * PAGE)
        data = os.urandom(4 * PAGE)
        store.write(slot, data)  # the "disk" acknowledged every byte; only the first page landed
        out = bytearray(4 * PAGE)
        with pytest.raises(CorruptBlockError, match="checksum"):
            store.read_into(slot, 4 * PAGE, out)
        assert store.health.faults()[0].errno == "checksum"
        (result,) = store.read_many([(slot, 4 * PAGE, bytearray(4 * PAGE))])
        assert isinstance(result, CorruptBlockError)


def test_a_failed_manifest_delete_is_recorded_not_raised(tmp_path):
    store, _ = _store(tmp_path, FaultRule("manifest", "EIO"))
    with store:
        store.forget([b"k"])  # a stale entry costs a miss after restart, never a wrong byte
        with pytest.raises(OSError):
            store.meta_put(b"n", b"v")
        assert [(f.op, f.count) for f in store.health.faults()] == [("manifest", 2)]


# -- the daemon ----------------------------------------------------------------------------------


@pytest.fixture
def allow_faults(monkeypatch):
    monkeypatch.setenv("KVD_ALLOW_FAULTS", "1")


def faulty_daemon(daemon_factory, tmp_path, rules: list[dict], *extra: str, **kwargs):
    plan = tmp_path / f"plan-{len(list(tmp_path.glob('plan-*')))}.json"
    plan.write_text(json.dumps({"rules": rules}))
    port = free_port()
    d = daemon_factory(
        extra=["--metrics-port", str(port), "--metrics-host", "127.0.0.1", "--fault-plan", str(plan), *extra], **kwargs
    )
    d.metrics_port = port
    return d


def faults(d, tier: str, op: str, code: str) -> float:
    return Scrape(scrape_text(d.metrics_port))("kvd_tier_faults_total", tier=tier, op=op, errno=code)


def tier_json(kvctl, d, name: str) -> dict:
    r = kvctl(d, "status", "-o", "json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["tiers"][name]


def fault_lines(d, tier: str, op: str, code: str) -> list[str]:
    return [line for line in d.log().splitlines() if f"{tier} {op} fault ({code})" in line]


def without_plan(d) -> None:
    """Drop --fault-plan from the daemon's arguments (the next start has a healthy disk)."""
    i = d.args.index("--fault-plan")
    del d.args[i : i + 2]


@pytest.mark.parametrize("op, code", [("write", "ENOSPC"), ("write", "EIO"), ("sync", "EIO")])
def test_nvme_writes_failing_keep_dram_serving(daemon_factory, tmp_path, allow_faults, kvctl, wait_until, op, code):
    """Every write-behind fails: blocks stay in DRAM and load right; NVMe is degraded,
    counted and logged once, although write-behind retries (once a second) keep failing;
    nothing reaches the manifest, so a restart serves nothing stale."""
    n = 12
    d = faulty_daemon(daemon_factory, tmp_path, [{"op": op, "errno": code}], dram="8MiB", nvme="32MiB").start()
    hashes, blocks = make_hashes(n, seed=71), make_blocks(n)
    with d.client() as c:
        c.register_namespace(NS, TOKENS, BLOCK)
        assert c.store(NS, hashes, blocks) == n
        wait_until(lambda: faults(d, "nvme", op, code) >= 2, timeout=30, what="write-behind to fail twice")
        assert c.load(NS, hashes) == blocks
        assert c.lookup(NS, hashes) == ["dram"] * n
        assert c.sync(timeout_s=0.2) == n  # nothing reached NVMe
        r = kvctl(d, "sync", "--wait", "0.2")
        assert (r.returncode, r.stdout, r.stderr) == (1, f"pending: {n}\n", f"kvctl: {n} blocks still pending after 0.2 s\n")
        nvme = tier_json(kvctl, d, "nvme")
        assert nvme["degraded"] is True and nvme["blocks"] == 0
        assert [(f["op"], f["errno"], f["active"]) for f in nvme["faults"]] == [(op, code, True)]
        assert tier_json(kvctl, d, "dram")["degraded"] is False
        r = kvctl(d, "status")
        nvme_row = next(line for line in r.stdout.splitlines() if line.startswith("nvme "))
        assert " yes " in nvme_row and f" {op} {code} x" in nvme_row
        assert Scrape(scrape_text(d.metrics_port))("kvd_tier_degraded", tier="nvme") == 1
        assert len(fault_lines(d, "nvme", op, code)) == 1
        assert c.check() == []
    d.kill()
    without_plan(d)
    d.start()
    with d.client() as c:
        st = c.status()
        assert (st.recovered_blocks, st.dropped_on_recovery) == (0, 0)
        assert assert_never_wrong(c.load(NS, hashes), blocks) == list(range(n))


def test_manifest_write_failing_keeps_blocks_in_dram(daemon_factory, tmp_path, allow_faults, kvctl, wait_until):
    """The manifest fails after the namespace is recorded: blocks are written to the slabs
    but never named in the manifest, so they stay in DRAM (and are retried) and a restart
    finds nothing to serve, rather than anything unverified."""
    n = 8
    # The namespace's record passes, then every manifest write fails.
    d = faulty_daemon(
        daemon_factory, tmp_path, [{"op": "manifest", "errno": "EIO", "after": 1}], dram="8MiB", nvme="32MiB"
    ).start()
    hashes, blocks = make_hashes(n, seed=72), make_blocks(n)
    with d.client() as c:
        c.register_namespace(NS, TOKENS, BLOCK)
        assert c.store(NS, hashes, blocks) == n
        wait_until(lambda: faults(d, "nvme", "manifest", "EIO") >= 2, timeout=30, what="manifest writes to fail")
        assert c.load(NS, hashes) == blocks
        assert c.sync(timeout_s=0.2) == n
        nvme = tier_json(kvctl, d, "nvme")
        assert nvme["degraded"] is True and nvme["blocks"] == 0
        assert len(fault_lines(d, "nvme", "manifest", "EIO")) == 1
        assert c.check() == []
    d.kill()
    without_plan(d)
    d.start()
    with d.client() as c:
        assert (c.status().recovered_blocks, c.register_namespace(NS, TOKENS, BLOCK)) == (0, False)
        assert assert_never_wrong(c.load(NS, hashes), blocks) == list(range(n))


def test_a_namespace_the_manifest_cannot_record_is_unavailable_not_internal(
    daemon_factory, tmp_path, allow_faults
):
    d = faulty_daemon(daemon_factory, tmp_path, [{"op": "manifest", "errno": "EIO", "times": 1}]).start()
    with d.client() as c:
        with pytest.raises(ClientError) as info:
            c.register_namespace(NS, TOKENS, BLOCK)
        assert info.value.code == grpc.StatusCode.UNAVAILABLE
        assert "cannot be recorded in the NVMe manifest" in info.value.details
        assert c.register_namespace(NS, TOKENS, BLOCK) is True  # the fault passed: it works
        assert c.check() == []


def test_nvme_write_fault_clears_after_successful_writes(daemon_factory, tmp_path, allow_faults, kvctl, wait_until):
    d = faulty_daemon(daemon_factory, tmp_path, [{"op": "write", "errno": "EIO", "times": 1}]).start()
    hashes, blocks = make_hashes(1 + CLEAR_AFTER, seed=73), make_blocks(1 + CLEAR_AFTER)
    with d.client() as c:
        c.register_namespace(NS, TOKENS, BLOCK)
        c.store(NS, hashes[:1], blocks[:1])
        assert c.sync(timeout_s=30) == 0  # the retry after the failed write went through
        assert tier_json(kvctl, d, "nvme")["degraded"] is True
        for i in range(1, 1 + CLEAR_AFTER):  # each store + sync is one more write batch
            c.store(NS, hashes[i : i + 1], blocks[i : i + 1], parents=[hashes[i - 1]])
            assert c.sync(timeout_s=30) == 0
        nvme = tier_json(kvctl, d, "nvme")
        assert nvme["degraded"] is False and nvme["faults"][0]["count"] == 1
        assert "nvme write recovered" in d.log()
        assert c.load(NS, hashes) == blocks


@pytest.mark.parametrize("hbm", [False, True], ids=["to-dram", "to-hbm"])
def test_nvme_read_eio_reports_the_block_missing_then_serves_it(daemon_factory, tmp_path, allow_faults, kvctl, hbm):
    if hbm:
        pytest.importorskip("torch")  # promotions then go NVMe -> HBM, a block at a time
    n = 32
    d = daemon_factory(dram="8MiB", nvme="32MiB").start()
    hashes, blocks = make_hashes(n, seed=74), make_blocks(n)
    with d.client() as c:
        c.register_namespace(NS, TOKENS, BLOCK)
        assert c.store(NS, hashes, blocks) == n
        assert c.sync() == 0
    d.stop()
    # Restarted on a disk whose first 8 slots' range fails one read; no verification at
    # start, so the first reads of those bytes are the loads'.
    rules = [{"op": "read", "errno": "EIO", "file": "slab-0000.dat", "offset": 0, "length": 8 * BLOCK, "times": 1}]
    plan = tmp_path / "read-plan.json"
    plan.write_text(json.dumps({"rules": rules}))
    port = free_port()
    d.args += ["--fault-plan", str(plan), "--no-verify-on-start", "--metrics-port", str(port)]
    if hbm:
        d.args += ["--hbm-bytes", "2MiB", "--hbm-device", "cpu"]
    d.metrics_port = port
    d.start()
    with d.client() as c:
        assert c.lookup(NS, hashes) == ["nvme"] * n
        missing = assert_never_wrong(c.load(NS, hashes), blocks)
        assert 1 <= len(missing) < n
        assert faults(d, "nvme", "read", "EIO") == 1
        nvme = tier_json(kvctl, d, "nvme")
        assert nvme["faults"][0]["errno"] == "EIO" and nvme["faults"][0]["count"] == 1
        if not hbm:
            # Into DRAM the blocks come in a few coalesced reads: too few successes since to
            # clear the fault. (Into HBM the loads' batches are smaller: how many reads follow
            # depends on the client's batching, so the flag may be cleared already.)
            assert nvme["degraded"] is True
        assert len(fault_lines(d, "nvme", "read", "EIO")) == 1
        # The NVMe copies were not bad, only unreadable once: they load now.
        assert c.load(NS, hashes) == blocks
        assert c.check() == []


def test_torn_write_is_missing_never_wrong(daemon_factory, tmp_path, allow_faults, kvctl):
    """A write the disk acknowledged but only partly stored (a lost write): its checksum
    catches it when the block is read back from NVMe after a restart."""
    n = 16
    d = faulty_daemon(
        daemon_factory, tmp_path, [{"op": "write", "torn_bytes": 4096, "times": 1}], dram="8MiB", nvme="32MiB"
    ).start()
    hashes, blocks = make_hashes(n, seed=75), make_blocks(n)
    half = n // 2
    with d.client() as c:
        c.register_namespace(NS, TOKENS, BLOCK)
        assert c.store(NS, hashes[:half], blocks[:half]) == half
        assert c.sync() == 0  # the torn batch: the "disk" said every byte landed
        assert c.store(NS, hashes[half:], blocks[half:], parents=hashes[half - 1 : -1]) == half
        assert c.sync() == 0
        assert c.load(NS, hashes) == blocks  # DRAM copies are fine
    d.kill()
    without_plan(d)
    d.args.append("--no-verify-on-start")  # the load, not recovery, meets the torn bytes
    d.start()
    with d.client() as c:
        missing = assert_never_wrong(c.load(NS, hashes), blocks)
        assert missing and max(missing) < half  # only the first, torn batch
        assert faults(d, "nvme", "read", "checksum") == len(missing)
        nvme = tier_json(kvctl, d, "nvme")
        assert nvme["degraded"] is True and nvme["faults"][0]["errno"] == "checksum"
        assert len(fault_lines(d, "nvme", "read", "checksum")) == 1
        # Dropped for good: a corrupt copy is never offered again, the others stay.
        assert c.lookup(NS, hashes[half:]) == ["dram"] * half
        assert assert_never_wrong(c.load(NS, hashes), blocks) == missing
        assert c.check() == []


def test_dram_full_of_leased_blocks_refuses_then_recovers(daemon_factory, tmp_path, kvctl):
    """A 16-slot arena whose every slot a client's store lease holds: stores and loads that
    need a slot are refused (RESOURCE_EXHAUSTED, counted, logged once); what needs none keeps
    working; once the lease ends, the tier serves again and recovers."""
    port = free_port()
    d = daemon_factory(dram="1MiB", nvme="32MiB", extra=["--metrics-port", str(port), "--metrics-host", "127.0.0.1"])
    d.metrics_port = port
    d.start()
    held, held_blocks = make_hashes(4, seed=76), make_blocks(4)
    leased = make_hashes(21, seed=77)[5:]  # none of the extremes the held ones use
    with d.client() as c, grpc.insecure_channel(d.address) as channel:
        c.register_namespace(NS, TOKENS, BLOCK)
        assert c.store(NS, held, held_blocks) == 4
        assert c.sync() == 0
        stub = engine_pb2_grpc.EngineStub(channel)
        grant = stub.PrepareStore(
            engine_pb2.PrepareStoreRequest(
                namespace=NS, lease_seconds=60,
                blocks=[types_pb2.BlockSpec(hash=h, nbytes=BLOCK) for h in leased],
            )
        )
        assert all(s.write for s in grant.slots)  # every DRAM slot is this lease's now
        with pytest.raises(ClientError) as refused:
            c.store(NS, [12345], [os.urandom(BLOCK)])
        assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "protected by leases" in str(refused.value)
        assert c.lookup(NS, held) == ["nvme"] * 4  # still held, one tier down
        with pytest.raises(ClientError) as refused:
            c.load(NS, held)  # a promotion needs a DRAM slot
        assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert faults(d, "dram", "allocate", "ENOSPC") == 2
        dram = tier_json(kvctl, d, "dram")
        assert dram["degraded"] is True and dram["faults"][0]["count"] == 2
        assert tier_json(kvctl, d, "nvme")["degraded"] is False
        assert len(fault_lines(d, "dram", "allocate", "ENOSPC")) == 1
        # A store bigger than the whole tier is the client's error, not a fault.
        with pytest.raises(grpc.RpcError) as too_big:
            stub.PrepareStore(
                engine_pb2.PrepareStoreRequest(
                    namespace=NS, blocks=[types_pb2.BlockSpec(hash=h, nbytes=BLOCK) for h in make_hashes(22, seed=78)[5:]]
                )
            )
        assert too_big.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert faults(d, "dram", "allocate", "ENOSPC") == 2

        stub.CommitStore(engine_pb2.CommitStoreRequest(lease_id=grant.lease_id, abort=True))
        for _ in range(CLEAR_AFTER):
            assert assert_never_wrong(c.load(NS, held), held_blocks) == []
        assert tier_json(kvctl, d, "dram")["degraded"] is False
        assert c.check() == []


# -- the switch ----------------------------------------------------------------------------------


def serve(tmp_path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "KVD_ALLOW_FAULTS"}
    return subprocess.run(
        [sys.executable, "-m", "kvd.cli.kvd_main", "serve", "--socket", str(tmp_path / "s.sock"),
         "--shm-dir", str(tmp_path), "--nvme-dir", str(tmp_path / "nvme"), *args],
        capture_output=True, text=True, timeout=60, env={**environ, **(env or {})},
    )


def test_fault_plan_is_refused_without_the_environment_switch(tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text('{"rules": [{"op": "write", "errno": "EIO"}]}')
    r = serve(tmp_path, "--fault-plan", str(plan))
    assert r.returncode == 2
    assert "--fault-plan injects disk faults (a test facility); it needs KVD_ALLOW_FAULTS=1" in r.stderr
    plan.write_text('{"rules": [{"op": "write", "errno": "EIO", "tims": 1}]}')
    r = serve(tmp_path, "--fault-plan", str(plan), env={"KVD_ALLOW_FAULTS": "1"})
    assert r.returncode == 2 and f"fault plan {plan}: rule 0: unknown field 'tims'" in r.stderr
    r = serve(tmp_path, "--room-wait-seconds", "0")
    assert r.returncode == 2 and "--room-wait-seconds must be positive" in r.stderr
    assert "--fault-plan" not in subprocess.run(
        [sys.executable, "-m", "kvd.cli.kvd_main", "serve", "--help"], capture_output=True, text=True
    ).stdout
