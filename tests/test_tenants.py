"""Tenants (`kvd serve --tenants FILE`) against a real daemon over TCP: tokens admit callers,
globs bound what each sees and does, the admin token and the unix socket see everything."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import grpc
import pytest

from kvd.client import Client, ClientError
from kvd.v1 import admin_pb2, admin_pb2_grpc, engine_pb2, engine_pb2_grpc, view_pb2, view_pb2_grpc

BLOCK = 4096
ACME = "acme-token-0123456789"
GLOBEX = "globex-token-0123456789"
ADMIN = "admin-token-0123456789"
TENANTS = f"""
[tenant.acme]
token = "{ACME}"
namespaces = ["acme-*"]

[tenant.globex]
token = "{GLOBEX}"
namespaces = ["globex-*", "shared"]
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_secret(path, text: str, mode: int = 0o600):
    path.write_text(text)
    path.chmod(mode)
    return path


@pytest.fixture
def tenants(daemon_factory, tmp_path):
    """A daemon with two tenants and an admin token on TCP; (daemon, tcp address)."""
    port = free_port()
    files = tmp_path / "secrets"
    files.mkdir()
    d = daemon_factory(nvme="0", extra=[
        "--tcp", f"127.0.0.1:{port}", "--tcp-insecure",
        "--tenants", str(write_secret(files / "tenants.toml", TENANTS)),
        "--admin-token-file", str(write_secret(files / "admin", ADMIN)),
    ]).start()
    return d, f"127.0.0.1:{port}"


def code_of(call, *args, **kwargs) -> grpc.StatusCode:
    try:
        call(*args, **kwargs)
    except ClientError as exc:
        return exc.code
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def test_each_tenant_uses_and_sees_only_its_namespaces(tenants):
    d, address = tenants
    secret = [os.urandom(BLOCK) for _ in range(3)]
    with Client(address, token=ACME) as acme, Client(address, token=GLOBEX) as globex:
        acme.register_namespace("acme-llama", 16, BLOCK)
        globex.register_namespace("globex-llama", 16, BLOCK)
        assert acme.store("acme-llama", [1, 2, 3], secret) == 3
        acme.session_event("acme-llama", "agent-1", "turn_start", [1, 2, 3])
        globex.store("globex-llama", [1], [os.urandom(BLOCK)])
        assert acme.load("acme-llama", [1, 2, 3]) == secret  # inline: the arena is not a tenant's
        assert acme.lookup("acme-llama", [1, 2, 3]) == ["dram"] * 3
        # Another tenant's namespace, by any call: PERMISSION_DENIED, before anything happens.
        for call, args in (
            (globex.lookup, ("acme-llama", [1])), (globex.load, ("acme-llama", [1])),
            (globex.score, ("acme-llama", [1])), (globex.register_namespace, ("acme-x", 16, BLOCK)),
            (globex.store, ("acme-llama", [9], [bytes(BLOCK)])), (globex.pin, ("acme-llama", [1])),
            (globex.evict, ("acme-llama",)), (globex.sessions, ("acme-llama",)),
            (globex.snapshot, ("acme-llama",)),
        ):
            assert code_of(call, *args) == grpc.StatusCode.PERMISSION_DENIED, call.__name__
        # What "every namespace" means for a tenant: its own.
        assert {b.namespace for b in acme.snapshot().blocks} == {"acme-llama"}
        assert set(acme.snapshot().block_tokens) == {"acme-llama"}
        assert {b.namespace for b in acme.list_blocks()} == {"acme-llama"}
        assert {s.namespace for s in acme.sessions()} == {"acme-llama"}
        status = acme.status()
        assert [n.name for n in status.namespaces] == ["acme-llama"]
        assert all(t.used_bytes == 0 and t.blocks == 0 and t.capacity_bytes > 0 for t in status.tiers)
        assert {b.namespace for b in globex.snapshot().blocks} == {"globex-llama"}
        # The operator's calls are not a tenant's.
        for call in (acme.check, acme.sync, acme.resume, lambda: acme.evict(all=True), lambda: acme.set_policy("lru")):
            assert code_of(call) == grpc.StatusCode.PERMISSION_DENIED
        assert acme.policy()[0] == "typed"  # reading the policy is allowed
        assert acme.evict("acme-llama") == (3, 0)
    # The admin token and the unix socket see every tenant's namespaces.
    with Client(address, token=ADMIN) as admin, d.client() as local:
        for c in (admin, local):
            assert {n.name for n in c.status().namespaces} == {"acme-llama", "globex-llama"}
            assert c.status().tiers[0].blocks == 1
        assert admin.check() == []


def test_watch_carries_a_tenants_own_events_only(tenants):
    d, address = tenants
    with Client(address, token=ACME) as acme, Client(address, token=GLOBEX) as globex:
        acme.register_namespace("acme-a", 16, BLOCK)
        globex.register_namespace("globex-a", 16, BLOCK)
        start = acme.snapshot().as_of_seq
        globex.store("globex-a", [7], [bytes(BLOCK)])
        acme.store("acme-a", [8], [bytes(BLOCK)])
        for batch in acme.watch(from_seq=start):
            assert {e.namespace for e in batch.events} == {"acme-a"}
            assert [e.kind for e in batch.events] == ["stored"]
            break


def test_calls_without_a_known_token_are_unauthenticated(tenants):
    d, address = tenants
    with grpc.insecure_channel(address) as ch:
        engine, view, admin = (engine_pb2_grpc.EngineStub(ch), view_pb2_grpc.ViewStub(ch), admin_pb2_grpc.AdminStub(ch))
        for metadata in ((), (("authorization", "Bearer not-a-token-of-anyone"),), (("authorization", ACME),)):
            assert code_of(engine.Lookup, engine_pb2.LookupRequest(namespace="acme-a", hashes=[1]),
                           metadata=metadata, timeout=10) == grpc.StatusCode.UNAUTHENTICATED
            assert code_of(view.Snapshot, view_pb2.SnapshotRequest(), metadata=metadata, timeout=10) \
                == grpc.StatusCode.UNAUTHENTICATED
            assert code_of(admin.Status, admin_pb2.StatusRequest(), metadata=metadata, timeout=10) \
                == grpc.StatusCode.UNAUTHENTICATED
        # A tenant's slot calls are refused: the arena is every tenant's.
        good = (("authorization", f"Bearer {ACME}"),)
        assert code_of(engine.GetArena, engine_pb2.GetArenaRequest(), metadata=good, timeout=10) \
            == grpc.StatusCode.PERMISSION_DENIED
        assert code_of(engine.PrepareLoad, engine_pb2.PrepareLoadRequest(namespace="acme-a", hashes=[1]),
                       metadata=good, timeout=10) == grpc.StatusCode.PERMISSION_DENIED
    assert "refused /kvd.v1.Engine/Lookup" in d.log()


def test_unix_tenants_makes_the_socket_need_tokens_too(daemon_factory, tmp_path):
    path = write_secret(tmp_path / "tenants.toml", TENANTS)
    d = daemon_factory(nvme="0", extra=["--tenants", str(path), "--unix-tenants"]).start()
    with d.client() as anonymous:
        assert code_of(anonymous.lookup, "acme-a", [1]) == grpc.StatusCode.UNAUTHENTICATED
    with d.client(token=ACME) as acme:
        acme.register_namespace("acme-a", 16, BLOCK)
        assert acme.store("acme-a", [1], [b"z" * BLOCK]) == 1  # inline, on the unix socket
        assert acme.load("acme-a", [1]) == [b"z" * BLOCK]
        assert code_of(acme.register_namespace, "globex-a", 16, BLOCK) == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize("text, mode, message", [
    (TENANTS, 0o644, "mode 0644; it holds tokens, make it 0600"),
    ("[tenant.a]\ntoken = 'short'\nnamespaces = ['a-*']\n", 0o600, "tenant.a.token must be at least 16"),
    ("[tenant.a\n", 0o600, "not valid TOML"),
    (f"[tenant.a]\ntoken = '{ACME}'\n", 0o600, "tenant.a.namespaces must be a non-empty list"),
    (f"[tenant.a]\ntoken = '{ACME}'\nnamespaces = ['a']\n[tenant.b]\ntoken = '{ACME}'\nnamespaces = ['b']\n", 0o600,
     "tenants a and b share a token"),
    (f"[tenant.a]\ntoken = '{ACME}'\nnamespaces = ['a']\ncolor = 1\n", 0o600, "unknown key 'color'"),
    ("[tenants.a]\n", 0o600, "unknown table or key 'tenants'"),
])
def test_a_bad_tenants_file_is_one_line_and_exit_2(tmp_path, text, mode, message):
    path = write_secret(tmp_path / "t.toml", text, mode)
    r = subprocess.run(
        [sys.executable, "-m", "kvd.cli.kvd_main", "serve", "--socket", str(tmp_path / "s.sock"), "--nvme-bytes", "0",
         "--shm-dir", str(tmp_path / "shm"), "--tenants", str(path)],
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 2, r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith(f"kvd serve: --tenants {path}: ") and message in line, line
    assert not (tmp_path / "shm").exists()


def test_unix_tenants_without_tenants_is_refused(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "kvd.cli.kvd_main", "serve", "--socket", str(tmp_path / "s.sock"), "--unix-tenants"],
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 2 and r.stderr.strip() == "kvd serve: --unix-tenants needs --tenants"


def test_a_router_follows_a_tenant_daemon_with_a_token(tenants):
    """GlobalView over TCP: with the admin token it sees every tenant; with a tenant's, its own."""
    from kvd.router import GlobalView

    d, address = tenants
    with Client(address, token=ACME) as acme, Client(address, token=GLOBEX) as globex:
        acme.register_namespace("acme-r", 16, BLOCK)
        globex.register_namespace("globex-r", 16, BLOCK)
        acme.store("acme-r", [1, 2], [bytes(BLOCK)] * 2)
        globex.store("globex-r", [1, 2], [bytes(BLOCK)] * 2)
        snap = acme.snapshot()
    for token, sees in ((ADMIN, {"acme-r", "globex-r"}), (ACME, {"acme-r"})):
        with GlobalView([address], token=token) as view:
            assert view.wait_for(address, snap.epoch, snap.as_of_seq, timeout=30)
            seen = {ns for ns in ("acme-r", "globex-r") if view.score(ns, [1, 2]).best == address}
            assert seen == sees, token
