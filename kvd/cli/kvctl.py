"""`kvctl`: operate a kvd daemon — status, sessions, blocks, pin/unpin, evict, policy, watch,
check, sync, drain/resume, health.

``--addr`` defaults to ``KVD_ADDR``, then the default socket (./var/kvd.sock); ``--token``
to ``KVD_TOKEN`` (Admin calls over TCP need it, and every call to a daemon with tenants); ``--tls-ca/--tls-cert/--tls-key`` to
``KVD_TLS_CA``, ``KVD_TLS_CLIENT_CERT``, ``KVD_TLS_CLIENT_KEY``. ``-o table|json|yaml`` print one
schema per command (:mod:`kvd.cli.render`). Errors print one line on stderr and exit non-zero
(1: the daemon refused or is unreachable; 2: usage).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from dataclasses import asdict, fields
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvd.cli import render
from kvd.cli.parsing import ArgumentParser
from kvd.client import BlockInfo, Client, ClientError, ClusterInfo, NamespaceInfo, Status, TlsFiles, default_address
from kvd.client.channel import listening, open_channel
from kvd.media import TIER_BY_CODE
from kvd.v1 import view_pb2, view_pb2_grpc

OUTPUTS = ("table", "json", "yaml")


def _add_common(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """The same options before or after the subcommand (a subcommand's copy must not reset them)."""

    def default(value):
        return argparse.SUPPRESS if suppress else value

    parser.add_argument(
        "--addr", default=default(None), help="unix:///path or host:port (default: $KVD_ADDR, then ./var/kvd.sock)"
    )
    parser.add_argument(
        "-o", "--output", choices=OUTPUTS, default=default("table"),
        help="table (default), json or yaml: the same keys in each form",
    )
    parser.add_argument("--timeout", type=float, default=default(10.0), help="seconds to wait for the daemon")
    parser.add_argument("--token", default=default(None), help="bearer token, the admin's or a tenant's (default: $KVD_TOKEN)")
    parser.add_argument("--tls-ca", type=Path, default=default(None), help="CA of the daemon's TLS certificate")
    parser.add_argument("--tls-cert", type=Path, default=default(None), help="client certificate (mutual TLS)")
    parser.add_argument("--tls-key", type=Path, default=default(None), help="client certificate's key")


CONNECT_S = 1.0  # a daemon that does not accept a connection within this is not there


def _hash(text: str) -> int:
    """A block hash as kvctl prints it, in decimal, or in hexadecimal with a 0x prefix."""
    try:
        value = int(text, 16) if text.lower().startswith("0x") else int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a block hash (decimal, or hexadecimal with 0x)") from None
    if not 0 <= value < 1 << 64:
        raise argparse.ArgumentTypeError(f"{text!r} is not a 64-bit block hash")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="kvctl", description="Operate a kvd daemon.")
    _add_common(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_common(sub.add_parser("status", help="tiers, namespaces, leases"), suppress=True)
    blocks = sub.add_parser("blocks", help="list held blocks")
    _add_common(blocks, suppress=True)
    blocks.add_argument("--namespace", "-n", default=None, help="only this namespace's blocks")
    blocks.add_argument("--limit", type=int, default=None, help="at most this many blocks")
    _add_common(sub.add_parser("check", help="validate the daemon's invariants (exit 1 if any fails)"), suppress=True)
    watch = sub.add_parser("watch", help="print the daemon's events as they happen (Ctrl-C stops)")
    _add_common(watch, suppress=True)
    watch.add_argument("--namespace", "-n", default=None, help="only this namespace's events")
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
        "evict",
        help="drop blocks from every tier: a session's own, a namespace's, or all (exit 1 if some are in use and stay)",
    )
    _add_common(evict, suppress=True)
    evict.add_argument("--namespace", "-n", help="the namespace (with --session: the session's)")
    scope = evict.add_mutually_exclusive_group()
    scope.add_argument("--session", help="only the blocks this session alone holds (needs --namespace)")
    scope.add_argument("--all", action="store_true", help="every block of every namespace")
    sessions = sub.add_parser(
        "sessions", help="sessions the daemon knows: list, show one, or announce one's next turn (ahead)"
    )
    _add_common(sessions, suppress=True)
    sessions.add_argument(
        "action", nargs="?", choices=["list", "show", "ahead"], default="list",
        help="list (default), show one session, or announce its next turn (ahead)",
    )
    sessions.add_argument("session", nargs="?", metavar="ID", help="show, ahead: the session id")
    sessions.add_argument("hashes", nargs="*", type=_hash, metavar="HASH", help="ahead: the turn's prompt hashes")
    sessions.add_argument("--namespace", "-n", default=None, help="the session's namespace (list: only this one)")
    sessions.add_argument("--in", dest="arrives_in", type=float, metavar="S", help="ahead: seconds until the turn arrives")
    for name, text in (("pin", "keep blocks where they are whatever the policy says"),
                       ("unpin", "let the policy decide about blocks again")):
        pin = sub.add_parser(name, help=text)
        _add_common(pin, suppress=True)
        pin.add_argument("--namespace", "-n", required=True, help="the blocks' namespace")
        pin.add_argument("--session", help="every block of this session's chain, instead of hashes")
        pin.add_argument("hashes", nargs="*", type=_hash, metavar="HASH", help="block hashes (decimal as `blocks` prints them, or 0x-hex)")
    policy = sub.add_parser("policy", help="the retention policy: get, or set NAME (at run time)")
    _add_common(policy, suppress=True)
    policy.add_argument("action", choices=["get", "set"], help="get the policy, or set it to NAME")
    policy.add_argument("name", nargs="?", metavar="NAME", help="set: the policy to switch to")
    drain = sub.add_parser(
        "drain",
        help="stop new stores and loads, let leases finish, write kept blocks to NVMe (health: NOT_SERVING)",
    )
    _add_common(drain, suppress=True)
    drain.add_argument("--wait", type=float, default=60.0, help="seconds for leases and NVMe writes (default 60)")
    drain.add_argument("--exit", action="store_true", help="then exit 0, as on SIGTERM (else: drained until resume)")
    _add_common(sub.add_parser("resume", help="serve again after a drain without --exit"), suppress=True)
    sync = sub.add_parser("sync", help="write every kept block to NVMe now (exit 1 if some are still pending)")
    _add_common(sync, suppress=True)
    sync.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the writes (default 60)")
    return parser


TIER_KEYS = ("name", "capacity_bytes", "used_bytes", "used_pct", "blocks", "degraded", "faults", "location", "direct_io")
NAMESPACE_KEYS = tuple(f.name for f in fields(NamespaceInfo))
CLUSTER_KEYS = tuple(f.name for f in fields(ClusterInfo))
BLOCK_KEYS = tuple(f.name for f in fields(BlockInfo))
SESSION_KEYS = (
    "namespace", "session_id", "state", "tool", "expected_pause_s", "inferred", "turns", "held_blocks", "chain_blocks",
    "idle_s",
)


def _faults(faults: list[dict]) -> str:
    """A tier's faults in a table cell: ``write ENOSPC x3, read EIO x1 (recovered)``."""
    return ", ".join(
        f"{f['op']} {f['errno']} x{f['count']}" + ("" if f["active"] else " (recovered)") for f in faults
    ) or "-"


def status_data(st: Status, serving: bool) -> dict:
    """`kvctl status`'s schema: the daemon's figures, its tiers by name, its namespaces."""
    data = {
        "version": st.version, "serving": serving, "uptime_s": st.uptime_s, "policy": st.policy, "leases": st.leases,
        "write_behind_queue": st.write_behind_queue, "recovered_blocks": st.recovered_blocks,
        "dropped_on_recovery": st.dropped_on_recovery,
    }
    data["tiers"] = {
        t.name: {
            "name": t.name, "capacity_bytes": t.capacity_bytes, "used_bytes": t.used_bytes,
            "used_pct": 100 * t.used_bytes / t.capacity_bytes if t.capacity_bytes else None, "blocks": t.blocks,
            "degraded": t.degraded, "faults": [asdict(f) for f in t.faults], "location": t.location,
            "direct_io": t.direct_io,
        }
        for t in st.tiers
    }
    data["namespaces"] = [asdict(n) for n in st.namespaces]
    if st.cluster is not None:  # a listing of one, so that the table shows it as a section
        data["cluster"] = [asdict(st.cluster)]
    return data


def cmd_status(client: Client, output: str) -> int:
    data = status_data(client.status(), client.serving())
    scalars = {k: v for k, v in data.items() if k not in ("tiers", "namespaces", "cluster")}
    parts = [
        render.record(scalars),
        "tiers:\n" + render.columns(list(data["tiers"].values()), TIER_KEYS, {"faults": _faults}),
        "namespaces:\n" + render.columns(data["namespaces"], NAMESPACE_KEYS),
    ]
    if "cluster" in data:
        parts.append("cluster:\n" + render.columns(data["cluster"], CLUSTER_KEYS))
    table = "\n\n".join(parts)
    render.emit(output, data, table)
    if not data["serving"]:
        print("kvctl: drained: stores and loads are refused until `kvctl resume`", file=sys.stderr)
    return 0


def cmd_blocks(client: Client, output: str, namespace: str | None, limit: int | None) -> int:
    rows = []
    for b in client.list_blocks(namespace):
        if limit is not None and len(rows) >= limit:
            break
        rows.append(asdict(b))
    render.emit_rows(output, rows, BLOCK_KEYS)
    return 0


def cmd_check(client: Client, output: str) -> int:
    problems = client.check()
    render.emit_record(output, {"ok": not problems, "problems": problems})
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
            tier=str(TIER_BY_CODE[body.tier]),
            nbytes=body.nbytes,
            session_id=body.session_id or None,
        )
    elif kind == "removed":
        fields.update(hash=body.hash, tier=str(TIER_BY_CODE[body.tier]), reason=body.reason)
    elif kind == "registered":
        fields.update(block_tokens=body.block_tokens, block_bytes=body.block_bytes)
    elif kind == "session":
        fields.update(session_id=body.session_id, state=body.state, tool=body.tool or None)
    return fields


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
            render.emit_event(output, _event_fields(e))
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
    render.emit_record(output, {"service": service, "status": status})
    serving = reply.status == health_pb2.HealthCheckResponse.SERVING
    return 0 if serving or (liveness and reply.status == health_pb2.HealthCheckResponse.NOT_SERVING) else 1


def cmd_evict(client: Client, output: str, namespace: str | None, session: str | None, everything: bool) -> int:
    if everything:
        if namespace:
            raise ValueError("evict: --all takes no --namespace")
        scope = "all namespaces"
        removed, remaining = client.evict(all=True)
    elif session:
        if not namespace:
            raise ValueError("evict: --session needs --namespace")
        scope = f"session {session} of {namespace}"
        removed, remaining = client.evict(namespace, session_id=session)
    elif namespace:
        scope = namespace
        removed, remaining = client.evict(namespace)
    else:
        raise ValueError("evict: give --namespace, --session with --namespace, or --all")
    render.emit_record(
        output, {"namespace": namespace, "session_id": session, "all": everything, "removed": removed, "remaining": remaining}
    )
    if remaining:
        print(f"kvctl: {remaining} blocks of {scope} are being read or moved and stay; run evict again", file=sys.stderr)
        return 1
    return 0


def cmd_sessions(
    client: Client,
    output: str,
    action: str,
    session: str | None,
    namespace: str | None,
    hashes: list[int] | None = None,
    arrives_in: float | None = None,
) -> int:
    if action == "ahead":
        return cmd_ahead(client, output, session, namespace, hashes or [], arrives_in)
    if hashes or arrives_in is not None:
        raise ValueError(f"sessions {action} takes no hashes and no --in (those are for: sessions ahead)")
    if action == "show" and not session:
        raise ValueError("sessions show: give a session id")
    if action == "list" and session:
        raise ValueError("sessions list takes no session id (use: sessions show ID)")
    infos = client.sessions(namespace, session)
    if action == "show":
        render.emit_record(output, asdict(infos[0]))
        return 0
    render.emit_rows(output, [{k: getattr(x, k) for k in SESSION_KEYS} for x in infos], SESSION_KEYS)
    return 0


def cmd_ahead(
    client: Client, output: str, session: str | None, namespace: str | None, hashes: list[int], arrives_in: float | None
) -> int:
    """Announce a session's next turn: its prompt's hashes arrive in ``arrives_in`` seconds."""
    if not session or not namespace:
        raise ValueError("sessions ahead: give the session id and --namespace")
    if not hashes:
        raise ValueError("sessions ahead: give the turn's prompt hashes")
    if arrives_in is None or not 0 <= arrives_in <= 86_400:
        raise ValueError("sessions ahead: --in must give the seconds until the turn arrives (0..86400)")
    state = client.expect_turn(namespace, session, hashes, arrives_in)
    render.emit_record(output, {"namespace": namespace, "session_id": session, "blocks": len(hashes),
                                "arrives_in_s": arrives_in, "state": state.state, "turns": state.turns})
    return 0


def cmd_pin(client: Client, output: str, unpin: bool, namespace: str, session: str | None, hashes: list[int]) -> int:
    if bool(session) == bool(hashes):
        raise ValueError(f"{'unpin' if unpin else 'pin'}: give block hashes or --session, not both or neither")
    result = (client.unpin if unpin else client.pin)(namespace, hashes, session_id=session)
    render.emit_record(output, asdict(result))
    return 0


def cmd_policy(client: Client, output: str, action: str, name: str | None) -> int:
    if action == "get":
        if name:
            raise ValueError("policy get takes no name")
        policy, available = client.policy()
    else:
        if not name:
            raise ValueError("policy set: give a policy name")
        client.set_policy(name)
        policy, available = client.policy()
    render.emit_record(output, {"policy": policy, "available": available})
    return 0


def cmd_drain(client: Client, output: str, wait: float, exit: bool) -> int:
    if wait <= 0:
        raise ValueError("drain: --wait must be positive")
    r = client.drain(wait, exit)
    render.emit_record(output, asdict(r))
    if not r.exiting:
        print("kvctl: drained: stores and loads are refused until `kvctl resume`", file=sys.stderr)
    return 1 if r.pending or r.leases else 0


def cmd_sync(client: Client, output: str, wait: float) -> int:
    if not 0 < wait <= 3600:
        raise ValueError("sync: --wait must be seconds in (0, 3600]")
    pending = client.sync(wait)
    render.emit_record(output, {"pending": pending})
    if pending:
        print(f"kvctl: {pending} blocks still pending after {wait:g} s", file=sys.stderr)
    return 1 if pending else 0


def cmd_resume(client: Client, output: str) -> int:
    was = client.resume()
    render.emit_record(output, {"was_draining": was})
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        code = _main(argv)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
        return code
    except BrokenPipeError:
        # The reader left (`kvctl status | head -1`): stop quietly, and let the interpreter's
        # last flush go nowhere instead of raising again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    address = args.addr or default_address()
    token = args.token or os.environ.get("KVD_TOKEN") or None
    try:
        if args.tls_ca or args.tls_cert or args.tls_key:
            tls = TlsFiles(args.tls_ca, args.tls_cert, args.tls_key)
        else:
            tls = TlsFiles.from_env()
        if args.command in ("health", "watch"):
            raw, channel = open_channel(address, token=token, tls=tls)
            with contextlib.closing(raw):
                if args.command == "health":
                    return cmd_health(channel, args.output, args.service, args.liveness, args.timeout)
                return cmd_watch(channel, args.output, args.namespace, args.from_seq, args.count)
        with Client(address, shared_memory=False, timeout=args.timeout, token=token, tls=tls) as client:
            if not listening(address, min(args.timeout, CONNECT_S)):
                print(f"kvctl: unavailable: no kvd daemon listens at {address}", file=sys.stderr)
                return 1
            client.wait_ready(args.timeout)
            return _run(client, args)
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


def _run(client: Client, args: argparse.Namespace) -> int:
    command, output = args.command, args.output
    if command == "status":
        return cmd_status(client, output)
    if command == "blocks":
        return cmd_blocks(client, output, args.namespace, args.limit)
    if command == "check":
        return cmd_check(client, output)
    if command == "evict":
        return cmd_evict(client, output, args.namespace, args.session, args.all)
    if command == "sessions":
        return cmd_sessions(client, output, args.action, args.session, args.namespace, args.hashes, args.arrives_in)
    if command in ("pin", "unpin"):
        return cmd_pin(client, output, command == "unpin", args.namespace, args.session, args.hashes)
    if command == "policy":
        return cmd_policy(client, output, args.action, args.name)
    if command == "drain":
        return cmd_drain(client, output, args.wait, args.exit)
    if command == "sync":
        return cmd_sync(client, output, args.wait)
    return cmd_resume(client, output)


if __name__ == "__main__":
    sys.exit(main())
