"""The daemon's gRPC surface: health checking, server reflection, socket mode, TCP."""

from __future__ import annotations

import os
import socket
import stat

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from kvd.client import Client


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_health_reports_each_service_serving(daemon):
    with grpc.insecure_channel(daemon.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "kvd.v1.Engine", "kvd.v1.Admin", "kvd.v1.View"):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, service


def test_reflection_lists_the_api(daemon):
    with grpc.insecure_channel(daemon.address) as channel:
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {"kvd.v1.Engine", "kvd.v1.Admin", "kvd.v1.View", "grpc.health.v1.Health"} <= services


def test_unix_socket_is_group_accessible_only(daemon):
    mode = stat.S_IMODE(os.stat(daemon.socket).st_mode)
    assert mode == 0o660


def test_tcp_listener_serves_inline(daemon_factory):
    port = _free_port()
    d = daemon_factory(extra=["--tcp", f"127.0.0.1:{port}", "--tcp-insecure"]).start()
    with Client(f"127.0.0.1:{port}", shared_memory=False) as c:
        c.register_namespace("m", 16, 4096)
        blocks = [os.urandom(4096) for _ in range(3)]
        assert c.store("m", [1, 2, 3], blocks) == 3
        assert c.lookup("m", [1, 2, 3, 4]) == ["dram"] * 3
        assert c.load("m", [1, 2, 3]) == blocks
    with d.client() as local:
        assert local.shared_memory
        assert local.load("m", [2]) == [blocks[1]]


def test_sigterm_exits_cleanly_and_removes_socket_and_arena(daemon):
    arenas = list(daemon.shm_dir.iterdir())
    assert len(arenas) == 1
    assert daemon.kill(15) == 0
    assert not daemon.socket.exists()
    assert list(daemon.shm_dir.iterdir()) == []
