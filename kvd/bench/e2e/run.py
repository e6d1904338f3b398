"""One end-to-end run: a cache layer (none, a kvd daemon, an LMCache server), a vLLM OpenAI
server on the benchmark model, aiperf replaying the trace against it; the figures of that run.

Each run starts every process fresh, warms the engine with one request outside the trace,
scrapes vLLM's (and the layer's) Prometheus metrics before and after aiperf, keeps aiperf's
exports and every log in the run's directory, and stops everything by process group.
"""

from __future__ import annotations

import collections
import json
import socket
import statistics
import urllib.request
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from kvd.bench.e2e.model import SPECIALS, ModelShape, words
from kvd.bench.e2e.procs import Proc, delta, scrape

BLOCK_TOKENS = 32  # vLLM's CPU attention wants a multiple of 32
MAX_MODEL_LEN = 8192
SERVED_NAME = "kvd-bench"


class Layer(Enum):
    """The cache layer under vLLM's own prefix cache."""

    NONE = "none"
    KVD_TYPED = "kvd_typed"
    KVD_LRU = "kvd_lru"
    LMCACHE = "lmcache"


@dataclass(frozen=True)
class Envs:
    """Where the programs are: vLLM's python (with kvd installed), kvd's, aiperf, LMCache's
    server, and LMCache installed without dependencies for the vLLM process (its connector)."""

    vllm_python: Path
    kvd_python: Path
    aiperf: Path
    lmcache: Path
    lmcache_path: Path

    def check(self, layers: list[Layer]) -> None:
        needed = [("vLLM", self.vllm_python), ("aiperf", self.aiperf)]
        if Layer.LMCACHE in layers:
            needed += [("LMCache", self.lmcache), ("LMCache for vLLM", self.lmcache_path)]
        for what, path in needed:
            if not path.exists():
                raise ValueError(f"{what} is missing: {path} (make e2e-env builds it)")


@dataclass(frozen=True)
class RunSpec:
    """One run: the layer, its memory (bytes; 0 for none), vLLM's own KV cache (bytes),
    concurrency (sessions in flight), the trace and its sessions, the directory of its
    artifacts."""

    layer: Layer
    layer_bytes: int
    engine_kv_bytes: int
    concurrency: int
    sessions: int
    trace: Path
    model: Path
    out: Path
    timeout_s: float = 900.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _layer_procs(spec: RunSpec, envs: Envs) -> tuple[list[Proc], dict, dict, str | None]:
    """The layer's processes, the connector config for vLLM, the env vLLM needs, and the
    layer's metrics URL."""
    out = spec.out
    if spec.layer is Layer.NONE:
        return [], {}, {}, None
    metrics_port = free_port()
    if spec.layer in (Layer.KVD_TYPED, Layer.KVD_LRU):
        sock = out / "kvd.sock"
        policy = "typed" if spec.layer is Layer.KVD_TYPED else "lru"
        proc = Proc("kvd", [str(envs.kvd_python), "-m", "kvd.cli.kvd_main", "serve", "--socket", str(sock),
                            "--dram-bytes", str(spec.layer_bytes), "--nvme-bytes", "0", "--nvme-dir", str(out / "nvme"),
                            "--shm-dir", str(out / "shm"), "--policy", policy, "--metrics-host", "127.0.0.1",
                            "--metrics-port", str(metrics_port)], out / "kvd.log")
        config = {"kv_connector": "KvdConnector", "kv_connector_module_path": "kvd.connector.vllm",
                  "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
                  "kv_connector_extra_config": {"kvd_address": f"unix://{sock}"}}
        return [proc], config, {}, f"http://127.0.0.1:{metrics_port}/metrics"
    port, http_port = free_port(), free_port()
    gib = max(spec.layer_bytes / (1 << 30), 0.01)
    proc = Proc("lmcache", [str(envs.lmcache), "server", "--host", "localhost", "--port", str(port),
                            "--supported-transfer-mode", "auto", "--l1-size-gb", f"{gib:.3f}", "--eviction-policy", "LRU",
                            "--chunk-size", "256",
                            "--http-port", str(http_port), "--prometheus-port", str(metrics_port)],
                out / "lmcache.log", env={"LMCACHE_DISABLE_BANNER": "1"})
    config = {"kv_connector": "LMCacheMPConnector", "kv_role": "kv_both",
              "kv_connector_extra_config": {"lmcache.mp.host": "tcp://localhost", "lmcache.mp.port": port}}
    # Its Prometheus text is served on the HTTP port (nothing answers on --prometheus-port).
    return [proc], config, {"PYTHONPATH": str(envs.lmcache_path)}, f"http://127.0.0.1:{http_port}/metrics"


def run_once(spec: RunSpec, envs: Envs) -> dict:
    """Start the layer and vLLM, warm up, replay the trace with aiperf; this run's figures."""
    spec.out.mkdir(parents=True, exist_ok=True)
    layer_procs, connector, vllm_env, layer_metrics = _layer_procs(spec, envs)
    port = free_port()
    argv = [str(envs.vllm_python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(spec.model),
            "--served-model-name", SERVED_NAME, "--host", "127.0.0.1", "--port", str(port), "--dtype", "bfloat16",
            "--max-model-len", str(MAX_MODEL_LEN), "--block-size", str(BLOCK_TOKENS), "--enable-prefix-caching",
            "--kv-cache-memory-bytes", str(spec.engine_kv_bytes), "--max-num-seqs", "4",
            "--max-num-batched-tokens", str(MAX_MODEL_LEN), "--enable-prompt-tokens-details", "--seed", "0"]
    if connector:
        argv += ["--kv-transfer-config", json.dumps(connector)]
    if spec.layer in (Layer.KVD_TYPED, Layer.KVD_LRU):
        argv += ["--middleware", "kvd.connector.middleware.SessionFromUser"]  # sessions from `user` too
    # One core, one thread for the model in every configuration: vLLM's CPU backend reserves a
    # core more when a KV connector is configured, which on a small machine leaves none
    # reserved and runs the model on every core (another thread count, another ITL).
    pinning = {"VLLM_CPU_OMP_THREADS_BIND": "0", "OMP_NUM_THREADS": "1"}
    vllm = Proc("vllm", argv, spec.out / "vllm.log", env={**vllm_env, **pinning, "HF_HUB_OFFLINE": "1",
                                                          "TRANSFORMERS_OFFLINE": "1", "PYTHONHASHSEED": "0"})
    procs = [*layer_procs, vllm]
    try:
        for p in layer_procs:
            p.start().wait_http(layer_metrics, 180)
        vllm.start().wait_http(f"http://127.0.0.1:{port}/v1/models", 600)
        _warm_up(port)
        vllm_url = f"http://127.0.0.1:{port}/metrics"
        before = scrape(vllm_url), scrape(layer_metrics) if layer_metrics else {}
        artifacts = spec.out / "aiperf"
        aiperf = Proc("aiperf", [
            str(envs.aiperf), "profile", "--model", SERVED_NAME, "--tokenizer", str(spec.model),
            "--url", f"http://127.0.0.1:{port}", "--endpoint-type", "chat", "--streaming",
            "--custom-dataset-type", "multi_turn", "--input-file", str(spec.trace),
            "--concurrency", str(spec.concurrency), "--num-sessions", str(spec.sessions),
            "--session-header", "X-Session-ID", "--random-seed", "0",
            # Special tokens stay in the replies' text, so the next turn's prompt tokenizes to
            # what the engine computed and its prefix matches.
            "--extra-inputs", json.dumps({"ignore_eos": True, "skip_special_tokens": False}),
            "--artifact-dir", str(artifacts), "--ui-type", "none",
        ], spec.out / "aiperf.log")
        aiperf.start()
        try:
            code = aiperf.popen.wait(timeout=spec.timeout_s)
        except Exception:
            aiperf.stop()
            raise RuntimeError(f"aiperf ran past {spec.timeout_s:.0f} s; see {aiperf.log}") from None
        if code != 0:
            raise RuntimeError(f"aiperf exited {code}; see {aiperf.log}")
        after = scrape(vllm_url), scrape(layer_metrics) if layer_metrics else {}
        for p in procs:
            if not p.alive():
                raise RuntimeError(f"{p.name} died during the run; see {p.log}")
    finally:
        for p in reversed(procs):
            p.stop()
    engine, layer = delta(before[0], after[0]), delta(before[1], after[1])
    (spec.out / "metrics_delta.json").write_text(json.dumps({"vllm": engine, "layer": layer}, indent=1))
    return figures(artifacts, engine, layer)


def _warm_up(port: int) -> None:
    """One short chat request outside the trace (compiles, allocates, loads the tokenizer)."""
    text = " ".join(words(ModelShape().vocab - len(SPECIALS))[:200])
    body = {"model": SERVED_NAME, "messages": [{"role": "user", "content": text}], "max_tokens": 4}
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        r.read()


def figures(artifacts: Path, engine: dict[str, float], layer: dict[str, float]) -> dict:
    """A run's figures from aiperf's exports and the metric deltas."""
    summary = json.loads((artifacts / "profile_export_aiperf.json").read_text())

    def stat(name: str, key: str) -> float | None:
        return summary.get(name, {}).get(key)

    spans: dict[str, list[int]] = collections.defaultdict(lambda: [1 << 80, 0])
    errors = 0
    for line in (artifacts / "profile_export.jsonl").read_text().splitlines():
        record = json.loads(line)
        meta = record["metadata"]
        span = spans[meta.get("x_correlation_id") or meta.get("conversation_id")]  # one session's instance
        span[0] = min(span[0], meta["request_start_ns"])
        span[1] = max(span[1], meta["request_end_ns"])
        errors += bool(record.get("error"))
    walls = [(end - start) / 1e9 for start, end in spans.values()]
    by_source = {s: engine.get(f"vllm:prompt_tokens_by_source_total{{source={s}}}", 0.0)
                 for s in ("local_compute", "local_cache_hit", "external_kv_transfer")}
    return {
        "ttft_ms": {"p50": stat("time_to_first_token", "p50"), "p90": stat("time_to_first_token", "p90")},
        "itl_ms": {"mean": stat("inter_token_latency", "avg")},
        "request_latency_ms": {"p50": stat("request_latency", "p50"), "mean": stat("request_latency", "avg")},
        "session_wall_s": {"mean": statistics.fmean(walls) if walls else None},
        "requests_completed": int(stat("request_count", "avg") or 0) - errors,
        "request_errors": errors,
        "prompt_tokens": engine.get("vllm:prompt_tokens_total", 0.0),
        "prompt_tokens_prefilled": by_source["local_compute"],
        "tokens_from_engine_cache": by_source["local_cache_hit"],
        "tokens_from_cache": by_source["external_kv_transfer"],
        "engine_itl_ms": _mean_ms(engine, "vllm:inter_token_latency_seconds"),
        "engine_prefill_ms": _mean_ms(engine, "vllm:request_prefill_time_seconds"),
        "benchmark_s": stat("benchmark_duration", "avg"),
        "layer_metrics": {k: v for k, v in layer.items() if k.startswith(("kvd_", "lmcache")) and v},
    }


def _mean_ms(metrics: dict[str, float], histogram: str) -> float | None:
    count = metrics.get(f"{histogram}_count", 0.0)
    return 1000 * metrics[f"{histogram}_sum"] / count if count else None
