"""The connector's engine-free parts: the scheduler side's plan (kvd.connector.plan) with
hand-written requests, and the worker side's paged copies (kvd.connector.paged) with torch."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from kvd.connector.plan import (
    LoadSpec,
    NewRequestStep,
    Planner,
    RunningRequestStep,
    SaveSpec,
    SessionHints,
    block_key,
)

BS = 4


@dataclass
class FakeRequest:
    """What vLLM's Request gives the planner: its id, its full blocks' hashes, its length."""

    request_id: str
    tokens: int
    block_hashes: list[bytes] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.grow(0)

    def grow(self, n: int) -> None:
        self.tokens += n
        while len(self.block_hashes) < self.tokens // BS:
            self.block_hashes.append(bytes([len(self.block_hashes) + 1]) * 32)

    @property
    def num_tokens(self) -> int:
        return self.tokens


def key(i: int) -> int:
    return block_key(bytes([i + 1]) * 32)


def test_block_key_is_vllms_integer_hash():
    h = bytes(range(32))
    assert block_key(h) == int.from_bytes(h, "big") & (2**64 - 1) == int.from_bytes(h[-8:], "big")
    assert block_key(2**70 + 5) == 5


def test_lookup_keys_leave_the_last_token_to_compute():
    p = Planner(BS)
    assert len(p.lookup_keys(FakeRequest("a", 12))) == 2  # 3 full blocks, the last token's is not offered
    assert len(p.lookup_keys(FakeRequest("b", 13))) == 3
    assert p.lookup_keys(FakeRequest("c", 1)) == []


def test_first_run_saves_every_full_block_once_as_computed():
    p, r = Planner(BS), FakeRequest("a", 10)
    assert p.matched("a", 0, held_blocks=0) == 0
    p.allocated(r, [7, 8, 9], 0, SessionHints("s"))
    # Chunked prefill: 6 tokens, then 4.
    plan = p.step([NewRequestStep("a", [7, 8, 9], 0)], {"a": 6})
    assert plan.loads == [] and plan.saves == [SaveSpec("a", "s", [key(0)], [None], [7])]
    plan = p.step([RunningRequestStep("a", [], 6)], {"a": 4})
    assert plan.saves == [SaveSpec("a", "s", [key(1)], [key(0)], [8])]
    # Decode: the output tokens fill block 2 (its hash appears once its tokens are known).
    r.grow(1)
    assert p.step([RunningRequestStep("a", [], 10)], {"a": 1}).saves == []
    r.grow(1)
    plan = p.step([RunningRequestStep("a", [], 11)], {"a": 1})
    assert plan.saves == [SaveSpec("a", "s", [key(2)], [key(1)], [9])]
    assert p.finished("a") == SessionHints("s") and p.tracked == 0


def test_hit_loads_the_held_blocks_after_the_local_ones_and_saves_the_rest():
    p, r = Planner(BS), FakeRequest("a", 18)  # 4 full blocks offered
    # The engine's own cache has block 0; kvd holds 3: tokens 4..12 come from kvd.
    assert p.matched("a", 4, held_blocks=3) == 8
    assert p.matched("a", 4, held_blocks=3) == 8  # asking again changes nothing
    p.allocated(r, [5, 6, 7, 8, 9], 8, SessionHints())
    plan = p.step([NewRequestStep("a", [5, 6, 7, 8, 9], 12)], {"a": 6})
    assert plan.loads == [LoadSpec("a", [key(1), key(2)], [6, 7])]
    assert plan.saves == [SaveSpec("a", None, [key(3)], [key(2)], [8])]
    assert p.step([RunningRequestStep("a", [], 18)], {"a": 1}).loads == []  # a load is planned once


def test_kvd_holding_less_than_the_engine_loads_nothing_and_saves_the_engines_blocks():
    p, r = Planner(BS), FakeRequest("a", 13)
    assert p.matched("a", 8, held_blocks=1) == 0
    p.allocated(r, [1, 2, 3, 4], 0, SessionHints())
    plan = p.step([NewRequestStep("a", [1, 2, 3, 4], 8)], {"a": 5})
    assert plan.loads == []
    assert plan.saves == [SaveSpec("a", None, [key(1), key(2)], [key(0), key(1)], [2, 3])]


def test_failed_load_is_saved_again_once_recomputed():
    p, r = Planner(BS), FakeRequest("a", 17)
    p.matched("a", 0, held_blocks=4)
    p.allocated(r, [1, 2, 3, 4, 5], 16, SessionHints())
    plan = p.step([NewRequestStep("a", [1, 2, 3, 4, 5], 16)], {"a": 1})
    assert plan.loads == [LoadSpec("a", [key(i) for i in range(4)], [1, 2, 3, 4])] and plan.saves == []
    p.load_failed({3})  # the engine recomputes from block 2 on
    plan = p.step([RunningRequestStep("a", [], 8)], {"a": 9})
    assert plan.saves == [SaveSpec("a", None, [key(2), key(3)], [key(1), key(2)], [3, 4])]


def test_preempted_request_resumes_with_its_new_blocks():
    p, r = Planner(BS), FakeRequest("a", 9)
    p.allocated(r, [1, 2, 3], 0, SessionHints())  # no lookup: nothing to load
    assert p.step([NewRequestStep("a", [1, 2, 3], 0)], {"a": 4}).saves[0].block_ids == [1]
    plan = p.step([NewRequestStep("a", [7, 8, 9], 0, resumed=True)], {"a": 9})
    assert plan.saves == [SaveSpec("a", None, [key(1)], [key(0)], [8])]


def test_speculative_tokens_do_not_count_as_computed():
    p, r = Planner(BS), FakeRequest("a", 8)
    p.allocated(r, [1, 2], 0, SessionHints())
    plan = p.step([NewRequestStep("a", [1, 2], 0)], {"a": 8}, {"a": [5, 6]})
    assert [s.block_ids for s in plan.saves] == [[1]]


def test_planner_rejects_inconsistent_engine_calls():
    p, r = Planner(BS), FakeRequest("a", 13)
    with pytest.raises(ValueError, match="without a lookup"):
        p.allocated(r, [1, 2, 3], 4, SessionHints())
    p.matched("a", 0, held_blocks=1)
    with pytest.raises(ValueError, match="exceed"):
        p.allocated(r, [1, 2, 3], 8, SessionHints())
    with pytest.raises(ValueError, match="block_size"):
        Planner(0)
    # A request the connector never saw allocated is not planned.
    assert p.step([RunningRequestStep("zz", [1], 0)], {"zz": 4}).saves == []


def test_session_hints():
    assert SessionHints.parse(None) == SessionHints()
    assert SessionHints.parse({"other": 1}, "eng-session") == SessionHints("eng-session")
    hints = SessionHints.parse({"kvd": {"tool": "run_tests", "expected_pause_s": 30}}, "s1")
    assert hints == SessionHints("s1", "run_tests", 30.0)
    assert SessionHints.parse({"kvd": {"session_id": "s2"}}, "s1").session_id == "s2"


@pytest.mark.parametrize(
    "params, message",
    [
        ({"kvd": "s1"}, "must be an object"),
        ({"kvd": {"sesion_id": "s1"}}, "unknown keys: sesion_id"),
        ({"kvd": {"session_id": ""}}, "non-empty string"),
        ({"kvd": {"session_id": 5}}, "non-empty string"),
        ({"kvd": {"session_id": "s", "tool": "t", "expected_pause_s": -1}}, "seconds >= 0"),
        ({"kvd": {"session_id": "s", "tool": "t", "expected_pause_s": True}}, "seconds >= 0"),
        ({"kvd": {"session_id": "s", "tool": "t", "expected_pause_s": float("nan")}}, "seconds >= 0"),
        ({"kvd": {"session_id": "s", "expected_pause_s": 3}}, 'needs a "tool"'),
        ({"kvd": {"tool": "t"}}, "needs a session id"),
    ],
)
def test_bad_session_hints_name_the_field(params, message):
    with pytest.raises(ValueError, match=message):
        SessionHints.parse(params)


# -- worker side: paged caches <-> block rows -----------------------------------------------------

torch = pytest.importorskip("torch")
from kvd.connector.paged import PagedLayout  # noqa: E402


def caches(num_blocks: int, shape=(2, 4, 8), dtype=None, layers=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {f"layer.{i}": torch.randn((num_blocks, *shape), generator=g).to(dtype or torch.bfloat16)
            for i in range(layers)}


def test_gather_then_scatter_moves_blocks_between_caches():
    src, dst = caches(10), caches(10, seed=1)
    a, b = PagedLayout(src, 10), PagedLayout(dst, 10)
    assert a.block_bytes == 3 * 2 * 4 * 8 * 2
    rows = a.gather([7, 2, 5]).clone()
    b.scatter([0, 9, 3], rows)
    for name in src:
        assert torch.equal(dst[name][[0, 9, 3]], src[name][[7, 2, 5]])
        assert torch.equal(dst[name][1], caches(10, seed=1)[name][1])  # other blocks untouched
    # A block's bytes are layer 0's, then layer 1's, ...
    assert bytes(rows[0][: a.layers[0].block_bytes].numpy()) == bytes(src["layer.0"][7].contiguous().view(torch.uint8).numpy())


def test_kernel_blocks_smaller_than_the_engines_and_block_axis_not_first():
    # Two kernel blocks per engine block; and a layout with K/V stacked in front of the blocks.
    src = caches(8, shape=(4, 16))
    a = PagedLayout(src, 4)
    assert a.kernel_blocks == 2
    dst = caches(8, shape=(4, 16), seed=3)
    PagedLayout(dst, 4).scatter([1], a.gather([3]))
    assert torch.equal(dst["layer.0"][2:4], src["layer.0"][6:8])
    kv = {"l": torch.randn(2, 6, 4, 8)}
    layout = PagedLayout(kv, 6)
    rows = layout.gather([5])
    assert torch.equal(rows[0].view(torch.float32).reshape(2, 4, 8), kv["l"][:, 5])


def test_paged_layout_errors():
    with pytest.raises(ValueError, match="no KV caches"):
        PagedLayout({}, 4)
    with pytest.raises(ValueError, match="cannot find the block axis"):
        PagedLayout({"l": torch.zeros(3, 5)}, 4)
    layout = PagedLayout(caches(4), 4)
    with pytest.raises(ValueError, match="outside the cache"):
        layout.gather([4])
    with pytest.raises(ValueError, match="rows of shape"):
        layout.scatter([0, 1], layout.gather([0]))
    with pytest.raises(ValueError, match="kernel blocks per block"):
        PagedLayout({"a": torch.zeros(4, 2), "b": torch.zeros(8, 2)}, 4)


def test_bench_e2e_without_a_vllm_environment_is_one_line_and_exit_1(tmp_path):
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-m", "kvd.cli.kvd_main", "bench", "connector", "--tokens", "64", "--layers", "1",
         "--repeat", "1", "--e2e", "--vllm-python", str(tmp_path / "none")],
        capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 1
    assert r.stderr.strip() == f"kvd bench connector: --e2e needs a vLLM environment: {tmp_path / 'none'} is missing (make vllm-cpu-env)"
