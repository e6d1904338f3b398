"""The daemon's configuration: one typed dataclass, filled from `kvd serve` flags."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

GiB = 1 << 30
MAX_UNIX_PATH = 107  # bytes of a unix socket's path (sun_path holds 108 with its NUL)
# The fault plan is a test and chaos facility: refused unless this variable is "1", so that
# no production config file or stray KVD_FAULT_PLAN turns fault injection on by accident.
ALLOW_FAULTS_ENV = "KVD_ALLOW_FAULTS"
KV_EVENT_ENCODINGS = ("array", "map")  # kvd serve --kv-events-encoding
CLUSTER_PROTOCOLS = ("tcp", "rdma")  # kvd serve --cluster-protocol


@dataclass(frozen=True)
class ServeConfig:
    """Everything `kvd serve` needs. Sizes are bytes, times seconds."""

    socket: Path = Path("var/kvd.sock")
    dram_bytes: int = 1 * GiB
    hbm_bytes: int = 0  # daemon-owned GPU pool; 0: none (and none without CUDA)
    hbm_device: str = "cuda"  # cuda, cuda:N, or cpu: a host-memory stand-in that runs the HBM path (tests)
    nvme_dir: Path = Path("var/kvd")
    nvme_bytes: int = 4 * GiB
    tcp: str | None = None  # HOST:PORT, off unless asked for; TLS unless tcp_insecure
    tls_cert: Path | None = None  # PEM certificate (chain) the daemon presents on TCP
    tls_key: Path | None = None  # its private key
    tls_client_ca: Path | None = None  # mutual TLS: TCP clients must present a certificate it signed
    tcp_insecure: bool = False  # TCP without TLS: a trusted network only (tests, a loopback router)
    admin_token_file: Path | None = None  # Admin calls over TCP need `authorization: Bearer <its content>`
    tenants: Path | None = None  # TOML of [tenant.NAME] token + namespace globs (mode 0600): calls need a token
    unix_tenants: bool = False  # with tenants: the unix socket needs tokens too (else it is the operator's)
    socket_group: str | None = None  # group (name or gid) owning the unix socket, mode 0660; None: the daemon's
    metrics_port: int | None = None  # Prometheus /metrics over HTTP; None or 0: off
    metrics_host: str = "0.0.0.0"  # every interface: a Prometheus in the cluster scrapes the pod
    shm_dir: Path = Path("/dev/shm")  # where the DRAM arena file lives
    policy: str = "typed"
    lease_seconds: float = 30.0
    write_behind: bool = True
    page_bytes: int = 4096
    slab_bytes: int = 1 * GiB
    io_threads: int = 8
    verify_on_start: bool = True  # read every recovered NVMe block and check its checksum
    event_buffer: int = 100_000  # events kept for Watch streams to resume from
    dram_to_hbm_gbps: float = 25.0  # GB/s: the cost model of Score's estimated load time
    nvme_to_dram_gbps: float = 6.0
    kv_events: str | None = None  # ZMQ endpoint of the vLLM-format publisher; off unless asked for
    kv_events_replay: str | None = None  # ZMQ endpoint of its replay ROUTER socket
    kv_events_buffer: int = 10_000  # published messages kept for replay
    kv_events_pod: str | None = None  # the <pod> of topic kv@<pod>@<model> by default; None: the host name
    kv_events_encoding: str = "array"  # array (llm-d reads it) or map (vLLM 0.33's own bytes)
    log_level: str = "INFO"  # DEBUG, INFO, WARNING, ERROR
    log_format: str = "text"  # text, or json: one object per line with the request id
    drain_seconds: float = 25.0  # SIGTERM: time for leases to finish and kept blocks to reach NVMe
    room_wait_seconds: float = 10.0  # a store or load waits at most this long for DRAM room, then RESOURCE_EXHAUSTED
    cluster_master: str | None = None  # HOST:PORT of a mooncake_master: join its cluster tier; None: no cluster tier
    cluster_metadata: str | None = None  # the transfer engine's metadata server (http://HOST:PORT/metadata)
    cluster_bytes: int = 4 * GiB  # this node's memory contributed to the cluster (its Mooncake segment)
    cluster_host: str = "127.0.0.1"  # the address other nodes reach this node's segment at
    cluster_protocol: str = "tcp"  # tcp, or rdma where the NIC has it
    cluster_replicas: int = 2  # copies of each value on distinct nodes: one node leaving loses none
    cluster_timeout_seconds: float = 2.0  # a lookup's or a load's wait for the cluster before it answers without it
    fault_plan: Path | None = None  # tests/chaos only (needs KVD_ALLOW_FAULTS=1): JSON rules, see kvd/tiers/faults.py

    def validate(self) -> None:
        """Raise ValueError naming the bad setting."""
        if self.dram_bytes < self.page_bytes or self.dram_bytes % self.page_bytes:
            raise ValueError(f"--dram-bytes must be a whole number of pages ({self.page_bytes} bytes), at least one")
        if self.nvme_bytes < 0 or self.nvme_bytes % self.page_bytes:
            raise ValueError(f"--nvme-bytes must be 0 (no NVMe tier) or a whole number of pages ({self.page_bytes} bytes)")
        if self.slab_bytes < self.page_bytes or self.slab_bytes % self.page_bytes:
            raise ValueError(f"--slab-bytes must be a whole number of pages ({self.page_bytes} bytes), at least one")
        if self.nvme_bytes and self.nvme_dir.exists() and not self.nvme_dir.is_dir():
            raise ValueError(f"--nvme-dir {self.nvme_dir}: not a directory")
        if self.socket.exists() and self.socket.is_dir():
            raise ValueError(f"--socket {self.socket}: a directory, not a socket path")
        if len(str(self.socket.resolve()).encode()) > MAX_UNIX_PATH:
            raise ValueError(
                f"--socket {self.socket}: its absolute path is longer than the {MAX_UNIX_PATH} bytes a unix socket may have"
            )
        if self.hbm_bytes < 0 or self.hbm_bytes % self.page_bytes:
            raise ValueError(f"--hbm-bytes must be 0 (no HBM tier) or a multiple of {self.page_bytes} bytes")
        if not re.fullmatch(r"cuda(:\d+)?|cpu", self.hbm_device):
            raise ValueError(f"--hbm-device must be cuda, cuda:N or cpu, got {self.hbm_device!r}")
        if self.lease_seconds <= 0:
            raise ValueError("--lease-seconds must be positive")
        if self.event_buffer <= 0:
            raise ValueError("--event-buffer must be positive")
        from kvd.server.logs import LOG_FORMATS, LOG_LEVELS

        if self.log_level not in LOG_LEVELS:
            raise ValueError(f"--log-level must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}")
        if self.log_format not in LOG_FORMATS:
            raise ValueError(f"--log-format must be one of {', '.join(LOG_FORMATS)}, got {self.log_format!r}")
        if self.drain_seconds < 0:
            raise ValueError("--drain-seconds must not be negative")
        if self.io_threads <= 0:
            raise ValueError("--io-threads must be positive")
        if not self.room_wait_seconds > 0:
            raise ValueError("--room-wait-seconds must be positive")
        if self.fault_plan is not None:
            if os.environ.get(ALLOW_FAULTS_ENV) != "1":
                raise ValueError(
                    f"--fault-plan injects disk faults (a test facility); it needs {ALLOW_FAULTS_ENV}=1 in the environment"
                )
            from kvd.tiers.faults import FaultPlan

            FaultPlan.load(self.fault_plan)  # ValueError naming the file, the rule and the field
        for flag, endpoint in (("--kv-events", self.kv_events), ("--kv-events-replay", self.kv_events_replay)):
            if endpoint is not None and not endpoint.startswith(("tcp://", "ipc://", "inproc://")):
                raise ValueError(f"{flag} must be a ZMQ endpoint (tcp://HOST:PORT, ipc://PATH), got {endpoint!r}")
        if self.kv_events is None and self.kv_events_replay is not None:
            raise ValueError("--kv-events-replay needs --kv-events")
        if self.kv_events_buffer <= 0:
            raise ValueError("--kv-events-buffer must be positive")
        if self.kv_events_pod is not None and (not self.kv_events_pod or "@" in self.kv_events_pod):
            raise ValueError("--kv-events-pod must be non-empty and without '@' (topics are kv@<pod>@<model>)")
        if self.kv_events_encoding not in KV_EVENT_ENCODINGS:
            raise ValueError(
                f"--kv-events-encoding must be one of {', '.join(KV_EVENT_ENCODINGS)}, got {self.kv_events_encoding!r}"
            )
        self._validate_security()
        self._validate_cluster()
        if self.tcp is not None and not _host_port(self.tcp):
            raise ValueError(f"--tcp must be HOST:PORT, got {self.tcp!r}")
        if self.metrics_port is not None and not 0 <= self.metrics_port < 65536:
            raise ValueError(f"--metrics-port must be a TCP port, 1..65535 (0: off), got {self.metrics_port}")
        if not self.metrics_host or any(c.isspace() for c in self.metrics_host):
            raise ValueError(f"--metrics-host must be an address or host name, got {self.metrics_host!r}")

    def _validate_cluster(self) -> None:
        if self.cluster_master is None:
            if self.cluster_metadata is not None:
                raise ValueError("--cluster-metadata needs --cluster-master")
            return
        if not _host_port(self.cluster_master):
            raise ValueError(f"--cluster-master must be HOST:PORT, got {self.cluster_master!r}")
        if self.cluster_metadata is None:
            raise ValueError("--cluster-master needs --cluster-metadata (e.g. http://HOST:PORT/metadata)")
        if not self.cluster_metadata.startswith(("http://", "https://", "etcd://", "redis://")):
            raise ValueError(f"--cluster-metadata must be an http://, etcd:// or redis:// URL, got {self.cluster_metadata!r}")
        if self.cluster_bytes <= 0:
            raise ValueError("--cluster-bytes must be positive")
        if not self.cluster_host or any(c.isspace() or c == "/" for c in self.cluster_host):
            raise ValueError(f"--cluster-host must be an address or host name, got {self.cluster_host!r}")
        if self.cluster_protocol not in CLUSTER_PROTOCOLS:
            raise ValueError(f"--cluster-protocol must be one of {', '.join(CLUSTER_PROTOCOLS)}, got {self.cluster_protocol!r}")
        if not 1 <= self.cluster_replicas <= 8:
            raise ValueError(f"--cluster-replicas must be 1..8, got {self.cluster_replicas}")
        if not self.cluster_timeout_seconds > 0:
            raise ValueError("--cluster-timeout-seconds must be positive")

    def _validate_security(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
        if self.tls_cert is not None and self.tcp is None:
            raise ValueError("--tls-cert is for TCP: add --tcp HOST:PORT")
        if self.tcp is not None and self.tls_cert is None and not self.tcp_insecure:
            raise ValueError("--tcp needs --tls-cert and --tls-key (or --tcp-insecure on a trusted network)")
        if self.tcp_insecure and self.tls_cert is not None:
            raise ValueError("--tcp-insecure contradicts --tls-cert")
        for flag, path in (
            ("--tls-cert", self.tls_cert), ("--tls-key", self.tls_key), ("--tls-client-ca", self.tls_client_ca),
            ("--admin-token-file", self.admin_token_file),
        ):
            if path is not None and not path.is_file():
                raise ValueError(f"{flag}: no such file {path}")
        if self.admin_token_file is not None and not self.admin_token():
            raise ValueError(f"--admin-token-file: {self.admin_token_file} is empty")
        if self.socket_group is not None:
            self.socket_gid()
        if self.unix_tenants and self.tenants is None:
            raise ValueError("--unix-tenants needs --tenants")
        if self.tenants is not None:
            self.tenant_tokens()  # ValueError naming the file and the problem

    def tenant_tokens(self):
        """Token -> tenant, from ``--tenants`` (None without it)."""
        if self.tenants is None:
            return None
        from kvd.server.tenants import load_tenants

        return load_tenants(self.tenants)

    def admin_token(self) -> str | None:
        """The admin bearer token (the file's content without surrounding whitespace)."""
        if self.admin_token_file is None:
            return None
        try:
            return self.admin_token_file.read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"--admin-token-file: cannot read {self.admin_token_file}: {exc}") from None

    def socket_gid(self) -> int | None:
        """The unix socket's group id, from a name or a number; None: the daemon's own."""
        import grp

        if self.socket_group is None:
            return None
        if self.socket_group.isdigit():
            return int(self.socket_group)
        try:
            return grp.getgrnam(self.socket_group).gr_gid
        except KeyError:
            raise ValueError(f"--socket-group: no group named {self.socket_group!r}") from None

    @property
    def arena_path(self) -> Path:
        """One arena file per socket, so a restarted daemon replaces its own and no other's."""
        import hashlib

        digest = hashlib.sha256(str(self.socket.resolve()).encode()).hexdigest()[:12]
        return self.shm_dir / f"kvd-arena-{digest}"

    @property
    def hbm_share_path(self) -> Path:
        """The file of a host-memory HBM pool (``--hbm-device cpu``), beside the arena and
        named like it, so a restarted daemon replaces its own."""
        return self.arena_path.with_name(self.arena_path.name.replace("kvd-arena-", "kvd-hbm-", 1))


def _host_port(text: str) -> bool:
    host, sep, port = text.rpartition(":")
    return bool(sep and host and port.isdigit() and 0 < int(port) < 65536)
