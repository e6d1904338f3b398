"""A mooncake_master on free ports of this machine, for tests and ``kvd bench cluster``.

Its clients reach it at 127.0.0.1; Mooncake 0.3.13 binds its RPC and metadata ports on every
interface whatever the host flag says, so run it where those ports are not exposed.

Its HTTP metadata server runs in the same process (``--enable_http_metadata_server``), so one
process is the whole control plane of a cluster on one machine. The binary comes with the
``cluster`` extra (``mooncake-transfer-engine-non-cuda``), beside the Python interpreter.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def master_binary() -> str | None:
    """The mooncake_master beside this interpreter, else on PATH; None without one."""
    beside = Path(sys.executable).with_name("mooncake_master")
    return str(beside) if beside.exists() else shutil.which("mooncake_master")


class LocalMaster:
    """``mooncake_master`` as a child process. Its ports stay the same across
    :meth:`restart`, as a master restarted by Kubernetes keeps its Service address.
    ``client_ttl_s``: how long after a node's last heartbeat the master drops its segment."""

    def __init__(self, log_path: Path | None = None, client_ttl_s: int = 10) -> None:
        binary = master_binary()
        if binary is None:
            raise FileNotFoundError("mooncake_master is not installed (pip install 'kvd[cluster]')")
        self.rpc_port, self.http_port, self.metrics_port = free_port(), free_port(), free_port()
        self.log_path = log_path
        self.args = [
            binary, "--rpc_port", str(self.rpc_port),
            "--enable_http_metadata_server=true", "--http_metadata_server_host", "127.0.0.1",
            "--http_metadata_server_port", str(self.http_port),
            "--metrics_host", "127.0.0.1", "--metrics_port", str(self.metrics_port),
            "--client_ttl", str(client_ttl_s),
        ]
        self.proc: subprocess.Popen | None = None

    @property
    def master(self) -> str:
        return f"127.0.0.1:{self.rpc_port}"

    @property
    def metadata(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/metadata"

    def start(self, timeout_s: float = 30.0) -> LocalMaster:
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115 - the child owns it
        self.proc = subprocess.Popen(self.args, stdout=out, stderr=subprocess.STDOUT)
        if self.log_path:
            out.close()
        deadline = time.monotonic() + timeout_s
        while not self._answers():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"mooncake_master did not start (exit {self.proc.returncode})")
            time.sleep(0.05)  # polling while the master starts
        return self

    def _answers(self) -> bool:
        try:
            urllib.request.urlopen(f"{self.metadata}?key=kvd-probe", timeout=1).close()
        except urllib.error.HTTPError:
            return True  # 404: the metadata server is up
        except OSError:
            return False
        return True

    def kill(self) -> None:
        """kill -9: the cluster's metadata goes with it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def restart(self) -> LocalMaster:
        self.kill()
        return self.start()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> LocalMaster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
