"""A block's origin (its tokens, LoRA, extra keys): kept with the block, carried by its
events, persisted in the NVMe manifest, and validated where it enters."""

from __future__ import annotations

import pytest
from core_helpers import NS, PAGE, make_core

from kvd.core.errors import InvalidArgument
from kvd.core.events import BlockStored
from kvd.core.manager import BlockSpec
from kvd.core.types import BlockOrigin
from kvd.server.codec import block_meta, parse_block_meta

TOKENS = list(range(100_000, 100_016))  # 16 tokens a block in the helpers' namespace


def test_an_origin_packs_tokens_as_uint32_and_refuses_what_does_not_fit():
    o = BlockOrigin.of(TOKENS, "fr", b"\x91\xa1x")
    assert o.num_tokens == 16 and len(o.token_ids) == 64 and o.tokens() == TOKENS
    assert BlockOrigin.of([], "", b"") == BlockOrigin(b"", None, None)  # empty names are none
    for bad in ([-1], [1 << 32], ["7"]):
        with pytest.raises(ValueError, match="32-bit unsigned"):
            BlockOrigin.of(bad)


def test_a_store_keeps_the_origin_its_events_carry_and_a_held_block_learns_it_once():
    core, _ = make_core(4)
    o = BlockOrigin.of(TOKENS)
    grant = core.prepare_store(NS, [BlockSpec(1, None, PAGE, o), BlockSpec(2, 1, PAGE)])
    core.commit_store(grant.lease_id)
    stored = [e for e in core.take_events() if isinstance(e, BlockStored)]
    assert [(e.hash, e.origin) for e in stored] == [(1, o), (2, None)]
    # Stored again with tokens: block 2 is held (nothing written), and keeps them from now on.
    o2 = BlockOrigin.of([t + 1 for t in TOKENS])
    grant = core.prepare_store(NS, [BlockSpec(1, None, PAGE, o), BlockSpec(2, 1, PAGE, o2)])
    assert grant.slots == [None, None]
    core.commit_store(grant.lease_id)
    blocks = {r.hash: r.origin for r in core.blocks(NS)}
    assert blocks == {1: o, 2: o2} and core.check() == []


@pytest.mark.parametrize(
    ("origin", "message"),
    [
        (BlockOrigin.of(TOKENS[:15]), "15 token ids"),
        (BlockOrigin.of(TOKENS, extra_keys=b"\x90" * 1025), "extra keys of 1025 bytes"),
        (BlockOrigin.of(TOKENS, lora_name="x" * 300), "LoRA name must be 1..256"),
    ],
)
def test_an_origin_the_namespace_cannot_keep_is_refused_whole(origin, message):
    core, _ = make_core(4)
    with pytest.raises(InvalidArgument, match=message):
        core.prepare_store(NS, [BlockSpec(1, None, PAGE), BlockSpec(2, 1, PAGE, origin)])
    assert list(core.blocks(NS)) == [] and core.check() == []


def test_check_reports_an_origin_of_the_wrong_size():
    core, _ = make_core(4)
    grant = core.prepare_store(NS, [BlockSpec(1, None, PAGE, BlockOrigin.of(TOKENS))])
    core.commit_store(grant.lease_id)
    (record,) = core.blocks(NS)
    record.origin = BlockOrigin.of(TOKENS[:3])
    assert core.check() == [f"{NS}/1: 3 token ids, not 16"]


def test_the_manifest_meta_keeps_parent_and_origin_and_reads_the_older_forms():
    o = BlockOrigin.of(TOKENS, "fr", b"\x91\xa1x")
    assert parse_block_meta(block_meta(None, o)) == (None, o)
    assert parse_block_meta(block_meta(2**64 - 1, BlockOrigin.of([0]))) == (2**64 - 1, BlockOrigin.of([0]))
    assert parse_block_meta(block_meta(None)) == (None, None) and parse_block_meta(block_meta(7)) == (7, None)
    assert len(block_meta(None, BlockOrigin.of([0]))) not in (0, 8)  # never read as the tokenless form
    for bad in (b"\x02abc", b"\x01\xc1", b"\x01" + block_meta(None, o)[1:-3], b"\x01\x94\xc0\xa0\xc0\xc0"):
        with pytest.raises(ValueError, match="malformed block meta"):
            parse_block_meta(bad)


def test_a_restored_block_keeps_its_origin_unless_the_geometry_changed():
    core, _ = make_core(4, nvme_blocks=4)
    slot = core.spaces["nvme"].allocate(PAGE)
    core.restore_block(NS, 1, None, PAGE, "nvme", slot, BlockOrigin.of(TOKENS))
    slot = core.spaces["nvme"].allocate(PAGE)
    core.restore_block(NS, 2, 1, PAGE, "nvme", slot, BlockOrigin.of(TOKENS[:8]))
    assert {r.hash: r.origin for r in core.blocks(NS)} == {1: BlockOrigin.of(TOKENS), 2: None}
    assert core.check() == []
