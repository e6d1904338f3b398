"""Walks along a namespace's chains: pure reads of the catalog, no changes.

A chain runs from a root (no parent) through each block's parent link. A lookup stops at the
first missing block, so a block is reachable only while every ancestor of it is held; these
walks answer who is above and who is below a block. ``present`` lets a caller that plans
changes (:mod:`kvd.core.placement`) walk the catalog as its plan would leave it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from kvd.core.catalog import BlockKey, BlockRecord, Namespace


def chain_up(ns: Namespace, h: int | None) -> Iterator[BlockRecord]:
    """The records of ``h`` and its ancestors, ``h`` first, while the catalog has them (ready
    or being written); stops at the first missing one, or at a cycle."""
    seen: set[int] = set()
    while h is not None and h not in seen and (record := ns.blocks.get(h)) is not None:
        seen.add(h)
        yield record
        h = record.parent


def reaches_a_root(ns: Namespace, h: int | None) -> bool:
    """Whether ``h`` and every ancestor of it are in the catalog (ready or being written): a
    lookup of a chain through ``h`` can reach ``h``. True for None (a chain's start)."""
    if h is None:
        return True
    blocks = ns.blocks
    # chain_up, inlined (it walks 2,000 a store); a count bounds the walk in place of a
    # cycle check: no chain is longer than the namespace.
    for _ in range(len(blocks)):
        record = blocks.get(h)
        if record is None:
            return False
        h = record.parent
        if h is None:
            return True
    return False


def held_ancestors(ns: Namespace, record: BlockRecord) -> list[BlockKey]:
    """Keys of ``record``'s ancestors with a ready copy, root first; the walk stops at the
    first ancestor without one."""
    out = []
    parent = record.parent
    blocks, visible, name = ns.blocks, ns.visible, ns.name  # visible: the hashes with a ready copy
    # A count bounds the walk in place of a cycle check: no chain is longer than the namespace.
    for _ in range(len(blocks)):
        if parent is None or parent not in visible:
            break
        out.append((name, parent))
        parent = blocks[parent].parent
    out.reverse()
    return out


def descendants(
    ns: Namespace, h: int, present: Callable[[BlockRecord], bool] = lambda record: True
) -> Iterator[BlockRecord]:
    """Every record below ``h`` (children, their children, ...), depth first, each once.
    A record that is not ``present`` is skipped with everything below it. The caller may
    drop copies of a yielded record before asking for the next one: a record's children
    are read when it is yielded."""
    stack = list(ns.children.get(h, ()))
    while stack:
        record = ns.blocks.get(stack.pop())
        if record is None or not present(record):
            continue
        stack.extend(ns.children.get(record.hash, ()))
        yield record


class LoadChain:
    """The keys of the chain a load reads: its held hashes and the ancestors of its first,
    as a set for ``in`` tests only. Walked on the first test, so a load that makes no room
    (nothing asks) does not walk a long chain's prefix once a batch."""

    __slots__ = ("_ns", "_hashes", "_keys")

    def __init__(self, ns: Namespace, hashes: Sequence[int]) -> None:
        self._ns = ns
        self._hashes = hashes
        self._keys: set[BlockKey] | None = None

    def __contains__(self, key: object) -> bool:
        if self._keys is None:
            ns, hashes = self._ns, self._hashes
            keys = {(ns.name, h) for h in hashes if h in ns.blocks}
            first = ns.blocks.get(hashes[0]) if hashes else None
            keys.update(record.key for record in chain_up(ns, first.parent if first is not None else None))
            self._keys = keys
        return key in self._keys
