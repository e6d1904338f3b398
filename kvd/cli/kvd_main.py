"""The `kvd` command: `kvd serve` runs the daemon; `kvd bench` measures it; `kvd replay` runs
a trace through the daemon's core; `kvd gen-workload` writes a synthetic trace."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from kvd.cli.parsing import ArgumentParser
from kvd.server.config import ServeConfig
from kvd.sizes import parse_size


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="kvd", description="Session-aware KV-cache manager daemon.")
    sub = parser.add_subparsers(dest="command", required=True)
    d = ServeConfig()
    serve = sub.add_parser("serve", help="run the daemon")
    serve.add_argument(
        "--config", type=Path, metavar="FILE",
        help="a TOML file of settings (flat keys: dram_bytes, nvme_dir, ...); KVD_* variables and flags override it",
    )
    serve.add_argument("--socket", type=Path, help=f"unix socket (default {d.socket})")
    serve.add_argument("--dram-bytes", type=_size, metavar="SIZE", help="DRAM arena (default 1GiB)")
    serve.add_argument(
        "--hbm-bytes", type=_size, metavar="SIZE",
        help="daemon-owned GPU pool, 0 for none (default 0); without CUDA the daemon logs why and runs without it",
    )
    serve.add_argument(
        "--hbm-device", metavar="DEV",
        help="the HBM pool's device: cuda (default), cuda:N, or cpu (host memory standing in for HBM, for tests)",
    )
    serve.add_argument("--nvme-dir", type=Path, metavar="DIR", help=f"NVMe tier directory (default {d.nvme_dir})")
    serve.add_argument("--nvme-bytes", type=_size, metavar="SIZE", help="NVMe tier, 0 for none (default 4GiB)")
    serve.add_argument("--tcp", metavar="HOST:PORT", help="also listen on TCP, with TLS (off by default)")
    serve.add_argument("--tls-cert", type=Path, metavar="PEM", help="TCP: the daemon's certificate (chain)")
    serve.add_argument("--tls-key", type=Path, metavar="PEM", help="TCP: the certificate's private key")
    serve.add_argument(
        "--tls-client-ca", type=Path, metavar="PEM", help="TCP: demand client certificates signed by this CA (mTLS)"
    )
    serve.add_argument(
        "--tcp-insecure", action="store_true", default=None, help="TCP without TLS (a trusted network only)"
    )
    serve.add_argument(
        "--admin-token-file", type=Path, metavar="FILE",
        help="Admin calls over TCP need 'authorization: Bearer <token in FILE>' (without it Admin is unix-only)",
    )
    serve.add_argument(
        "--tenants", type=Path, metavar="FILE",
        help="TOML of [tenant.NAME] tables (token, namespaces globs; mode 0600): every TCP call needs a token",
    )
    serve.add_argument(
        "--unix-tenants", action="store_true", default=None, help="with --tenants: the unix socket needs tokens too"
    )
    serve.add_argument("--socket-group", metavar="GROUP", help="group owning the unix socket (mode 0660)")
    serve.add_argument(
        "--metrics-port", type=int, metavar="PORT", help="serve Prometheus metrics at :PORT/metrics (off by default)"
    )
    serve.add_argument("--metrics-host", metavar="HOST", help=f"address the metrics port binds (default {d.metrics_host})")
    serve.add_argument("--shm-dir", type=Path, metavar="DIR", help=f"where the arena file lives (default {d.shm_dir})")
    serve.add_argument("--policy", help=f"retention policy (default {d.policy})")
    serve.add_argument("--lease-seconds", type=float, help="default lease of a prepare (default 30)")
    serve.add_argument("--slab-bytes", type=_size, metavar="SIZE", help="size of one NVMe slab file (default 1GiB)")
    serve.add_argument("--io-threads", type=int, help="worker threads for disk I/O (default 8)")
    serve.add_argument("--event-buffer", type=int, help="events kept for Watch to resume from (default 100000)")
    serve.add_argument(
        "--kv-events", metavar="ENDPOINT",
        help="publish KV events in vLLM's ZMQ format, e.g. tcp://*:5557 (off by default; needs kvd[kv-events])",
    )
    serve.add_argument("--kv-events-replay", metavar="ENDPOINT", help="replay ROUTER socket, e.g. tcp://*:5558")
    serve.add_argument("--kv-events-buffer", type=int, help="messages kept for replay (default 10000)")
    serve.add_argument(
        "--kv-events-pod", metavar="ID",
        help="the pod of a namespace no engine attached to: topic kv@ID@NAMESPACE (default: the host name)",
    )
    serve.add_argument(
        "--kv-events-encoding", choices=("array", "map"),
        help="events as positional arrays (llm-d's indexer reads them; the default) or maps (vLLM 0.33's bytes)",
    )
    serve.add_argument(
        "--drain-seconds", type=float,
        help="on SIGTERM, how long leases may finish and kept blocks go to NVMe before exit (default 25)",
    )
    serve.add_argument(
        "--room-wait-seconds", type=float,
        help="how long a store or load waits for DRAM room before RESOURCE_EXHAUSTED (default 10)",
    )
    cluster = serve.add_argument_group("cluster tier (Mooncake Store; needs kvd[cluster], docs/cluster.md)")
    cluster.add_argument("--cluster-master", metavar="HOST:PORT", help="join the cluster of this mooncake_master (off by default)")
    cluster.add_argument(
        "--cluster-metadata", metavar="URL", help="its transfer engine's metadata server, e.g. http://HOST:PORT/metadata"
    )
    cluster.add_argument(
        "--cluster-bytes", type=_size, metavar="SIZE", help="memory this node contributes to the cluster (default 4GiB)"
    )
    cluster.add_argument(
        "--cluster-host", metavar="ADDR", help="the address other nodes reach this node's segment at (default 127.0.0.1)"
    )
    cluster.add_argument("--cluster-protocol", choices=("tcp", "rdma"), help="the transfer engine's (default tcp)")
    cluster.add_argument(
        "--cluster-replicas", type=int, help="copies of each value, on distinct nodes (default 2: one node may leave)"
    )
    cluster.add_argument(
        "--cluster-timeout-seconds", type=float,
        help="how long a lookup or load waits for the cluster before answering without it (default 2)",
    )
    # A test and chaos facility (docs/reliability.md), hidden from --help; refused without KVD_ALLOW_FAULTS=1.
    serve.add_argument("--fault-plan", type=Path, metavar="FILE", help=argparse.SUPPRESS)
    serve.add_argument("--no-write-behind", action="store_true", help="write blocks to NVMe only when DRAM evicts them")
    serve.add_argument("--no-verify-on-start", action="store_true", help="skip reading every recovered block at start")
    serve.add_argument("--log-level", help="DEBUG, INFO (default), WARNING or ERROR")
    serve.add_argument("--log-format", help="text (default) or json: one object per line, with request ids")

    cfg = sub.add_parser("config", help="the daemon's configuration")
    cfg_sub = cfg.add_subparsers(dest="config_command", required=True)
    show = cfg_sub.add_parser("print", help="print the effective config (defaults < --config < KVD_* < flags) as TOML")
    show.add_argument("--config", type=Path, metavar="FILE", help="a TOML file of settings")

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    from kvd.bench.datapath import add_arguments as add_datapath_arguments

    add_datapath_arguments(
        bench_sub.add_parser("datapath", help="kvd store/load vs bulk memcpy, raw direct I/O and Redis"), _size
    )
    rt = bench_sub.add_parser("router", help="the router index: score per key, event ingest (memory and Redis)")
    rt.add_argument("--json", action="store_true", help="print one JSON object")
    rt.add_argument("--nodes", type=int, default=8, help="simulated nodes (default 8)")
    rt.add_argument("--blocks", type=int, default=1_000_000, help="indexed blocks in all (default 1,000,000)")
    rt.add_argument("--repeat", type=int, default=50, help="scores to time (default 50)")
    from kvd.bench.connector import add_arguments as add_connector_arguments

    add_connector_arguments(
        bench_sub.add_parser("connector", help="gather/scatter of paged KV blocks vs memcpy (device copy on a GPU)")
    )

    from kvd.bench.soak import add_arguments as add_soak_arguments

    add_soak_arguments(
        bench_sub.add_parser("soak", help="many concurrent clients on loopback TCP: errors, latency, daemon RSS"), _size
    )

    from kvd.bench.engine import add_arguments as add_engine_arguments

    add_engine_arguments(
        bench_sub.add_parser("engine", help="engines' requests at a rate: each kvd call's latency, the control overhead"),
        _size,
    )

    from kvd.bench.cluster import add_arguments as add_cluster_arguments

    add_cluster_arguments(
        bench_sub.add_parser("cluster", help="the cluster tier vs Mooncake Store's own put/get, two real nodes"), _size
    )
    from kvd.bench.e2e.bench import add_arguments as add_e2e_arguments

    add_e2e_arguments(
        bench_sub.add_parser("e2e", help="aiperf replays an agentic trace through vLLM: no cache, kvd, LMCache"), _size
    )

    from kvd.replay.cli import add_arguments as add_replay_arguments
    from kvd.replay.workload import add_arguments as add_workload_arguments

    add_replay_arguments(
        sub.add_parser("replay", help="replay a trace through the daemon's core with each policy; compare")
    )
    gen = sub.add_parser("gen-workload", help="write a synthetic trace (kvd's session format)")
    gen_sub = gen.add_subparsers(dest="workload", required=True)
    add_workload_arguments(gen_sub.add_parser("agentic", help="coding agents (llm-d's agentic preset)"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "config":
        return _config_print(args)
    if args.command == "bench" and args.bench == "datapath":
        from kvd.bench.datapath import run_cli

        return run_cli(args)
    if args.command == "bench" and args.bench == "router":
        from kvd.bench.router import run_cli as run_router

        return run_router(args)
    if args.command == "bench" and args.bench == "connector":
        from kvd.bench.connector import run_cli as run_connector

        return run_connector(args)
    if args.command == "bench" and args.bench == "engine":
        from kvd.bench.engine import run_cli as run_engine

        return run_engine(args)
    if args.command == "bench" and args.bench == "soak":
        from kvd.bench.soak import run_cli as run_soak

        return run_soak(args)
    if args.command == "bench" and args.bench == "cluster":
        from kvd.bench.cluster import run_cli as run_cluster

        return run_cluster(args)
    if args.command == "bench" and args.bench == "e2e":
        from kvd.bench.e2e.bench import run_cli as run_e2e

        return run_e2e(args)
    if args.command == "replay":
        from kvd.replay.cli import run_cli as run_replay

        return run_replay(args)
    if args.command == "gen-workload" and args.workload == "agentic":
        from kvd.replay.workload import run_cli as run_workload

        return run_workload(args)
    return 2


SERVE_FLAGS = (
    "socket", "dram_bytes", "nvme_dir", "nvme_bytes", "tcp", "metrics_port", "metrics_host", "shm_dir", "policy",
    "lease_seconds", "slab_bytes", "hbm_device",
    "io_threads", "event_buffer", "kv_events", "kv_events_replay", "kv_events_buffer", "kv_events_pod",
    "kv_events_encoding",
    "drain_seconds", "log_level", "log_format", "room_wait_seconds", "fault_plan",
    "tls_cert", "tls_key", "tls_client_ca", "tcp_insecure", "admin_token_file", "socket_group",
    "tenants", "unix_tenants",
    "cluster_master", "cluster_metadata", "cluster_bytes", "cluster_host", "cluster_protocol", "cluster_replicas",
    "cluster_timeout_seconds",
)


def _flag_overrides(args: argparse.Namespace) -> dict:
    """The settings given as flags (the others come from the file, the environment or defaults)."""
    out = {name: getattr(args, name) for name in SERVE_FLAGS if getattr(args, name) is not None}
    if args.hbm_bytes is not None:
        out["hbm_bytes"] = args.hbm_bytes
    if args.no_write_behind:
        out["write_behind"] = False
    if args.no_verify_on_start:
        out["verify_on_start"] = False
    return out


def _config_print(args: argparse.Namespace) -> int:
    from kvd.server.config_file import ConfigError, load_config, to_toml

    try:
        config = load_config(args.config, os.environ)
    except ConfigError as exc:
        print(f"kvd config: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(to_toml(config))
    return 0


def _serve(args: argparse.Namespace) -> int:
    from kvd.server.config_file import ConfigError, load_config

    try:
        config = load_config(args.config, os.environ, _flag_overrides(args))
        from kvd.policies import make_policy

        make_policy(config.policy)
    except (ConfigError, ValueError) as exc:
        print(f"kvd serve: {exc}", file=sys.stderr)
        return 2
    from kvd.server import logs

    logs.configure(config.log_level, config.log_format)
    if config.kv_events is not None:
        try:
            import kvd.server.kv_events  # noqa: F401 - pyzmq and msgspec are an optional extra
        except ImportError as exc:
            if exc.name not in ("zmq", "msgspec"):
                raise
            print(f"kvd serve: --kv-events needs {exc.name} (pip install 'kvd[kv-events]')", file=sys.stderr)
            return 2
    from kvd.server.daemon import serve
    from kvd.server.startup import StartupError

    try:
        serve(config)
    except StartupError as exc:
        print(f"kvd serve: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"kvd serve: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
