"""Shared fixtures: a real `kvd serve` process per test, on a private socket and directory."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvd.client import Client

START_TIMEOUT_S = 60.0


class DaemonProcess:
    """`kvd serve` as a child process; the same socket and NVMe directory across restarts."""

    def __init__(self, root: Path, dram: str = "64MiB", nvme: str = "256MiB", extra: list[str] | None = None) -> None:
        self.root = root
        self.socket = root / "kvd.sock"
        self.nvme_dir = root / "nvme"
        self.shm_dir = root / "shm"
        self.log_path = root / "kvd.log"
        self.args = [
            sys.executable, "-m", "kvd.cli.kvd_main", "serve",
            "--socket", str(self.socket),
            "--dram-bytes", dram,
            "--nvme-dir", str(self.nvme_dir),
            "--nvme-bytes", nvme,
            "--shm-dir", str(self.shm_dir),
            "--slab-bytes", "64MiB",
            *(extra or []),
        ]
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"unix://{self.socket}"

    def start(self) -> DaemonProcess:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.wait_serving()
        return self

    def wait_serving(self) -> None:
        """Poll the gRPC health service until SERVING (bounded; fails with the daemon's log)."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"kvd exited with {self.proc.returncode}:\n{self.log()}")
            if self.socket.exists():
                with grpc.insecure_channel(self.address) as channel:
                    try:
                        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
                        if reply.status == health_pb2.HealthCheckResponse.SERVING:
                            return
                    except grpc.RpcError:
                        pass
            time.sleep(0.05)  # polling interval while the process starts, not a race fix
        raise RuntimeError(f"kvd did not start within {START_TIMEOUT_S}s:\n{self.log()}")

    def kill(self, sig: int = signal.SIGKILL) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=30)

    def restart(self) -> DaemonProcess:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()
        return self.start()

    def client(self, **kwargs) -> Client:
        return Client(self.address, **kwargs)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def daemon_factory(tmp_path):
    started: list[DaemonProcess] = []

    def make(**kwargs) -> DaemonProcess:
        d = DaemonProcess(tmp_path / f"d{len(started)}", **kwargs)
        d.root.mkdir()
        started.append(d)
        return d

    yield make
    for d in started:
        d.stop()


@pytest.fixture
def daemon(daemon_factory) -> DaemonProcess:
    return daemon_factory().start()


def run_kvctl(address: str, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    """The real `kvctl` CLI in a child process: ``kvctl --addr ADDRESS ARGS...``."""
    return subprocess.run(
        [sys.executable, "-m", "kvd.cli.kvctl", "--addr", address, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def kvctl():
    """``kvctl(daemon_or_address, *args)`` -> CompletedProcess of the real CLI."""

    def run(target, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
        address = target.address if isinstance(target, DaemonProcess) else str(target)
        return run_kvctl(address, *args, timeout=timeout)

    return run


def wait_until(predicate, timeout: float = 10.0, what: str = "condition", interval: float = 0.05):
    """Poll ``predicate`` until it returns a truthy value (returned); AssertionError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)  # polling interval of an observable condition, not a race fix


@pytest.fixture(name="wait_until")
def wait_until_fixture():
    return wait_until


def pytest_collection_modifyitems(config, items):
    if os.environ.get("KVD_GPU") or _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


@pytest.fixture(scope="session")
def redis_server():
    """A real redis-server on a loopback port for the session (skips without one)."""
    from kvd.bench.redis_server import loopback_redis

    with loopback_redis(start_timeout_s=30) as client:
        if client is None:
            pytest.skip("redis-server is not installed (.ci/run installs Debian's package)")
        yield client
