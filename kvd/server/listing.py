"""Pages of held blocks in key order (namespace, then hash), for ListBlocks and Snapshot."""

from __future__ import annotations

import heapq
from collections.abc import Callable

from kvd.core.catalog import BlockRecord
from kvd.core.errors import InvalidArgument
from kvd.core.manager import KvCore
from kvd.media import TIER_CODES
from kvd.server.codec import block_key, parse_block_key
from kvd.v1 import types_pb2

DEFAULT_PAGE = 1000
MAX_PAGE = 100_000


def held_page(
    core: KvCore, namespace: str, page_size: int, page_token: str, allows: Callable[[str], bool] = lambda ns: True
) -> tuple[list[BlockRecord], str]:
    """One page of readable blocks after ``page_token``, and the next page's token ("" at the end),
    of ``namespace`` (every namespace the caller ``allows`` when empty).

    One pass over the catalog keeping the page's worth of smallest keys: no sort of every
    block per page. Raises InvalidArgument for a page size over MAX_PAGE or a foreign token,
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
    keyed = (
        (key, r)
        for r in core.blocks(namespace or None)
        if r.fastest_ready() and allows(r.namespace) and (key := block_key(r.namespace, r.hash)) > after
    )
    chosen = heapq.nsmallest(page + 1, keyed, key=lambda kr: kr[0])
    more = len(chosen) > page
    chosen = chosen[:page]
    return [r for _, r in chosen], chosen[-1][0].hex() if more else ""


def block_info(record: BlockRecord) -> types_pb2.BlockInfo:
    info = types_pb2.BlockInfo(namespace=record.namespace, hash=record.hash, nbytes=record.nbytes)
    if record.parent is not None:
        info.parent = record.parent
    info.tiers.extend(TIER_CODES[t] for t in record.ready_tiers())
    return info
