"""SessionTable (kvd/core/sessions.py) on hand-made chains, and the core's session events.

Hashes are small ints standing for chained prefix hashes; times are seconds on a clock the
test passes in. Every expected value below is worked out from the chains by hand.
"""

from __future__ import annotations

import pytest

from kvd.core.errors import InvalidArgument, SessionStateError, UnknownNamespace, UnknownSession
from kvd.core.events import BlockStored, SessionChanged
from kvd.core.manager import BlockSpec, KvCore, StoreGrant
from kvd.core.sessions import (
    ACTIVE,
    ENDED,
    IDLE,
    MAX_EXPECTED_PAUSE_S,
    MAX_SESSION_ID_LEN,
    TOOL_PAUSE,
    SessionConfig,
    SessionTable,
)
from kvd.policies import LruPolicy, TypedPolicy
from kvd.tiers import ExtentAllocator

NS = "ns"
PAGE = 4096


def k(h: int) -> tuple[str, int]:
    return (NS, h)


def infer(table: SessionTable, hashes, now: float = 0.0, last_partial: bool = False):
    """An unhinted request's prompt: what the core does for a store without a session id."""
    return table.observe_store(NS, None, hashes, now, last_partial)


# -- inference --------------------------------------------------------------------------------


def test_a_chain_extending_a_whole_chain_continues_its_session():
    t = SessionTable()
    s = infer(t, [1, 2, 3])
    assert s.inferred and s.turns == 1
    again = infer(t, [1, 2, 3, 4, 5], now=1)
    assert again is s
    assert s.turns == 2 and s.chain == [1, 2, 3, 4, 5] and len(t) == 1


def test_a_chain_extending_all_but_the_last_partial_block_continues_its_session():
    t = SessionTable()
    s = infer(t, [1, 2, 3], last_partial=True)  # block 3 is partial: the next turn re-hashes it
    nxt = infer(t, [1, 2, 30, 31], now=1)
    assert nxt is s and s.turns == 2 and s.chain == [1, 2, 30, 31]
    # The partial block left the chain: no session holds it any more.
    assert t.refs.get(k(3)) is None and t.refs[k(30)] == 1


def test_a_chain_that_does_not_extend_any_starts_a_new_session():
    t = SessionTable()
    s = infer(t, [1, 2, 3])
    other = infer(t, [1, 7, 8], now=1)  # shares only the root: not s's chain up to its tail
    assert other is not s and other.turns == 1 and len(t) == 2
    unrelated = infer(t, [40, 41], now=2)
    assert unrelated not in (s, other) and len(t) == 3


def test_a_key_shared_by_two_chains_is_not_used_to_infer():
    # Without sharing, [1, 2, 7, 8] would continue s (it extends all of s's chain but its last).
    t = SessionTable()
    s = infer(t, [1, 2])
    t.turn_start(NS, "h", [1, 2, 9], now=1)  # a hinted session takes 1 and 2 into its chain too
    assert t.is_shared(k(1)) and t.is_shared(k(2))
    fresh = infer(t, [1, 2, 7, 8], now=2)
    assert fresh is not s and fresh.id != "h" and fresh.turns == 1 and len(t) == 3
    # Control: the same request with no sharing continues s.
    t2 = SessionTable()
    s2 = infer(t2, [1, 2])
    assert infer(t2, [1, 2, 7, 8], now=2) is s2


def test_the_longest_match_wins():
    # Arbitrary ids (not chained) so that two sessions' tails can both occur in one request.
    t = SessionTable()
    s1 = infer(t, [10, 11])
    s2 = infer(t, [20, 21, 22, 23], now=1)
    assert s1 is not s2
    # Only s1's tail (11, at position 1) present: s1 continues; its chain is now [10, 11, 50].
    assert infer(t, [10, 11, 50], now=2) is s1 and s1.turns == 2
    # s1's tail 11 at position 1 and s2's tail 23 at position 3: the deeper match, s2, wins.
    assert infer(t, [10, 11, 22, 23, 99], now=3) is s2
    assert s2.turns == 2 and s1.turns == 2 and len(t) == 2


# -- hinted sessions and stores in parts ------------------------------------------------------


def test_hinted_sessions_are_found_by_id_whatever_their_chains():
    t = SessionTable()
    a = t.turn_start(NS, "a", [1, 2], now=0)
    assert (a.id, a.inferred, a.turns, a.state) == ("a", False, 1, ACTIVE)
    t.turn_end(NS, "a", now=1)
    again = t.turn_start(NS, "a", [5, 6], now=2)  # an unrelated chain, same id: same session
    assert again is a and a.turns == 2 and a.chain == [5, 6]
    assert t.get(NS, "a") is a and t.get("other-ns", "a") is None
    # A store of the turn under way (the usual daemon flow) is not another turn.
    assert t.observe_store(NS, "a", [5, 6, 7], now=3) is a
    assert a.turns == 2 and a.chain == [5, 6, 7]
    # An ended session's id used again is a new program.
    t.end(NS, "a", now=4)
    b = t.turn_start(NS, "a", [5], now=5)
    assert b is not a and b.turns == 1 and b.state == ACTIVE


def test_the_parent_linked_parts_of_one_store_extend_the_same_turn():
    t = SessionTable()
    s = t.observe_store(NS, None, [1, 2], now=0, parent=None)
    assert s.turns == 1 and s.grown == 2
    part = t.observe_store(NS, None, [3, 4], now=0.1, parent=2)  # the store's second batch
    assert part is s
    assert s.turns == 1 and s.chain == [1, 2, 3, 4] and s.grown == 4  # 2 + 2 blocks this turn
    # A retried part (its parent is no longer a tail) and a retried whole store: same turn.
    assert t.observe_store(NS, None, [3, 4], now=0.2, parent=2) is s
    assert t.observe_store(NS, None, [1, 2, 3, 4], now=0.3) is s
    assert s.turns == 1 and s.chain == [1, 2, 3, 4] and len(t) == 1
    # A part retried after later parts were stored (it waited for room while the client's
    # pipeline sent them): the chain already holds it, the turn stays one.
    assert t.observe_store(NS, None, [5], now=0.4, parent=4) is s
    assert t.observe_store(NS, None, [6], now=0.4, parent=5) is s
    assert t.observe_store(NS, None, [5], now=0.5, parent=4) is s
    assert s.turns == 1 and s.chain == [1, 2, 3, 4, 5, 6] and len(t) == 1
    # The same for a hinted session's parts.
    h = t.observe_store(NS, "h", [20, 21], now=1)
    assert t.observe_store(NS, "h", [22], now=1.1, parent=21) is h
    assert h.turns == 1 and h.chain == [20, 21, 22]
    # After the turn ended, the next store that extends the chain is the next turn.
    t.turn_end(NS, "h", now=2)
    assert t.observe_store(NS, "h", [20, 21, 22, 23], now=3) is h and h.turns == 2


# -- sharing ----------------------------------------------------------------------------------


def test_refs_owner_is_shared_and_latest():
    t = SessionTable()
    s1 = t.turn_start(NS, "s1", [1, 2, 3], now=0)
    s2 = t.turn_start(NS, "s2", [1, 2, 9], now=1)
    assert t.refs == {k(1): 2, k(2): 2, k(3): 1, k(9): 1}
    assert t.owner(k(3)) is s1 and t.owner(k(9)) is s2
    assert t.owner(k(1)) is None and t.owner(k(77)) is None  # shared; unknown
    assert t.is_shared(k(1)) and t.is_shared(k(2)) and not t.is_shared(k(3)) and not t.is_shared(k(77))
    assert t.latest(k(1)) is s2 and t.latest(k(3)) is s1
    # s2's next turn moves past 9: 9 has no session left.
    t.turn_start(NS, "s2", [1, 2, 10], now=2)
    assert k(9) not in t.refs and t.owner(k(9)) is None and t.latest(k(9)) is None
    t.end(NS, "s1", now=3)
    assert t.refs == {k(1): 1, k(2): 1, k(10): 1}
    assert t.owner(k(3)) is None  # an ended session's private block is an orphan
    assert t.check() == []


def test_take_reclassified_when_a_block_changes_holders():
    t = SessionTable()
    t.turn_start(NS, "s1", [1, 2, 3], now=0)
    assert t.take_reclassified() == {k(1), k(2), k(3)}  # held by no chain before: now s1's
    t.turn_start(NS, "s2", [1, 2, 9], now=1)
    assert t.take_reclassified() == {k(1), k(2), k(9)}  # 1, 2 became shared
    assert t.take_reclassified() == set()  # drained
    t.turn_start(NS, "s2", [1, 2, 10], now=2)
    assert t.take_reclassified() == {k(9), k(10)}  # s2 moved past 9: orphaned
    t.end(NS, "s1", now=3)
    assert t.take_reclassified() == {k(1), k(2), k(3)}  # 1, 2 private again; 3 orphaned
    t.turn_start(NS, "s3", [1, 2, 11], now=4)
    t.turn_start(NS, "s4", [1, 12], now=4)
    assert t.take_reclassified() == {k(1), k(2), k(11), k(12)}  # 1: from two holders to three


def test_hinted_refs_count_only_the_chains_of_named_sessions():
    t = SessionTable()
    t.turn_start(NS, "a", [1, 2], now=0)
    t.turn_start(NS, "b", [1, 3], now=0)
    t.observe_store(NS, None, [1, 7], now=0)  # extends no chain: a new inferred session
    assert t.refs[k(1)] == 3 and t.hinted_refs == {k(1): 2, k(2): 1, k(3): 1}
    t.end(NS, "a", now=1)
    assert t.hinted_refs == {k(1): 1, k(3): 1}
    assert t.check() == []
    t.hinted_refs[k(7)] = 1  # an inferred chain counted as named
    assert any("hinted reference counts" in p for p in t.check())


def test_a_block_taken_up_after_its_session_ended_is_a_shared_prefix():
    t = SessionTable()
    t.turn_start(NS, "s1", [1, 2, 3], now=0)
    t.end(NS, "s1", now=1)
    assert not t.is_shared(k(1))  # one session's chain so far
    t.turn_start(NS, "s2", [1, 2, 4], now=2)  # the next session on the same repository
    assert t.is_shared(k(1)) and t.is_shared(k(2))
    assert not t.is_shared(k(4)) and t.owner(k(4)).id == "s2"
    # A session taking back a block it let go of shares it with nobody.
    t.turn_start(NS, "s2", [1, 2, 5], now=3)
    t.turn_start(NS, "s2", [1, 2, 4], now=4)
    assert not t.is_shared(k(4)) and t.owner(k(4)).id == "s2"
    assert t.check() == []


def test_a_finished_program_leaves_the_context_it_started_from_as_a_shared_prefix():
    t = SessionTable()
    t.turn_start(NS, "one-shot", [1, 2, 3], now=0)
    t.end(NS, "one-shot", now=1)
    assert not any(t.is_shared(k(h)) for h in (1, 2, 3))  # a single turn: nothing to start from
    t.turn_start(NS, "agent", [7, 8, 9], now=2, last_partial=True)  # 9: a partial block
    t.turn_start(NS, "agent", [7, 8, 10, 11], now=3)
    assert not t.is_shared(k(7))
    t.end(NS, "agent", now=4)
    assert [t.is_shared(k(h)) for h in (7, 8, 9, 10, 11)] == [True, True, False, False, False]
    assert t.check() == []

def test_an_inferred_conversation_leaves_no_shared_prefix_when_it_ends():
    # An inferred session is one chain, not a program started from a repository: its first
    # prompt is its own, and another conversation sharing it is seen sharing it while it lives.
    t = SessionTable()
    s = infer(t, [7, 8, 9], now=0, last_partial=True)
    assert infer(t, [7, 8, 10, 11], now=1) is s and s.turns == 2
    t.end(NS, s.id, now=2)
    assert not any(t.is_shared(k(h)) for h in (7, 8, 9, 10, 11))
    assert t.check() == []


def test_released_keys_are_remembered_up_to_the_bound():
    t = SessionTable(SessionConfig(max_shared_keys=2))
    for sid, h in (("a", 5), ("b", 6), ("c", 7)):
        t.turn_start(NS, sid, [h], now=0)
        t.end(NS, sid, now=0)
    t.turn_start(NS, "d", [5, 6, 7], now=1)
    assert [t.is_shared(k(h)) for h in (5, 6, 7)] == [False, True, True]  # 5 was forgotten
    assert t.check() == []


# -- states and observations ------------------------------------------------------------------


def test_state_transitions_and_the_observations_they_emit():
    t = SessionTable()
    s = t.turn_start(NS, "a", [1], now=10.0)
    assert s.state == ACTIVE
    obs = t.take_observations()
    assert [(o.kind, o.tool, o.turns, o.session) for o in obs] == [("turn", None, 1, s)]
    assert t.take_changes() == [s]

    t.turn_end(NS, "a", now=11.0)
    assert s.state == IDLE and t.take_observations() == []
    t.tool_pause(NS, "a", "run_tests", 30.0, now=12.0)
    assert (s.state, s.tool, s.expected_pause_s, s.paused_at) == (TOOL_PAUSE, "run_tests", 30.0, 12.0)
    t.tool_resume(NS, "a", now=19.5)
    assert s.state == ACTIVE and s.tool is None and s.paused_at is None
    [pause] = t.take_observations()
    assert (pause.kind, pause.tool, pause.seconds, pause.turns, pause.expected_s) == ("pause", "run_tests", 7.5, 1, 30.0)
    # The turn that follows a resume teaches no second pause.
    t.turn_start(NS, "a", [1, 2], now=20.0)
    [turn] = t.take_observations()
    assert (turn.kind, turn.turns) == ("turn", 2)

    # A pause that ends with a turn start (no resume event) is learnt at the turn start.
    t.turn_end(NS, "a", now=21.0)
    t.tool_pause(NS, "a", "bash", None, now=22.0)
    t.turn_start(NS, "a", [1, 2, 3], now=24.25)
    pause, turn = t.take_observations()
    assert (pause.kind, pause.tool, pause.seconds, pause.expected_s) == ("pause", "bash", 2.25, None)
    assert (turn.kind, turn.turns) == ("turn", 3)

    # A turn after a plain turn end: the gap since the end, no tool.
    t.turn_end(NS, "a", now=25.0)
    t.turn_start(NS, "a", [1, 2, 3, 4], now=26.5)
    pause, _ = t.take_observations()
    assert (pause.kind, pause.tool, pause.seconds) == ("pause", None, 1.5)

    t.end(NS, "a", now=30.0)
    assert s.state == ENDED and not s.live
    [end] = t.take_observations()  # reported 3.5 s after its last sign of life (a turn start)
    assert (end.kind, end.seconds, end.turns, end.session, end.reported) == ("end", 3.5, 4, s, True)


def test_a_session_that_expires_is_an_unreported_end():
    t = SessionTable(SessionConfig(idle_expiry_s=100.0))
    s = t.turn_start(NS, "a", [1], now=10.0)
    t.turn_end(NS, "a", now=12.0)
    t.take_observations()
    assert t.expire(now=112.0) == 1
    [end] = t.take_observations()
    assert (end.kind, end.seconds, end.session, end.reported) == ("end", 100.0, s, False)


def test_inferred_sessions_learn_the_gap_since_their_last_sign_of_life():
    t = SessionTable()
    s = infer(t, [1, 2], now=3.0)
    t.take_observations()
    infer(t, [1, 2, 3], now=7.5)  # no turn end for inferred sessions: the store stands in
    pause, turn = t.take_observations()
    assert (pause.kind, pause.tool, pause.seconds, pause.session) == ("pause", None, 4.5, None)
    assert (turn.kind, turn.turns, turn.session) == ("turn", 2, s)


def test_unknown_sessions_raise_unknown_session():
    t = SessionTable()
    for call in (
        lambda: t.turn_end(NS, "nobody", 0),
        lambda: t.tool_pause(NS, "nobody", "bash", None, 0),
        lambda: t.tool_resume(NS, "nobody", 0),
        lambda: t.end(NS, "nobody", 0),
    ):
        with pytest.raises(UnknownSession):
            call()
    t.turn_start(NS, "a", [1], 0)
    with pytest.raises(UnknownSession):
        t.turn_end("other-ns", "a", 0)  # sessions are per namespace


def test_resume_when_not_paused_and_events_after_end_are_state_errors():
    t = SessionTable()
    t.turn_start(NS, "a", [1], 0)
    with pytest.raises(SessionStateError, match="not in a tool pause"):
        t.tool_resume(NS, "a", 1)
    t.turn_end(NS, "a", 1)
    with pytest.raises(SessionStateError):
        t.tool_resume(NS, "a", 2)  # idle is not paused either
    t.end(NS, "a", 3)
    for call in (
        lambda: t.turn_end(NS, "a", 4),
        lambda: t.tool_pause(NS, "a", "bash", None, 4),
        lambda: t.tool_resume(NS, "a", 4),
        lambda: t.end(NS, "a", 4),
    ):
        with pytest.raises(SessionStateError, match="has ended"):
            call()


def test_bad_tool_expected_seconds_and_id_length_are_invalid_arguments():
    t = SessionTable()
    t.turn_start(NS, "a", [1], 0)
    with pytest.raises(InvalidArgument):
        t.tool_pause(NS, "a", "", None, 1)
    for bad in (0.0, -1.0, 86_400.001):
        with pytest.raises(InvalidArgument):
            t.tool_pause(NS, "a", "bash", bad, 1)
    assert t.get(NS, "a").state == ACTIVE  # nothing changed
    t.tool_pause(NS, "a", "bash", 86_400.0, 1)  # the upper bound itself is allowed
    with pytest.raises(InvalidArgument):
        t.turn_start(NS, "x" * (MAX_SESSION_ID_LEN + 1), [1], 2)
    with pytest.raises(InvalidArgument):
        t.turn_start(NS, "", [1], 2)
    longest = t.turn_start(NS, "x" * MAX_SESSION_ID_LEN, [1], 2)
    assert longest.id == "x" * MAX_SESSION_ID_LEN


# -- expiry and check ---------------------------------------------------------------------------


def test_expire_by_idle_time():
    t = SessionTable(SessionConfig(idle_expiry_s=100.0))
    t.turn_start(NS, "a", [1], now=0)
    t.turn_start(NS, "b", [2], now=10)
    t.turn_end(NS, "a", now=20)  # a's last activity is now 20, later than b's 10
    assert t.expire(now=109.9) == 0
    assert t.expire(now=110.0) == 1  # b: idle exactly 100 s
    assert t.get(NS, "b") is None and t.get(NS, "a") is not None
    assert k(2) not in t.refs and t.refs == {k(1): 1}
    assert t.expire(now=120.0) == 1 and len(t) == 0 and t.refs == {}
    assert t.check() == []


def test_an_ended_session_drops_its_chain_and_is_forgotten_after_its_grace():
    t = SessionTable(SessionConfig(ended_expiry_s=60.0, idle_expiry_s=1e9))
    t.turn_start(NS, "old", [9], now=0)  # live and older than "a": does not hold the forgetting back
    t.turn_start(NS, "a", [1, 2, 3], now=0)
    t.end(NS, "a", now=10)
    a = t.get(NS, "a")
    assert a.chain == [] and t.refs == {k(9): 1}  # nothing held, nothing kept for it
    assert t.expire(now=69.9) == 0
    with pytest.raises(SessionStateError, match="has ended"):
        t.turn_end(NS, "a", 50)  # within the grace: a late event is refused as after the end
    assert t.expire(now=70.0) == 1 and t.get(NS, "a") is None
    with pytest.raises(UnknownSession):
        t.turn_end(NS, "a", 71)  # forgotten: an unknown session now
    assert t.turn_start(NS, "a", [1], now=72).turns == 1  # the id may start a new session
    assert [s.id for s in t.sessions()] == ["old", "a"] and t.check() == []


def test_an_id_reused_within_the_grace_is_a_new_session_its_expiry_does_not_drop():
    t = SessionTable(SessionConfig(ended_expiry_s=60.0, idle_expiry_s=1e9))
    t.turn_start(NS, "a", [1, 2], now=0)
    t.end(NS, "a", now=10)
    again = t.turn_start(NS, "a", [1, 3], now=20)  # the same id, within the grace: a new program
    assert again.live and again.turns == 1
    assert t.expire(now=70.0) == 0  # the first "a"'s grace ends: the new one stays
    assert t.get(NS, "a") is again and t.refs == {k(1): 1, k(3): 1} and t.hinted_refs == t.refs
    assert t.check() == []


def test_expire_beyond_max_sessions_forgets_the_least_recently_active():
    t = SessionTable(SessionConfig(max_sessions=2, idle_expiry_s=1e9))
    t.turn_start(NS, "a", [1], now=0)
    t.turn_start(NS, "b", [2], now=1)
    t.turn_start(NS, "c", [3], now=2)
    t.turn_end(NS, "a", now=3)  # a is now the most recently active
    assert t.expire(now=4) == 1
    assert [s.id for s in t.sessions()] == ["c", "a"]
    assert t.refs == {k(1): 1, k(3): 1}
    ended = t.take_changes()
    assert any(s.id == "b" and s.state == ENDED for s in ended)


def test_chains_beyond_max_chain_keys_end_the_least_recently_active():
    t = SessionTable(SessionConfig(max_chain_keys=5, idle_expiry_s=1e9))
    t.turn_start(NS, "a", [1, 2], now=0)
    t.turn_start(NS, "b", [3, 4], now=1)
    t.turn_start(NS, "c", [5, 6], now=2)  # 6 keys held: one session too many
    assert t.check() == []
    assert t.expire(now=3) == 1
    assert [s.id for s in t.sessions()] == ["b", "c"] and t.check() == []
    t.turn_start(NS, "b", [3, 4, 7, 8], now=4)  # b grows: 6 keys again, c is now the oldest
    assert t.expire(now=5) == 1
    assert [s.id for s in t.sessions()] == ["b"] and t.check() == []


def test_check_finds_a_miscounted_chain():
    t = SessionTable()
    t.turn_start(NS, "a", [1, 2], 0)
    t._chain_keys += 1
    assert t.check() == ["chain keys counted 3, held 2"]


def test_check_finds_a_corrupted_reference_count():
    t = SessionTable()
    t.turn_start(NS, "a", [1, 2], 0)
    t.turn_start(NS, "b", [1, 3], 0)
    assert t.check() == []
    t.refs[k(1)] = 3
    assert len(t.check()) == 1 and "reference counts" in t.check()[0]
    t.refs[k(1)] = 2
    del t.refs[k(3)]
    assert len(t.check()) == 1


# -- the core's session events ------------------------------------------------------------------


def make_core(policy=None, blocks: int = 8) -> KvCore:
    now = [0.0]
    sessions = SessionTable()
    core = KvCore(
        {"dram": ExtentAllocator([(0, blocks * PAGE)], PAGE)},
        policy or LruPolicy(),
        lambda: now[0],
        sessions=sessions,
    )
    core.now = now  # the test moves the clock through this list
    core.register_namespace(NS, 16, PAGE)
    core.take_events()
    return core


def session_events(core: KvCore) -> list[tuple[str, str, str | None]]:
    return [(e.session_id, e.state, e.tool) for e in core.take_events() if isinstance(e, SessionChanged)]


def test_core_session_events_reach_the_event_log_once_per_change():
    core = make_core()
    s = core.session_event(NS, "a", "turn_start", [1, 2])
    assert s.state == ACTIVE and s.turns == 1
    assert session_events(core) == [("a", "active", None)]
    core.session_event(NS, "a", "turn_start", [1, 2, 3])  # still active: no new event
    assert session_events(core) == []
    core.session_event(NS, "a", "turn_end")
    core.session_event(NS, "a", "tool_pause", tool="run_tests", expected_s=3.0)
    core.session_event(NS, "a", "tool_pause", tool="bash")  # another tool: a change
    core.session_event(NS, "a", "tool_resume")
    core.session_event(NS, "a", "session_end")
    assert session_events(core) == [
        ("a", "idle", None),
        ("a", "tool_pause", "run_tests"),
        ("a", "tool_pause", "bash"),
        ("a", "active", None),
        ("a", "ended", None),
    ]
    ended = core.sessions.get(NS, "a")
    assert ended.turns == 2 and ended.state == ENDED


def test_core_session_event_errors():
    core = make_core()
    with pytest.raises(UnknownNamespace):
        core.session_event("nope", "a", "turn_start", [1])
    with pytest.raises(InvalidArgument):
        core.session_event(NS, "", "turn_start", [1])
    with pytest.raises(InvalidArgument, match="unknown session event"):
        core.session_event(NS, "a", "nap")
    with pytest.raises(UnknownSession):
        core.session_event(NS, "a", "turn_end")
    core.session_event(NS, "a", "turn_start", [1])
    with pytest.raises(SessionStateError):
        core.session_event(NS, "a", "tool_resume")
    assert session_events(core) == [("a", "active", None)]


def store(core: KvCore, hashes, session_id=None, parent=None) -> None:
    specs = [BlockSpec(h, parent if i == 0 else hashes[i - 1], PAGE) for i, h in enumerate(hashes)]
    grant = core.prepare_store(NS, specs, session_id=session_id)
    assert isinstance(grant, StoreGrant)
    core.commit_store(grant.lease_id)


def test_block_stored_carries_the_session_of_the_store():
    core = make_core()
    core.session_event(NS, "a", "turn_start", [1, 2])
    core.take_events()
    store(core, [1, 2], session_id="a")
    stored = [e for e in core.take_events() if isinstance(e, BlockStored)]
    assert [(e.hash, e.session_id) for e in stored] == [(1, "a"), (2, "a")]
    assert core.sessions.get(NS, "a").turns == 1  # the store was the turn already started
    # An unhinted store is filed under the session the table inferred for it.
    store(core, [7, 8])
    stored = [e for e in core.take_events() if isinstance(e, BlockStored)]
    inferred = core.sessions.latest(k(7))
    assert inferred.inferred and [(e.hash, e.session_id) for e in stored] == [(7, inferred.id), (8, inferred.id)]
    assert core.check() == []


def test_a_hinted_store_without_turn_start_starts_the_session_and_says_so():
    core = make_core()
    store(core, [1, 2, 3], session_id="b")
    events = core.take_events()
    assert [(e.session_id, e.state) for e in events if isinstance(e, SessionChanged)] == [("b", "active")]
    # The session event precedes the blocks it stored.
    kinds = [type(e).__name__ for e in events]
    assert kinds == ["SessionChanged", "BlockStored", "BlockStored", "BlockStored"]


def test_lookup_with_a_session_id_starts_its_turn_once():
    core = make_core()
    store(core, [1, 2], session_id="a")
    core.session_event(NS, "a", "turn_end")
    core.session_event(NS, "a", "tool_pause", tool="bash")
    core.take_events()
    assert core.lookup(NS, [1, 2, 3], session_id="a") == ["dram", "dram"]
    s = core.sessions.get(NS, "a")
    assert s.state == ACTIVE and s.turns == 2 and s.chain == [1, 2, 3]
    assert session_events(core) == [("a", "active", None)]
    assert core.lookup(NS, [1, 2, 3], session_id="a") == ["dram", "dram"]  # asked again: nothing
    assert s.turns == 2 and session_events(core) == []


def test_typed_policy_sees_the_sessions_of_the_core():
    sessions = SessionTable()
    policy = TypedPolicy(sessions)
    now = [0.0]
    core = KvCore({"dram": ExtentAllocator([(0, 8 * PAGE)], PAGE)}, policy, lambda: now[0], sessions=sessions)
    core.register_namespace(NS, 16, PAGE)
    store(core, [1, 2], session_id="a")
    core.session_event(NS, "a", "turn_end")
    core.session_event(NS, "a", "tool_pause", tool="run_tests", expected_s=5.0)
    assert policy.retention_class(k(1), "dram") == "tool_pause"
    store(core, [1, 2, 3], session_id="b")  # b shares a's chain
    assert policy.retention_class(k(1), "dram") == "shared_prefix"
    assert policy.retention_class(k(3), "dram") == "session"
    core.session_event(NS, "b", "session_end")
    assert policy.retention_class(k(3), "dram") == "ephemeral"
    assert core.check() == []


# -- the core's prefetch plan for a paused session ----------------------------------------------

A_CHAIN = list(range(100, 108))  # 8 blocks
B_CHAIN = list(range(200, 216))  # 16 blocks: the whole DRAM tier


def paused_after_pressure(b_event: str) -> KvCore:
    """DRAM 16 blocks, NVMe 64, typed. a stores 8 blocks (written behind to NVMe) and ends its
    turn; b stores 16, which pushes all of a's out of DRAM; b's ``b_event``; a pauses for a
    tool expected to take 1 s."""
    sessions = SessionTable()
    now = [0.0]
    core = KvCore(
        {"dram": ExtentAllocator([(0, 16 * PAGE)], PAGE), "nvme": ExtentAllocator([(0, 64 * PAGE)], PAGE)},
        TypedPolicy(sessions),
        lambda: now[0],
        sessions=sessions,
    )
    core.now = now
    core.register_namespace(NS, 16, PAGE)

    def write_behind() -> None:
        for transfer in core.plan_write_behind(64):
            core.complete_transfer(transfer)

    core.session_event(NS, "a", "turn_start", A_CHAIN)
    store(core, A_CHAIN, session_id="a")
    core.session_event(NS, "a", "turn_end")
    write_behind()
    now[0] = 1.0
    core.session_event(NS, "b", "turn_start", B_CHAIN)
    store(core, B_CHAIN, session_id="b")
    write_behind()
    assert core.lookup(NS, A_CHAIN) == ["nvme"] * 8
    assert core.lookup(NS, B_CHAIN) == ["dram"] * 16
    now[0] = 2.0
    core.session_event(NS, "b", b_event)
    assert core.plan_prefetch(64) == []  # a is idle: nothing is due
    core.session_event(NS, "a", "tool_pause", tool="run_tests", expected_s=1.0)
    now[0] = 2.25  # the mover's next round
    return core


def test_core_plans_the_prefetch_of_a_paused_session():
    core = paused_after_pressure("session_end")
    transfers = core.plan_prefetch(64)
    # Predicted resume: paused_at + the 0.25 quantile of a lognormal with median 1 s
    # (exp(-0.674) = 0.51 s) minus a 2 s lead: due at once. b ended: its blocks are worth 0,
    # so they make way (a prefetch pushes out only worthless copies).
    assert [(t.kind, t.src_tier, t.dst_tier) for t in transfers] == [("prefetch", "nvme", "dram")] * 8
    assert [t.record.hash for t in transfers] == A_CHAIN  # root first
    for transfer in transfers:
        core.complete_transfer(transfer)
    assert core.lookup(NS, A_CHAIN) == ["dram"] * 8
    assert core.plan_prefetch(64) == []  # nothing left to bring up
    assert core.check() == []


def test_one_event_a_turn_lookup_starts_it_and_a_tool_pause_ends_it():
    """The lean pattern docs/retention.md describes: Lookup(session_id) -> store -> tool_pause -> the next
    Lookup(session_id). No turn_start, turn_end or tool_resume, and the pause is learned."""
    sessions = SessionTable()
    policy = TypedPolicy(sessions)
    now = [0.0]
    core = KvCore({"dram": ExtentAllocator([(0, 8 * PAGE)], PAGE)}, policy, lambda: now[0], sessions=sessions)
    core.register_namespace(NS, 16, PAGE)
    core.now = now
    core.lookup(NS, [1, 2], session_id="a")
    store(core, [1, 2], session_id="a")
    core.now[0] = 3.0
    assert core.session_event(NS, "a", "tool_pause", tool="pytest").state == TOOL_PAUSE
    core.now[0] = 10.0
    assert core.lookup(NS, [1, 2, 3], session_id="a") == ["dram", "dram"]
    s = core.sessions.get(NS, "a")
    assert (s.state, s.turns, s.chain) == (ACTIVE, 2, [1, 2, 3])
    assert policy.pauses.samples("pytest") == 1


def test_check_finds_counts_that_disagree_with_the_chains():
    t = SessionTable()
    t.turn_start(NS, "a", [1, 2], now=0)
    t.refs[k(9)] = 1  # a count no chain explains
    t.sharing._released[k(1)] = 99  # a live key counted as released
    problems = t.check()
    assert any("disagree" in p for p in problems)
    assert any("released are in a live chain" in p for p in problems)


# -- announced turns (turn_ahead) ---------------------------------------------------------------


def test_a_turn_announced_for_a_named_session_not_known_yet_starts_it_idle_and_waiting():
    table = SessionTable()
    s = table.expect(NS, "a", [1, 2, 3], 0.5, now=10.0)
    assert s.state == IDLE and s.turns == 0 and s.ahead == [1, 2, 3] and s.expected_at == 10.5
    assert table.take_changes() == [s]
    assert not table.refs  # an announcement holds nothing: the turn's store does
    table.turn_start(NS, "a", [1, 2, 3], now=10.4)
    assert s.state == ACTIVE and s.ahead == [] and s.expected_at is None


def test_a_turn_announced_by_its_hashes_finds_the_session_its_chain_continues():
    table = SessionTable()
    s = infer(table, [1, 2, 3], last_partial=True)
    assert table.expect(NS, None, [1, 2, 4, 5], 2.0, now=1.0) is s  # all but the partial block
    assert s.ahead == [1, 2, 4, 5] and s.expected_at == 3.0
    assert table.expect(NS, None, [7, 8], 2.0, now=1.0) is None  # continues nothing: no session
    assert table.find(NS, [1, 2, 3]) is s and table.find(NS, [9]) is None


def test_an_ended_session_forgets_its_announced_turn_and_bad_leads_are_invalid():
    table = SessionTable()
    s = table.expect(NS, "a", [1], 1.0, now=0.0)
    table.end(NS, "a", now=0.5)
    assert s.ahead == [] and s.expected_at is None
    for bad in (-1.0, float("nan"), float("inf"), MAX_EXPECTED_PAUSE_S + 1):
        with pytest.raises(InvalidArgument, match="arrives_in_s"):
            table.expect(NS, "b", [1], bad, now=0.0)
    assert table.get(NS, "b") is None


def test_core_turn_ahead_and_session_end_may_name_a_session_by_its_hashes():
    core = make_core()
    store(core, [1, 2, 3])  # an inferred session
    s = core.session_event(NS, "", "turn_ahead", [1, 2, 3, 4], expected_s=1.5)
    assert s is not None and s.inferred and s.ahead == [1, 2, 3, 4] and s.expected_at == 1.5
    assert core.session_event(NS, "", "turn_ahead", [8, 9], expected_s=1.0) is None
    assert core.session_event(NS, "", "session_end", [1, 2, 3]) is s and s.state == ENDED
    assert core.session_event(NS, "", "session_end", [1, 2, 3]) is None  # nothing live continues it now
    with pytest.raises(InvalidArgument, match="session id"):
        core.session_event(NS, "", "turn_end", [1, 2, 3])
    with pytest.raises(InvalidArgument, match="session id"):
        core.session_event(NS, "", "turn_ahead", [], expected_s=1.0)
    with pytest.raises(InvalidArgument, match="seconds until the turn arrives"):
        core.session_event(NS, "a", "turn_ahead", [1])
    assert core.check() == []
