"""Security of a real daemon: the unix socket's mode and group, TCP only with TLS (or an
explicit --tcp-insecure), mutual TLS, the admin bearer token over TCP, and namespaces that
never reveal one tenant's blocks to another."""

from __future__ import annotations

import datetime
import grp
import ipaddress
import os
import socket as socketlib
import stat
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from kvd.client import Client, ClientError, TlsFiles
from kvd.v1 import admin_pb2, admin_pb2_grpc

BLOCK = 4096


def _free_port() -> int:
    with socketlib.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _key():
    return ec.generate_private_key(ec.SECP256R1())


def _cert(subject: str, key, issuer_name, issuer_key, ca: bool, sans=()):
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer_name or x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path: Path, cert=None, key=None) -> Path:
    if cert is not None:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    else:
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    return path


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1/localhost, a client certificate from that CA,
    and a client certificate from a rogue CA."""
    d = tmp_path_factory.mktemp("pki")
    out = {}
    for ca_name in ("ca", "rogue"):
        ca_key = _key()
        ca = _cert(f"kvd test {ca_name}", ca_key, None, ca_key, ca=True)
        out[ca_name] = _write(d / f"{ca_name}.pem", cert=ca)
        client_key = _key()
        client = _cert(f"client of {ca_name}", client_key, ca.subject, ca_key, ca=False)
        out[f"{ca_name}_client"] = _write(d / f"{ca_name}-client.pem", cert=client)
        out[f"{ca_name}_client_key"] = _write(d / f"{ca_name}-client.key", key=client_key)
        if ca_name == "ca":
            server_key = _key()
            sans = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            server = _cert("kvd", server_key, ca.subject, ca_key, ca=False, sans=sans)
            out["server"] = _write(d / "server.pem", cert=server)
            out["server_key"] = _write(d / "server.key", key=server_key)
    return out


def tls_daemon(daemon_factory, pki, *extra: str):
    port = _free_port()
    args = ["--tcp", f"127.0.0.1:{port}", "--tls-cert", str(pki["server"]), "--tls-key", str(pki["server_key"])]
    d = daemon_factory(nvme="0", extra=[*args, *extra]).start()
    return d, f"127.0.0.1:{port}"


def roundtrip(client: Client) -> None:
    client.register_namespace("m", 16, BLOCK)
    data = [os.urandom(BLOCK) for _ in range(2)]
    assert client.store("m", [1, 2], data) in (0, 2)
    assert client.load("m", [1, 2]) is not None


def refused(address: str, **kwargs) -> grpc.StatusCode:
    with Client(address, shared_memory=False, timeout=5, **kwargs) as c:
        with pytest.raises(ClientError) as info:
            c.register_namespace("m", 16, BLOCK)
    return info.value.code


# -- the unix socket --------------------------------------------------------------------------
def test_the_socket_is_0660_and_owned_by_the_configured_group(daemon_factory):
    if os.geteuid() != 0:
        pytest.skip("giving the socket to another group needs root (CI runs as root)")
    other = next(g for g in grp.getgrall() if g.gr_gid != os.getegid())
    d = daemon_factory(nvme="0", extra=["--socket-group", other.gr_name]).start()
    st = os.stat(d.socket)
    assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == other.gr_gid
    d.stop()
    d2 = daemon_factory(nvme="0", extra=["--socket-group", str(other.gr_gid)]).start()
    assert os.stat(d2.socket).st_gid == other.gr_gid


def serve_error(tmp_path: Path, *args: str) -> str:
    r = subprocess.run(
        [sys.executable, "-m", "kvd.cli.kvd_main", "serve", "--socket", str(tmp_path / "s.sock"),
         "--nvme-bytes", "0", "--shm-dir", str(tmp_path / "shm"), *args],
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 2, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and not (tmp_path / "s.sock").exists(), r.stderr
    return lines[0]


def test_security_settings_are_checked_before_serving(tmp_path, pki):
    cert, key = str(pki["server"]), str(pki["server_key"])
    cases = [
        (["--tcp", "127.0.0.1:1"], "--tcp needs --tls-cert and --tls-key (or --tcp-insecure on a trusted network)"),
        (["--tcp", "127.0.0.1:1", "--tls-cert", cert], "--tls-cert and --tls-key go together"),
        (["--tls-cert", cert, "--tls-key", key], "--tls-cert is for TCP: add --tcp HOST:PORT"),
        (["--tcp", "127.0.0.1:1", "--tls-cert", cert, "--tls-key", str(tmp_path / "nope.key")],
         f"--tls-key: no such file {tmp_path / 'nope.key'}"),
        (["--tcp", "127.0.0.1:1", "--tls-client-ca", str(pki["ca"]), "--tcp-insecure"],
         "--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key"),
        (["--socket-group", "no-such-group-kvd"], "--socket-group: no group named 'no-such-group-kvd'"),
        (["--admin-token-file", str(tmp_path / "none")], f"--admin-token-file: no such file {tmp_path / 'none'}"),
    ]
    for args, message in cases:
        assert serve_error(tmp_path, *args) == f"kvd serve: {message}", args
    empty = tmp_path / "empty-token"
    empty.write_text("\n")
    assert serve_error(tmp_path, "--admin-token-file", str(empty)) == (
        f"kvd serve: --admin-token-file: {empty} is empty"
    )


# -- TLS and mutual TLS -----------------------------------------------------------------------
def test_tcp_with_tls_serves_clients_that_trust_its_ca_only(daemon_factory, pki):
    d, address = tls_daemon(daemon_factory, pki)
    with Client(address, shared_memory=False, tls=TlsFiles(ca=pki["ca"])) as c:
        roundtrip(c)
    assert refused(address) == grpc.StatusCode.UNAVAILABLE  # plaintext to a TLS port
    assert refused(address, tls=TlsFiles(ca=pki["rogue"])) == grpc.StatusCode.UNAVAILABLE  # untrusted server


def test_mutual_tls_demands_a_client_certificate_from_its_ca(daemon_factory, pki):
    d, address = tls_daemon(daemon_factory, pki, "--tls-client-ca", str(pki["ca"]))
    mine = TlsFiles(ca=pki["ca"], cert=pki["ca_client"], key=pki["ca_client_key"])
    with Client(address, shared_memory=False, tls=mine) as c:
        roundtrip(c)
    assert refused(address, tls=TlsFiles(ca=pki["ca"])) == grpc.StatusCode.UNAVAILABLE
    rogue = TlsFiles(ca=pki["ca"], cert=pki["rogue_client"], key=pki["rogue_client_key"])
    assert refused(address, tls=rogue) == grpc.StatusCode.UNAVAILABLE
    with d.client() as local:  # the unix socket stays plain
        assert local.lookup("m", [1, 2]) == ["dram", "dram"]


def test_a_router_follows_a_tls_daemon(daemon_factory, pki):
    from kvd.router import GlobalView

    d, address = tls_daemon(daemon_factory, pki)
    with d.client() as local:
        local.register_namespace("m", 16, BLOCK)
        local.store("m", [1, 2], [os.urandom(BLOCK) for _ in range(2)])
        snap = local.snapshot()
    with GlobalView([address], tls=TlsFiles(ca=pki["ca"])) as view:
        assert view.wait_for(address, snap.epoch, snap.as_of_seq, timeout=30)
        assert view.score("m", [1, 2]).nodes[address].matched_blocks == 2


# -- the admin token ----------------------------------------------------------------------------
def admin_status(address: str, pki, token: str | None) -> grpc.StatusCode:
    with Client(address, shared_memory=False, timeout=5, tls=TlsFiles(ca=pki["ca"]), token=token) as c:
        try:
            c.status()
        except ClientError as exc:
            return exc.code
    return grpc.StatusCode.OK


def test_admin_over_tcp_needs_the_bearer_token(daemon_factory, pki, tmp_path, kvctl):
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n")
    d, address = tls_daemon(daemon_factory, pki, "--admin-token-file", str(token_file))
    assert admin_status(address, pki, None) == grpc.StatusCode.UNAUTHENTICATED
    assert admin_status(address, pki, "wrong") == grpc.StatusCode.UNAUTHENTICATED
    assert admin_status(address, pki, "s3cret-token") == grpc.StatusCode.OK
    with Client(address, shared_memory=False, tls=TlsFiles(ca=pki["ca"])) as c:
        roundtrip(c)  # Engine calls need no token
    with d.client() as local:
        assert local.status().policy == "typed"  # the unix socket needs none
    env = {**os.environ, "KVD_TLS_CA": str(pki["ca"])}
    base = [sys.executable, "-m", "kvd.cli.kvctl", "--addr", address]
    r = subprocess.run([*base, "drain"], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 1 and r.stderr.splitlines() == [
        "kvctl: unauthenticated: Admin over TCP needs 'authorization: Bearer <token>'"
    ]
    r = subprocess.run([*base, "policy", "set", "lru"], capture_output=True, text=True,
                       env={**env, "KVD_TOKEN": "s3cret-token"}, timeout=60)
    assert (r.returncode, r.stdout.splitlines()[0]) == (0, "policy: lru"), r.stderr
    r = subprocess.run([*base, "--token", "nope", "status"], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 1 and r.stderr.splitlines() == ["kvctl: unauthenticated: wrong admin token"]
    assert "refused /kvd.v1.Admin/Status from ipv4:127.0.0.1" in d.log()


def test_without_a_token_file_admin_is_unix_socket_only(daemon_factory):
    port = _free_port()
    d = daemon_factory(nvme="0", extra=["--tcp", f"127.0.0.1:{port}", "--tcp-insecure"]).start()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = admin_pb2_grpc.AdminStub(ch)
        with pytest.raises(grpc.RpcError) as info:
            stub.Drain(admin_pb2.DrainRequest(timeout_s=1), metadata=[("authorization", "Bearer anything")])
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "--admin-token-file" in info.value.details()
    with d.client() as local:
        assert local.resume() is False  # nothing was drained over TCP


def test_the_engine_api_over_tcp_needs_no_admin_token(daemon_factory):
    """A client that did not register the namespace itself (a second engine) stores and loads
    over TCP without the admin token: the block size comes from the View API."""
    port = _free_port()
    d = daemon_factory(nvme="0", extra=["--tcp", f"127.0.0.1:{port}", "--tcp-insecure"]).start()
    with d.client() as local:
        local.register_namespace("m", 16, BLOCK)
        local.store("m", [1, 2], [b"a" * BLOCK, b"b" * BLOCK])
    from kvd.client import Client

    with Client(f"127.0.0.1:{port}") as remote:
        assert remote.load("m", [1, 2, 3]) == [b"a" * BLOCK, b"b" * BLOCK, None]
        assert remote.lookup("m", [1, 2]) == ["dram", "dram"]
    with Client(f"127.0.0.1:{port}") as remote:
        with pytest.raises(Exception) as info:
            remote.load("nope", [1])
        assert "not registered" in str(info.value)


# -- namespaces isolate tenants -------------------------------------------------------------------
def test_no_lookup_load_score_or_listing_crosses_namespaces(daemon):
    secret = [os.urandom(BLOCK) for _ in range(3)]
    with daemon.client() as a, daemon.client() as b:
        a.register_namespace("tenant-a", 16, BLOCK)
        b.register_namespace("tenant-b", 16, BLOCK)
        assert a.store("tenant-a", [1, 2, 3], secret) == 3
        assert b.lookup("tenant-b", [1, 2, 3]) == []
        assert b.load("tenant-b", [1, 2, 3]) == [None, None, None]
        score = b.score("tenant-b", [1, 2, 3])
        assert (score.matched_blocks, score.by_tier) == (0, {})
        assert b.snapshot("tenant-b").blocks == []
        assert [x.namespace for x in b.list_blocks("tenant-b")] == []
        assert b.pin("tenant-b", [1, 2, 3]).not_held == 3
        # The same hashes in tenant b are b's own blocks: stored again, read back as b's bytes.
        mine = [os.urandom(BLOCK) for _ in range(3)]
        assert b.store("tenant-b", [1, 2, 3], mine) == 3
        assert b.load("tenant-b", [1, 2, 3]) == mine
        assert a.load("tenant-a", [1, 2, 3]) == secret
        b.session_event("tenant-b", "s", "turn_start", hashes=[1, 2, 3])
        sessions = b.sessions("tenant-b")  # b's own (hinted "s", and the one inferred from its store)
        assert {x.namespace for x in sessions} == {"tenant-b"} and "s" in {x.session_id for x in sessions}
        assert b.evict("tenant-b") == (3, 0)
        assert a.load("tenant-a", [1, 2, 3]) == secret


def test_a_connection_that_never_speaks_is_closed(daemon):
    """A client that connects and sends nothing holds a descriptor only until the handshake
    deadline (5 s); thousands of them do not pile up."""
    import socket
    import time

    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    raw.connect(str(daemon.socket))
    raw.settimeout(60)
    t0 = time.monotonic()
    try:
        data = raw.recv(4096)
        while data:  # the server's own preface and settings frames, then the close
            data = raw.recv(4096)
    except ConnectionResetError:
        pass
    finally:
        raw.close()
    assert time.monotonic() - t0 < 30
    with daemon.client() as c:
        c.register_namespace("m", 16, 4096)  # and the daemon serves others meanwhile
