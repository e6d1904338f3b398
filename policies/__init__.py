"""Retention policies (imported as ``kvd.policies``): pure objects fed events, asked for victims."""

from kvd.policies.base import BlockKey, Policy
from kvd.policies.lru import LruPolicy

POLICIES: dict[str, type[Policy]] = {LruPolicy.name: LruPolicy}


def make_policy(name: str) -> Policy:
    """The policy called ``name``; ValueError names the known ones."""
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; known: {', '.join(sorted(POLICIES))}") from None


__all__ = ["POLICIES", "BlockKey", "LruPolicy", "Policy", "make_policy"]
