"""``KvdConnector``: vLLM's (0.32, 0.33) KV connector, backed by the node's kvd daemon.

Start vLLM with::

    --kv-transfer-config '{"kv_connector": "KvdConnector", "kv_connector_module_path": "kvd.connector.vllm",
      "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
      "kv_connector_extra_config": {"kvd_address": "unix:///run/kvd/kvd.sock"}}'

It stays thin: the scheduler side asks the daemon what it holds (``Lookup``) and plans, per
step, which blocks to load and save (``kvd.connector.plan``); the worker side copies those
blocks straight between vLLM's paged caches and the daemon's shared-memory arena slots
(``kvd.connector.transfer`` over ``kvd.native.PagedKv``). Blocks are keyed by vLLM's own
block hashes. A step never waits for a save: ``wait_for_save`` hands the step's saves to a
background thread; a finished request's blocks stay allocated until its saves end (vLLM's
delayed free: ``request_finished`` answers True, ``get_finished`` reports the request), its
turn-end or tool-pause event follows them, and a preempted request's saves end before its
blocks are reused (``handle_preemptions``). A load completes in ``start_load_kv`` before the forward (the default), or,
with ``kvd_async_load``, on a background thread while the request waits in vLLM's
``WAITING_FOR_REMOTE_KVS`` and other requests keep running; ``get_finished`` reports it done.

``kv_connector_extra_config`` keys: ``kvd_address`` (default ``$KVD_ADDR`` or
./var/kvd.sock), ``kvd_namespace`` (default: the served model name), ``kvd_shared_memory``
(default: required for a unix socket, else inline bytes over gRPC), ``kvd_timeout_s``,
``kvd_async_load`` (default false), ``kvd_token`` (default ``$KVD_TOKEN``: the bearer token
of a daemon that serves tenants; a tenant's bytes go inline, never through the arena),
``kvd_pod_id`` (this engine's pod as the router's scheduler knows it: the daemon's KV events
for the engine's namespace go to topic ``kv@<kvd_pod_id>@<served model name>``; default the
daemon's ``--kv-events-pod``). Saved blocks go with their tokens, LoRA and extra keys.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import grpc
import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)
from vllm.logger import init_logger

from kvd.client import Client, ClientError
from kvd.connector.events import event_extra_keys, save_origin, stored_event
from kvd.connector.paged import PagedCaches
from kvd.connector.plan import (
    LoadSpec,
    NewRequestStep,
    Planner,
    RunningRequestStep,
    SaveSpec,
    SessionHints,
    usable_name,
)
from kvd.connector.transfer import BackgroundLoads, BackgroundSaves, Transfers

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.distributed.kv_events import KVCacheEvent
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

# A child of vLLM's logger, so its messages follow vLLM's logging configuration.
logger = init_logger("vllm.kvd_connector")

MAX_NAMESPACE = 200  # the daemon takes up to 256 characters


@dataclass
class KvdConnectorMetadata(KVConnectorMetadata):
    """Scheduler -> worker, per step: blocks to load (before the forward, or in the
    background when ``load_async``), blocks to save after it; ``released``: finished
    requests whose blocks wait for their saves (each reported by ``get_finished`` once they
    end); ``preempted``: requests whose blocks vLLM may reuse from this step on."""

    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)
    load_async: bool = False
    released: list[str] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)


@dataclass
class KvdWorkerMetadata(KVConnectorWorkerMetadata):
    """Worker -> scheduler, per step: the outcome of each save (``SaveSpec.save_id``). With
    several workers (tensor/pipeline shards) a save counts as stored only if every shard
    stored it: kvd can serve a block only when it holds all its shards."""

    stored: set[int] = field(default_factory=set)
    failed: set[int] = field(default_factory=set)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KvdWorkerMetadata:
        if not isinstance(other, KvdWorkerMetadata):
            raise TypeError(f"cannot aggregate KvdWorkerMetadata with {type(other).__name__}")
        failed = self.failed | other.failed
        return KvdWorkerMetadata(stored=(self.stored & other.stored) - failed, failed=failed | (self.stored ^ other.stored))


def served_model_name(vllm_config: VllmConfig) -> str | None:
    """The model name clients ask for (the first of ``--served-model-name``, else the model),
    as a router names it in KV-event topics; None when it cannot be one (``@``, too long)."""
    model_config = vllm_config.model_config
    name = model_config.served_model_name or model_config.model
    if isinstance(name, (list, tuple)):
        name = name[0]
    name = str(name)
    return name if usable_name(name) and "@" not in name else None


def namespace_for(vllm_config: VllmConfig, tp_rank: int, pp_rank: int) -> str:
    """The kvd namespace of one worker's shard: model, KV dtype, block size and rank. Blocks
    of different models, dtypes, geometries or shards never match."""
    extra = vllm_config.kv_transfer_config.kv_connector_extra_config or {}
    model_config = vllm_config.model_config
    name = extra.get("kvd_namespace") or model_config.served_model_name or model_config.model
    if isinstance(name, (list, tuple)):
        name = name[0]
    cache_dtype = vllm_config.cache_config.cache_dtype
    dtype = str(model_config.dtype).removeprefix("torch.") if cache_dtype == "auto" else cache_dtype
    par = vllm_config.parallel_config
    suffix = (
        f"|{dtype}|b{vllm_config.cache_config.block_size}"
        f"|tp{tp_rank}of{par.tensor_parallel_size}|pp{pp_rank}of{par.pipeline_parallel_size}"
    )
    name = str(name)
    if len(name) + len(suffix) > MAX_NAMESPACE:
        digest = hashlib.sha256(name.encode()).hexdigest()[:16]
        name = f"{name[: MAX_NAMESPACE - len(suffix) - 17]}~{digest}"
    return name + suffix


class KvdConnector(KVConnectorBase_V1):
    """vLLM <-> kvd. One instance in the scheduler (role SCHEDULER), one per worker (WORKER)."""

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        if len(kv_cache_config.kv_cache_groups) != 1:
            raise ValueError(
                f"KvdConnector supports models with one KV cache group, this one has "
                f"{len(kv_cache_config.kv_cache_groups)} (hybrid attention is not supported yet)"
            )
        extra = self._kv_transfer_config.kv_connector_extra_config or {}
        self._block_size = vllm_config.cache_config.block_size
        self._num_blocks = kv_cache_config.num_blocks
        address = extra.get("kvd_address")
        shm = extra.get("kvd_shared_memory")
        token = extra.get("kvd_token") or os.environ.get("KVD_TOKEN") or None
        if shm is None and address and str(address).startswith("unix:") and token is None:
            shm = True  # a local daemon: block bytes go through the arena, never inline
        # With a token (a daemon serving tenants) the arena may be refused: bytes then go inline.
        self._client = Client(address, shared_memory=shm, timeout=float(extra.get("kvd_timeout_s", 60.0)), token=token)
        self._pod_id = extra.get("kvd_pod_id") or None
        if self._pod_id is not None and not (usable_name(self._pod_id) and "@" not in self._pod_id):
            raise ValueError(
                f"kv_connector_extra_config kvd_pod_id must be 1..256 printable characters without '@', "
                f"got {self._pod_id!r}"
            )
        self._model_name = served_model_name(vllm_config)
        self._async_load = extra.get("kvd_async_load", False)
        if not isinstance(self._async_load, bool):
            raise ValueError(f"kv_connector_extra_config kvd_async_load must be true or false, got {self._async_load!r}")
        par = vllm_config.parallel_config
        if role == KVConnectorRole.SCHEDULER:
            self._planner = Planner(self._block_size)
            events = vllm_config.kv_events_config
            # Events are made only when vLLM publishes them (--kv-events-config).
            self._emit_events = bool(events is not None and events.enable_kv_cache_events)
            self._pending_events: dict[int, KVCacheEvent] = {}  # save_id -> its BlockStored
            self._events: list[KVCacheEvent] = []
            self._unconfirmed: dict[int, str] = {}  # save_id -> req_id: saves not yet reported
            self._released: list[str] = []  # finished requests for the next step's metadata
            self._ending: dict[str, SessionHints] = {}  # released requests: their session's event
            # Session events go out on a thread of their own, in order: the scheduler's step
            # never waits for the daemon's answer to one.
            self._notices: ThreadPoolExecutor | None = ThreadPoolExecutor(1, thread_name_prefix="kvd-session")
            # A block is loadable only if every shard of it is held.
            self._namespaces = [
                namespace_for(vllm_config, tp, pp)
                for pp in range(par.pipeline_parallel_size)
                for tp in range(par.tensor_parallel_size)
            ]
            self._namespace = self._namespaces[0]
        else:
            from vllm.distributed.parallel_state import get_pp_group, get_tensor_model_parallel_rank

            self._namespace = namespace_for(vllm_config, get_tensor_model_parallel_rank(), get_pp_group().rank_in_group)
            self._transfers: Transfers | None = None
            self._background: BackgroundLoads | None = None
            self._saves: BackgroundSaves | None = None
            self._load_errors: set[int] = set()
        logger.info("KvdConnector (%s): daemon %s, namespace %s", role.name, self._client.address, self._namespace)

    # ==============================
    # Scheduler side
    # ==============================

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        """Tokens beyond ``num_computed_tokens`` whose blocks kvd holds (every shard of them).
        Asks the daemon each time and changes nothing but the session's turn (idempotent).
        The load is asynchronous (True) with ``kvd_async_load``; else it completes in the
        step's ``start_load_kv``, before the forward."""
        hints = self._hints(request)
        keys = self._planner.lookup_keys(request)
        held = 0
        if keys and len(keys) * self._block_size > num_computed_tokens:
            held = len(keys)
            for ns in self._namespaces:
                try:
                    held = min(held, len(self._client.lookup(ns, keys, session_id=hints.session_id)))
                except ClientError as exc:
                    if exc.code != grpc.StatusCode.NOT_FOUND:  # NOT_FOUND: no worker registered yet
                        logger.warning("kvd lookup failed, computing request %s: %s", request.request_id, exc)
                    held = 0
                    break
        matched = self._planner.matched(request.request_id, num_computed_tokens, held)
        return matched, self._async_load and matched > 0

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        """Remember the request's blocks; with ``num_external_tokens`` plan their load."""
        self._planner.allocated(request, blocks.get_block_ids()[0], num_external_tokens, self._hints(request))

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        """The loads planned since the last step, and the saves of the blocks this step fills."""
        scheduled: list[NewRequestStep | RunningRequestStep] = [
            NewRequestStep(r.req_id, r.block_ids[0], r.num_computed_tokens) for r in scheduler_output.scheduled_new_reqs
        ]
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            new_ids = cached.new_block_ids[i]
            ids = new_ids[0] if new_ids is not None else []
            if req_id in cached.resumed_req_ids:
                scheduled.append(NewRequestStep(req_id, ids, cached.num_computed_tokens[i], resumed=True))
            else:
                scheduled.append(RunningRequestStep(req_id, ids, cached.num_computed_tokens[i]))
        plan = self._planner.step(
            scheduled, scheduler_output.num_scheduled_tokens, scheduler_output.scheduled_spec_decode_tokens
        )
        saves = []
        for save in plan.saves:
            self._unconfirmed[save.save_id] = save.req_id
            request = self._planner.request(save.req_id)
            # The blocks' tokens go with them: kvd's KV events carry them to token-keyed routers.
            extra = event_extra_keys(request, save.first, len(save.hashes), self._block_size)
            saves.append(replace(save, origin=save_origin(request, save.first, len(save.hashes), self._block_size, extra)))
            if self._emit_events:
                self._pending_events[save.save_id] = stored_event(
                    request, save.first, len(save.hashes), self._block_size, save.session_id or request.session_id,
                    extra,
                )
        released, self._released = self._released, []
        return KvdConnectorMetadata(
            loads=plan.loads, saves=saves, load_async=self._async_load, released=released,
            preempted=sorted(scheduler_output.preempted_req_ids or ()),
        )

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        """Blocks whose load failed are recomputed by vLLM: plan to save them again. Saves
        the workers confirmed become ``BlockStored`` events for ``take_events``. A released
        request whose saves all ended ends its session's turn now, after its blocks."""
        self._planner.load_failed(connector_output.invalid_block_ids or ())
        outcome = connector_output.kv_connector_worker_meta
        if isinstance(outcome, KvdWorkerMetadata):
            for save_id in outcome.stored:
                self._unconfirmed.pop(save_id, None)
                event = self._pending_events.pop(save_id, None)
                if event is not None:
                    self._events.append(event)
            for save_id in outcome.failed:
                self._unconfirmed.pop(save_id, None)
                self._pending_events.pop(save_id, None)
        for req_id in connector_output.finished_sending or ():
            hints = self._ending.pop(req_id, None)
            if hints is not None:
                self._session_event(hints)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        """Tell kvd the session's turn ended, that it pauses on a tool call (hinted by
        ``kv_transfer_params={"kvd": {"tool": ..., "expected_pause_s": ...}}``), or that the
        session ended (``{"kvd": {"session_end": true}}``). With saves
        of the request still running, vLLM keeps its blocks (True) until the workers report
        them ended, and the session's event waits for them too."""
        req_id = request.request_id
        hints = self._planner.finished(req_id) or self._hints(request)
        if req_id in self._unconfirmed.values():
            self._released.append(req_id)
            self._ending[req_id] = hints
            return True, None
        self._session_event(hints)
        return False, None

    def _session_event(self, hints: SessionHints) -> None:
        if hints.session_id is None:
            return
        if self._notices is not None:
            self._notices.submit(self._send_session_event, hints)
        else:
            self._send_session_event(hints)

    def _send_session_event(self, hints: SessionHints) -> None:
        kind = "session_end" if hints.session_end else "tool_pause" if hints.tool else "turn_end"
        try:
            self._client.session_event(
                self._namespace, hints.session_id, kind, tool=hints.tool, expected_pause_s=hints.expected_pause_s
            )
        except ClientError as exc:
            logger.warning("kvd session event %s of %s failed: %s", kind, hints.session_id, exc)

    def take_events(self) -> Iterable[KVCacheEvent]:
        """``BlockStored`` (medium ``CPU``) for the blocks kvd holds since the last call
        because this engine saved them (the workers confirmed it); vLLM publishes them with
        its own KV events. Nothing when vLLM's KV events are off. Removals are not reported:
        see :mod:`kvd.connector.events` (``kvd serve --kv-events`` publishes them)."""
        events, self._events = self._events, []
        return events

    def _hints(self, request: Request) -> SessionHints:
        engine_session = getattr(request, "session_id", None)
        if engine_session is not None and not usable_name(engine_session):
            # A client's X-Session-ID the daemon would refuse: the request still uses kvd, as
            # a request without a session.
            logger.warning("request %s: ignoring session id %r (not 1..256 printable characters)",
                           request.request_id, engine_session)
            engine_session = None
        try:
            return SessionHints.parse(request.kv_transfer_params, engine_session)
        except ValueError as exc:
            logger.warning("request %s: ignoring kvd hints: %s", request.request_id, exc)
            return SessionHints(session_id=engine_session)

    # ==============================
    # Worker side
    # ==============================

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Read the layout vLLM hands over and register this shard's namespace with it; on a
        GPU host, register the daemon's arena with CUDA so copies reach it directly."""
        caches = PagedCaches(kv_caches, self._num_blocks)
        self._client.register_namespace(
            self._namespace, self._block_size, caches.block_bytes, model_name=self._model_name, pod_id=self._pod_id
        )
        self._transfers = Transfers(self._client, self._namespace, caches)
        self._saves = BackgroundSaves(self._transfers)
        if self._async_load:
            self._background = BackgroundLoads(self._transfers)
        logger.info(
            "KvdConnector: %d layers, %d bytes a block, shared memory: %s, async loads: %s",
            len(caches.names), caches.block_bytes, self._transfers.shared_memory, self._async_load,
        )

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        """Before vLLM reuses a preempted request's blocks: let its running saves end."""
        if not isinstance(kv_connector_metadata, KvdConnectorMetadata):
            raise TypeError(f"KvdConnector got {type(kv_connector_metadata).__name__} metadata")
        if kv_connector_metadata.preempted and self._saves is not None:
            self._saves.wait(kv_connector_metadata.preempted)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        """Copy this step's planned blocks from kvd into the paged caches: before the forward,
        or (``load_async``) start them on the background thread. A block kvd no longer has
        (evicted, or failed its checksum) is reported by ``get_block_ids_with_load_errors``
        and recomputed by vLLM."""
        meta = self._meta()
        if meta.released:
            self._require_saves().release(meta.released)
        if not meta.loads:
            return
        transfers = self._require_transfers()
        if meta.load_async:
            if self._background is None:
                raise RuntimeError("KvdConnector: an asynchronous load, but kvd_async_load is off on this worker")
            for spec in meta.loads:
                self._background.submit(spec.req_id, spec.hashes, spec.block_ids)
            return
        hashes = [h for spec in meta.loads for h in spec.hashes]
        block_ids = [b for spec in meta.loads for b in spec.block_ids]
        self._load_errors.update(transfers.load(hashes, block_ids))

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Nothing to wait for: a synchronous load copied every layer before the forward (on
        a GPU, in order on the copy's stream, which it synchronized), and an asynchronous
        one is not read before ``get_finished`` reports it."""
        return None

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: AttentionMetadata, **kwargs: Any
    ) -> None:
        """Saves are gathered for all layers at once in ``wait_for_save``, after the forward
        has written every layer; a per-layer copy here would add a copy per layer per step."""
        return None

    def wait_for_save(self) -> None:
        """Start copying the blocks this step filled into kvd (the forward wrote them); the
        copies run on the background thread while the next steps run."""
        meta = self._meta()
        if not meta.saves:
            return
        saves = self._require_saves()
        for spec in meta.saves:
            saves.submit(spec.req_id, spec.save_id, spec.hashes, spec.parents, spec.block_ids, spec.session_id,
                         spec.origin)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """(sending, receiving): released requests whose saves all ended (vLLM frees their
        blocks now); requests whose asynchronous load is over (loaded or failed: its failed
        blocks are reported by ``get_block_ids_with_load_errors`` in the same step)."""
        sent = self._saves.finished() if self._saves is not None else set()
        received: set[str] = set()
        if self._background is not None:
            done = self._background.finished()
            for failed in done.values():
                self._load_errors.update(failed)
            received = set(done)
        return sent or None, received or None

    def get_block_ids_with_load_errors(self) -> set[int]:
        """Block ids whose load from kvd failed since the last call (vLLM recomputes them)."""
        errors, self._load_errors = self._load_errors, set()
        return errors

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        """The outcome of the saves ended since the last call (None when there were none)."""
        if self._saves is None:
            return None
        stored, failed = self._saves.take_outcomes()
        if not stored and not failed:
            return None
        return KvdWorkerMetadata(stored=stored, failed=failed)

    def shutdown(self) -> None:
        """Let running background loads, saves and session events finish, unregister the
        arena, close the client."""
        if self._role == KVConnectorRole.SCHEDULER and self._notices is not None:
            self._notices.shutdown(wait=True)
        if self._role == KVConnectorRole.WORKER:
            if self._background is not None:
                self._background.close()
            if self._saves is not None:
                self._saves.close()
            if self._transfers is not None:
                self._transfers.close()
        self._client.close()

    def _meta(self) -> KvdConnectorMetadata:
        meta = self._get_connector_metadata()
        if not isinstance(meta, KvdConnectorMetadata):
            raise TypeError(f"KvdConnector got {type(meta).__name__} metadata")
        return meta

    def _require_transfers(self) -> Transfers:
        if self._transfers is None:
            raise RuntimeError("KvdConnector: blocks to move before register_kv_caches")
        return self._transfers

    def _require_saves(self) -> BackgroundSaves:
        if self._saves is None:
            raise RuntimeError("KvdConnector: blocks to save before register_kv_caches")
        return self._saves
