"""What a trace says about its own schedule: the expected order of its requests, Belady's
future, and which request ends each conversation."""

from __future__ import annotations

from kvd.policies import Future
from kvd.replay.trace import Trace, TraceRequest


def expected_order(trace: Trace) -> list[TraceRequest]:
    """The requests in expected arrival order (timestamps; ties in trace order)."""
    return sorted(trace.requests, key=lambda r: (r.arrival_s, r.index))


def future_of(trace: Trace, namespace: str) -> Future:
    """Belady's future: every request in expected order; a session's closed-loop turns
    (those with ``pause_s``) form a group whose arrivals the replay settles as it goes."""
    order = expected_order(trace)
    return Future.from_chains(
        namespace,
        [r.hash_ids for r in order],
        [r.arrival_s for r in order],
        [r.session_id if r.session_id is not None and r.pause_s is not None else None for r in order],
    )


def conversation_ends(trace: Trace) -> set[int]:
    """Indexes of the requests that end their conversation: those no later request continues
    (:func:`continuations`). A request without a session id and without a block continues
    nothing and ends nothing."""
    continued = {earlier for _, earlier_ones in continuations(trace) for earlier in earlier_ones}
    return {r.index for r in trace.requests if r.session_id is not None or r.hash_ids} - continued


def previous_turns(trace: Trace) -> dict[int, int]:
    """Request index -> the index of the request it continues (its conversation's previous
    turn, :func:`continuations`; the latest, where it continues several); a conversation's
    first request has none."""
    return {index: earlier[-1] for index, earlier in continuations(trace) if earlier}


def continuations(trace: Trace) -> list[tuple[int, list[int]]]:
    """Per request, in expected order: its index and the earlier requests it continues. With
    session ids: its session's previous request. Without: the requests whose chain it extends
    through at least all but their last block — continuing as kvd infers it. (A trace's hash
    ids name whole prefixes, so the id at a chain's second-to-last place stands for it.) As
    kvd does, a continuation is told only by an id the conversation brought in itself: a
    two-block prompt after a system prompt that every conversation carries is continued only
    by a request that carries its last block."""
    out: list[tuple[int, list[int]]] = []
    last_of: dict[str, int] = {}
    tails: dict[int, list[int]] = {}  # the id a continuation must carry -> requests waiting for one
    conversation: dict[int, int] = {}  # request index -> its conversation's first request
    brought: dict[int, int] = {}  # id -> the conversation that first carried it
    for req in expected_order(trace):
        if req.session_id is not None:
            previous = last_of.get(req.session_id)
            out.append((req.index, [] if previous is None else [previous]))
            last_of[req.session_id] = req.index
            continue
        ids = req.hash_ids
        mine = req.index
        earlier_ones: list[int] = []
        for h in ids:
            for earlier in tails.pop(h, ()):
                if earlier != req.index:
                    earlier_ones.append(earlier)
                    mine = conversation[earlier]
        out.append((req.index, earlier_ones))
        conversation[req.index] = mine
        for h in ids:
            brought.setdefault(h, mine)
        if ids:
            own = len(ids) >= 2 and brought[ids[-2]] == mine
            tails.setdefault(ids[-2] if own else ids[-1], []).append(req.index)
    return out
