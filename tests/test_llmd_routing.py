"""llm-d routes by kvd's tiers: a real daemon's KV events, read as llm-d's indexer reads them.

``tests/llmd.py`` models llm-d's indexer from its documented format (positional events, its
FNV-64a/CBOR request keys, its index and longest-prefix scorer). Here a real daemon stores
blocks with their tokens, as an engine's connector does, and the prompt's tokens, turned
into llm-d's keys, find the engine pods that attached to the daemon, in kvd's tiers, with
no event from the engine itself.
"""

from __future__ import annotations

import os

import grpc
import msgspec
import pytest
from llmd import DEFAULT_WEIGHTS, Index, TokenKeys, decode_payload
from test_kv_events import Held, replay

from kvd.client import ClientError
from kvd.core.events import BlockRemoved, BlockStored
from kvd.core.types import BlockOrigin
from kvd.server.kv_event_wire import Encoding, Keyable, encode_batch, wire_events

pytestmark = pytest.mark.timeout(180)

BT = 16  # tokens a block, as llm-d's default block size
BLOCK = 16 << 10
MEDIUM = {"hbm": "gpu", "dram": "cpu", "nvme": "nvme", "cluster": "cluster"}  # llm-d's lower-cased medium per kvd tier
WEIGHTS = {"gpu": 1.0, "cpu": 0.8, "nvme": 0.5, "cluster": 0.3}  # docs/kv-events.md: HBM > DRAM > NVMe > cluster
NS = "llama|bfloat16|b16|tp0of1|pp0of1"


def prompt(seed: int, blocks: int) -> list[int]:
    return [(seed * 7919 + i * 31) % 50_000 for i in range(blocks * BT)]


def chain(tokens: list[int]) -> list[int]:
    """Engine block hashes of ``tokens``: any chained hash does (kvd never reads tokens)."""
    hashes, h = [], 17
    for lo in range(0, len(tokens), BT):
        h = hash((h, tuple(tokens[lo : lo + BT]))) & 0xFFFFFFFFFFFFFFFF
        hashes.append(h)
    return hashes


def store(client, tokens: list[int], first: int = 0, session: str | None = None) -> list[int]:
    """Store blocks ``first..`` of ``tokens``'s chain with their tokens; returns the hashes."""
    hashes = chain(tokens)
    parents = [None, *hashes[:-1]][first:]
    blocks = [tokens[lo : lo + BT] for lo in range(first * BT, len(tokens), BT)]
    client.store(NS, hashes[first:], [os.urandom(BLOCK) for _ in blocks], parents=parents, session_id=session,
                 token_ids=blocks)
    return hashes


class Indexer:
    """The model indexer, fed from the daemon's replay socket in order."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.index = Index(TokenKeys(block_size=BT))
        self.next_seq = 0
        self.topics: set[bytes] = set()

    def catch_up(self) -> int:
        got = replay(self.endpoint, self.next_seq)
        for topic, seq, payload in got:
            assert seq == self.next_seq, "a gap in the daemon's sequence numbers"
            self.next_seq = seq + 1
            self.topics.add(topic)
            self.index.apply(topic, payload)
        assert self.index.dropped == [], self.index.dropped
        return len(got)


@pytest.fixture
def node(daemon_factory, tmp_path):
    rep = f"ipc://{tmp_path}/replay.sock"
    # DRAM for 8 blocks: a longer prompt pushes the oldest blocks down to NVMe.
    d = daemon_factory(dram=f"{8 * BLOCK // 1024}KiB", nvme="16MiB", extra=[
        "--kv-events", f"ipc://{tmp_path}/kv.sock", "--kv-events-replay", rep, "--kv-events-pod", "node-1",
        "--policy", "lru",
    ]).start()
    return d, Indexer(rep)


def test_a_prompt_finds_the_engine_pod_in_kvds_tiers_without_the_engines_events(node, wait_until):
    d, indexer = node
    first, second = prompt(1, 6), prompt(2, 6)
    with d.client() as c:
        c.register_namespace(NS, BT, BLOCK, model_name="llama", pod_id="pod-a")
        store(c, first, session="s1")
        assert c.sync() == 0  # write-behind: every block on NVMe too
        indexer.catch_up()
        assert indexer.topics == {b"kv@pod-a@llama"}
        # Every block of the prompt, in DRAM and on NVMe: the pod scores 0.8 a block.
        assert indexer.index.tiers(first, "llama", "pod-a") == [{"cpu", "nvme"}] * 6
        assert indexer.index.score(first + [1, 2, 3], "llama", WEIGHTS) == {"pod-a": pytest.approx(6 * 0.8)}
        assert indexer.index.score(first, "mistral", WEIGHTS) == {}  # another model's keys
        # A continuation stored later names the chain's last block as its parent (llm-d knows it).
        longer = first + prompt(3, 2)
        store(c, longer, first=6, session="s1")
        store(c, second)  # DRAM holds 8: the oldest blocks of the first prompt leave DRAM
        assert c.sync() == 0
        indexer.catch_up()
        # llm-d lists, for each block of the prompt, exactly the tiers kvd holds it in.
        held = {b.hash: {MEDIUM[t] for t in b.tiers} for b in c.list_blocks(NS)}
        tiers = indexer.index.tiers(longer, "llama", "pod-a")
        assert tiers == [held[h] for h in chain(longer)]
        assert {"nvme"} in tiers and {"cpu", "nvme"} in tiers  # some left DRAM for the second prompt
        assert 8 * 0.5 < indexer.index.score(longer, "llama", WEIGHTS)["pod-a"] < 8 * 0.8


def test_a_pod_that_attaches_later_is_told_what_the_node_holds_first(node, wait_until):
    d, indexer = node
    tokens = prompt(4, 4)
    with d.client() as c:
        c.register_namespace(NS, BT, BLOCK, model_name="llama", pod_id="pod-a")
        store(c, tokens, session="s9")
        assert c.sync() == 0
        c.register_namespace(NS, BT, BLOCK, model_name="llama", pod_id="pod-b")
        wait_until(lambda: indexer.catch_up() and "pod-b" in indexer.index.score(tokens, "llama", WEIGHTS),
                   what="pod-b's announcement")
        assert indexer.index.score(tokens, "llama", WEIGHTS) == {"pod-a": pytest.approx(3.2),
                                                                  "pod-b": pytest.approx(3.2)}
        # What follows goes to both pods' topics.
        assert c.evict(NS, session_id="s9") == (4, 0)
        indexer.catch_up()
        assert indexer.index.score(tokens, "llama", WEIGHTS) == {}
        assert indexer.topics == {b"kv@pod-a@llama", b"kv@pod-b@llama"}


def test_tokens_survive_a_restart_and_are_announced_to_the_engine_that_attaches_again(node, wait_until):
    d, indexer = node
    tokens = prompt(5, 3)
    with d.client() as c:
        c.register_namespace(NS, BT, BLOCK, model_name="llama", pod_id="pod-a")
        store(c, tokens)
        assert c.sync() == 0
    d.restart()
    fresh = Indexer(indexer.endpoint)  # a new daemon numbers its messages from 0 again
    with d.client() as c:
        assert c.lookup(NS, chain(tokens)) == ["nvme"] * 3
        c.register_namespace(NS, BT, BLOCK, model_name="llama", pod_id="pod-a")
        wait_until(lambda: fresh.catch_up() >= 0 and fresh.index.score(tokens, "llama", WEIGHTS), what="the announcement")
        assert fresh.index.tiers(tokens, "llama", "pod-a") == [{"nvme"}] * 3


def test_cluster_blocks_are_listed_for_the_putting_nodes_pods_only_at_the_configured_weight():
    tokens = prompt(6, 3)
    hashes = chain(tokens)
    origins = [BlockOrigin.of(tokens[i * BT : (i + 1) * BT], None, None) for i in range(3)]
    held = Held({h: (o, p) for h, o, p in zip(hashes, origins, [None, *hashes[:-1]])}, tokens=BT)

    def message(events) -> bytes:
        (groups,) = wire_events(events, held.block_tokens, Keyable(held.origin_of)).values()
        return encode_batch(Encoding.ARRAY, 1.0, groups, msgspec.msgpack.encode)

    parents = [None, *hashes[:-1]]
    index = Index(TokenKeys(block_size=BT))
    # Node 1 stores the prompt in DRAM, puts it into the cluster, then drops its DRAM copies.
    index.apply(b"kv@pod-a@llama", message(
        [BlockStored(i, NS, h, p, "dram", BLOCK, 0.0, None, o) for i, (h, p, o) in enumerate(zip(hashes, parents, origins))]
        + [BlockStored(3 + i, NS, h, p, "cluster", BLOCK, 0.0) for i, (h, p) in enumerate(zip(hashes, parents))]
    ))
    index.apply(b"kv@pod-a@llama", message([BlockRemoved(6 + i, NS, h, "dram", "evicted", 0.0) for i, h in enumerate(hashes)]))
    # Node 2's engine holds the first block in DRAM, through its own daemon.
    index.apply(b"kv@pod-b@llama", message([BlockStored(9, NS, hashes[0], None, "dram", BLOCK, 0.0, None, origins[0])]))
    assert index.dropped == []
    assert index.tiers(tokens, "llama", "pod-a") == [{"cluster"}] * 3
    assert index.tiers(tokens, "llama", "pod-b") == [{"cpu"}, set(), set()]  # it could read 2 and 3 too
    assert index.score(tokens, "llama", WEIGHTS) == {"pod-a": pytest.approx(3 * 0.3), "pod-b": pytest.approx(0.8)}
    # Unconfigured, llm-d weighs the cluster as much as the GPU.
    assert "cluster" not in DEFAULT_WEIGHTS
    assert index.score(tokens, "llama") == {"pod-a": pytest.approx(3.0), "pod-b": pytest.approx(0.8)}
    index.apply(b"kv@pod-a@llama", message([BlockRemoved(10, NS, h, "cluster", "gone", 0.0) for h in hashes]))
    assert index.score(tokens, "llama", WEIGHTS) == {"pod-b": pytest.approx(0.8)}


def test_blocks_without_tokens_are_location_updates_and_map_encoding_is_what_llmd_rejects(daemon_factory, tmp_path):
    rep = f"ipc://{tmp_path}/replay.sock"
    d = daemon_factory(extra=["--kv-events", f"ipc://{tmp_path}/kv.sock", "--kv-events-replay", rep,
                              "--kv-events-encoding", "map", "--no-write-behind"]).start()
    with d.client() as c:
        c.register_namespace(NS, BT, BLOCK, model_name="llama", pod_id="pod-a")
        c.store(NS, [1, 2], [os.urandom(BLOCK)] * 2)  # no tokens
    (topic, _, payload), = replay(rep, 0)
    assert topic == b"kv@pod-a@llama"
    (event,) = msgspec.msgpack.decode(payload)[1]
    assert (event["block_hashes"], event["parent_block_hash"], event["token_ids"]) == ([1, 2], None, [])
    with pytest.raises(ValueError, match="positional"):
        decode_payload(payload)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"token_ids": [[1] * (BT - 1)]}, "15 token ids; namespace"),
        ({"token_ids": [[1] * BT], "extra_keys": [b"\xc1"]}, "extra keys are not msgpack"),
        ({"token_ids": [[1] * BT], "extra_keys": [msgspec.msgpack.encode({"a": 1})]}, "must be a msgpack array"),
        ({"token_ids": [[1] * BT], "extra_keys": [msgspec.msgpack.encode(["x" * 2000])]}, "at most 1024"),
        ({"extra_keys": [msgspec.msgpack.encode(["img"])]}, "extra keys without token ids"),
        ({"token_ids": [[1] * BT], "lora_name": "bad\nname"}, "LoRA name must be printable"),
    ],
)
def test_a_store_whose_tokens_events_could_not_carry_is_refused_and_stores_nothing(daemon_factory, kwargs, message):
    d = daemon_factory().start()
    with d.client() as c:
        c.register_namespace(NS, BT, BLOCK)
        with pytest.raises(ClientError) as err:
            c.store(NS, [9], [bytes(BLOCK)], **kwargs)
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and message in err.value.details
        assert c.lookup(NS, [9]) == [] and c.check() == []


@pytest.mark.parametrize(("field", "value"), [("model_name", "a@b"), ("pod_id", "pod@x"), ("pod_id", "x" * 300)])
def test_a_pod_or_model_a_topic_cannot_name_is_refused(daemon_factory, field, value):
    d = daemon_factory().start()
    with d.client() as c:
        with pytest.raises(ClientError) as err:
            c.register_namespace(NS, BT, BLOCK, **{field: value})
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and field.split("_")[0] in err.value.details
        assert all(ns.name != NS for ns in c.status().namespaces)  # nothing registered
