"""Sessions against real `kvd serve` processes: the SessionEvent RPC and its status codes, and
the typed policy's prefetch of a paused session's blocks, end to end."""

from __future__ import annotations

import subprocess
import sys

import grpc
import pytest

from kvd.client import Client, ClientError
from kvd.client.results import SessionState
from kvd.v1 import engine_pb2, engine_pb2_grpc

NS = "llama"
BLOCK = 64 << 10  # 16 blocks fill the 1 MiB DRAM tier
CODE = grpc.StatusCode


def block(h: int) -> bytes:
    return h.to_bytes(8, "little") * (BLOCK // 8)


def code_of(call, *args, **kwargs) -> grpc.StatusCode:
    with pytest.raises(ClientError) as err:
        call(*args, **kwargs)
    return err.value.code


# -- the SessionEvent RPC -----------------------------------------------------------------------


def test_session_event_rpc_states_and_turns(daemon):
    with daemon.client() as c:
        c.register_namespace(NS, 16, 4096)
        assert c.session_event(NS, "a", "turn_start", [1, 2]) == SessionState("active", 1)
        assert c.session_event(NS, "a", "turn_end") == SessionState("idle", 1)
        assert c.session_event(NS, "a", "tool_pause", tool="bash", expected_pause_s=2.0) == SessionState("tool_pause", 1)
        assert c.session_event(NS, "a", "tool_resume") == SessionState("active", 1)
        assert c.session_event(NS, "a", "turn_start", [1, 2, 3]) == SessionState("active", 2)
        assert c.session_event(NS, "a", "session_end") == SessionState("ended", 2)
        # An ended session's id starts a new program.
        assert c.session_event(NS, "a", "turn_start", [1]) == SessionState("active", 1)
        # A lookup with a session id starts that session's turn.
        c.lookup(NS, [1, 2], session_id="b")
        assert c.session_event(NS, "b", "turn_end") == SessionState("idle", 1)
        c.lookup(NS, [1, 2, 3], session_id="b")
        assert c.session_event(NS, "b", "tool_pause", tool="grep") == SessionState("tool_pause", 2)
        # A store with a session id: the store of the turn under way is not another turn.
        c.session_event(NS, "s", "turn_start", [7, 8])
        c.store(NS, [7, 8], [bytes(4096)] * 2, session_id="s")
        assert c.session_event(NS, "s", "turn_end") == SessionState("idle", 1)
        assert c.check() == []


def test_session_event_rpc_errors_map_to_status_codes(daemon):
    with daemon.client() as c:
        c.register_namespace(NS, 16, 4096)
        assert code_of(c.session_event, "nope", "a", "turn_start", [1]) == CODE.NOT_FOUND
        assert code_of(c.session_event, NS, "ghost", "turn_end") == CODE.NOT_FOUND
        assert code_of(c.session_event, NS, "ghost", "tool_resume") == CODE.NOT_FOUND
        c.session_event(NS, "a", "turn_start", [1])
        assert code_of(c.session_event, NS, "a", "tool_resume") == CODE.FAILED_PRECONDITION
        assert code_of(c.session_event, NS, "a", "tool_pause") == CODE.INVALID_ARGUMENT  # no tool
        for bad in (0.0, -1.0, 86_401.0):
            assert code_of(c.session_event, NS, "a", "tool_pause", tool="bash", expected_pause_s=bad) == (
                CODE.INVALID_ARGUMENT
            ), bad
        assert code_of(c.session_event, NS, "", "turn_start", [1]) == CODE.INVALID_ARGUMENT
        assert code_of(c.session_event, NS, "x" * 257, "turn_start", [1]) == CODE.INVALID_ARGUMENT
        assert code_of(c.lookup, NS, [1], session_id="x" * 257) == CODE.INVALID_ARGUMENT
        c.session_event(NS, "a", "session_end")
        for kind in ("turn_end", "tool_resume", "session_end"):
            assert code_of(c.session_event, NS, "a", kind) == CODE.FAILED_PRECONDITION, kind
        assert code_of(c.session_event, NS, "a", "tool_pause", tool="bash") == CODE.FAILED_PRECONDITION
        # The client refuses what it cannot encode.
        with pytest.raises(ValueError, match="unknown session event"):
            c.session_event(NS, "a", "nap")
        with pytest.raises(ValueError):
            c.session_event(NS, "a", "turn_start", [1 << 64])
        assert c.check() == []
    # Kinds the client would not send: unspecified (0) and out of the enum.
    with grpc.insecure_channel(daemon.address) as channel:
        stub = engine_pb2_grpc.EngineStub(channel)
        for kind in (0, 99):
            with pytest.raises(grpc.RpcError) as err:
                stub.SessionEvent(engine_pb2.SessionEventRequest(namespace=NS, session_id="a", kind=kind), timeout=10)
            assert err.value.code() == CODE.INVALID_ARGUMENT, kind
            assert "unknown session event kind" in err.value.details()


# -- typed retention honours a tool pause -------------------------------------------------------

A = list(range(100, 108))  # session a's context: 8 blocks
B = list(range(200, 216))  # session b's: 16 blocks, the whole DRAM tier


def start_pair(daemon_factory) -> dict[str, object]:
    """A typed and an lru daemon with the same tiers: DRAM 1 MiB (16 blocks), NVMe 64 MiB."""
    out = {}
    for policy in ("lru", "typed"):
        d = daemon_factory(dram="1MiB", nvme="64MiB", extra=["--policy", policy]).start()
        out[policy] = d
    return out


def test_typed_prefetches_a_paused_sessions_blocks_before_it_resumes(daemon_factory, wait_until):
    daemons = start_pair(daemon_factory)
    clients = {p: Client(d.address, shared_memory=False) for p, d in daemons.items()}
    try:
        # The same steps on both daemons, the lru one first each time (so its pause is never
        # younger than the typed one's).
        for policy, c in clients.items():
            assert c.status().policy == policy
            c.register_namespace(NS, 16, BLOCK)
            # a's turn: its context is stored, written behind to NVMe, and the turn ends.
            c.session_event(NS, "a", "turn_start", A)
            assert c.store(NS, A, [block(h) for h in A], session_id="a") == 8
            c.session_event(NS, "a", "turn_end")
            assert c.sync() == 0
            assert c.lookup(NS, A) == ["dram"] * 8
        for policy, c in clients.items():
            # b's turn stores 16 blocks in one store (inline: one PrepareStore): the whole DRAM
            # tier, so every one of a's blocks must leave DRAM (their NVMe copies stay).
            c.session_event(NS, "b", "turn_start", B)
            assert c.store(NS, B, [block(h) for h in B], session_id="b") == 16
            # b ends: its blocks are worthless, so a prefetch may push them out (a prefetch
            # never displaces blocks the policy still values).
            c.session_event(NS, "b", "session_end")
            # a is idle, not paused: nothing brings it back, so this holds until a pauses.
            assert c.lookup(NS, A) == ["nvme"] * 8, policy
        for c in clients.values():
            # a calls a tool expected to take 1 s: its predicted resume is due at once.
            assert c.session_event(NS, "a", "tool_pause", tool="run_tests", expected_pause_s=1.0).state == "tool_pause"

        # Typed: the mover's prefetch brings a's context back to DRAM with no request from a.
        typed = clients["typed"]
        wait_until(lambda: typed.lookup(NS, A) == ["dram"] * 8, timeout=20, what="a's blocks prefetched to DRAM")

        # Lru never prefetches. Its pause is at least as old as typed's; make its mover run
        # rounds after the pause: each store + Sync needs a write-behind pass of the mover, and
        # every pass plans prefetches (Mover._run) before the Sync can return. Two rounds: a
        # prefetch planned in the first would have landed (a few ms of reads) by the second.
        lru = clients["lru"]
        for h in (900, 901):
            lru.store(NS, [h], [block(h)])
            assert lru.sync() == 0
        assert lru.lookup(NS, A) == ["nvme"] * 8

        # a resumes: its turn's load returns the right bytes on both (lru promotes from NVMe).
        for policy, c in clients.items():
            c.session_event(NS, "a", "tool_resume")
            assert c.session_event(NS, "a", "turn_start", A + [108]).turns == 2
            assert c.load(NS, A) == [block(h) for h in A], policy
            assert c.check() == [], policy
        assert typed.lookup(NS, A) == ["dram"] * 8
    finally:
        for c in clients.values():
            c.close()


def test_serve_refuses_the_belady_policy(tmp_path):
    for policy, message in (("belady", "needs the trace's future"), ("nope", "unknown policy 'nope'")):
        proc = subprocess.run(
            [
                sys.executable, "-m", "kvd.cli.kvd_main", "serve",
                "--socket", str(tmp_path / "kvd.sock"),
                "--dram-bytes", "1MiB",
                "--nvme-bytes", "0",
                "--nvme-dir", str(tmp_path / "nvme"),
                "--shm-dir", str(tmp_path / "shm"),
                "--policy", policy,
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("kvd serve: ") and message in lines[0], proc.stderr
        assert not (tmp_path / "kvd.sock").exists()


# -- an announced turn --------------------------------------------------------------------------


def test_an_announced_turn_is_moved_up_before_it_arrives_and_kvctl_shows_it(daemon_factory, wait_until):
    d = daemon_factory(dram="1MiB", nvme="64MiB", extra=["--policy", "typed"]).start()
    with Client(d.address, shared_memory=False) as c:
        c.register_namespace(NS, 16, BLOCK)
        c.session_event(NS, "a", "turn_start", A)
        c.store(NS, A, [block(h) for h in A], session_id="a")
        c.session_event(NS, "a", "turn_end")
        assert c.sync() == 0
        c.session_event(NS, "b", "turn_start", B)
        c.store(NS, B, [block(h) for h in B], session_id="b")  # fills DRAM: a's blocks leave it
        c.session_event(NS, "b", "turn_end")  # b is idle, not ended: its blocks are still valued
        assert c.lookup(NS, A) == ["nvme"] * 8
        # A router sends a's next turn here: the daemon is told 2 s ahead.
        assert c.expect_turn(NS, "a", A + [108], 2.0) == SessionState("idle", 1)
        (info,) = c.sessions(NS, "a")
        assert info.ahead_blocks == 9 and 0 < info.ahead_in_s <= 2.0
        wait_until(lambda: c.lookup(NS, A) == ["dram"] * 8, timeout=20, what="a's announced blocks in DRAM")
        assert c.load(NS, A) == [block(h) for h in A]
        c.session_event(NS, "a", "turn_start", A + [108])
        (info,) = c.sessions(NS, "a")
        assert info.ahead_in_s is None and info.ahead_blocks == 0
        # Named by its hashes alone: the session b's chain continues; none for a chain nobody's.
        assert c.expect_turn(NS, "", B + [300], 1.0) == SessionState("idle", 1)
        assert c.expect_turn(NS, "", [5555], 1.0) == SessionState("", 0)
        for bad in (-1.0, 86_401.0, float("nan")):
            assert code_of(c.expect_turn, NS, "a", A, bad) == CODE.INVALID_ARGUMENT, bad
        assert code_of(c.session_event, NS, "", "turn_end") == CODE.INVALID_ARGUMENT
        assert c.check() == []
    kvctl = [sys.executable, "-m", "kvd.cli.kvctl", "--addr", d.address]
    hashes = [f"{h:x}" for h in (1, 2)]
    out = subprocess.run([*kvctl, "sessions", "ahead", "c", *hashes, "-n", NS, "--in", "3", "-o", "json"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert '"blocks": 2' in out.stdout and '"state": "idle"' in out.stdout
    out = subprocess.run([*kvctl, "sessions", "ahead", "c", *hashes, "-n", NS], capture_output=True, text=True)
    assert out.returncode == 2 and "--in" in out.stderr
