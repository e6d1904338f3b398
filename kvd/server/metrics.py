"""The daemon's Prometheus metrics: `kvd serve --metrics-port PORT` (docs/metrics.md).

Fed from what the daemon already has, so the data path carries almost no metrics code:

- the core's events, which :meth:`DaemonState.after_core` hands over after every core call:
  evictions and demotions by tier, retention class and reason, blocks held per tier, events
  by kind;
- two calls where only an adapter knows the answer: lookups and loads (hits by the tier a
  block was found in and its retention class) from the Engine service, and the mover's
  landed transfers (bytes per tier link, prefetches);
- a gRPC server interceptor: latency of every RPC by service, method and status code;
- a collector read at scrape time: tier capacity and use, sessions by state, leases, the
  write-behind queue, Watch streams and their lag.

Threads: counters change on the event loop's thread, and prometheus_client's HTTP server
answers scrapes from threads of its own. The core is single-threaded, so what the collector
reads of it is computed on the loop (``call_soon_threadsafe``) while the scrape waits.
Everything lives in a private :class:`CollectorRegistry`, never the process-global one.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import inspect
import time
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, Info, disable_created_metrics, start_http_server
from prometheus_client.core import GaugeMetricFamily

from kvd import __version__
from kvd.core.events import BlockRemoved, BlockStored, Event, NamespaceCleared, NamespaceRegistered, SessionChanged
from kvd.core.sessions import STATES
from kvd.core.types import Moved, TransferKind
from kvd.media import ALL_TIERS, TIER_BY_CODE
from kvd.tiers.health import TierHealth

NO_CLASS = "none"  # the class label under a policy that keeps no classes (lru)
EVENT_KINDS = {
    BlockStored: "stored",
    BlockRemoved: "removed",
    NamespaceRegistered: "registered",
    NamespaceCleared: "cleared",
    SessionChanged: "session",
}
# RPC latency buckets, seconds: a Lookup takes ~100 us, a large load or a Sync seconds.
RPC_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
SCRAPE_TIMEOUT_S = 5.0  # how long a scrape waits for the event loop to read the core


@dataclass(frozen=True)
class TierGauge:
    tier: str
    capacity_bytes: int
    used_bytes: int
    blocks: int
    degraded: bool = False  # the tier's TierHealth: a fault not yet followed by enough successes


@dataclass(frozen=True)
class Snapshot:
    """What a scrape reads of the daemon's state, taken at one instant on the loop."""

    tiers: list[TierGauge]
    sessions: dict[str, int]  # state -> sessions in the table (ended ones until forgotten)
    namespaces: int
    leases: int
    write_behind_pending: int
    watch_lags: list[int] = field(default_factory=list)  # per Watch stream: events not yet sent


class StateCollector:
    """The gauges, read at scrape time through ``snapshot`` (a callable that returns a
    :class:`Snapshot`; the daemon's runs it on the event loop)."""

    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterable[GaugeMetricFamily]:
        snap = self.snapshot()
        capacity = GaugeMetricFamily("kvd_tier_capacity_bytes", "Bytes the tier can hold.", labels=["tier"])
        used = GaugeMetricFamily("kvd_tier_used_bytes", "Bytes of the tier's slots in use.", labels=["tier"])
        blocks = GaugeMetricFamily("kvd_tier_blocks", "Readable block copies held in the tier.", labels=["tier"])
        degraded = GaugeMetricFamily(
            "kvd_tier_degraded", "1 while the tier is degraded by a fault it has not recovered from.", labels=["tier"]
        )
        for t in snap.tiers:
            capacity.add_metric([t.tier], t.capacity_bytes)
            used.add_metric([t.tier], t.used_bytes)
            blocks.add_metric([t.tier], t.blocks)
            degraded.add_metric([t.tier], int(t.degraded))
        yield from (capacity, used, blocks, degraded)
        sessions = GaugeMetricFamily("kvd_sessions", "Sessions in the session table, by state.", labels=["state"])
        for state in STATES:
            sessions.add_metric([state], snap.sessions.get(state, 0))
        yield sessions
        yield GaugeMetricFamily("kvd_namespaces", "Registered namespaces.", value=snap.namespaces)
        yield GaugeMetricFamily("kvd_leases", "Store and load leases held by clients.", value=snap.leases)
        yield GaugeMetricFamily(
            "kvd_write_behind_pending_blocks", "Blocks queued or in flight for writing down to NVMe.",
            value=snap.write_behind_pending,
        )
        yield GaugeMetricFamily("kvd_watch_streams", "Open Watch streams.", value=len(snap.watch_lags))
        yield GaugeMetricFamily(
            "kvd_watch_lag_events", "Events published but not yet sent, on the Watch stream furthest behind.",
            value=max(snap.watch_lags, default=0),
        )


class DaemonMetrics:
    """Every metric of one daemon, in its own registry. Create it on the event loop's thread
    while no core events are pending (its blocks-per-tier counts start from the core's
    stats and follow the events from then on)."""

    def __init__(self, state, registry: CollectorRegistry | None = None) -> None:
        self.state = state  # kvd.server.state.DaemonState
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.lookup_hits = Counter(
            "kvd_lookup_hits_total", "Blocks of the held prefix that Lookup found, by fastest tier.", ["tier"],
            registry=r,
        )
        for tier in ALL_TIERS:  # every tier a Lookup can answer, the cluster's included: 0 until its first hit
            self.lookup_hits.labels(tier)
        self.lookup_misses = Counter(
            "kvd_lookup_misses_total", "Blocks Lookup was asked for past the held prefix.", registry=r
        )
        self.load_hits = Counter(
            "kvd_load_hits_total", "Blocks a load found, by the tier it was found in and its retention class.",
            ["tier", "class"], registry=r,
        )
        self.load_misses = Counter("kvd_load_misses_total", "Blocks a load asked for that were not held.", registry=r)
        self.evictions = Counter(
            "kvd_evictions_total", "Block copies dropped from a tier, by retention class and reason.",
            ["tier", "class", "reason"], registry=r,
        )
        self.demotions = Counter(
            "kvd_demotions_total", "Block copies moved one tier down to make room, by the tier they left.",
            ["tier", "class", "reason"], registry=r,
        )
        self.prefetches = Counter(
            "kvd_prefetches_total", "Blocks moved up into a tier ahead of need, by retention class.",
            ["tier", "class"], registry=r,
        )
        self.moved_bytes = Counter(
            "kvd_tier_moved_bytes_total", "Bytes copied between tiers by transfers that landed.",
            ["src", "dst", "kind"], registry=r,
        )
        self.transfer_failures = Counter(
            "kvd_transfer_failures_total", "Block transfers between tiers that failed (I/O error, bad checksum).",
            ["src", "dst", "kind"], registry=r,
        )
        self.events = Counter("kvd_events_total", "Events published to Watch streams, by kind.", ["kind"], registry=r)
        self.tier_faults = Counter(
            "kvd_tier_faults_total", "Failed tier operations (I/O errors, checksum mismatches, no free slot).",
            ["tier", "op", "errno"], registry=r,
        )
        for health in tier_healths(state).values():
            for record in health.faults():  # faults before metrics existed (recovery)
                self.tier_faults.labels(health.tier, record.op, record.errno).inc(record.count)
            health.listeners.append(self.fault)  # I/O threads call it: Counter is thread safe
        self.rpc_seconds = Histogram(
            "kvd_rpc_duration_seconds", "Time to handle a gRPC call, by service, method and status code.",
            ["service", "method", "code"], buckets=RPC_BUCKETS, registry=r,
        )
        Info("kvd", "The daemon's version and retention policy.", registry=r).info(
            {"version": __version__, "policy": state.policy_name}
        )
        self._blocks = {u.tier: u.blocks for u in state.core.stats().tiers}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server = None
        self._thread = None
        r.register(StateCollector(self._snapshot_from_loop))

    # -- feeds ----------------------------------------------------------------------------
    def on_events(self, events: Sequence[Event]) -> None:
        """The core's new events (after_core): blocks per tier, evictions, demotions."""
        kinds: Tally[str] = Tally()
        for event in events:
            kinds[EVENT_KINDS[type(event)]] += 1
            if type(event) is BlockStored:
                self._blocks[event.tier] = self._blocks.get(event.tier, 0) + 1
            elif type(event) is BlockRemoved:
                self._blocks[event.tier] = self._blocks.get(event.tier, 0) - 1
                cls = event.retention_class or NO_CLASS
                if event.reason == "demoted":
                    self.demotions.labels(event.tier, cls, event.cause or "capacity").inc()
                else:
                    self.evictions.labels(event.tier, cls, event.cause or event.reason).inc()
        for kind, n in kinds.items():
            self.events.labels(kind).inc(n)

    def fault(self, tier: str, op: str, errno: str) -> None:
        """A tier's TierHealth recorded one fault."""
        self.tier_faults.labels(tier, op, errno).inc()

    def looked_up(self, runs: Sequence[tuple[int, int]], misses: int) -> None:
        """A Lookup's answer: ``runs`` of (tier code, blocks) of the held prefix."""
        for code, n in runs:
            self.lookup_hits.labels(TIER_BY_CODE[code]).inc(n)
        if misses:
            self.lookup_misses.inc(misses)

    def loaded(self, namespace: str, hashes: Sequence[int], found: Sequence[str | None]) -> None:
        """A load's grant: per hash the tier it was found in (None: a miss)."""
        core = self.state.core
        hits: Tally[tuple[str, str]] = Tally()
        for h, tier in zip(hashes, found):
            if tier is not None:
                hits[tier, core.retention_class((namespace, h), tier) or NO_CLASS] += 1
        for labels, n in hits.items():
            self.load_hits.labels(*labels).inc(n)
        misses = len(found) - sum(hits.values())
        if misses:
            self.load_misses.inc(misses)

    def landed(self, moved: Sequence[Moved]) -> None:
        """The mover reported the ``moved`` transfers to the core: counts the bytes of those
        that landed and the number that did not (an error or a corrupt source), by tier link
        and kind, and the prefetches that landed, by tier and retention class."""
        landed: Tally[tuple[str, str, str]] = Tally()
        failed: Tally[tuple[str, str, str]] = Tally()
        prefetched: Tally[tuple[str, str]] = Tally()
        core = self.state.core
        for m in moved:
            t = m.transfer
            link = (t.src_tier, t.dst_tier, t.kind)
            if not m.ok:
                failed[link] += 1
                continue
            landed[link] += t.nbytes
            if t.kind == TransferKind.PREFETCH:
                prefetched[t.dst_tier, core.retention_class(t.record.key, t.dst_tier) or NO_CLASS] += 1
        for labels, n in landed.items():
            self.moved_bytes.labels(*labels).inc(n)
        for labels, n in failed.items():
            self.transfer_failures.labels(*labels).inc(n)
        for labels, n in prefetched.items():
            self.prefetches.labels(*labels).inc(n)

    # -- gauges ---------------------------------------------------------------------------
    def snapshot(self) -> Snapshot:
        """The gauges' values now. Call on the event loop's thread (it reads the core)."""
        core = self.state.core
        healths = tier_healths(self.state)
        tiers = [
            TierGauge(
                t, core.spaces[t].capacity_bytes, core.spaces[t].used_bytes, self._blocks.get(t, 0),
                t in healths and healths[t].degraded,
            )
            for t in core.tiers
        ]
        events = self.state.events
        next_seq = events.next_seq if events is not None else 0
        return Snapshot(
            tiers=tiers,
            sessions=dict(Tally(s.state for s in core.sessions.sessions())),
            namespaces=len(core.namespaces()),
            leases=core.lease_count,
            write_behind_pending=core.write_behind_pending,
            watch_lags=[max(0, next_seq - cursor) for cursor in self.state.watch_cursors.values()],
        )

    def _snapshot_from_loop(self) -> Snapshot:
        loop = self._loop
        if loop is None or _running_loop() is loop:
            return self.snapshot()  # not serving yet, or already on the loop's thread
        answer: concurrent.futures.Future[Snapshot] = concurrent.futures.Future()

        def take() -> None:
            try:
                answer.set_result(self.snapshot())
            except BaseException as exc:  # noqa: BLE001 - the scrape thread reports it
                answer.set_exception(exc)

        loop.call_soon_threadsafe(take)
        return answer.result(SCRAPE_TIMEOUT_S)

    # -- serving --------------------------------------------------------------------------
    def serve(self, host: str, port: int) -> None:
        """Answer scrapes at http://HOST:PORT/metrics from a thread of prometheus_client's.
        Call from the event loop. Raises OSError naming the address when it cannot bind."""
        self._loop = asyncio.get_running_loop()
        disable_created_metrics()  # no *_created series: nothing here resets a counter but a restart
        try:
            self._server, self._thread = start_http_server(port, host, self.registry)
        except OSError as exc:
            raise OSError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from None

    def close(self) -> None:
        """Stop answering scrapes (the port is free when this returns)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join()
            self._server = self._thread = None

    def interceptor(self) -> RpcMetricsInterceptor:
        return RpcMetricsInterceptor(self.rpc_seconds)


def tier_healths(state) -> dict[str, TierHealth]:
    """The TierHealth of each tier the daemon runs, by tier name (the core's spaces are the
    tiers themselves; a bare allocator, as in replays and unit tests, has none)."""
    spaces = state.core.spaces.items()
    return {name: space.health for name, space in spaces if isinstance(getattr(space, "health", None), TierHealth)}


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class RpcMetricsInterceptor(grpc.aio.ServerInterceptor):
    """Times every call into ``histogram`` by service, method and status code: OK, the code
    the servicer aborted with, CANCELLED when the client went away, UNKNOWN for an
    exception that escaped (the servicers map theirs to codes, so that is a bug)."""

    def __init__(self, histogram: Histogram) -> None:
        self.histogram = histogram

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None  # no such method: gRPC answers UNIMPLEMENTED itself
        service, _, method = handler_call_details.method.lstrip("/").rpartition("/")
        for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
            behavior = getattr(handler, kind)
            if behavior is not None:
                return handler._replace(**{kind: self._timed(behavior, service, method)})
        return handler

    @contextlib.contextmanager
    def _timing(self, service: str, method: str, context) -> Iterator[None]:
        """Observe the time the block takes, under the status the call ends with."""
        start, code = time.perf_counter(), None
        try:
            yield
        except (asyncio.CancelledError, GeneratorExit):
            code = "CANCELLED"
            raise
        except grpc.aio.AbortError:
            raise  # the servicer's own status: context.code() has it
        except Exception:
            code = "UNKNOWN"
            raise
        finally:
            if code is None:
                status = context.code()
                code = status.name if status is not None else "OK"
            self.histogram.labels(service, method, code).observe(time.perf_counter() - start)

    def _timed(self, behavior, service: str, method: str):
        """``behavior`` wrapped to time it, of the same kind (gRPC dispatches on it)."""
        timing = self._timing
        if inspect.isasyncgenfunction(behavior):

            async def stream(request, context):
                with timing(service, method, context):
                    async for item in behavior(request, context):
                        yield item

            return stream

        async def call(request, context):
            with timing(service, method, context):
                result = behavior(request, context)
                return await result if inspect.isawaitable(result) else result

        return call
