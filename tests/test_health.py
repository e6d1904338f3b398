"""gRPC health checking (grpc.health.v1) of the real daemon, and `kvctl health`, the probe the
DaemonSet runs (deploy/base/daemonset.yaml): SERVING on the unix socket and on TCP once
recovery is done, NOT_SERVING through :meth:`Daemon.set_serving` (what a drain calls) and from
the moment a stop begins, and a probe that fails fast and within its deadline."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvd.server.config import ServeConfig
from kvd.server.daemon import SERVICES, Daemon

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check(address: str, service: str = "") -> int:
    with grpc.insecure_channel(address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5
        ).status


class HealthWatch:
    """A health Watch stream read on a thread; ``statuses`` fills as updates arrive."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address)
        self.stream = health_pb2_grpc.HealthStub(self.channel).Watch(health_pb2.HealthCheckRequest(), timeout=60)
        self.statuses: list[int] = []
        self.ended: grpc.StatusCode | None = None
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for reply in self.stream:
                self.statuses.append(reply.status)
        except grpc.RpcError as exc:
            self.ended = exc.code()

    def close(self) -> None:
        self.stream.cancel()
        self.thread.join(timeout=10)
        self.channel.close()


class InProcessDaemon:
    """kvd's own Daemon (the object `kvd serve` runs) on an event loop in a thread of the test,
    so the test can call :meth:`Daemon.set_serving` as a drain will, while clients — the real
    `kvctl` process included — talk to it over its unix socket."""

    def __init__(self, root: Path) -> None:
        self.config = ServeConfig(
            socket=root / "kvd.sock", dram_bytes=16 << 20, nvme_bytes=0, nvme_dir=root / "nvme", shm_dir=root / "shm"
        )
        self.address = f"unix://{self.config.socket}"
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="kvd-loop", daemon=True)
        self.daemon: Daemon | None = None

    def call(self, coro, timeout: float = 30.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def __enter__(self) -> InProcessDaemon:
        self.thread.start()

        async def start() -> Daemon:
            daemon = Daemon(self.config)  # made on the loop: the health servicer's conditions live there
            await daemon.start()
            return daemon

        self.daemon = self.call(start())
        return self

    def stop(self) -> None:
        daemon, self.daemon = self.daemon, None
        if daemon is not None:
            self.call(daemon.stop(grace_s=0.5))

    def __exit__(self, *exc) -> None:
        async def cancel_the_rest() -> None:  # e.g. grpc's own waiters: no task outlives the loop
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            self.stop()
            self.call(cancel_the_rest())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=30)
            self.loop.close()


@pytest.fixture
def inproc(tmp_path):
    with InProcessDaemon(tmp_path) as d:
        yield d


def test_serving_on_the_unix_socket_and_on_tcp(daemon_factory, kvctl):
    port = _free_port()
    d = daemon_factory(nvme="0", extra=["--tcp", f"127.0.0.1:{port}", "--tcp-insecure"]).start()
    for address in (d.address, f"127.0.0.1:{port}"):
        for service in ("", *SERVICES):
            assert _check(address, service) == SERVING, (address, service)
        r = kvctl(address, "health")
        assert (r.returncode, r.stdout, r.stderr) == (0, "service: -\nstatus: SERVING\n", "")
        r = kvctl(address, "health", "--service", "kvd.v1.Engine", "-o", "json")
        assert r.returncode == 0 and json.loads(r.stdout) == {"service": "kvd.v1.Engine", "status": "SERVING"}


def test_the_first_serving_answer_comes_after_recovery(daemon_factory):
    """A readiness probe's SERVING means the NVMe tier's blocks are already served: the
    restarted daemon answers SERVING only once recovery has re-entered every one of them."""
    d = daemon_factory(dram="16MiB", nvme="64MiB").start()
    n = 200
    blocks = [os.urandom(4096) for _ in range(n)]
    with d.client() as c:
        c.register_namespace("m", 16, 4096)
        assert c.store("m", list(range(1, n + 1)), blocks) == n
        assert c.sync() == 0  # every block durable on NVMe
    d.kill(signal.SIGKILL)
    d.start()  # returns at the first SERVING answer (conftest polls the health service)
    with d.client() as c:
        assert c.status().recovered_blocks == n
        assert c.lookup("m", list(range(1, n + 1))) == ["nvme"] * n


def test_set_serving_reaches_checks_watchers_and_the_probe(inproc, kvctl):
    watch = HealthWatch(inproc.address)
    try:
        deadline = time.monotonic() + 10
        while watch.statuses != [SERVING] and time.monotonic() < deadline:
            time.sleep(0.02)  # polling the watcher thread's list, not a race fix
        assert watch.statuses == [SERVING]

        inproc.call(inproc.daemon.set_serving(False))
        for service in ("", *SERVICES):
            assert _check(inproc.address, service) == NOT_SERVING, service
        r = kvctl(inproc.address, "health")
        assert (r.returncode, r.stdout) == (1, "service: -\nstatus: NOT_SERVING\n")
        r = kvctl(inproc.address, "health", "--liveness")  # draining is alive: no restart
        assert (r.returncode, r.stdout) == (0, "service: -\nstatus: NOT_SERVING\n")

        inproc.call(inproc.daemon.set_serving(True))
        assert _check(inproc.address) == SERVING
        assert kvctl(inproc.address, "health").returncode == 0
        deadline = time.monotonic() + 10
        while len(watch.statuses) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert watch.statuses == [SERVING, NOT_SERVING, SERVING]
    finally:
        watch.close()


def test_a_stop_says_not_serving_for_good(inproc):
    """Watchers hear NOT_SERVING when a stop begins, and a set_serving(True) that races the
    stop cannot bring SERVING back."""
    watch = HealthWatch(inproc.address)
    deadline = time.monotonic() + 10
    while not watch.statuses and time.monotonic() < deadline:
        time.sleep(0.02)
    assert watch.statuses == [SERVING]
    daemon = inproc.daemon
    inproc.stop()
    watch.thread.join(timeout=10)
    assert watch.statuses == [SERVING, NOT_SERVING]
    assert watch.ended is not None  # the stream ended with the server
    watch.close()

    inproc.call(daemon.set_serving(True))
    reply = inproc.call(daemon.health.Check(health_pb2.HealthCheckRequest(), None))
    assert reply.status == NOT_SERVING


def test_probe_fails_fast_when_the_socket_is_missing(tmp_path, kvctl):
    """No daemon (down, or still recovering before it listens): the probe fails at once,
    not after waiting out its timeout for the socket to appear."""
    start = time.monotonic()
    r = kvctl(f"unix://{tmp_path}/kvd.sock", "--timeout", "30", "health")
    assert r.returncode == 1
    assert r.stdout == "" and r.stderr.startswith("kvctl: unavailable:")
    assert time.monotonic() - start < 15


def test_probe_of_an_unknown_service_fails(daemon, kvctl):
    r = kvctl(daemon, "health", "--service", "kvd.v1.Nothing")
    assert r.returncode == 1
    assert r.stderr.strip() == "kvctl: not_found: the daemon reports no health for service 'kvd.v1.Nothing'"


def test_liveness_probe_fails_on_a_hung_daemon(daemon, kvctl):
    """A daemon that cannot answer within the probe's deadline fails liveness (the kubelet
    restarts it); the same daemon answering again passes."""
    daemon.proc.send_signal(signal.SIGSTOP)
    try:
        start = time.monotonic()
        r = kvctl(daemon, "--timeout", "1", "health", "--liveness")
        assert r.returncode == 1
        assert r.stderr.startswith("kvctl: deadline_exceeded:")
        assert time.monotonic() - start < 10
    finally:
        daemon.proc.send_signal(signal.SIGCONT)
    r = kvctl(daemon, "health", "--liveness")
    assert (r.returncode, r.stdout) == (0, "service: -\nstatus: SERVING\n")
