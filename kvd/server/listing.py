"""Pages of held blocks in key order (namespace, then hash), for ListBlocks and Snapshot: the
node's own copies and those it put in the cluster tier."""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass

from kvd.core.catalog import BlockKey
from kvd.core.errors import InvalidArgument
from kvd.core.manager import KvCore
from kvd.media import CLUSTER, TIER_CODES, TierName
from kvd.server.codec import block_key, parse_block_key
from kvd.v1 import types_pb2

DEFAULT_PAGE = 1000
MAX_PAGE = 100_000


def held_page(
    core: KvCore, namespace: str, page_size: int, page_token: str, allows: Callable[[str], bool] = lambda ns: True
) -> tuple[list[Listed], str]:
    """One page of the blocks this node holds after ``page_token``, and the next page's token
    ("" at the end), of ``namespace`` (every namespace the caller ``allows`` when empty): the
    blocks readable in its own tiers, and those it put in the cluster tier (a router's
    resync must count them as the Watch stream did).

    One pass keeping the page's worth of smallest keys: no sort of every block per page.
    Raises InvalidArgument for a page size over MAX_PAGE or a foreign token,
    UnknownNamespace for an unknown namespace.
    """
    page = page_size or DEFAULT_PAGE
    if page > MAX_PAGE:
        raise InvalidArgument(f"page_size must be at most {MAX_PAGE}")
    after = b""
    if page_token:
        try:
            after = bytes.fromhex(page_token)
            parse_block_key(after)
        except ValueError:
            raise InvalidArgument("page_token is not one this daemon issued") from None
    if namespace:
        core.namespace(namespace)  # UnknownNamespace
    published = core.exports.published
    keyed = (
        (key, r.key)
        for r in core.blocks(namespace or None)
        if (r.fastest_ready() or r.key in published)
        and allows(r.namespace)
        and (key := block_key(r.namespace, r.hash)) > after
    )
    cluster_only = (
        (key, k)
        for k in published
        if (not namespace or k[0] == namespace)
        and allows(k[0])
        and core.catalog.record(k) is None
        and (key := block_key(*k)) > after
    )
    chosen = heapq.nsmallest(page + 1, itertools.chain(keyed, cluster_only), key=lambda kr: kr[0])
    more = len(chosen) > page
    chosen = chosen[:page]
    return [_listed(core, k) for _, k in chosen], chosen[-1][0].hex() if more else ""


@dataclass(frozen=True, slots=True)
class Listed:
    """A block as a listing shows it: its tiers fastest first, ``cluster`` last."""

    namespace: str
    hash: int
    parent: int | None
    nbytes: int
    tiers: tuple[TierName, ...]


def _listed(core: KvCore, key: BlockKey) -> Listed:
    record = core.catalog.record(key)
    put = core.exports.published.get(key)
    cluster = (CLUSTER,) if put is not None else ()
    if record is not None:
        return Listed(record.namespace, record.hash, record.parent, record.nbytes, (*record.ready_tiers(), *cluster))
    return Listed(key[0], key[1], put[0], put[1], cluster)


def block_info(block: Listed) -> types_pb2.BlockInfo:
    info = types_pb2.BlockInfo(namespace=block.namespace, hash=block.hash, nbytes=block.nbytes)
    if block.parent is not None:
        info.parent = block.parent
    info.tiers.extend(TIER_CODES[t] for t in block.tiers)
    return info
