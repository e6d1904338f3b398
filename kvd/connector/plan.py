"""The scheduler side of an engine connector, without the engine: which blocks a step loads
from kvd and which it saves to kvd, and the session hints a request carries.

Units: ``block_size`` and every ``*_tokens`` count tokens; block indexes count the request's
full blocks from its first (block i holds tokens ``[i*block_size, (i+1)*block_size)``);
block ids are the engine's paged-cache block ids. Block keys are the engine's own chained
prefix hashes folded to 64 bits (``block_key``), so a block's key already names everything
before it (and the engine's salt, LoRA and multimodal inputs).

Invariants kept per request: ``saved_upto`` blocks from the first are in kvd or planned to be
saved, and a block is planned for saving only once its tokens are all computed (the step
that computes its last token saves it, after that step's forward).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from kvd.core.errors import MAX_NAME_LEN as MAX_NAME

MASK64 = (1 << 64) - 1


def block_key(block_hash: bytes | int) -> int:
    """The 64-bit kvd key of an engine block hash: an int as is (masked), bytes as their last
    eight bytes big-endian (what vLLM's integer KV events publish for the same block)."""
    if isinstance(block_hash, int):
        return block_hash & MASK64
    return int.from_bytes(bytes(block_hash), "big") & MASK64


def usable_name(value: Any) -> bool:
    """Whether the daemon takes ``value`` as a session or tool name (its ``check_name``:
    1..256 printable characters)."""
    return isinstance(value, str) and 0 < len(value) <= MAX_NAME and value.isprintable()


class EngineRequest(Protocol):
    """What the planner reads of an engine request (vLLM's ``Request`` has these)."""

    request_id: str
    block_hashes: Sequence[bytes | int]  # one per full block of the tokens known so far
    num_tokens: int  # prompt plus output tokens known so far


@dataclass(frozen=True)
class SessionHints:
    """What a request says about its agent session. ``tool`` set: the session pauses on that
    tool call when the request finishes (``expected_pause_s`` seconds, if known);
    ``session_end``: the request is the session's last turn, the session ends with it."""

    session_id: str | None = None
    tool: str | None = None
    expected_pause_s: float | None = None
    session_end: bool = False

    @classmethod
    def parse(cls, kv_transfer_params: Mapping[str, Any] | None, session_id: str | None = None) -> SessionHints:
        """Hints from ``kv_transfer_params["kvd"]`` (``session_id``, ``tool``,
        ``expected_pause_s``, ``session_end``), the session id falling back to the engine's
        own. ValueError names the first bad field."""
        raw = (kv_transfer_params or {}).get("kvd")
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            raise ValueError(f'kv_transfer_params["kvd"] must be an object, got {type(raw).__name__}')
        unknown = sorted(set(raw) - {"session_id", "tool", "expected_pause_s", "session_end"})
        if unknown:
            raise ValueError(f'kv_transfer_params["kvd"] has unknown keys: {", ".join(unknown)}')
        sid = raw.get("session_id", session_id)
        tool = raw.get("tool")
        pause = raw.get("expected_pause_s")
        for name, value in (("session_id", sid), ("tool", tool)):
            if value is not None and not usable_name(value):
                raise ValueError(
                    f'kv_transfer_params["kvd"]["{name}"] must be 1..{MAX_NAME} printable characters, got {value!r}'
                )
        if pause is not None:
            if isinstance(pause, bool) or not isinstance(pause, (int, float)) or not math.isfinite(pause) or pause < 0:
                raise ValueError(f'kv_transfer_params["kvd"]["expected_pause_s"] must be seconds >= 0, got {pause!r}')
            if tool is None:
                raise ValueError('kv_transfer_params["kvd"]["expected_pause_s"] needs a "tool"')
            pause = float(pause)
        if tool is not None and sid is None:
            raise ValueError('kv_transfer_params["kvd"]["tool"] needs a session id')
        end = raw.get("session_end", False)
        if not isinstance(end, bool):
            raise ValueError(f'kv_transfer_params["kvd"]["session_end"] must be true or false, got {end!r}')
        if end and tool is not None:
            raise ValueError('kv_transfer_params["kvd"] cannot both pause on a "tool" and end the session')
        if end and sid is None:
            raise ValueError('kv_transfer_params["kvd"]["session_end"] needs a session id')
        return cls(sid or None, tool, pause, end)


@dataclass(frozen=True)
class LoadSpec:
    """Copy blocks ``hashes[i]`` from kvd into the engine's block ``block_ids[i]``."""

    req_id: str
    hashes: list[int]
    block_ids: list[int]


@dataclass(frozen=True)
class SaveOrigin:
    """What saved blocks were computed from, kept by kvd and published with its KV events:
    each block's tokens, the LoRA adapter, and each block's engine extra keys (one msgpack
    array each, or None)."""

    token_ids: list[list[int]]
    lora_name: str | None = None
    extra_keys: list[bytes | None] | None = None


@dataclass(frozen=True)
class SaveSpec:
    """Copy the engine's block ``block_ids[i]`` into kvd as ``hashes[i]`` (parent ``parents[i]``);
    they are the request's blocks ``first, first + 1, ...``. ``save_id`` names this save in
    the worker's report of it (unique per planner); ``origin``, when the engine knows it,
    goes with the blocks."""

    req_id: str
    session_id: str | None
    hashes: list[int]
    parents: list[int | None]
    block_ids: list[int]
    first: int = 0
    save_id: int = 0
    origin: SaveOrigin | None = None


@dataclass
class StepPlan:
    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)


@dataclass
class NewRequestStep:
    """A request scheduled for the first time (or again after a preemption, ``resumed``):
    ``block_ids`` is its whole block list."""

    req_id: str
    block_ids: Sequence[int]
    num_computed_tokens: int  # before this step
    resumed: bool = False


@dataclass
class RunningRequestStep:
    """A request scheduled again: ``new_block_ids`` were appended to its block list."""

    req_id: str
    new_block_ids: Sequence[int]
    num_computed_tokens: int  # before this step


@dataclass
class _Tracked:
    request: EngineRequest
    hints: SessionHints
    block_ids: list[int] = field(default_factory=list)
    saved_upto: int = 0  # blocks [0, saved_upto) are in kvd or planned to be saved
    lookup: tuple[int, int] | None = None  # (engine's computed tokens, kvd's held blocks) at lookup


class Planner:
    """Scheduler-side bookkeeping of one engine; single-threaded, as the engine's scheduler is."""

    def __init__(self, block_size: int) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = block_size
        self._lookups: dict[str, tuple[int, int]] = {}
        self._tracked: dict[str, _Tracked] = {}
        self._loads: list[LoadSpec] = []
        self._save_ids = 0

    def lookup_keys(self, request: EngineRequest) -> list[int]:
        """The keys a lookup asks kvd for: the full blocks of all tokens but the last (the
        engine must compute at least one token to sample from)."""
        n = min(len(request.block_hashes), max(request.num_tokens - 1, 0) // self.block_size)
        return [block_key(h) for h in request.block_hashes[:n]]

    def matched(self, req_id: str, num_computed_tokens: int, held_blocks: int) -> int:
        """Tokens kvd can add beyond the engine's ``num_computed_tokens`` (block aligned),
        given that kvd holds the first ``held_blocks`` lookup keys. Repeatable: only the last
        answer for a request is remembered."""
        self._lookups[req_id] = (num_computed_tokens, held_blocks)
        return max(0, held_blocks * self.block_size - num_computed_tokens)

    def allocated(
        self, request: EngineRequest, block_ids: Sequence[int], num_external_tokens: int, hints: SessionHints
    ) -> None:
        """The engine allocated ``block_ids`` (all of the request's) and will take
        ``num_external_tokens`` tokens from kvd; plan that load for the next step."""
        req_id = request.request_id
        tracked = self._tracked.get(req_id)
        if tracked is None:
            tracked = self._tracked[req_id] = _Tracked(request, hints)
        tracked.block_ids = list(block_ids)
        looked = self._lookups.pop(req_id, None)
        if looked is None:
            if num_external_tokens:
                raise ValueError(f"request {req_id}: {num_external_tokens} external tokens without a lookup")
            return
        computed, held = looked
        tracked.lookup = looked
        tracked.saved_upto = max(tracked.saved_upto, held)
        if num_external_tokens <= 0:
            return
        first = computed // self.block_size
        count = num_external_tokens // self.block_size
        if first + count > held or first + count > len(tracked.block_ids):
            raise ValueError(
                f"request {req_id}: {num_external_tokens} external tokens after {computed} exceed "
                f"the {held} blocks kvd holds or the {len(tracked.block_ids)} allocated"
            )
        keys = [block_key(h) for h in request.block_hashes[first : first + count]]
        self._loads.append(LoadSpec(req_id, keys, tracked.block_ids[first : first + count]))

    def step(
        self,
        scheduled: Iterable[NewRequestStep | RunningRequestStep],
        num_scheduled_tokens: Mapping[str, int],
        spec_tokens: Mapping[str, Sequence[int]] | None = None,
    ) -> StepPlan:
        """This step's plan: the loads planned since the last step, and the saves of every
        block whose last token this step computes. Speculative tokens do not count as
        computed (they may be rejected)."""
        plan = StepPlan(loads=self._loads)
        self._loads = []
        for s in scheduled:
            tracked = self._tracked.get(s.req_id)
            if tracked is None:
                continue  # scheduled without update_state_after_alloc: not ours to save
            if isinstance(s, NewRequestStep):
                tracked.block_ids = list(s.block_ids)
            else:
                tracked.block_ids.extend(s.new_block_ids)
            done = s.num_computed_tokens + num_scheduled_tokens.get(s.req_id, 0)
            done -= len((spec_tokens or {}).get(s.req_id, ()))
            keys = tracked.request.block_hashes
            full = min(done // self.block_size, len(keys), len(tracked.block_ids))
            if full > tracked.saved_upto:
                lo = tracked.saved_upto
                hashes = [block_key(h) for h in keys[lo:full]]
                parents: list[int | None] = [block_key(keys[lo - 1]) if lo else None, *hashes[:-1]]
                self._save_ids += 1
                plan.saves.append(
                    SaveSpec(s.req_id, tracked.hints.session_id, hashes, parents, tracked.block_ids[lo:full], lo,
                             self._save_ids)
                )
                tracked.saved_upto = full
        return plan

    def load_failed(self, block_ids: Iterable[int]) -> None:
        """Blocks whose load failed will be recomputed by the engine: save them again then."""
        failed = set(block_ids)
        if not failed:
            return
        for tracked in self._tracked.values():
            for i, b in enumerate(tracked.block_ids[: tracked.saved_upto]):
                if b in failed:
                    tracked.saved_upto = i
                    break

    def request(self, req_id: str) -> EngineRequest | None:
        """The engine request of a tracked (allocated, not finished) request."""
        tracked = self._tracked.get(req_id)
        return tracked.request if tracked else None

    def hints(self, req_id: str) -> SessionHints | None:
        tracked = self._tracked.get(req_id)
        return tracked.hints if tracked else None

    def finished(self, req_id: str) -> SessionHints | None:
        """Forget a finished request; its hints (None if it was never allocated)."""
        self._lookups.pop(req_id, None)
        tracked = self._tracked.pop(req_id, None)
        return tracked.hints if tracked else None

    @property
    def tracked(self) -> int:
        return len(self._tracked)
