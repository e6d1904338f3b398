"""Operating a real daemon with `kvctl`: sessions, pin/unpin, evict, policy, drain/resume,
SIGTERM — and their errors (one line, non-zero exit)."""

from __future__ import annotations

import json
import signal
import threading

import grpc
import pytest
import yaml

from kvd.client import ClientError
from kvd.v1 import engine_pb2, engine_pb2_grpc, types_pb2

BLOCK = 4096


def blocks(*seeds: int) -> list[bytes]:
    return [bytes([s % 251]) * BLOCK for s in seeds]


def test_sessions_list_and_show_in_every_output(daemon, kvctl):
    with daemon.client() as c:
        c.register_namespace("m", 16, BLOCK)
        c.session_event("m", "agent-1", "turn_start", hashes=[1, 2, 3])
        c.store("m", [1, 2, 3], blocks(1, 2, 3), session_id="agent-1")
        c.session_event("m", "agent-1", "tool_pause", tool="run_tests", expected_pause_s=30)
    r = kvctl(daemon, "sessions")
    assert r.returncode == 0, r.stderr
    header, row = r.stdout.splitlines()
    assert header.split() == ["NAMESPACE", "SESSION_ID", "STATE", "TOOL", "EXPECTED_PAUSE_S", "INFERRED", "TURNS",
                              "HELD_BLOCKS", "CHAIN_BLOCKS", "IDLE_S"]
    assert row.split()[:8] == ["m", "agent-1", "tool_pause", "run_tests", "30.0", "no", "1", "3"]
    data = json.loads(kvctl(daemon, "sessions", "-o", "json").stdout)
    assert [(s["session_id"], s["state"], s["held_blocks"], s["expected_pause_s"]) for s in data] == [
        ("agent-1", "tool_pause", 3, 30.0)
    ]
    shown = yaml.safe_load(kvctl(daemon, "sessions", "show", "agent-1", "-n", "m", "-o", "yaml").stdout)
    assert shown["tool"] == "run_tests" and shown["turns"] == 1 and shown["inferred"] is False
    r = kvctl(daemon, "sessions", "show", "nobody", "-n", "m")
    assert r.returncode == 1 and r.stderr.splitlines() == ["kvctl: not_found: session 'nobody' of 'm' is unknown"]
    r = kvctl(daemon, "sessions", "show")
    assert r.returncode == 2 and r.stderr.splitlines() == ["kvctl: sessions show: give a session id"]


def test_a_pinned_block_survives_pressure_and_unpin_lets_it_go(daemon_factory, kvctl):
    d = daemon_factory(dram="64KiB", nvme="0", extra=["--policy", "lru"]).start()  # 16 blocks of DRAM
    with d.client() as c:
        c.register_namespace("m", 16, BLOCK)
        c.store("m", [100], blocks(100), parents=[None])
        r = kvctl(d, "pin", "-n", "m", "100", "0xffff")  # decimal as printed, or 0x-hex
        assert r.returncode == 0, r.stderr
        assert r.stdout.splitlines() == ["changed: 1", "not_held: 1", "pinned: 1"]
        for h in range(1, 40):  # far more than DRAM holds: LRU would drop 100 first
            c.store("m", [h], blocks(h), parents=[None])
        assert c.lookup("m", [100]) == ["dram"]
        r = kvctl(d, "unpin", "-n", "m", "0x64", "-o", "json")
        assert json.loads(r.stdout) == {"changed": 1, "not_held": 0, "pinned": 0}
        for h in range(40, 60):
            c.store("m", [h], blocks(h), parents=[None])
        assert c.lookup("m", [100]) == []
    assert kvctl(d, "check").returncode == 0


def test_pin_errors_are_one_line(daemon, kvctl):
    for bad in ("xyz", "ff", str(1 << 64)):
        r = kvctl(daemon, "pin", "-n", "m", bad)
        assert r.returncode == 2 and "not a " in r.stderr and "block hash" in r.stderr, (bad, r.stderr)
    r = kvctl(daemon, "pin", "-n", "m")
    assert r.returncode == 2 and r.stderr.splitlines() == ["kvctl: pin: give block hashes or --session, not both or neither"]
    r = kvctl(daemon, "pin", "-n", "nope", "1")
    assert r.returncode == 1 and r.stderr.splitlines() == ["kvctl: not_found: namespace 'nope' is not registered"]
    with daemon.client() as c:
        c.register_namespace("m", 16, BLOCK)
    r = kvctl(daemon, "pin", "-n", "m", "--session", "ghost")
    assert r.returncode == 1 and r.stderr.splitlines() == ["kvctl: not_found: session 'ghost' of 'm' is unknown"]


def test_evict_a_session_then_everything(daemon, kvctl):
    with daemon.client() as c:
        c.register_namespace("m", 16, BLOCK)
        c.register_namespace("n", 16, BLOCK)
        c.session_event("m", "a", "turn_start", hashes=[1, 2, 3])
        c.session_event("m", "b", "turn_start", hashes=[1, 2, 9])
        c.store("m", [1, 2, 3], blocks(1, 2, 3), session_id="a")
        c.store("m", [9], blocks(9), parents=[2], session_id="b")
        c.store("n", [5], blocks(5))
        assert c.sync() == 0
        r = kvctl(daemon, "evict", "--session", "a", "-n", "m")
        assert (r.returncode, r.stdout.splitlines()) == (
            0, ["namespace: m", "session_id: a", "all: no", "removed: 1", "remaining: 0"]
        ), r.stderr
        assert c.lookup("m", [1, 2, 3]) == ["dram", "dram"] and c.lookup("m", [1, 2, 9]) == ["dram"] * 3
        r = kvctl(daemon, "evict", "--all", "-o", "json")
        assert json.loads(r.stdout)["removed"] == 4
        assert c.lookup("m", [1]) == [] and c.lookup("n", [5]) == []
    for args, line in (
        (["evict"], "kvctl: evict: give --namespace, --session with --namespace, or --all"),
        (["evict", "--session", "a"], "kvctl: evict: --session needs --namespace"),
        (["evict", "--all", "-n", "m"], "kvctl: evict: --all takes no --namespace"),
    ):
        r = kvctl(daemon, *args)
        assert (r.returncode, r.stderr.splitlines()) == (2, [line])
    r = kvctl(daemon, "evict", "--session", "zz", "-n", "m")
    assert r.returncode == 1 and r.stderr.splitlines() == ["kvctl: not_found: session 'zz' of 'm' is unknown"]
    assert kvctl(daemon, "check").returncode == 0


def test_policy_get_and_set_at_run_time(daemon, kvctl):
    with daemon.client() as c:
        c.register_namespace("m", 16, BLOCK)
        c.store("m", [1, 2], blocks(1, 2))
    assert kvctl(daemon, "policy", "get").stdout.splitlines() == ["policy: typed", "available:", "  - lru", "  - typed"]
    r = kvctl(daemon, "policy", "set", "lru", "-o", "json")
    assert json.loads(r.stdout) == {"policy": "lru", "available": ["lru", "typed"]}
    assert json.loads(kvctl(daemon, "status", "-o", "json").stdout)["policy"] == "lru"
    r = kvctl(daemon, "policy", "set", "belady")
    assert r.returncode == 1 and r.stderr.splitlines() == [
        "kvctl: invalid_argument: policy 'belady' cannot run in the daemon; available: lru, typed"
    ]
    r = kvctl(daemon, "policy", "set")
    assert r.returncode == 2 and r.stderr.splitlines() == ["kvctl: policy set: give a policy name"]
    assert kvctl(daemon, "check").returncode == 0
    with daemon.client() as c:
        assert c.lookup("m", [1, 2]) == ["dram", "dram"]


def health(d) -> str:
    with grpc.insecure_channel(d.address) as ch:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def nvme_blocks(client) -> int:
    return next(t.blocks for t in client.status().tiers if t.name == "nvme")


def test_drain_writes_kept_blocks_refuses_work_and_resume_serves_again(daemon_factory, kvctl):
    d = daemon_factory(extra=["--no-write-behind"]).start()
    with d.client() as c:
        c.register_namespace("m", 16, BLOCK)
        c.store("m", [1, 2, 3], blocks(1, 2, 3))
        assert nvme_blocks(c) == 0  # no write-behind: DRAM only
        r = kvctl(d, "drain", "-o", "json")
        assert r.returncode == 0 and r.stderr == "kvctl: drained: stores and loads are refused until `kvctl resume`\n"
        assert json.loads(r.stdout) == {"written": 3, "pending": 0, "leases": 0, "exiting": False}
        assert nvme_blocks(c) == 3 and health(d) == "NOT_SERVING"
        with pytest.raises(ClientError) as info:
            c.store("m", [4], blocks(4), parents=[3])
        assert info.value.code == grpc.StatusCode.UNAVAILABLE and "draining" in info.value.details
        with pytest.raises(ClientError) as info:
            c.load("m", [1])
        assert info.value.code == grpc.StatusCode.UNAVAILABLE
        assert c.lookup("m", [1, 2, 3]) == ["dram"] * 3  # lookups still answer
        r = kvctl(d, "status")
        assert "\nserving: no\n" in r.stdout
        assert r.stderr == "kvctl: drained: stores and loads are refused until `kvctl resume`\n"
        assert json.loads(kvctl(d, "status", "-o", "json").stdout)["serving"] is False
        assert kvctl(d, "resume").stdout == "was_draining: yes\n"
        assert health(d) == "SERVING"
        r = kvctl(d, "status")
        assert "\nserving: yes\n" in r.stdout and r.stderr == ""
        c.store("m", [4], blocks(4), parents=[3])
        assert c.load("m", [1, 4]) == blocks(1, 4)
    assert kvctl(d, "check").returncode == 0


def test_drain_waits_for_a_lease_in_flight(daemon_factory, wait_until):
    d = daemon_factory(extra=["--no-write-behind"]).start()
    with d.client() as c, grpc.insecure_channel(d.address) as ch:
        c.register_namespace("m", 16, BLOCK)
        stub = engine_pb2_grpc.EngineStub(ch)
        grant = stub.PrepareStore(
            engine_pb2.PrepareStoreRequest(namespace="m", blocks=[types_pb2.BlockSpec(hash=7, nbytes=BLOCK)])
        )
        result = {}
        drainer = threading.Thread(target=lambda: result.update(r=c.drain(30)))
        drainer.start()
        # The drain is waiting on the lease; the daemon shows it by refusing new stores.
        def refused():
            try:
                c.store("m", [8], blocks(8))
            except ClientError as exc:
                return exc.code == grpc.StatusCode.UNAVAILABLE
            return False

        wait_until(refused, what="the drain to begin")
        assert drainer.is_alive()
        stub.CommitStore(engine_pb2.CommitStoreRequest(lease_id=grant.lease_id))
        drainer.join(30)
        assert result["r"].leases == 0 and result["r"].written == 1
        assert c.lookup("m", [7]) == ["dram"] and nvme_blocks(c) == 1


def test_sigterm_drains_kept_blocks_to_nvme_and_exits_0(daemon_factory):
    d = daemon_factory(extra=["--no-write-behind"]).start()
    with d.client() as c:
        c.register_namespace("m", 16, BLOCK)
        c.store("m", list(range(1, 21)), blocks(*range(1, 21)))
        assert nvme_blocks(c) == 0
    assert d.kill(signal.SIGTERM) == 0
    assert "drained: 20 blocks queued for NVMe, 20 written, 0 still pending" in d.log()
    d.start()
    with d.client() as c:
        assert c.status().recovered_blocks == 20
        assert c.load("m", list(range(1, 21))) == blocks(*range(1, 21))


def test_drain_exit_stops_the_daemon_with_0(daemon_factory, kvctl):
    d = daemon_factory(extra=["--no-write-behind"]).start()
    with d.client() as c:
        c.register_namespace("m", 16, BLOCK)
        c.store("m", [1], blocks(1))
    r = kvctl(d, "drain", "--exit")
    assert r.returncode == 0 and r.stdout.splitlines()[-1] == "exiting: yes", r.stderr
    assert d.proc.wait(timeout=30) == 0
    d.start()
    with d.client() as c:
        assert c.status().recovered_blocks == 1


def test_drain_errors(daemon, kvctl):
    r = kvctl(daemon, "drain", "--wait", "0")
    assert r.returncode == 2 and r.stderr.splitlines() == ["kvctl: drain: --wait must be positive"]
    r = kvctl(daemon, "resume")
    assert (r.returncode, r.stdout) == (0, "was_draining: no\n")


def test_blocks_prints_hashes_as_pin_reads_them(daemon, kvctl):
    with daemon.client() as c:
        c.register_namespace("m", 16, BLOCK)
        c.store("m", [2**63 + 5, 300], blocks(1) + blocks(2), parents=[None, 2**63 + 5])
    table = kvctl(daemon, "blocks", "-n", "m").stdout.splitlines()[1:]
    printed = sorted(int(line.split()[1]) for line in table)
    assert printed == [300, 2**63 + 5]
    assert sorted(b["hash"] for b in json.loads(kvctl(daemon, "blocks", "-o", "json").stdout)) == printed
    r = kvctl(daemon, "pin", "-n", "m", *map(str, printed))
    assert r.stdout.splitlines() == ["changed: 2", "not_held: 0", "pinned: 2"], r.stderr


def test_no_daemon_is_said_at_once(tmp_path, kvctl):
    import time

    t0 = time.monotonic()
    r = kvctl(f"unix://{tmp_path}/nobody.sock", "status")
    took = time.monotonic() - t0
    assert r.returncode == 1 and r.stderr.splitlines() == [f"kvctl: unavailable: no kvd daemon listens at unix://{tmp_path}/nobody.sock"]
    assert took < 8, took  # the default --timeout is 10 s; a refused connection is said at once
    # Nothing listens on a TCP port either (one just freed): the same.
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = kvctl(f"127.0.0.1:{port}", "status")
    assert r.returncode == 1 and r.stderr.splitlines() == [f"kvctl: unavailable: no kvd daemon listens at 127.0.0.1:{port}"]


def test_a_closed_pipe_ends_kvctl_without_a_traceback(daemon):
    import os
    import subprocess
    import sys

    read, write = os.pipe()
    os.close(read)  # the reader is gone before kvctl writes a byte
    try:
        r = subprocess.run([sys.executable, "-m", "kvd.cli.kvctl", "--addr", daemon.address, "status"],
                           stdout=write, stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(write)
    assert r.returncode == 1 and r.stderr == ""


def test_sync_sessions_show_health_and_watch_read_as_people_expect(daemon, kvctl):
    with daemon.client() as c:
        c.register_namespace("m", 16, BLOCK)
        start = c.snapshot().as_of_seq
        c.store("m", [1, 2], blocks(1, 2))
        c.session_event("m", "agent-1", "turn_start", [1, 2])
        c.session_event("m", "agent-1", "tool_pause", tool="pytest", expected_pause_s=12.5)
    r = kvctl(daemon, "sync")
    assert (r.returncode, r.stdout) == (0, "pending: 0\n"), r.stderr
    assert json.loads(kvctl(daemon, "sync", "-o", "json").stdout) == {"pending": 0}
    assert kvctl(daemon, "sync", "--wait", "0").returncode == 2
    shown = dict(line.split(": ", 1) for line in kvctl(daemon, "sessions", "show", "agent-1", "-n", "m").stdout.splitlines())
    assert shown["inferred"] == "no" and shown["expected_pause_s"] == "12.5" and shown["ahead_in_s"] == "-"
    assert kvctl(daemon, "health", "-o", "json").stdout == json.dumps({"service": "", "status": "SERVING"}, indent=2) + "\n"
    # The namespace's registration is the event just before the snapshot's sequence number.
    lines = kvctl(daemon, "watch", "--from-seq", str(start - 1), "--count", "1").stdout.splitlines()
    assert lines[0].split()[2:4] == ["kind=registered", "namespace=m"]
