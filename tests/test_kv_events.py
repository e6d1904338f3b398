"""`kvd serve --kv-events`: kvd's events in vLLM 0.33's ZMQ format.

The mapping and the bytes are checked here with msgspec; the real daemon's messages are
decoded with vLLM's own event classes (vllm==0.33.0 in ``.venv-vllm``, built by
``make vllm-env``) in a child process, re-encoded there by vLLM, and compared byte for byte,
and what they say is compared with the daemon's own Watch stream and block list.
"""

from __future__ import annotations

import asyncio
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

from kvd.core.catalog import BlockRecord, Copy
from kvd.core.events import BlockRemoved, BlockStored, NamespaceCleared, NamespaceRegistered, SessionChanged
from kvd.core.types import BlockOrigin
from kvd.media import ALL_TIERS, TIER_BY_CODE
from kvd.server import kv_events
from kvd.server.kv_event_wire import MEDIUM as WIRE_MEDIUM
from kvd.server.kv_event_wire import Encoding, Keyable, encode_batch, wire_events
from kvd.server.kv_events import END_SEQ, KvEventPublisher, chain_order, is_bind_endpoint
from kvd.v1 import admin_pb2, admin_pb2_grpc

pytestmark = pytest.mark.timeout(180)

REPO = Path(__file__).resolve().parents[1]
VLLM_PYTHON = Path(os.environ.get("KVD_VLLM_PYTHON", REPO / ".venv-vllm" / "bin" / "python"))
BLOCK = 64 << 10
MEDIUM = {"hbm": "GPU", "dram": "CPU", "nvme": "NVME", "cluster": "CLUSTER"}

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


def origin(*tokens: int, lora: str | None = None, extra: list | None = None) -> BlockOrigin:
    return BlockOrigin.of(tokens, lora, msgspec.msgpack.encode(extra) if extra is not None else None)


class Held:
    """A fake of the core's holdings: ``blocks`` maps hash -> (origin, parent); ``missing``
    hashes are not held."""

    def __init__(self, blocks: dict[int, tuple[BlockOrigin | None, int | None]], tokens: int = 2) -> None:
        self.held = blocks
        self.tokens = tokens

    def block_tokens(self, namespace: str) -> int:
        return self.tokens

    def origin_of(self, namespace: str, h: int):
        return self.held[h]


def trim(event):
    """An array-encoded event without its trailing nulls (msgspec writes every field)."""
    if isinstance(event, list):
        assert len(event) == (16 if event[0] == "BlockStored" else 6)  # the tag and vLLM 0.33's fields
        while event[-1] is None:
            event = event[:-1]
    return event


def wire(events, held: Held, encoding=Encoding.ARRAY) -> dict[str, list]:
    groups = wire_events(events, held.block_tokens, Keyable(held.origin_of))
    structs = {ns: [g.encodable(encoding) for g in gs] for ns, gs in groups.items()}
    decoded = msgspec.msgpack.decode(msgspec.msgpack.encode(structs))  # extra keys are raw msgpack
    return {ns: [trim(e) for e in events] for ns, events in decoded.items()}


def test_stores_of_one_chain_share_a_positional_block_stored_with_their_tokens():
    a, b, c = origin(1, 2), origin(3, 4, lora="fr"), origin(5, 6)
    held = Held({1: (a, None), 2: (a, 1), 3: (a, 2), 4: (None, None), 5: (a, 4)})
    events = [
        NamespaceRegistered(1, "m", 2, 4096, 0.0),
        SessionChanged(2, "m", "s1", "active", None, 0.0),
        BlockStored(3, "m", 1, None, "dram", 4096, 0.0, "s1", a),
        BlockStored(4, "m", 2, 1, "dram", 4096, 0.0, "s1", c),  # the chain goes on: same event
        BlockStored(5, "m", 3, 2, "nvme", 4096, 0.0, None, c),  # another tier: a new event, parent 2 known
        BlockStored(6, "m", 4, None, "dram", 4096, 0.0),  # no tokens: a location update
        BlockStored(7, "m", 5, 4, "dram", 4096, 0.0, None, b),  # its parent has no tokens: a location update too
        BlockRemoved(8, "m", 1, "dram", "evicted", 0.0),
        BlockRemoved(9, "m", 2, "dram", "evicted", 0.0),
        BlockRemoved(10, "m", 3, "nvme", "cleared", 0.0),
        NamespaceCleared(11, "m", 0.0),  # never sent: llm-d would clear the whole pod
    ]
    assert wire(events, held) == {"m": [
        ["BlockStored", [1, 2], None, [1, 2, 5, 6], 2, None, "CPU", *[None] * 7, "s1"],  # session_id: 14th
        ["BlockStored", [3], 2, [5, 6], 2, None, "NVME"],
        ["BlockStored", [4, 5], None, [], 2, None, "CPU"],
        ["BlockRemoved", [1, 2], "CPU"],
        ["BlockRemoved", [3], "NVME"],
    ]}
    assert wire(events[:2], held) == {}  # registrations and sessions have no wire form


def test_the_cluster_tier_is_medium_cluster_in_location_updates_of_its_own():
    a = origin(1, 2)
    held = Held({1: (a, None), 2: (a, 1), 3: (a, 2)})
    events = [
        BlockStored(1, "m", 1, None, "dram", 4096, 0.0, None, a),
        BlockStored(2, "m", 2, 1, "dram", 4096, 0.0, None, a),
        # The node put 1 and 2 into the cluster: the ledger's events carry no tokens.
        BlockStored(3, "m", 1, None, "cluster", 4096, 0.0),
        BlockStored(4, "m", 2, 1, "cluster", 4096, 0.0),
        BlockStored(5, "m", 3, 2, "dram", 4096, 0.0, None, a),  # back in DRAM: its parent 2 is keyable
        BlockRemoved(6, "m", 1, "cluster", "gone", 0.0),
        BlockRemoved(7, "m", 2, "cluster", "gone", 0.0),
        BlockRemoved(8, "m", 3, "dram", "evicted", 0.0),
    ]
    assert wire(events, held) == {"m": [
        ["BlockStored", [1, 2], None, [1, 2, 1, 2], 2, None, "CPU"],
        ["BlockStored", [1, 2], None, [], 2, None, "CLUSTER"],
        ["BlockStored", [3], 2, [1, 2], 2, None, "CPU"],
        ["BlockRemoved", [1, 2], "CLUSTER"],
        ["BlockRemoved", [3], "CPU"],
    ]}


def test_a_chain_breaks_where_its_lora_or_token_knowledge_changes_and_extra_keys_ride_along():
    a, fr = origin(1, 2, extra=["img-1"]), origin(3, 4, lora="fr")
    held = Held({1: (a, None), 2: (fr, 1), 3: (None, 2), 4: (a, 3)})
    events = [
        BlockStored(1, "m", 1, None, "hbm", 4096, 0.0, None, a),
        BlockStored(2, "m", 2, 1, "hbm", 4096, 0.0, None, fr),  # another LoRA: its own event
        BlockStored(3, "m", 3, 2, "hbm", 4096, 0.0),  # no tokens
        BlockStored(4, "m", 4, 3, "hbm", 4096, 0.0, None, a),  # behind a tokenless block: no tokens either
    ]
    assert wire(events, held)["m"] == [
        ["BlockStored", [1], None, [1, 2], 2, None, "GPU", None, [["img-1"]]],
        ["BlockStored", [2], 1, [3, 4], 2, None, "GPU", "fr"],
        ["BlockStored", [3, 4], None, [], 2, None, "GPU"],
    ]


def test_map_encoding_is_vllms_tagged_maps_in_field_order():
    a = origin(7, 8)
    held = Held({1: (a, None)})
    events = [BlockStored(1, "m", 1, None, "dram", 4096, 0.0, "s1", a), BlockRemoved(2, "m", 1, "nvme", "evicted", 0.0)]
    as_maps = wire(events, held, Encoding.MAP)["m"]
    assert as_maps == [
        {"type": "BlockStored", "block_hashes": [1], "parent_block_hash": None, "token_ids": [7, 8], "block_size": 2,
         "lora_id": None, "medium": "CPU", "lora_name": None, "session_id": "s1"},
        {"type": "BlockRemoved", "block_hashes": [1], "medium": "NVME"},
    ]
    assert list(as_maps[0]) == [  # vLLM 0.33's declaration order; session_id is a later field
        "type", "block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id", "medium", "lora_name",
        "session_id",
    ]
    groups = wire_events(events, held.block_tokens, Keyable(held.origin_of))["m"]
    # The batch is an array of three; BlockStored a map16 (its 16 possible entries) in map
    # form, as vLLM 0.33's own structs encode it; an array with the tag first in array form.
    payload = encode_batch(Encoding.MAP, 1.0, groups, msgspec.msgpack.encode)
    assert payload[:10] == bytes.fromhex("93cb3ff0000000000000") and payload[10] == 0x92
    assert payload[11:14] == bytes.fromhex("de0009") and payload[-1] == 0
    payload = encode_batch(Encoding.ARRAY, 1.0, groups, msgspec.msgpack.encode)
    assert payload[11] & 0xF0 == 0x90 or payload[11] == 0xDC
    assert msgspec.msgpack.decode(payload)[1][0][0] == "BlockStored"


def test_keyable_walks_to_the_root_once_and_a_block_not_held_is_not_keyable():
    a = origin(1, 2)
    calls = []

    def origin_of(ns, h):
        calls.append(h)
        return {1: (a, None), 2: (a, 1), 3: (a, 2), 5: (a, 9)}[h]

    keyable = Keyable(origin_of)
    assert keyable("m", 3) and calls == [3, 2, 1]
    assert keyable("m", 2) and keyable("m", None) and calls == [3, 2, 1]  # memoized
    assert not keyable("m", 5) and not keyable("m", 9)  # 9 is not held


def test_every_tier_has_a_medium_of_its_own():
    assert WIRE_MEDIUM == MEDIUM and set(WIRE_MEDIUM) == set(ALL_TIERS)
    assert len({m.lower() for m in WIRE_MEDIUM.values()}) == len(ALL_TIERS)  # apart once llm-d lower-cases them


def test_chain_order_puts_every_parent_first():
    records = {h: BlockRecord("m", h, p, 1) for h, p in ((3, 2), (1, None), (4, 2), (2, 1), (9, None))}
    order = [r.hash for r in chain_order(records)]
    assert sorted(order) == [1, 2, 3, 4, 9]
    assert all(order.index(records[h].parent) < order.index(h) for h in order if records[h].parent)


async def collect(sub, count: int) -> list[tuple[bytes, int, list]]:
    out = []
    while len(out) < count:
        assert await asyncio.wait_for(asyncio.to_thread(sub.poll, 5000), 10), f"{len(out)} of {count} messages"
        topic, seq, payload = sub.recv_multipart()
        out.append((topic, int.from_bytes(seq, "big"), msgspec.msgpack.decode(payload)))
    return out


def test_publisher_sends_to_every_attached_pod_and_announces_a_new_one_first(tmp_path):
    endpoint = f"ipc://{tmp_path}/kv.sock"
    a = origin(1, 2)
    held = Held({1: (a, None), 2: (a, 1)})

    class Blocks(Held):
        def blocks(self, namespace):
            r1, r2 = BlockRecord("m", 1, None, 4096, origin=a), BlockRecord("m", 2, 1, 4096, origin=a)
            r1.copies["dram"] = Copy(None, ready=True)
            r2.copies["dram"] = Copy(None, ready=True)
            r2.copies["nvme"] = Copy(None, ready=True)
            return {2: r2, 1: r1}

        def published(self, namespace):
            return [7, 2]  # put into the cluster: 7 is no longer held here, 2 is

    holdings = Blocks(held.held)

    async def scenario():
        pub = KvEventPublisher(endpoint, "node-1", holdings, buffer_batches=100, clock=lambda: 12.5)
        pub.start()
        ctx = zmq.Context()
        sub = ctx.socket(zmq.SUB)
        try:
            sub.setsockopt(zmq.SUBSCRIBE, b"kv@")
            sub.connect(endpoint)
            assert pub.topics("m") == [b"kv@node-1@m"]  # nobody attached: the daemon's pod
            # PUB drops what it sends before the subscription arrives; publish until one lands.
            tries = 0
            while not sub.poll(50):
                tries += 1
                assert tries < 200, "the subscription never reached the publisher"
                pub.publish([BlockRemoved(0, "warm", 1, "dram", "evicted", 0.0)])
            while sub.poll(100):
                sub.recv_multipart()
            assert pub.attach("m", "pod-a", "llama") is True
            assert pub.attach("m", "pod-a", "llama") is False  # already told
            # Published while the announcement is pending: it goes out after the announcement.
            pub.publish([BlockRemoved(0, "m", 2, "nvme", "evicted", 0.0)])
            got = await collect(sub, 3)
            assert [(t, [trim(e) for e in p[1]]) for t, _, p in got] == [
                (b"kv@pod-a@llama", [
                    ["BlockStored", [1, 2], None, [1, 2, 1, 2], 2, None, "CPU"],
                    ["BlockStored", [2], 1, [1, 2], 2, None, "NVME"],
                ]),
                # What the node put into the cluster: one location update, after the tokens.
                (b"kv@pod-a@llama", [["BlockStored", [7, 2], None, [], 2, None, "CLUSTER"]]),
                (b"kv@pod-a@llama", [["BlockRemoved", [2], "NVME"]]),
            ]
            assert [seq for _, seq, _ in got] == [got[0][1], got[0][1] + 1, got[0][1] + 2]
            pub.attach("m", "pod-b", None)  # no model name: the namespace stands in
            await collect(sub, 2)
            assert pub.topics("m") == [b"kv@pod-a@llama", b"kv@pod-b@m"]
            pub.publish([BlockRemoved(0, "m", 1, "dram", "evicted", 0.0), NamespaceCleared(0, "m", 0.0)])
            got = await collect(sub, 2)
            assert [t for t, _, _ in got] == [b"kv@pod-a@llama", b"kv@pod-b@m"]
            assert got[0][2] == got[1][2] and [trim(e) for e in got[0][2][1]] == [["BlockRemoved", [1], "CPU"]]
            assert got[0][2][0] == 12.5 and got[0][2][2] == 0
            pub.publish([SessionChanged(0, "m", "s", "idle", None, 0.0)])  # nothing to send
            assert not sub.poll(100)
        finally:
            sub.close(linger=0)
            ctx.term()
            await pub.stop()

    asyncio.run(scenario())


def test_a_namespace_keeps_at_most_max_pods_and_forgets_the_longest_silent(tmp_path, monkeypatch):
    monkeypatch.setattr(kv_events, "MAX_PODS", 2)
    pub = KvEventPublisher(f"ipc://{tmp_path}/kv.sock", "node-1", Held({}))
    for pod in ("a", "b", "a", "c"):
        pub.attach("m", pod, "x")  # not started: no announcement
    assert pub.topics("m") == [b"kv@a@x", b"kv@c@x"]


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
                # Tokenless (these blocks have none): location updates without a parent.
                assert e["parent_block_hash"] is None and e["token_ids"] == []
                rows.extend(("stored", h, e["medium"], e["block_size"], e["session_id"]) for h in e["block_hashes"])
            else:
                rows.extend(("removed", h, e["medium"]) for h in e["block_hashes"])
    return out


def test_vllm_decodes_the_daemons_messages_to_what_it_holds(daemon_factory, tmp_path, wait_until):
    pub, rep = f"ipc://{tmp_path}/kv.sock", f"ipc://{tmp_path}/replay.sock"
    d = daemon_factory(dram="1MiB", nvme="32MiB", extra=[
        "--kv-events", pub, "--kv-events-replay", rep, "--kv-events-pod", "node-7", "--kv-events-encoding", "map",
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

        messages = replay(rep, 0)  # published before the clear's answer: every message
        live = []  # the subscriber's messages, up to the last one replayed
        while not live or live[-1][1] < messages[-1][1]:
            assert sub.poll(10_000), f"{len(live)} messages, then nothing"
            topic, seq, payload = sub.recv_multipart()
            live.append((topic, int.from_bytes(seq, "big"), payload))
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
            f"vllm.distributed.kv_events.{k}" for k in ("BlockStored", "BlockRemoved")  # never AllBlocksCleared
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
            row = ("stored", s.hash, MEDIUM[TIER_BY_CODE[s.tier]], tokens[s.namespace], s.session_id or None)
            expected.setdefault(s.namespace, []).append(row)
        elif kind == "removed":
            r = e.removed
            expected.setdefault(r.namespace, []).append(("removed", r.hash, MEDIUM[TIER_BY_CODE[r.tier]]))
    assert per_block(by_namespace) == expected
    m_rows = expected["m"]
    assert m_rows[:3] == [("stored", h, "CPU", 16, "s1") for h in (1, 2, 3)]
    assert m_rows[-1][0] == "removed" and any(r[0] == "removed" and r[2] == "CPU" for r in expected["n"])

    # Applying the decoded events gives exactly what the daemon holds.
    state: set[tuple[str, int, str]] = set()
    for ns, rows in per_block(by_namespace).items():
        for row in rows:
            if row[0] == "stored":
                state.add((ns, row[1], row[2]))
            else:
                state.discard((ns, row[1], row[2]))
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
        (event,) = msgspec.msgpack.decode(payload)[1]  # positional: llm-d's form, the default
        assert (event[0], event[1], event[14]) == ("BlockStored", [5], "s")
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
    assert [msgspec.msgpack.decode(p)[1][0][1] for _, _, p in got] == [[3], [4], [5]]
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
        (["--kv-events", "tcp://*:5557", "--kv-events-encoding", "cbor"], "--kv-events-encoding"),
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
