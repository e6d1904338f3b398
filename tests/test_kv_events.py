"""`kvd serve --kv-events`: kvd's events in vLLM 0.33's ZMQ format.

The mapping and the bytes are checked here with msgspec; the real daemon's messages are
decoded with vLLM's own event classes (vllm==0.33.0 in ``.venv-vllm``, built by
``make vllm-env``) in a child process, re-encoded there by vLLM, and compared byte for byte,
and what they say is compared with the daemon's own Watch stream and block list.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
import msgspec
import pytest
import zmq
from conftest import DaemonProcess
from test_clear import watch_until_cleared

from kvd.core.events import BlockRemoved, BlockStored, NamespaceCleared, NamespaceRegistered, SessionChanged
from kvd.server.kv_events import END_SEQ, KVEventBatch, KvEventPublisher, is_bind_endpoint, vllm_events
from kvd.v1 import admin_pb2, admin_pb2_grpc

pytestmark = pytest.mark.timeout(180)

REPO = Path(__file__).resolve().parents[1]
VLLM_PYTHON = Path(os.environ.get("KVD_VLLM_PYTHON", REPO / ".venv-vllm" / "bin" / "python"))
BLOCK = 64 << 10
MEDIUM = {"hbm": "GPU", "dram": "CPU", "nvme": "STORAGE"}

# Run by .venv-vllm's python: decode each payload (hex, one a line on stdin) with vLLM's own
# KVEventBatch, re-encode it with vLLM's encoder, print what it found as JSON.
VLLM_DECODER = r"""
import ast, importlib.metadata, importlib.util, json, pathlib, sys, types, typing

root = pathlib.Path(importlib.util.find_spec("vllm").submodule_search_locations[0])
# vllm/__init__.py and these packages' __init__ files import the engine (torch, transformers,
# ...): skip them; their submodules still load from vLLM's own files.
for name in ("vllm", "vllm.config", "vllm.distributed", "vllm.utils", "vllm.v1", "vllm.v1.core"):
    package = types.ModuleType(name)
    package.__path__ = [str(root.joinpath(*name.split(".")[1:]))]
    sys.modules[name] = package
# Of vllm.v1.core.kv_cache_utils (the engine's block hashing) the events need one type alias,
# ExternalBlockHash: run that statement of the file and nothing else.
path = root / "v1" / "core" / "kv_cache_utils.py"
(alias,) = [n for n in ast.parse(path.read_text()).body
            if isinstance(n, ast.AnnAssign) and getattr(n.target, "id", "") == "ExternalBlockHash"]
utils = types.ModuleType("vllm.v1.core.kv_cache_utils")
utils.TypeAlias = typing.TypeAlias
exec(compile(ast.Module([alias], []), str(path), "exec"), utils.__dict__)
sys.modules[utils.__name__] = utils
# vllm.config.kv_events holds the publisher's settings (pydantic, torch); decoding needs none.
config = types.ModuleType("vllm.config.kv_events")
config.KVEventsConfig = type("KVEventsConfig", (), {})
sys.modules[config.__name__] = config

import msgspec
from vllm.distributed import kv_events

decode = msgspec.msgpack.Decoder(kv_events.KVEventBatch).decode
encode = msgspec.msgpack.Encoder().encode
out = {"vllm": importlib.metadata.version("vllm"), "module": kv_events.__file__,
       "hash_type": str(utils.ExternalBlockHash), "batches": []}
for line in sys.stdin:
    payload = bytes.fromhex(line.strip())
    batch = decode(payload)
    out["batches"].append({
        "ts": batch.ts,
        "rank": batch.data_parallel_rank,
        "same_bytes": encode(batch) == payload,
        "events": [{"class": type(e).__module__ + "." + type(e).__name__,
                    **{f: getattr(e, f) for f in e.__struct_fields__}} for e in batch.events],
    })
json.dump(out, sys.stdout)
"""


def vllm_decode(payloads: list[bytes]) -> dict:
    """What vLLM 0.33's classes make of ``payloads`` (skips where .venv-vllm is missing;
    fails in CI, which must build it)."""
    if not VLLM_PYTHON.exists():
        reason = f"{VLLM_PYTHON} is missing: `make vllm-env` builds it (vllm==0.33.0 --no-deps)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    run = subprocess.run(
        [str(VLLM_PYTHON), "-c", VLLM_DECODER],
        input="".join(p.hex() + "\n" for p in payloads),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


# -- the mapping, without a daemon ------------------------------------------------------------


def test_events_map_to_vllm_maps_in_field_order_grouped_per_namespace():
    tokens = {"m": 16, "n": 32}.__getitem__
    events = [
        NamespaceRegistered(1, "m", 16, 4096, 0.0),
        SessionChanged(2, "m", "s1", "active", None, 0.0),
        BlockStored(3, "m", 1, None, "dram", 4096, 0.0, "s1"),
        BlockStored(4, "m", 2, 1, "dram", 4096, 0.0, "s1"),  # the chain goes on: same event
        BlockStored(5, "n", 9, None, "hbm", 4096, 0.0),
        BlockStored(6, "m", 3, 2, "nvme", 4096, 0.0),  # another tier: a new event
        BlockStored(7, "m", 5, None, "nvme", 4096, 0.0),  # another chain: a new event
        BlockRemoved(8, "m", 1, "dram", "evicted", 0.0),
        BlockRemoved(9, "m", 2, "dram", "evicted", 0.0),
        BlockRemoved(10, "m", 3, "nvme", "cleared", 0.0),
        NamespaceCleared(11, "m", 0.0),
    ]
    stored = {"type": "BlockStored", "token_ids": [], "lora_id": None, "lora_name": None}
    as_maps = {ns: msgspec.to_builtins(batch) for ns, batch in vllm_events(events, tokens).items()}
    assert as_maps == {
        "m": [
            {**stored, "block_hashes": [1, 2], "parent_block_hash": None, "block_size": 16, "medium": "CPU",
             "session_id": "s1"},
            {**stored, "block_hashes": [3], "parent_block_hash": 2, "block_size": 16, "medium": "STORAGE"},
            {**stored, "block_hashes": [5], "parent_block_hash": None, "block_size": 16, "medium": "STORAGE"},
            {"type": "BlockRemoved", "block_hashes": [1, 2], "medium": "CPU"},
            {"type": "BlockRemoved", "block_hashes": [3], "medium": "STORAGE"},
            {"type": "AllBlocksCleared"},
        ],
        "n": [{**stored, "block_hashes": [9], "parent_block_hash": None, "block_size": 32, "medium": "GPU"}],
    }
    assert list(as_maps["m"][0]) == [  # vLLM 0.33's declaration order; session_id is a later field
        "type", "block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id", "medium", "lora_name",
        "session_id",
    ]
    assert vllm_events(events[:2], tokens) == {}  # registrations and sessions have no vLLM form
    # Encoded: the batch is an array of three, BlockStored a map16 (its 16 possible entries),
    # BlockRemoved a fixmap, as vLLM 0.33's own structs encode them.
    batch = KVEventBatch(1.0, vllm_events(events, tokens)["m"], 0)
    payload = msgspec.msgpack.encode(batch)
    assert payload[:10] == bytes.fromhex("93cb3ff0000000000000") and payload[10] == 0x96  # [1.0, [6 events]
    assert payload[11:14] == bytes.fromhex("de0009")  # first event: map16 of 9 entries
    assert msgspec.msgpack.decode(payload)[1] == as_maps["m"] and payload[-1] == 0  # rank 0


def test_publisher_sends_topic_seq_and_a_three_element_batch_and_buffers_a_bounded_replay(tmp_path):
    endpoint = f"ipc://{tmp_path}/kv.sock"
    pub = KvEventPublisher(endpoint, "node-1", lambda ns: 16, buffer_batches=2, clock=lambda: 12.5)
    pub.start()
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    try:
        sub.setsockopt(zmq.SUBSCRIBE, b"kv@")
        sub.connect(endpoint)
        # PUB drops what it sends before the subscription arrives; publish until one lands.
        h = 0
        while not sub.poll(50):
            h += 1
            assert h < 200, "the subscription never reached the publisher"
            pub.publish([BlockStored(h, "m", h, None, "dram", 4096, 0.0)])
        topic, seq, payload = sub.recv_multipart()
        assert topic == b"kv@node-1@m" and len(seq) == 8
        assert msgspec.msgpack.decode(payload) == [12.5, [
            {"type": "BlockStored", "block_hashes": [int.from_bytes(seq, "big") + 1], "parent_block_hash": None,
             "token_ids": [], "block_size": 16, "lora_id": None, "medium": "CPU", "lora_name": None}
        ], 0]
        assert pub.next_seq == h
        # One core call touching two namespaces: two messages, consecutive sequence numbers.
        pub.publish([BlockRemoved(0, "a", 1, "nvme", "evicted", 0.0), NamespaceCleared(0, "b", 0.0)])
        got = [sub.recv_multipart() for _ in range(2)]
        assert [(t, int.from_bytes(s, "big")) for t, s, _ in got] == [(b"kv@node-1@a", h), (b"kv@node-1@b", h + 1)]
        assert msgspec.msgpack.decode(got[1][2]) == [12.5, [{"type": "AllBlocksCleared"}], 0]
        assert [seq for seq, _, _ in pub._buffer] == [h, h + 1]  # the last two only
        pub.publish([SessionChanged(0, "a", "s", "idle", None, 0.0)])  # nothing to send
        assert pub.next_seq == h + 2 and not sub.poll(100)
    finally:
        sub.close(linger=0)
        ctx.term()
        pub.close()


def test_endpoints_bind_or_connect_by_vllms_rule():
    assert is_bind_endpoint("tcp://*:5557") and is_bind_endpoint("tcp://[::]:5557")
    assert is_bind_endpoint("ipc:///run/kvd/kv.sock") and is_bind_endpoint("inproc://kv")
    assert not is_bind_endpoint("tcp://indexer:5557") and not is_bind_endpoint("tcp://127.0.0.1:5557")


# -- a real daemon, decoded by vLLM -----------------------------------------------------------


def replay(endpoint: str, start_seq: int) -> list[tuple[bytes, int, bytes]]:
    """Ask the replay socket for every message from ``start_seq``: (topic, seq, payload)."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)  # a DEALER sees the ROUTER's reply frames after the delimiter
    try:
        sock.connect(endpoint)
        sock.send_multipart([b"", start_seq.to_bytes(8, "big")])
        out = []
        while True:
            assert sock.poll(10_000), "the replay stopped before its end marker"
            empty, topic, seq, payload = sock.recv_multipart()
            assert empty == b""
            if seq == END_SEQ:
                assert (topic, payload) == (b"", b"")
                return out
            out.append((topic, int.from_bytes(seq, "big"), payload))
    finally:
        sock.close(linger=0)
        ctx.term()


def subscribe(ctx: zmq.Context, endpoint: str) -> zmq.Socket:
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"kv@")
    sub.connect(endpoint)
    return sub


def handshake(sub: zmq.Socket, client, wait_until) -> None:
    """Store blocks of namespace ``warm`` until one reaches ``sub`` (a PUB drops what it sends
    before a subscription arrives), then drain them."""
    client.register_namespace("warm", 16, 4096)
    hashes = iter(range(1, 1000))

    def one_more_arrives() -> bool:
        client.store("warm", [next(hashes)], [bytes(4096)])
        return bool(sub.poll(100))

    wait_until(one_more_arrives, what="a subscription")
    while sub.poll(200):
        sub.recv_multipart()


def per_block(events_by_namespace: dict[str, list[dict]]) -> dict[str, list[tuple]]:
    """vLLM events as one tuple per block: the grouping undone, for comparing with Watch."""
    out: dict[str, list[tuple]] = {}
    for ns, events in events_by_namespace.items():
        rows = out.setdefault(ns, [])
        for e in events:
            kind = e["class"].rsplit(".", 1)[1]
            if kind == "BlockStored":
                parent = e["parent_block_hash"]
                for h in e["block_hashes"]:
                    rows.append(("stored", h, parent, e["medium"], e["block_size"], e["session_id"]))
                    parent = h
            elif kind == "BlockRemoved":
                rows.extend(("removed", h, e["medium"]) for h in e["block_hashes"])
            else:
                rows.append(("cleared",))
    return out


def test_vllm_decodes_the_daemons_messages_to_what_it_holds(daemon_factory, tmp_path, wait_until):
    pub, rep = f"ipc://{tmp_path}/kv.sock", f"ipc://{tmp_path}/replay.sock"
    d = daemon_factory(dram="1MiB", nvme="32MiB", extra=[
        "--kv-events", pub, "--kv-events-replay", rep, "--kv-events-pod", "node-7",
    ]).start()
    ctx = zmq.Context()
    sub = subscribe(ctx, pub)
    try:
        with d.client() as c, grpc.insecure_channel(d.address) as channel:
            handshake(sub, c, wait_until)
            c.register_namespace("m", 16, BLOCK)
            c.register_namespace("n", 32, BLOCK)
            c.store("m", [1, 2, 3], [os.urandom(BLOCK)] * 3, session_id="s1")
            c.store("n", [7], [os.urandom(BLOCK)])
            assert c.sync() == 0
            c.store("n", list(range(100, 116)), [os.urandom(BLOCK)] * 16)  # DRAM holds 16: evictions
            assert c.sync() == 0
            cleared = admin_pb2_grpc.AdminStub(channel).ClearNamespace(admin_pb2.ClearNamespaceRequest(namespace="m"))
            assert (cleared.removed, cleared.remaining) == (3, 0)
            held = {(b.namespace, b.hash, MEDIUM[t]) for b in c.list_blocks() for t in b.tiers}
            truth = watch_until_cleared(d.address, 1, "m")  # every event since the start

        live = []  # the subscriber's messages, until m's AllBlocksCleared
        while not live or msgspec.msgpack.decode(live[-1][2])[1][-1] != {"type": "AllBlocksCleared"}:
            assert sub.poll(10_000), f"{len(live)} messages, then nothing"
            topic, seq, payload = sub.recv_multipart()
            live.append((topic, int.from_bytes(seq, "big"), payload))
        messages = replay(rep, 0)
    finally:
        sub.close(linger=0)
        ctx.term()

    # The replay holds every message since the start; the subscriber got the same bytes.
    assert [seq for _, seq, _ in messages] == list(range(len(messages)))
    assert set(live) <= set(messages) and live[-1] == messages[-1]
    decoded = vllm_decode([payload for _, _, payload in messages])
    assert decoded["vllm"] == "0.33.0" and decoded["hash_type"] == "bytes | int"
    assert Path(decoded["module"]).resolve().is_relative_to(VLLM_PYTHON.parents[1].resolve())
    for batch in decoded["batches"]:
        assert batch["same_bytes"], "vLLM's encoder writes other bytes for the same events"
        assert batch["rank"] == 0 and batch["events"]
        assert {e["class"] for e in batch["events"]} <= {
            f"vllm.distributed.kv_events.{k}" for k in ("BlockStored", "BlockRemoved", "AllBlocksCleared")
        }
        for e in batch["events"]:
            if e["class"].endswith("BlockStored"):
                assert e["token_ids"] == [] and e["lora_id"] is None and e["lora_name"] is None
                assert e["extra_keys"] is None and e["group_idx"] is None
    assert {topic for topic, _, _ in messages} == {b"kv@node-7@warm", b"kv@node-7@m", b"kv@node-7@n"}

    # Undo the grouping: per namespace, the same changes in the same order as the Watch stream.
    by_namespace: dict[str, list[dict]] = {}
    for (topic, _, _), batch in zip(messages, decoded["batches"]):
        by_namespace.setdefault(topic.decode().split("@")[2], []).extend(batch["events"])
    tokens = {"warm": 16, "m": 16, "n": 32}
    expected: dict[str, list[tuple]] = {}
    for e in truth:
        kind = e.WhichOneof("kind")
        if kind == "stored":
            s = e.stored
            parent = s.parent if s.HasField("parent") else None
            row = ("stored", s.hash, parent, MEDIUM[("hbm", "dram", "nvme")[s.tier - 1]], tokens[s.namespace],
                   s.session_id or None)
            expected.setdefault(s.namespace, []).append(row)
        elif kind == "removed":
            r = e.removed
            expected.setdefault(r.namespace, []).append(("removed", r.hash, MEDIUM[("hbm", "dram", "nvme")[r.tier - 1]]))
        elif kind == "cleared":
            expected.setdefault(e.cleared.namespace, []).append(("cleared",))
    assert per_block(by_namespace) == expected
    m_rows = expected["m"]
    assert m_rows[:3] == [("stored", h, p, "CPU", 16, "s1") for h, p in ((1, None), (2, 1), (3, 2))]
    assert m_rows[-1] == ("cleared",) and any(r[0] == "removed" and r[2] == "CPU" for r in expected["n"])

    # Applying the decoded events gives exactly what the daemon holds.
    state: set[tuple[str, int, str]] = set()
    for ns, rows in per_block(by_namespace).items():
        for row in rows:
            if row[0] == "stored":
                state.add((ns, row[1], row[3]))
            elif row[0] == "removed":
                state.discard((ns, row[1], row[2]))
            else:
                state = {x for x in state if x[0] != ns}
    assert state == held and not any(ns == "m" for ns, _, _ in held)


def test_connect_mode_pushes_to_a_subscriber_that_binds(daemon_factory, wait_until):
    """A non-wildcard tcp endpoint is connected to, as vLLM does for a central indexer."""
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    try:
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        port = sub.bind_to_random_port("tcp://127.0.0.1")
        # No write-behind: no NVMe copy of a handshake block is announced after the drain.
        d = daemon_factory(extra=["--kv-events", f"tcp://127.0.0.1:{port}", "--no-write-behind"]).start()
        with d.client() as c:
            handshake(sub, c, wait_until)
            c.register_namespace("m", 16, 4096)
            c.store("m", [5], [bytes(4096)], session_id="s")
            topic, _, payload = sub.recv_multipart()
        assert topic.decode() == f"kv@{socket_hostname()}@m"  # the pod defaults to the host name
        (event,) = msgspec.msgpack.decode(payload)[1]
        assert (event["type"], event["block_hashes"], event["session_id"]) == ("BlockStored", [5], "s")
    finally:
        sub.close(linger=0)
        ctx.term()


def socket_hostname() -> str:
    import socket

    return socket.gethostname()


def test_replay_skips_a_malformed_request_and_keeps_only_the_buffer(daemon_factory, tmp_path):
    rep = f"ipc://{tmp_path}/replay.sock"
    d = daemon_factory(extra=[
        "--kv-events", f"ipc://{tmp_path}/kv.sock", "--kv-events-replay", rep, "--kv-events-buffer", "3",
        "--no-write-behind",  # one message a store
    ]).start()
    with d.client() as c:
        c.register_namespace("m", 16, 4096)
        for h in range(1, 6):
            c.store("m", [h], [bytes(4096)])  # one message each (stored in DRAM)
    ctx = zmq.Context()
    bad = ctx.socket(zmq.DEALER)
    try:
        bad.connect(rep)
        bad.send_multipart([b"", b"\x00" * 8, b"extra"])  # four frames at the ROUTER: ignored
        assert not bad.poll(300)
    finally:
        bad.close(linger=0)
        ctx.term()
    got = replay(rep, 0)
    assert [seq for _, seq, _ in got] == [2, 3, 4]  # the last three of five
    assert [msgspec.msgpack.decode(p)[1][0]["block_hashes"] for _, _, p in got] == [[3], [4], [5]]
    assert replay(rep, 4) == got[2:] and replay(rep, 9) == []
    assert "invalid replay request" in d.log()


# -- flags and errors -------------------------------------------------------------------------


def serve(args: list[str], prelude: str = "") -> subprocess.CompletedProcess:
    code = f"{prelude}\nimport sys\nfrom kvd.cli.kvd_main import main\nsys.exit(main(sys.argv[1:]))"
    return subprocess.run(
        [sys.executable, "-c", code, "serve", *args], capture_output=True, text=True, timeout=60
    )


NO_ZMQ = "import sys; sys.modules['zmq'] = None  # pyzmq not installed"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--kv-events", "http://x:1"], "--kv-events must be a ZMQ endpoint"),
        (["--kv-events-replay", "tcp://*:5558"], "--kv-events-replay needs --kv-events"),
        (["--kv-events", "tcp://*:5557", "--kv-events-buffer", "0"], "--kv-events-buffer must be positive"),
        (["--kv-events", "tcp://*:5557", "--kv-events-pod", "a@b"], "--kv-events-pod must be"),
    ],
)
def test_bad_kv_events_flags_exit_2_with_one_line(args, message, tmp_path):
    out = serve(["--socket", str(tmp_path / "s.sock"), *args])
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and message in out.stderr


def test_without_pyzmq_kv_events_exits_2_and_the_daemon_runs_without_it(tmp_path):
    out = serve(["--socket", str(tmp_path / "s.sock"), "--kv-events", "tcp://*:5557"], NO_ZMQ)
    assert out.returncode == 2
    assert out.stderr == "kvd serve: --kv-events needs zmq (pip install 'kvd[kv-events]')\n"
    d = DaemonProcess(tmp_path)
    d.args[1:3] = ["-c", f"{NO_ZMQ}\nimport sys\nfrom kvd.cli.kvd_main import main\nsys.exit(main(sys.argv[1:]))"]
    try:
        d.start()
        with d.client() as c:
            c.register_namespace("m", 16, 4096)
            c.store("m", [1], [bytes(4096)])
            assert c.lookup("m", [1]) == ["dram"]
    finally:
        d.stop()


def test_an_endpoint_that_cannot_be_bound_is_a_one_line_error(tmp_path):
    endpoint = f"ipc://{tmp_path}/missing-dir/kv.sock"
    out = serve(["--socket", str(tmp_path / "s.sock"), "--nvme-bytes", "0", "--shm-dir", str(tmp_path),
                 "--kv-events", endpoint])
    assert out.returncode == 1
    assert out.stderr.splitlines()[-1].startswith(f"kvd serve: --kv-events {endpoint}: ")
