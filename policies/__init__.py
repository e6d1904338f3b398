"""Retention policies (imported as ``kvd.policies``): pure objects fed events, asked for victims."""

from __future__ import annotations

from kvd.core.sessions import SessionTable
from kvd.policies.base import RETENTION_CLASSES, BlockKey, Policy, Prefetch
from kvd.policies.belady import BeladyPolicy, Future
from kvd.policies.lru import LruPolicy
from kvd.policies.typed import TypedPolicy

POLICIES: dict[str, type[Policy]] = {p.name: p for p in (LruPolicy, TypedPolicy, BeladyPolicy)}
DAEMON_POLICIES = ("lru", "typed")  # belady needs the future: replay only
DEFAULT_POLICY = "typed"


def make_policy(name: str, sessions: SessionTable | None = None, future: Future | None = None) -> Policy:
    """The policy called ``name``, over the core's session table (policies that use one).

    ValueError names the known ones, or says why one cannot run here.
    """
    if name == LruPolicy.name:
        return LruPolicy()
    if name == TypedPolicy.name:
        return TypedPolicy(sessions)
    if name == BeladyPolicy.name:
        return BeladyPolicy(future)
    raise ValueError(f"unknown policy {name!r}; known: {', '.join(sorted(POLICIES))}")


__all__ = [
    "DAEMON_POLICIES",
    "DEFAULT_POLICY",
    "POLICIES",
    "RETENTION_CLASSES",
    "BeladyPolicy",
    "BlockKey",
    "Future",
    "LruPolicy",
    "Policy",
    "Prefetch",
    "TypedPolicy",
    "make_policy",
]
