"""`kvd bench connector`: gather/scatter of a long context's paged KV blocks against the limit.

The engine side of kvd's data path is :class:`kvd.native.PagedKv`: gather a request's blocks
from vLLM's per-layer paged caches into kvd slots, scatter them back on a hit. This bench
moves a whole context (default 160Ki tokens of a Llama-3.1-8B-like model: 32 layers, 8 KV
heads, head size 128, bf16, 16-token blocks: 128 KiB a token, ~21 GB) and reports GB/s
(10^9 bytes per second) per backend, and the ratio to the limit measured in the same run:

- CPU: ``memcpy`` of the same bytes in the same batches between two pre-faulted buffers,
  numpy (one thread) and torch (its intra-op threads); the limit is the faster;
- GPU: the caches in HBM, slots in HBM (limit: a device-to-device ``copy_`` of the same
  bytes) and in pinned host memory (limit: a device-to-host ``copy_`` into pinned memory).

A 160Ki-token context does not fit twice in a small host's memory, so the engine cache
holds ``--cache-blocks`` blocks and the context's block ids (a shuffled walk over them) go
in batches of ``--window-blocks`` into one window of slots at shuffled page-aligned offsets
(as arena slots are): every byte of the context moves; only the memory is reused.

``e2e`` (with ``--e2e``) is the end-to-end time of a vLLM engine's second run of a prompt
against its first (prefill saved), from :mod:`kvd.bench.connector_e2e`; null without it.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import numpy as np

from kvd.bench import run_and_report
from kvd.bench.connector_e2e import add_arguments as add_e2e_arguments
from kvd.bench.connector_e2e import run_e2e

GB = 1e9
PAGE = 4096


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--tokens", type=int, default=160 * 1024, help="context length in tokens (default 163840)")
    p.add_argument("--block-tokens", type=int, default=16, help="tokens per vLLM block (default 16)")
    p.add_argument("--layers", type=int, default=32, help="attention layers (default 32)")
    p.add_argument("--kv-heads", type=int, default=8, help="KV heads (default 8)")
    p.add_argument("--head-size", type=int, default=128, help="head size (default 128)")
    p.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    p.add_argument(
        "--layout", choices=["kv_first", "blocks_first"], default="kv_first",
        help="per-layer cache shape: (2, blocks, ...) as flash-attn, or (blocks, 2, ...) as FlashInfer",
    )
    p.add_argument("--cache-blocks", type=int, default=1024, help="blocks in the engine cache (default 1024)")
    p.add_argument("--window-blocks", type=int, default=256, help="slots reused per batch (default 256)")
    p.add_argument("--repeat", type=int, default=3, help="passes per figure; the best is reported (default 3)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="where the caches live")
    add_e2e_arguments(p)


def _geometry(args) -> dict:
    for name in ("tokens", "block_tokens", "layers", "kv_heads", "head_size", "cache_blocks", "window_blocks",
                 "repeat"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive")
    blocks = -(-args.tokens // args.block_tokens)
    per_layer = 2 * args.block_tokens * args.kv_heads * args.head_size * 2  # K and V, 2-byte dtypes
    return {
        "tokens": args.tokens, "block_tokens": args.block_tokens, "layers": args.layers, "kv_heads": args.kv_heads,
        "head_size": args.head_size, "dtype": args.dtype, "layout": args.layout, "context_blocks": blocks,
        "slot_bytes": per_layer * args.layers, "context_bytes": blocks * per_layer * args.layers,
        "cache_blocks": min(args.cache_blocks, blocks), "window_blocks": min(args.window_blocks, blocks),
    }


def _best(fn, repeat: int, sync) -> float:
    best = float("inf")
    for _ in range(repeat):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def _batches(g: dict, seed: int = 0) -> list[list[int]]:
    """The context's block ids: a shuffled walk over the cache, cut into windows."""
    rng = np.random.default_rng(seed)
    cb, n = g["cache_blocks"], g["context_blocks"]
    ids = np.concatenate([rng.permutation(cb) for _ in range(-(-n // cb))])[:n].tolist()
    w = g["window_blocks"]
    return [ids[i : i + w] for i in range(0, n, w)]


def _offsets(g: dict, seed: int = 1) -> tuple[list[int], int]:
    """Slot offsets in a window: page-rounded slots in shuffled order; and the window's bytes."""
    stride = -(-g["slot_bytes"] // PAGE) * PAGE
    order = np.random.default_rng(seed).permutation(g["window_blocks"])
    return [int(i) * stride for i in order], g["window_blocks"] * stride


def run(args) -> dict:
    import torch

    from kvd.native import PagedKv
    from kvd.native.cuda import cupy_available

    g = _geometry(args)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch sees no CUDA device")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    cb, nt, h, hs = g["cache_blocks"], args.block_tokens, args.kv_heads, args.head_size
    shape = (2, cb, nt, h, hs) if args.layout == "kv_first" else (cb, 2, nt, h, hs)
    gen = torch.Generator(device=device).manual_seed(0)
    caches = [torch.randn(shape, generator=gen, device=device).to(dtype) for _ in range(args.layers)]
    paged = PagedKv(caches, block_dim=1 if args.layout == "kv_first" else 0)
    batches = _batches(g)
    offsets, window_bytes = _offsets(g)
    total = g["context_bytes"]
    if device == "cuda":
        def sync():
            torch.cuda.synchronize()
    else:
        def sync():
            return None

    def pass_of(op, buf, backend):
        def go():
            for ids in batches:
                op(ids, buf, offsets[: len(ids)], backend=backend)
        return go

    def measure(buf, backends) -> list[dict]:
        # Every backend gathers the same bytes (checked before the timed scatters rewrite
        # the cache with whatever the window holds).
        firsts = []
        for backend in backends:
            paged.gather(batches[0], buf, offsets[: len(batches[0])], backend=backend)
            firsts.append(bytes(buf[offsets[0] : offsets[0] + g["slot_bytes"]].cpu().numpy()))
            if firsts[-1] != firsts[0]:
                raise RuntimeError(f"backend {backend} gathered other bytes than {backends[0]}")
        out = []
        for backend in backends:
            tg = _best(pass_of(paged.gather, buf, backend), args.repeat, sync)
            ts = _best(pass_of(paged.scatter, buf, backend), args.repeat, sync)
            out.append({"backend": backend, "gather_s": tg, "scatter_s": ts,
                        "gather_gbps": total / tg / GB, "scatter_gbps": total / ts / GB})
        return out

    def with_ratios(rows: list[dict], limit: float) -> list[dict]:
        for r in rows:
            r["gather_vs_limit"] = r["gather_gbps"] / limit
            r["scatter_vs_limit"] = r["scatter_gbps"] / limit
        return rows

    result: dict[str, Any] = {"geometry": g, "device": device}
    if device == "cpu":
        arena = torch.zeros(window_bytes, dtype=torch.uint8)  # zeroed: pre-faulted, as the arena is
        src = torch.randint(0, 256, (window_bytes,), dtype=torch.uint8)
        a, s = arena.numpy(), src.numpy()
        nbatches = len(batches)

        def np_copy():
            for i in range(nbatches):
                n = len(batches[i]) * g["slot_bytes"]
                a[:n] = s[:n]

        def torch_copy():
            for i in range(nbatches):
                n = len(batches[i]) * g["slot_bytes"]
                arena[:n].copy_(src[:n])

        limits = {"memcpy_numpy_gbps": total / _best(np_copy, args.repeat, sync) / GB,
                  "memcpy_torch_gbps": total / _best(torch_copy, args.repeat, sync) / GB}
        limits["limit_gbps"] = max(limits.values())
        result["limits"] = limits
        result["destinations"] = {"arena": with_ratios(measure(arena, ["host", "torch"]), limits["limit_gbps"])}
    else:
        backends = ["cuda", "torch"] if cupy_available() else ["torch"]
        hbm = torch.zeros(window_bytes, dtype=torch.uint8, device=device)
        pinned = torch.zeros(window_bytes, dtype=torch.uint8, pin_memory=True)
        src = torch.randint(0, 256, (window_bytes,), dtype=torch.uint8, device=device)

        def copy_into(dst):
            def go():
                for ids in batches:
                    n = len(ids) * g["slot_bytes"]
                    dst[:n].copy_(src[:n], non_blocking=True)
            return go

        limits = {"device_copy_gbps": total / _best(copy_into(hbm), args.repeat, sync) / GB,
                  "d2h_pinned_gbps": total / _best(copy_into(pinned), args.repeat, sync) / GB}
        result["gpu"] = torch.cuda.get_device_name()
        result["limits"] = limits
        result["destinations"] = {
            "hbm": with_ratios(measure(hbm, backends), limits["device_copy_gbps"]),
            "pinned_host": with_ratios(measure(pinned, backends), limits["d2h_pinned_gbps"]),
        }
    # vLLM's second run of a prompt vs its first (prefill saved): kvd.bench.connector_e2e
    result["e2e"] = run_e2e(args) if getattr(args, "e2e", False) else None
    return result


def run_cli(args: argparse.Namespace) -> int:
    try:
        import torch  # noqa: F401
    except ImportError:
        print("kvd bench connector: needs torch (pip install 'kvd[torch]')", file=sys.stderr)
        return 2
    return run_and_report("connector", lambda: run(args), args.json)
