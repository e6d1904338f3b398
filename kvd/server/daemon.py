"""`kvd serve`: build the tiers and the core, recover NVMe, and serve gRPC until a signal.

Start-up order: NVMe recovery (manifest + checksums) -> core rebuilt from it -> a fresh DRAM
arena -> gRPC on the unix socket (mode 0660) and optionally TCP, with health checking and
server reflection -> background tasks (mover, lease reaper). SIGTERM/SIGINT stop it cleanly.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
import socket as socketlib
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from kvd.cluster.backend import MooncakeBackend, MooncakeConfig
from kvd.cluster.metrics import ClusterCollector
from kvd.cluster.tier import ClusterSettings, ClusterTier
from kvd.core.errors import KvdError
from kvd.core.eventbuffer import EventBuffer
from kvd.core.manager import CoreConfig, KvCore
from kvd.core.sessions import SessionTable
from kvd.policies import make_policy
from kvd.server.admin import AdminService
from kvd.server.auth import Auth
from kvd.server.codec import NAMESPACE_PREFIX, parse_block_key, parse_block_meta, parse_namespace
from kvd.server.config import ServeConfig
from kvd.server.drain import DrainResult, ShuttingDown, drain, resume
from kvd.server.engine import EngineService
from kvd.server.metrics import DaemonMetrics
from kvd.server.mover import Mover
from kvd.server.startup import SocketLock, StartupError
from kvd.server.state import DaemonState
from kvd.server.view import ViewService
from kvd.tiers.dram import DramArena
from kvd.tiers.hbm import HbmPool, HbmUnavailable
from kvd.tiers.hbm_share import PoolUnshareable
from kvd.tiers.nvme import NvmeStore
from kvd.v1 import admin_pb2, admin_pb2_grpc, engine_pb2, engine_pb2_grpc, view_pb2, view_pb2_grpc

log = logging.getLogger("kvd.daemon")

MAX_MESSAGE_BYTES = 256 << 20
SERVICES = ("kvd.v1.Engine", "kvd.v1.Admin", "kvd.v1.View")
REAP_INTERVAL_S = 0.5
HANDSHAKE_TIMEOUT_MS = 5_000
IDLE_CONNECTION_MS = 600_000
MAX_STREAMS_PER_CONNECTION = 256


def build_state(config: ServeConfig, hbm: HbmPool | None = None) -> DaemonState:
    """Tiers (``hbm`` on top when given), policy and core, with the NVMe tier's surviving
    blocks re-entered."""
    config.validate()
    clock = time.monotonic
    nvme = None
    if config.nvme_bytes:
        try:
            config.nvme_dir.mkdir(parents=True, exist_ok=True)
            nvme = NvmeStore(
                config.nvme_dir, config.nvme_bytes, slab_bytes=config.slab_bytes, page_bytes=config.page_bytes,
                io=fault_io(config),
            )
        except OSError as exc:  # RocksDB's "lock hold by current process" / a read-only disk
            raise StartupError("--nvme-dir", f"{config.nvme_dir}: {exc.strerror or exc}") from None
    try:
        config.shm_dir.mkdir(parents=True, exist_ok=True)
        arena = DramArena(config.arena_path, config.dram_bytes, page_bytes=config.page_bytes)
    except OSError as exc:
        if nvme is not None:
            nvme.close()
        raise StartupError("--shm-dir", f"{config.shm_dir}: cannot hold a {config.dram_bytes}-byte arena: "
                                        f"{exc.strerror or exc}") from None
    # The core allocates and frees through the tiers themselves (pure bookkeeping), so a
    # tier's own records follow its slots (NvmeStore forgets a freed slot's checksum).
    spaces = {"hbm": hbm} if hbm is not None else {}
    spaces["dram"] = arena
    if nvme is not None:
        spaces["nvme"] = nvme
    sessions = SessionTable()
    core = KvCore(
        spaces,
        make_policy(config.policy, sessions),
        clock,
        CoreConfig(lease_seconds=config.lease_seconds, write_behind=config.write_behind),
        lease_prefix=secrets.token_hex(4) + "-",
        sessions=sessions,
    )
    state = DaemonState(core, arena, nvme, clock, config.policy, started_at=clock(), hbm=hbm)
    if nvme is not None:
        recover(state, verify=config.verify_on_start)
    state.events = EventBuffer(config.event_buffer, next_seq=core.events.next_seq)
    return state


def fault_io(config: ServeConfig):
    """The NVMe tier's file layer: the real one, or faults by ``--fault-plan`` (tests)."""
    if config.fault_plan is None:
        return None
    from kvd.tiers.faults import FaultPlan, FaultyIO

    plan = FaultPlan.load(config.fault_plan)
    log.warning("fault injection is on: %d rules from %s (a test facility)", len(plan.rules), config.fault_plan)
    return FaultyIO(plan)


def recover(state: DaemonState, verify: bool) -> None:
    """Re-enter every NVMe block whose manifest entry and checksum are intact."""
    nvme, core = state.nvme, state.core
    for key, value in nvme.meta_items(NAMESPACE_PREFIX):
        try:
            name, block_tokens, block_bytes = parse_namespace(key, value)
            core.register_namespace(name, block_tokens, block_bytes)
        except (KvdError, ValueError, KeyError) as exc:
            # E.g. restarted with tiers too small for its blocks: its blocks are dropped below.
            log.error("namespace record %r cannot be restored, its blocks are dropped: %s", key, exc)
    before = nvme.manifest_size()
    entries = nvme.recover(verify=verify)
    orphans = []
    for entry in entries:
        try:
            namespace, h = parse_block_key(entry.key)
            parent, origin = parse_block_meta(entry.meta)
            core.restore_block(namespace, h, parent, entry.nbytes, "nvme", entry.slot, origin)
        except (KvdError, KeyError, ValueError, LookupError) as exc:
            log.warning("dropping manifest entry %r: %s", entry.key, exc)
            orphans.append(entry)
    if orphans:
        nvme.forget([e.key for e in orphans])
        for e in orphans:
            nvme.free(e.slot)
    core.take_events()
    state.recovered_blocks = len(entries) - len(orphans)
    state.dropped_on_recovery = before - state.recovered_blocks
    log.info("recovered %d blocks from NVMe (%d dropped)", state.recovered_blocks, state.dropped_on_recovery)


def open_hbm(config: ServeConfig) -> HbmPool | None:
    """The daemon-owned GPU pool of ``--hbm-bytes``, or None: when none is asked for, or when
    CUDA is not available here, or the pool could not be shared with engines (one log line
    says why; the daemon serves without it). With a pool, HBM is the core's top tier: stores
    land there and loads read from there, by device-to-device copies of the engines.

    ``--hbm-device cpu`` makes the pool in host memory (a shared-memory file beside the
    arena): the same daemon, client and connector code runs without a GPU (tests).
    Raises OSError when CUDA is present but the pool cannot be allocated.
    """
    if not config.hbm_bytes:
        return None
    device = config.hbm_device
    config.shm_dir.mkdir(parents=True, exist_ok=True)  # a host pool's file lives beside the arena
    try:
        pool = HbmPool(config.hbm_bytes, config.page_bytes, device=device, share_path=config.hbm_share_path)
    except HbmUnavailable as exc:
        log.warning("no HBM tier: CUDA not available (%s)", exc)
        return None
    except RuntimeError as exc:  # torch's out-of-memory and CUDA errors
        raise OSError(f"cannot allocate the {config.hbm_bytes}-byte HBM pool: {exc}") from None
    try:
        pool.handle()
    except PoolUnshareable as exc:
        pool.close()
        log.warning("no HBM tier: %s", exc)
        return None
    if device == "cpu":
        log.warning("HBM tier: %d bytes in host memory (--hbm-device cpu: a stand-in for tests)", config.hbm_bytes)
    else:
        log.info("HBM tier: %d bytes on %s", config.hbm_bytes, pool.device)
    return pool


def open_cluster(config: ServeConfig, state: DaemonState) -> ClusterTier:
    """The cluster tier over Mooncake Store (it joins once started)."""
    mooncake = MooncakeConfig(
        master=config.cluster_master,
        metadata=config.cluster_metadata,
        segment_bytes=config.cluster_bytes,
        host=config.cluster_host,
        protocol=config.cluster_protocol,
        replicas=config.cluster_replicas,
    )
    settings = ClusterSettings(timeout_s=config.cluster_timeout_seconds)
    tier = ClusterTier(lambda: MooncakeBackend(mooncake), state, settings, config.cluster_master, config.cluster_bytes)
    if state.metrics is not None:
        state.metrics.registry.register(ClusterCollector(tier))
    return tier


def tls_credentials(config: ServeConfig) -> grpc.ServerCredentials | None:
    """TLS for the TCP port (None: --tcp-insecure); mutual when a client CA is configured."""
    if config.tls_cert is None:
        return None
    ca = config.tls_client_ca.read_bytes() if config.tls_client_ca is not None else None
    return grpc.ssl_server_credentials(
        [(config.tls_key.read_bytes(), config.tls_cert.read_bytes())],
        root_certificates=ca,
        require_client_auth=ca is not None,
    )


class Daemon:
    """The running daemon: state + gRPC server + background tasks."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.lock = SocketLock.acquire(config.socket)  # first: a second daemon touches nothing
        self.hbm = None
        try:
            self.hbm = open_hbm(config)
            self.state = build_state(config, self.hbm)
        except BaseException:
            if self.hbm is not None:
                self.hbm.close()  # a host pool's shared-memory file must not outlive us
            self.lock.release()
            raise
        self.executor = ThreadPoolExecutor(config.io_threads, thread_name_prefix="kvd-io")
        self.server: grpc.aio.Server | None = None
        self.health = health.aio.HealthServicer()
        self._tasks: list[asyncio.Task] = []
        self.stopping = asyncio.Event()  # set by SIGTERM/SIGINT or a drain with exit

    async def start(self) -> None:
        state = self.state
        if self.config.metrics_port:  # first: a port in use stops the daemon before it serves
            state.metrics = DaemonMetrics(state)
            try:
                state.metrics.serve(self.config.metrics_host, self.config.metrics_port)
            except OSError as exc:
                raise StartupError("--metrics-port", f"{self.config.metrics_port}: {exc.strerror or exc}") from None
        if self.config.kv_events is not None:
            from kvd.server.kv_events import Holdings, KvEventPublisher  # pyzmq: an optional extra

            publisher = KvEventPublisher(
                self.config.kv_events,
                self.config.kv_events_pod or socketlib.gethostname(),
                Holdings(state.core),
                replay_endpoint=self.config.kv_events_replay,
                buffer_batches=self.config.kv_events_buffer,
                encoding=self.config.kv_events_encoding,
            )
            publisher.start()  # before any RPC can make an event
            state.kv_events = publisher
        state.mover = Mover(
            state.core, state.arena, state.nvme, self.executor, state.after_core, metrics=state.metrics, hbm=state.hbm
        )
        state.mover.start()
        if self.config.cluster_master is not None:
            state.cluster = open_cluster(self.config, state)
            state.cluster.start()  # joins in the background: a master that is down delays nothing
        options = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            # A connection that never says HTTP/2 within this is closed (it holds a descriptor).
            ("grpc.server_handshake_timeout_ms", HANDSHAKE_TIMEOUT_MS),
            # One that stays idle this long is closed too; a client reconnects when it needs to.
            ("grpc.max_connection_idle_ms", IDLE_CONNECTION_MS),
            ("grpc.max_concurrent_streams", MAX_STREAMS_PER_CONNECTION),
        ]
        interceptors = [state.metrics.interceptor()] if state.metrics is not None else []
        tenants = self.config.tenant_tokens()
        interceptors.append(Auth(self.config.admin_token(), tenants, self.config.unix_tenants))
        if tenants is not None and self.config.tcp_insecure:
            log.warning("tenant tokens travel over TCP without TLS (--tcp-insecure): loopback and tests only")
        server = grpc.aio.server(options=options, interceptors=interceptors)
        engine_pb2_grpc.add_EngineServicer_to_server(EngineService(state, self.config.room_wait_seconds), server)
        admin_pb2_grpc.add_AdminServicer_to_server(AdminService(state, self), server)
        view = ViewService(state, self.config.dram_to_hbm_gbps, self.config.nvme_to_dram_gbps)
        view_pb2_grpc.add_ViewServicer_to_server(view, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        names = (
            engine_pb2.DESCRIPTOR.services_by_name["Engine"].full_name,
            admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name,
            view_pb2.DESCRIPTOR.services_by_name["View"].full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        )
        reflection.enable_server_reflection(names, server)
        socket = self.config.socket
        socket.parent.mkdir(parents=True, exist_ok=True)
        if socket.exists() or socket.is_symlink():
            socket.unlink()  # a stale socket of a killed daemon: we hold its lock
        _listen(lambda: server.add_insecure_port(f"unix:{socket.resolve()}"), "--socket", f"{socket}: cannot listen")
        if self.config.tcp:
            credentials = tls_credentials(self.config)
            if credentials is None:
                log.warning("TCP %s without TLS (--tcp-insecure): use it on a trusted network only", self.config.tcp)
                _listen(lambda: server.add_insecure_port(self.config.tcp), "--tcp", f"{self.config.tcp}: cannot listen")
            else:
                _listen(lambda: server.add_secure_port(self.config.tcp, credentials), "--tcp",
                        f"{self.config.tcp}: cannot listen (in use, or --tls-cert/--tls-key are not a certificate "
                        "and its key in PEM)")
        # The servicer starts out SERVING for ""; nothing may say so before the last step below.
        await self.set_serving(False)
        await server.start()
        os.chmod(socket, 0o660)
        gid = self.config.socket_gid()
        if gid is not None:
            os.chown(socket, -1, gid)
        self.server = server
        self._tasks.append(asyncio.get_running_loop().create_task(self._reap_leases(), name="kvd-reaper"))
        state.mover.wake()  # blocks restored from NVMe need nothing, but a queue may exist
        await self.set_serving(True)  # recovery (in __init__) and every task are done: ready
        log.info(
            "kvd serving on unix:%s%s (dram %d bytes at %s, nvme %d bytes at %s, policy %s)",
            socket,
            f" and tcp {self.config.tcp}" if self.config.tcp else "",
            self.config.dram_bytes,
            state.arena.path,
            self.config.nvme_bytes,
            self.config.nvme_dir,
            self.config.policy,
        )

    async def _reap_leases(self) -> None:
        while True:
            await asyncio.sleep(REAP_INTERVAL_S)
            if self.state.core.expire_leases():
                self.state.after_core()

    async def set_serving(self, serving: bool) -> None:
        """What health checks answer for the server ("") and each kvd service: SERVING, or
        NOT_SERVING (e.g. while draining: readiness probes fail, health watchers are told).
        Ignored once :meth:`stop` has begun, which leaves everything NOT_SERVING."""
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *SERVICES):
            await self.health.set(name, status)

    async def drain(self, timeout_s: float, exit: bool) -> DrainResult:
        """Health NOT_SERVING, then :func:`kvd.server.drain.drain`; with ``exit`` the daemon
        then stops as on SIGTERM (after this call's reply went out)."""
        await self.set_serving(False)
        result = await drain(self.state, timeout_s)
        if exit:
            self.stopping.set()
        return result

    async def resume(self) -> bool:
        """Serve again after a drain without exit; FAILED_PRECONDITION once stopping."""
        if self.stopping.is_set():
            raise ShuttingDown("kvd is shutting down; it cannot resume")
        was = resume(self.state)
        await self.set_serving(True)
        return was

    async def shutdown(self) -> None:
        """SIGTERM: drain within ``drain_seconds``, then stop."""
        log.info("stopping: draining for up to %.0f s", self.config.drain_seconds)
        await self.set_serving(False)
        await drain(self.state, self.config.drain_seconds)
        await self.stop()

    async def stop(self, grace_s: float = 5.0) -> None:
        # NOT_SERVING for good: a set_serving(True) racing the shutdown cannot undo it.
        await self.health.enter_graceful_shutdown()
        if self.server is not None:
            await self.server.stop(grace_s)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        cluster, self.state.cluster = self.state.cluster, None
        if cluster is not None:
            await cluster.stop()
        if self.state.mover is not None:
            await self.state.mover.stop()
        publisher, self.state.kv_events = self.state.kv_events, None  # nothing publishes after this
        if publisher is not None:
            await publisher.stop()
        self.executor.shutdown(wait=True)
        self.close()

    def close(self) -> None:
        if self.state.metrics is not None:
            self.state.metrics.close()
        self.state.arena.close()
        if self.hbm is not None:
            self.hbm.close()
        if self.state.nvme is not None:
            self.state.nvme.close()
        try:
            self.config.socket.unlink()
        except FileNotFoundError:
            pass
        self.lock.release()


def _listen(bind, flag: str, message: str) -> None:
    """gRPC's bind: 0 or a RuntimeError ("Failed to bind") become a StartupError naming ``flag``."""
    try:
        port = bind()
    except RuntimeError:
        port = 0
    if port == 0:
        raise StartupError(flag, message)


async def serve_async(config: ServeConfig) -> None:
    daemon = Daemon(config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, daemon.stopping.set)
    try:
        await daemon.start()
    except BaseException:
        await daemon.stop(grace_s=0)  # the arena, the socket, the ports: nothing stays behind
        raise
    await daemon.stopping.wait()
    await daemon.shutdown()


def serve(config: ServeConfig) -> None:
    asyncio.run(serve_async(config))
