"""`kvctl`: operate a kvd daemon — status, blocks, check, watch, evict, health.

``--addr`` defaults to ``KVD_ADDR``, then the default socket (./var/kvd.sock). Errors print
one line on stderr and exit non-zero (1: the daemon refused or is unreachable; 2: usage).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvd.cli.parsing import ArgumentParser
from kvd.cli.sizes import format_size
from kvd.client import Client, ClientError, default_address
from kvd.client.client import grpc_target
from kvd.tiers import TIER_NAMES
from kvd.v1 import admin_pb2, admin_pb2_grpc, view_pb2, view_pb2_grpc


def _add_common(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """The same options before or after the subcommand (a subcommand's copy must not reset them)."""

    def default(value):
        return argparse.SUPPRESS if suppress else value

    parser.add_argument(
        "--addr", default=default(None), help="unix:///path or host:port (default: $KVD_ADDR, then ./var/kvd.sock)"
    )
    parser.add_argument("-o", "--output", choices=["table", "json"], default=default("table"))
    parser.add_argument("--timeout", type=float, default=default(10.0), help="seconds to wait for the daemon")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="kvctl", description="Operate a kvd daemon.")
    _add_common(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_common(sub.add_parser("status", help="tiers, namespaces, leases"), suppress=True)
    blocks = sub.add_parser("blocks", help="list held blocks")
    _add_common(blocks, suppress=True)
    blocks.add_argument("--namespace", "-n", default=None)
    blocks.add_argument("--limit", type=int, default=None, help="at most this many blocks")
    _add_common(sub.add_parser("check", help="validate the daemon's invariants (exit 1 if any fails)"), suppress=True)
    watch = sub.add_parser("watch", help="print the daemon's events as they happen (Ctrl-C stops)")
    _add_common(watch, suppress=True)
    watch.add_argument("--namespace", "-n", default=None)
    watch.add_argument("--from-seq", type=int, default=0, help="resume from this sequence number (default: now)")
    watch.add_argument("--count", type=int, default=None, help="exit after this many events")
    health = sub.add_parser(
        "health", help="exit 0 when the daemon's gRPC health service says SERVING (a probe for Kubernetes)"
    )
    _add_common(health, suppress=True)
    health.add_argument("--service", default="", help="a service, e.g. kvd.v1.Engine (default: the whole server)")
    health.add_argument(
        "--liveness", action="store_true",
        help="exit 0 when the daemon answers at all, SERVING or NOT_SERVING (a draining daemon is alive)",
    )
    evict = sub.add_parser(
        "evict", help="drop every block of a namespace from every tier (exit 1 if some are in use and stay)"
    )
    _add_common(evict, suppress=True)
    evict.add_argument("--namespace", "-n", required=True)
    return parser


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)] if rows else [len(h) for h in header]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def cmd_status(client: Client, output: str) -> int:
    st = client.status()
    if output == "json":
        data = asdict(st)
        data["tiers"] = {t["name"]: t for t in data["tiers"]}
        print(json.dumps(data, indent=2))
        return 0
    print(f"kvd {st.version}  up {st.uptime_s:.0f}s  policy {st.policy}  leases {st.leases}  "
          f"write-behind queue {st.write_behind_queue}  recovered {st.recovered_blocks} (dropped {st.dropped_on_recovery})")
    rows = [
        [t.name, format_size(t.capacity_bytes), format_size(t.used_bytes),
         f"{100 * t.used_bytes / t.capacity_bytes:.1f}%" if t.capacity_bytes else "-", t.blocks, t.location]
        for t in st.tiers
    ]
    print(_table(rows, ["TIER", "CAPACITY", "USED", "USE", "BLOCKS", "LOCATION"]))
    if st.namespaces:
        print()
        rows = [[n.name, n.block_tokens, format_size(n.block_bytes), n.blocks] for n in st.namespaces]
        print(_table(rows, ["NAMESPACE", "BLOCK_TOKENS", "BLOCK_BYTES", "BLOCKS"]))
    return 0


def cmd_blocks(client: Client, output: str, namespace: str | None, limit: int | None) -> int:
    blocks = []
    for b in client.list_blocks(namespace):
        if limit is not None and len(blocks) >= limit:
            break
        blocks.append(b)
    if output == "json":
        print(json.dumps([asdict(b) for b in blocks], indent=2))
        return 0
    rows = [[b.namespace, f"{b.hash:016x}", "-" if b.parent is None else f"{b.parent:016x}", b.nbytes, ",".join(b.tiers)]
            for b in blocks]
    print(_table(rows, ["NAMESPACE", "HASH", "PARENT", "BYTES", "TIERS"]))
    return 0


def cmd_check(client: Client, output: str) -> int:
    problems = client.check()
    if output == "json":
        print(json.dumps({"ok": not problems, "problems": problems}, indent=2))
    elif problems:
        print("\n".join(problems))
    else:
        print("ok")
    return 1 if problems else 0


def _event_fields(e: view_pb2.Event) -> dict:
    """One Watch event as a flat dict: seq, unix_time, kind, then the kind's own fields."""
    kind = e.WhichOneof("kind")
    body = getattr(e, kind)
    fields = {"seq": e.seq, "unix_time": e.unix_time, "kind": kind, "namespace": body.namespace}
    if kind == "stored":
        fields.update(
            hash=body.hash,
            parent=body.parent if body.HasField("parent") else None,
            tier=TIER_NAMES[body.tier - 1],
            nbytes=body.nbytes,
            session_id=body.session_id or None,
        )
    elif kind == "removed":
        fields.update(hash=body.hash, tier=TIER_NAMES[body.tier - 1], reason=body.reason)
    elif kind == "registered":
        fields.update(block_tokens=body.block_tokens, block_bytes=body.block_bytes)
    elif kind == "session":
        fields.update(session_id=body.session_id, state=body.state, tool=body.tool or None)
    return fields


def _event_line(f: dict) -> str:
    kind, head = f["kind"], f"{f['seq']:>8}"
    if kind == "stored":
        session = f"  session {f['session_id']}" if f["session_id"] else ""
        return f"{head}  stored    {f['namespace']}  {f['hash']:016x}  {f['tier']}  {f['nbytes']}{session}"
    if kind == "removed":
        return f"{head}  removed   {f['namespace']}  {f['hash']:016x}  {f['tier']}  {f['reason']}"
    if kind == "registered":
        return f"{head}  namespace {f['namespace']}  {f['block_tokens']} tokens  {f['block_bytes']} bytes"
    if kind == "cleared":
        return f"{head}  cleared   {f['namespace']}"
    tool = f"  {f['tool']}" if f["tool"] else ""
    return f"{head}  session   {f['namespace']}  {f['session_id']}  {f['state']}{tool}"


def cmd_watch(channel: grpc.Channel, output: str, namespace: str | None, from_seq: int, count: int | None) -> int:
    if from_seq < 0 or (count is not None and count <= 0):
        raise ValueError("--from-seq must be >= 0 and --count > 0")
    # The stub, not Client.watch: an operator sees every kind, cleared and session included.
    request = view_pb2.WatchRequest(
        from_seq=from_seq, namespace=namespace or "", with_cleared=True, with_sessions=True
    )
    seen = 0
    for batch in view_pb2_grpc.ViewStub(channel).Watch(request):
        if batch.resync:
            print(
                f"kvctl: events before {batch.next_seq} are no longer held; resynchronize from a snapshot",
                file=sys.stderr,
            )
            return 1
        for e in batch.events:
            fields = _event_fields(e)
            print(json.dumps(fields) if output == "json" else _event_line(fields), flush=True)
            seen += 1
            if count is not None and seen >= count:
                return 0
    return 0


def cmd_health(channel: grpc.Channel, output: str, service: str, liveness: bool, timeout: float) -> int:
    # One Check, no wait_for_ready: a probe must fail within its deadline when the socket is
    # missing (daemon down or still recovering), not wait for the daemon to appear.
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout
        )
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.NOT_FOUND:
            raise
        # The health service aborts NOT_FOUND without details; say what was not found.
        print(f"kvctl: not_found: the daemon reports no health for service {service!r}", file=sys.stderr)
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    if output == "json":
        print(json.dumps({"service": service, "status": status}))
    else:
        print(status)
    serving = reply.status == health_pb2.HealthCheckResponse.SERVING
    return 0 if serving or (liveness and reply.status == health_pb2.HealthCheckResponse.NOT_SERVING) else 1


def cmd_evict(channel: grpc.Channel, output: str, namespace: str, timeout: float) -> int:
    reply = admin_pb2_grpc.AdminStub(channel).ClearNamespace(
        admin_pb2.ClearNamespaceRequest(namespace=namespace), timeout=timeout
    )
    if output == "json":
        print(json.dumps({"namespace": namespace, "removed": reply.removed, "remaining": reply.remaining}))
    else:
        print(f"{namespace}: {reply.removed} blocks removed")
    if reply.remaining:
        print(
            f"kvctl: {reply.remaining} blocks of {namespace} are being read or moved and stay; run evict again",
            file=sys.stderr,
        )
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    address = args.addr or default_address()
    try:
        if args.command == "health":
            with grpc.insecure_channel(grpc_target(address)) as channel:
                return cmd_health(channel, args.output, args.service, args.liveness, args.timeout)
        with Client(address, shared_memory=False, timeout=args.timeout) as client:
            client.wait_ready(args.timeout)
            if args.command == "status":
                return cmd_status(client, args.output)
            if args.command == "blocks":
                return cmd_blocks(client, args.output, args.namespace, args.limit)
            if args.command == "check":
                return cmd_check(client, args.output)
        with grpc.insecure_channel(grpc_target(address)) as channel:
            if args.command == "watch":
                return cmd_watch(channel, args.output, args.namespace, args.from_seq, args.count)
            return cmd_evict(channel, args.output, args.namespace, args.timeout)
    except ClientError as exc:
        print(f"kvctl: {exc.code.name.lower()}: {exc.details}", file=sys.stderr)
        return 1
    except grpc.RpcError as exc:
        print(f"kvctl: {exc.code().name.lower()}: {exc.details()}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"kvctl: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
