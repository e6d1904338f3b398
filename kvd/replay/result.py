"""What a replay measured, per policy, and the floor every policy is compared with.

Tokens are prompt tokens; seconds are simulated. A turn's time to first token (TTFT) is its
wait in an engine's queue, plus the time it waits for KV bytes on its critical path (the
held prefix loaded from the tier it was found in), plus the prefill of the rest.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def percentiles(values: list[float], qs: tuple[int, ...] = (50, 90, 99)) -> dict[str, float]:
    data = np.asarray(values or [0.0])
    return {f"p{q}": float(np.percentile(data, q)) for q in qs}


@dataclass
class PolicyResult:
    """What one policy's replay measured."""

    policy: str
    requests: int
    prompt_tokens: int
    hit_tokens: int
    hit_tokens_by_tier: dict[str, int]
    recomputed_tokens: int
    compulsory_tokens: int
    ttft_s: list[float]
    session_completion_s: list[float]
    bytes_moved: dict[str, int]
    # Prompts not held whole right after their store: longer than a lone tier, no room
    # (leases), or making room for a later part dropped an earlier part or its ancestor.
    unstored_requests: int
    wall_s: float
    problems: list[str]
    kv_transfer_s: list[float] = field(default_factory=list)  # per turn: waiting for KV bytes
    queue_s: list[float] | None = None  # per turn: waiting for an engine (None: no engines modelled)
    # Session events the core refused (a trace's overlapping or late turns; see Replay).
    refused_session_events: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    @property
    def hbm_share_reused(self) -> float:
        """The share of reused prefix bytes served from HBM (0 without hits)."""
        return self.hit_tokens_by_tier.get("hbm", 0) / self.hit_tokens if self.hit_tokens else 0.0

    def summary(self) -> dict:
        done = np.asarray(self.session_completion_s or [0.0])
        total = self.prompt_tokens or 1
        kv = np.asarray(self.kv_transfer_s or [0.0])
        out = {
            "hit_rate": self.hit_rate,
            "hit_rate_by_tier": {t: n / total for t, n in self.hit_tokens_by_tier.items()},
            "prompt_tokens": self.prompt_tokens,
            "hit_tokens": self.hit_tokens,
            "recomputed_tokens": self.recomputed_tokens,
            "compulsory_tokens": self.compulsory_tokens,
            "ttft_s": percentiles(self.ttft_s),
            "kv_transfer_s": {"mean": float(kv.mean()), **percentiles(self.kv_transfer_s)},
            "hbm_share_reused": self.hbm_share_reused,
            "session_completion_s": {"mean": float(done.mean()), "p90": float(np.percentile(done, 90))},
            "bytes_moved": dict(sorted(self.bytes_moved.items())),
            "requests": self.requests,
            "unstored_requests": self.unstored_requests,
            "refused_session_events": self.refused_session_events,
            "wall_s": self.wall_s,
            "check_problems": self.problems,
        }
        if self.queue_s is not None:
            queue = np.asarray(self.queue_s or [0.0])
            out["queue_s"] = {"mean": float(queue.mean()), "p90": float(np.percentile(queue, 90))}
        return out


def floor_summary(result: PolicyResult) -> dict:
    """The floor: TTFT and session completion when nothing is ever transferred (one HBM tier
    holds every block), from a replay of the same trace."""
    done = np.asarray(result.session_completion_s or [0.0])
    return {
        "ttft_s": percentiles(result.ttft_s),
        "session_completion_s": {"mean": float(done.mean()), "p90": float(np.percentile(done, 90))},
    }
