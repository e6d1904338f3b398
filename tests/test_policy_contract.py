"""One contract for every retention policy in kvd.policies, then each policy's own exact
answers on tiny hand-made cases."""

from __future__ import annotations

import pytest

from kvd.core.sessions import SessionTable
from kvd.policies import (
    POLICIES,
    RETENTION_CLASSES,
    BeladyPolicy,
    Future,
    LruPolicy,
    Prefetch,
    TypedPolicy,
    make_policy,
)
from kvd.policies.guard import LruGuard
from kvd.policies.typed import ANNOUNCED

NS = "ns"
A, B, C, D = (NS, 1), (NS, 2), (NS, 3), (NS, 4)


def make(name: str, sessions: SessionTable | None = None, chains=((1, 2, 3, 4),)):
    return make_policy(name, sessions or SessionTable(), Future.from_chains(NS, chains))


@pytest.fixture(params=sorted(POLICIES))
def policy(request):
    return make(request.param)


def test_victims_cover_exactly_the_held_keys(policy):
    policy.on_stored("dram", [A, B, C], now=0)
    policy.on_stored("nvme", [A], now=1)
    assert set(policy.victims("dram", now=2)) == {A, B, C}
    assert set(policy.victims("nvme", now=2)) == {A}
    assert policy.check({"dram": {A, B, C}, "nvme": {A}}) == []


def test_removed_keys_are_never_victims(policy):
    policy.on_stored("dram", [A, B], now=0)
    policy.on_removed("dram", A)
    assert list(policy.victims("dram", now=1)) == [B]
    policy.on_removed("dram", D)  # unknown keys are ignored
    assert policy.check({"dram": {B}}) == []


def test_a_chain_loses_its_tail_before_its_head(policy):
    policy.on_stored("dram", [A, B, C], now=0)
    order = list(policy.victims("dram", now=1))
    assert order.index(C) < order.index(B) < order.index(A)


def test_retention_class_is_a_known_class_of_a_held_copy_only(policy):
    sessions = SessionTable()
    policy = make_policy(policy.name, sessions, Future.from_chains(NS, [[1, 2]]))
    sessions.turn_start(NS, "s", [1, 2], now=0)
    policy.on_sessions(sessions.take_changes(), sessions.take_observations(), sessions.take_reclassified(), 0)
    policy.on_stored("dram", [A, B], now=0)
    classes = {policy.retention_class(k, "dram") for k in (A, B)}
    # typed classifies (the session's private context); lru and belady keep no classes
    assert classes == ({"session"} if policy.name == "typed" else {None})
    assert classes <= set(RETENTION_CLASSES) | {None}
    assert policy.retention_class(A, "nvme") is None  # no copy there
    policy.on_removed("dram", A)
    assert policy.retention_class(A, "dram") is None
    assert policy.retention_class(B, "dram") == (None if policy.name != "typed" else "session")


def test_check_reports_disagreement(policy):
    policy.on_stored("dram", [A], now=0)
    assert policy.check({"dram": {A, B}}) != []


def test_the_first_victim_has_the_lowest_priority(policy):
    policy.on_stored("dram", [A, B, C], now=0)
    order = list(policy.victims("dram", now=1))
    priorities = [policy.priority(k, "dram", 1) for k in order]
    assert priorities[0] == min(priorities)


def test_nothing_to_prefetch_without_sessions(policy):
    policy.on_stored("nvme", [A, B], now=0)
    policy.on_sessions((), (), set(), now=1)
    assert list(policy.prefetches("dram", now=2)) == []
    assert isinstance(policy.worth_demoting(A, "dram", 2), bool)


def test_iterating_victims_leaves_the_order_unchanged(policy):
    policy.on_stored("dram", [A, B, C], now=0)
    first = list(policy.victims("dram", now=1))
    partial = policy.victims("dram", now=1)
    next(partial)
    del partial
    assert list(policy.victims("dram", now=1)) == first


def test_unknown_policy_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown policy 'nope'; known: belady, lru, typed"):
        make_policy("nope")


def test_belady_refuses_to_run_without_a_future():
    with pytest.raises(ValueError, match="runs only in `kvd replay`"):
        make_policy("belady")


# -- lru ------------------------------------------------------------------------------------


def test_lru_access_makes_a_chain_most_recent():
    lru = LruPolicy()
    lru.on_stored("dram", [A, B], now=0)
    lru.on_stored("dram", [C], now=1)
    assert list(lru.victims("dram", now=2)) == [B, A, C]
    lru.on_accessed([A, B], now=3)
    assert list(lru.victims("dram", now=4)) == [C, B, A]


def test_lru_a_copy_that_moves_keeps_its_blocks_last_use():
    # A and B stored in DRAM, then C in NVMe; A moves down to NVMe after C came: it is still
    # the least recently used there, and ranks below B (in DRAM) and C across tiers.
    lru = LruPolicy()
    lru.on_stored("dram", [A], now=0)
    lru.on_stored("dram", [B], now=1)
    lru.on_stored("nvme", [C], now=2)
    lru.on_stored("nvme", [A], now=3)  # a demotion lands
    lru.on_removed("dram", A)
    assert list(lru.victims("nvme", now=4)) == [A, C]
    assert lru.priority(A, "nvme", 4) < lru.priority(B, "nvme", 4) < lru.priority(C, "dram", 4)
    lru.on_removed("nvme", A)
    assert lru.priority(A, "nvme", 4) == float("-inf")  # held nowhere: no last use kept
    assert lru.check({"dram": {B}, "nvme": {C}}) == []


# -- belady ---------------------------------------------------------------------------------


def test_belady_evicts_the_farthest_next_use_first():
    # request 0 uses 1,2; request 1 uses 3; request 2 uses 1; request 3 uses 3; 2 never again
    future = Future.from_chains(NS, [[1, 2], [3], [1], [3]])
    belady = BeladyPolicy(future)
    future.serve(0)
    belady.on_stored("dram", [A, B], now=0)
    future.serve(1)
    belady.on_stored("dram", [C], now=1)
    assert list(belady.victims("dram", now=1)) == [B, C, A]  # never, then 3 (at 3), then 1 (at 2)
    future.serve(2)
    belady.on_accessed([A], now=2)
    # 1 and 2 are never used again (the deeper goes first), 3 is used by request 3
    assert list(belady.victims("dram", now=2)) == [B, A, C]
    assert belady.worth_demoting(B, "dram", 2) is False
    assert belady.worth_demoting(C, "dram", 2) is True


def test_belady_follows_the_closed_loop_schedule_not_the_timestamps():
    # requests: 0 = s's turn 0 [1], 1 = t's turn 0 [3], 2 = s's turn 1 [1, 2] (timestamp 5),
    # 3 = t's turn 1 [3] (timestamp 9), 4 = s's turn 2 [1, 2] (timestamp 12)
    future = Future.from_chains(NS, [[1], [3], [1, 2], [3], [1, 2]], [0, 1, 5, 9, 12], [None, None, "s", "t", "s"])
    belady = BeladyPolicy(future)
    future.serve(0)
    future.serve(1)
    belady.on_stored("dram", [A, C], now=1)
    assert list(belady.victims("dram", now=1)) == [C, A]  # by the timestamps: 3 at 9, 1 at 5
    future.schedule(2, 20.0)  # s's turn 1 settles 15 s late: its turn 2 is expected at 27
    assert future.expected_at(4) == 27.0 and future.next_use(A) == (20.0, 2)
    assert list(belady.victims("dram", now=1)) == [A, C]
    assert belady.priority(A, "dram", now=1) == -19.0
    with pytest.raises(ValueError, match="arrives at its timestamp"):
        future.schedule(1, 3.0)  # an open-loop request has no schedule to settle
    with pytest.raises(ValueError, match="one time and one group per request"):
        Future.from_chains(NS, [[1]], [0.0, 1.0])


def test_belady_moves_a_key_a_later_turn_of_a_rescheduled_session_uses():
    # 0 = [7]; 1 = [3]; s's turn 1 [1] at 5; s's turn 2 [1, 7] at 12; t's turn [3] at 20.
    # Key 7 is next used by s's turn 2, which s's turn 1 being settled late moves to 27.
    future = Future.from_chains(NS, [[7], [3], [1], [1, 7], [3]], [0, 1, 5, 12, 20], [None, None, "s", "s", "t"])
    belady = BeladyPolicy(future)
    seven = (NS, 7)
    future.serve(0)
    future.serve(1)
    belady.on_stored("dram", [seven, C], now=1)
    assert list(belady.victims("dram", now=1)) == [C, seven]  # 3 at 20, 7 at 12
    future.schedule(2, 20.0)  # 15 s late: s's turn 2 is expected at 27
    assert list(belady.victims("dram", now=1)) == [seven, C]


# -- typed ----------------------------------------------------------------------------------


def typed_with(*chains_by_session):
    sessions = SessionTable()
    policy = TypedPolicy(sessions)
    return sessions, policy


def sync(sessions: SessionTable, policy: TypedPolicy, now: float) -> None:
    """What the core does after every session change."""
    policy.on_sessions(sessions.take_changes(), sessions.take_observations(), sessions.take_reclassified(), now)


def test_typed_partial_tail_goes_first_and_is_not_written_down():
    sessions, policy = typed_with()
    sessions.observe_store(NS, None, [1, 2, 3], now=0, last_partial=True)
    sync(sessions, policy, 0)
    policy.on_stored("dram", [A, B, C], now=0)
    assert policy.retention_class(C, "dram") == "ephemeral"
    assert policy.retention_class(A, "dram") == "session"
    assert next(iter(policy.victims("dram", now=1))) == C
    assert policy.worth_demoting(C, "dram", 1) is False
    assert policy.worth_demoting(A, "dram", 1) is True


def test_typed_shared_prefix_outlives_private_blocks():
    sessions, policy = typed_with()
    sessions.turn_start(NS, "s1", [1, 2, 3], now=0)
    sessions.turn_start(NS, "s2", [1, 2, 4], now=0)
    sync(sessions, policy, 0)
    policy.on_stored("dram", [A, B, C], now=0)
    policy.on_stored("dram", [D], now=0)
    assert policy.retention_class(A, "dram") == "shared_prefix"
    assert policy.retention_class(C, "dram") == "session"
    order = list(policy.victims("dram", now=5))
    assert set(order[:2]) == {C, D} and set(order[2:]) == {A, B}


def test_typed_shared_blocks_held_by_more_live_sessions_go_last():
    sessions, policy = typed_with()
    for sid in ("r1", "r2", "r3"):
        sessions.turn_start(NS, sid, [1, 2], now=0)  # a repository three sessions work on
    for sid in ("q1", "q2"):
        sessions.turn_start(NS, sid, [3, 4], now=0)  # one two sessions work on
    sync(sessions, policy, 0)
    policy.on_stored("dram", [A, B], now=0)
    policy.on_stored("dram", [C, D], now=1)  # more recent: LRU would take A, B first
    assert {policy.retention_class(k, "dram") for k in (A, B, C, D)} == {"shared_prefix"}
    assert list(policy.victims("dram", now=2)) == [D, C, B, A]
    assert policy.priority(C, "dram", 2) < policy.priority(A, "dram", 2)
    for sid in ("r1", "r2"):  # two of the three end: one session left on the repository
        sessions.end(NS, sid, now=3)
    sync(sessions, policy, 3)
    assert list(policy.victims("dram", now=4)) == [B, A, D, C]
    assert policy.check({"dram": {A, B, C, D}}) == []


def test_typed_values_a_block_inferred_sessions_share_by_its_own_reuse():
    # Inferred sessions may have gone quiet without a word: their holds are not counted.
    sessions, policy = typed_with()
    sessions.observe_store(NS, None, [1, 2, 5], now=0)
    sessions.observe_store(NS, None, [1, 3, 6], now=0)  # does not extend [1, 2]: a second one
    sync(sessions, policy, 0)
    policy.on_stored("dram", [A], now=0)
    assert sessions.refs[A] == 2 and A not in sessions.hinted_refs
    assert policy.retention_class(A, "dram") == "shared_prefix"
    assert policy._where["dram"][A] == "shared_prefix"  # the per-block group, not a holders' one


def test_typed_ended_session_goes_before_a_paused_one():
    sessions, policy = typed_with()
    sessions.turn_start(NS, "done", [1, 2], now=0)
    sessions.turn_start(NS, "paused", [3, 4], now=0)
    sync(sessions, policy, 0)
    policy.on_stored("dram", [A, B], now=0)
    policy.on_stored("dram", [C, D], now=0)
    sessions.turn_end(NS, "paused", now=1)
    sessions.tool_pause(NS, "paused", "run_tests", 30.0, now=1)
    sessions.turn_end(NS, "done", now=1)
    sessions.end(NS, "done", now=1)
    sync(sessions, policy, 1)
    assert policy.retention_class(A, "dram") == "ephemeral"
    assert policy.retention_class(C, "dram") == "tool_pause"
    assert list(policy.victims("dram", now=2)) == [B, A, D, C]
    assert policy.worth_demoting(A, "dram", 2) is False
    assert policy.worth_demoting(C, "dram", 2) is True


def _quiet_and_fresh(report_ends: bool) -> tuple[float, float]:
    """Priorities of an idle session quiet for 10 s and of one quiet for 1 s, after ten
    earlier one-turn sessions that ended 3 s after their turn (reported, or not)."""
    sessions, policy = typed_with()
    for i in range(10):
        sessions.turn_start(NS, f"earlier{i}", [100 + i], now=i)
        sessions.turn_end(NS, f"earlier{i}", now=i)
        if report_ends:
            sessions.end(NS, f"earlier{i}", now=i + 3.0)
    sessions.turn_start(NS, "quiet", [1], now=20)
    sessions.turn_end(NS, "quiet", now=20)
    sessions.turn_start(NS, "fresh", [2], now=29)
    sessions.turn_end(NS, "fresh", now=29)
    sync(sessions, policy, 30)
    policy.on_stored("dram", [A, B], now=30)
    return policy.priority(A, "dram", 30), policy.priority(B, "dram", 30)


def test_typed_values_a_quiet_session_whose_end_would_have_been_reported_by_now():
    # Ends are reported 3 s after the last turn: 10 s of quiet without one says the session
    # is coming back, so it outranks a session quiet for 1 s, which may yet end.
    quiet, fresh = _quiet_and_fresh(report_ends=True)
    assert quiet > fresh
    # Without end reports, quiet means nothing more: the fresher session ranks first.
    quiet, fresh = _quiet_and_fresh(report_ends=False)
    assert quiet <= fresh


def test_typed_starts_a_named_sessions_pause_clock_when_its_turn_ends():
    sessions, policy = typed_with()
    for i in range(20):  # sessions pause about a second between turns
        sessions.turn_start(NS, "earlier", [100], now=2 * i)
        sessions.turn_end(NS, "earlier", now=2 * i + 1)
    sessions.turn_start(NS, "answering", [1], now=50)  # a long answer: no turn end yet
    sessions.turn_start(NS, "paused", [2], now=50)
    sessions.turn_end(NS, "paused", now=50)
    sync(sessions, policy, 50)
    policy.on_stored("dram", [A, B], now=50)
    at_start = policy.priority(A, "dram", 50)
    # 10 s on, the answering session is still a turn's end away from its pause; the paused
    # one is ten typical pauses overdue.
    assert policy.priority(A, "dram", 60) == at_start > policy.priority(B, "dram", 60)
    # A turn that runs past the grace counts as quiet from then on (no turn end may come).
    late = 50 + policy.config.turn_grace_s + 10
    assert policy.priority(A, "dram", late) < at_start


def test_typed_blocks_of_no_session_change_class_when_a_session_takes_them():
    sessions, policy = typed_with()
    policy.on_stored("dram", [A, B, C], now=0)  # e.g. restored from NVMe after a restart
    assert policy.retention_class(A, "dram") == "ephemeral"
    sessions.turn_start(NS, "s1", [1, 2, 3], now=1)
    sync(sessions, policy, 1)
    assert policy.retention_class(A, "dram") == "session"
    sessions.turn_end(NS, "s1", now=2)
    sessions.end(NS, "s1", now=2)
    sync(sessions, policy, 2)
    assert policy.retention_class(A, "dram") == "ephemeral"
    # The next session on the same repository: what both chains hold is a shared prefix.
    sessions.turn_start(NS, "s2", [1, 2, 4], now=3)
    sync(sessions, policy, 3)
    assert [policy.retention_class(k, "dram") for k in (A, B, C)] == ["shared_prefix", "shared_prefix", "ephemeral"]


def test_typed_prefetches_a_paused_session_before_its_predicted_resume():
    sessions, policy = typed_with()
    sessions.turn_start(NS, "s", [1, 2], now=0)
    sync(sessions, policy, 0)
    policy.on_stored("nvme", [A, B], now=0)  # only on NVMe: DRAM lost them
    sessions.turn_end(NS, "s", now=1)
    sessions.tool_pause(NS, "s", "run_tests", 40.0, now=1)
    sync(sessions, policy, 1)
    assert list(policy.prefetches("dram", now=2)) == []  # far from the resume
    due = policy.pauses.distribution("run_tests", 40.0).quantile(policy.config.prefetch_quantile)
    at = 1 + due - policy.config.prefetch_lead_s
    assert list(policy.prefetches("dram", now=at - 0.5)) == []
    assert list(policy.prefetches("dram", now=at + 0.01)) == [Prefetch([A, B])]  # a guess, root first
    policy.on_stored("dram", [A], now=at + 1)
    assert list(policy.prefetches("dram", now=at + 1)) == [Prefetch([B])]  # what is up already is not asked again


def test_typed_prefetches_an_announced_turn_first_and_values_it_above_every_guess():
    sessions, policy = typed_with()
    for sid, chain in (("s", [1, 2]), ("t", [3, 4])):
        sessions.turn_start(NS, sid, chain, now=0)
        sessions.turn_end(NS, sid, now=1)
    sync(sessions, policy, 1)
    policy.on_stored("nvme", [A, B, C, D], now=1)
    policy.on_stored("dram", [(NS, 9)], now=1)
    sessions.tool_pause(NS, "s", "run_tests", 0.5, now=1)  # s resumes at once, by its hint
    sessions.expect(NS, "t", [3, 4, 5], 1.5, now=1)  # t's next turn comes in 1.5 s
    sync(sessions, policy, 1)
    assert list(policy.prefetches("dram", now=1)) == [Prefetch([C, D], announced=True), Prefetch([A, B])]
    assert policy.priority(C, "dram", 1) == ANNOUNCED > policy.priority(A, "dram", 1)
    # An announced block is a store's last victim; the announcement ends with the turn.
    policy.on_stored("dram", [C, D], now=2)
    assert list(policy.victims("dram", 2))[-2:] == [D, C]
    sessions.turn_start(NS, "t", [3, 4, 5], now=3)
    sync(sessions, policy, 3)
    assert policy.priority(C, "dram", 3) < ANNOUNCED


def test_typed_announces_a_hinted_pause_once_its_tools_hints_proved_sharp():
    sessions, policy = typed_with()
    for _ in range(20):
        policy.pauses.observe("build", 30.0, 30.0)  # build's hints were exact
    for _ in range(5):
        policy.pauses.observe("grep", 90.0, 30.0)  # grep's a third of the pause
        policy.pauses.observe("grep", 10.0, 30.0)  # or three times it
    for sid, chain, tool in (("s", [1, 2], "build"), ("t", [3, 4, 7], "grep")):
        sessions.turn_start(NS, sid, chain, now=0, last_partial=sid == "t")
        sessions.turn_end(NS, sid, now=1)
        sessions.tool_pause(NS, sid, tool, 30.0, now=1)
    sync(sessions, policy, 1)
    policy.on_stored("nvme", [A, B, C, D, (NS, 7)], now=1)
    resume = 1 + policy.pauses.distribution("build", 30.0).quantile(policy.config.prefetch_quantile)
    assert 25 < resume < 31
    lead = policy.config.prefetch_lead_s
    assert not any(p.announced for p in policy.prefetches("dram", now=resume - lead - 0.5))
    # Sure to come: an announced turn of the chain so far; grep's pause stays a guess.
    due = list(policy.prefetches("dram", now=resume - lead + 0.01))
    assert due == [Prefetch([A, B], announced=True), Prefetch([C, D, (NS, 7)])]
    assert policy.priority(A, "nvme", resume - 0.5) == ANNOUNCED > policy.priority(C, "nvme", resume - 0.5)
    # The pause ends: so does the announcement.
    sessions.turn_start(NS, "s", [1, 2, 5], now=resume)
    sync(sessions, policy, resume)
    assert policy.priority(A, "nvme", resume) < ANNOUNCED


def test_guard_prefers_lru_once_the_shadow_is_ahead_and_returns():
    guard = LruGuard(halflife=1000, margin=0.1, warmup=0)
    guard.resize(2)
    guard.observe([A, B], held=0)  # a first request: nobody could hit
    guard.observe([A, B], held=2)  # the real cache held both, as the shadow did
    assert (guard.actual_hits, guard.shadow_hits) == pytest.approx((2, 2), rel=0.01)
    assert guard.prefer_lru is False
    # The real cache keeps missing a chain a same-sized LRU would still hold.
    for _ in range(3):
        guard.observe([A, B], held=0)
    assert guard.prefer_lru is True
    for _ in range(10):  # the real cache is ahead again
        guard.observe([C, D], held=2)
        guard.observe([(NS, 9), (NS, 10)], held=2)
    assert guard.prefer_lru is False


@pytest.mark.parametrize(("held", "prefers_lru"), [(97, True), (99, False)])
def test_guard_gives_way_when_the_shadow_is_more_than_two_percent_ahead(held, prefers_lru):
    guard = LruGuard(warmup=0)
    guard.resize(1000)
    chain = [(NS, h) for h in range(100)]
    guard.observe(chain, held=0)
    guard.observe(chain, held=held)  # the shadow finds all 100: 3% or 1% more
    assert guard.prefer_lru is prefers_lru


def test_guard_shadow_is_a_prefix_lru_of_the_same_size():
    guard = LruGuard(warmup=0)
    guard.resize(2)
    guard.observe([A, B], held=0)
    guard.observe([C], held=0)  # pushes out B, the chain's tail, not its head A
    guard.observe([A, B, D], held=0)
    assert guard.shadow_hits == pytest.approx(1, rel=1e-3)  # A, then B is missing: a 1-block prefix


def test_guard_judges_nothing_during_warmup():
    guard = LruGuard(warmup=2)
    guard.resize(2)
    guard.observe([A], held=0)
    guard.observe([A], held=0)
    assert guard.shadow_hits == 0 and guard.prefer_lru is False
    guard.observe([A], held=0)
    assert guard.shadow_hits > 0


def test_typed_guard_judges_a_turn_once_as_it_starts_however_many_batches_store_it():
    # A client stores a long prompt in batches. The guard scores the turn once, as it starts,
    # from the prefix some tier holds then: a later batch must not count the earlier ones
    # as held (this turn stored them), nor be put down to another session sharing them.
    sessions, policy = typed_with()
    seen = []
    observe = policy.guard.observe

    def recording(chain, held):
        seen.append((list(chain), held, policy.guard.capacity))
        observe(chain, held)

    policy.guard.observe = recording
    sessions.turn_start(NS, "a", [1, 2, 3, 4], now=0)
    sync(sessions, policy, 0)
    policy.on_stored("dram", [A, B], now=0)
    policy.on_stored("dram", [C, D], now=0)
    sessions.turn_start(NS, "b", [1, 2, 3, 9], now=1)  # b shares a's first three blocks
    sync(sessions, policy, 1)
    sessions.turn_start(NS, "a", [1, 2, 3, 4, 5], now=10)
    sync(sessions, policy, 10)
    policy.on_stored("dram", [(NS, 5)], now=10)
    assert seen == [
        ([A, B, C, D], 0, 0),
        ([A, B, C, (NS, 9)], 3, 4),
        ([A, B, C, D, (NS, 5)], 4, 4),
    ]


def test_typed_orders_by_recency_while_the_guard_prefers_lru():
    sessions, policy = typed_with()
    sessions.turn_start(NS, "s", [1, 2], now=0)
    sync(sessions, policy, 0)
    policy.on_stored("dram", [C], now=0)  # ephemeral: typed's first victim
    policy.on_stored("dram", [A, B], now=1)
    assert list(policy.victims("dram", now=2))[0] == C
    policy.guard.prefer_lru = True
    assert list(policy.victims("dram", now=2)) == [C, B, A]
    policy.on_accessed([C], now=3)
    policy.guard.prefer_lru = True  # (the access re-judged it; keep recency for this check)
    assert list(policy.victims("dram", now=3)) == [B, A, C]


def test_a_policy_ranks_a_block_where_it_is_not_held(policy):
    # The core weighs a block about to be demoted against the tier below's victims with
    # priority(key, lower): that must be a value.
    policy.on_stored("dram", [A, B, C], now=0)
    away = [policy.priority(k, "nvme", 1) for k in (A, B, C)]
    assert all(v > float("-inf") for v in away)


def test_typed_values_a_shared_block_where_it_is_not_held_by_its_last_use():
    # A block a finished program shared, last used at t=2: asked what it is worth in NVMe
    # (which does not hold it), typed answers from that use, not as if it were used now.
    sessions = SessionTable()
    policy = TypedPolicy(sessions)
    sessions.turn_start(NS, "a", [1, 2], now=0)
    sessions.turn_start(NS, "a", [1, 2, 3], now=1)
    sessions.end(NS, "a", now=2)
    policy.on_sessions(sessions.take_changes(), sessions.take_observations(), sessions.take_reclassified(), 2)
    policy.on_stored("dram", [A, B, C], now=2)
    assert policy.retention_class(A, "dram") == "shared_prefix"
    assert policy.priority(A, "nvme", 5000) < policy.priority(A, "nvme", 3)


def test_typed_under_its_guard_ranks_by_last_use_across_tiers():
    policy = TypedPolicy(SessionTable())
    policy.on_stored("dram", [A, B], now=0)
    policy.on_stored("nvme", [C], now=1)
    policy.guard.prefer_lru = True  # the guard's switch: recency is winning here
    assert policy.priority(B, "nvme", 2) < policy.priority(A, "nvme", 2) < policy.priority(C, "dram", 2)
    policy.on_stored("nvme", [B], now=3)  # B moves down: it keeps its last use
    policy.on_removed("dram", B)
    assert list(policy.victims("nvme", now=4)) == [B, C]


def test_a_policy_never_ranks_a_block_below_its_descendant(policy):
    # The core drops a chain's head that everything below outranks, trusting that its
    # descendants rank lower still: check it on a chain stored and used.
    policy.on_stored("dram", [A, B, C], now=0)
    policy.on_stored("nvme", [D], now=1)
    policy.on_accessed([A, B], now=2)
    for tier in ("dram", "nvme"):
        ranks = [policy.priority(k, tier, 3) for k in (A, B, C)]
        assert ranks == sorted(ranks, reverse=True)
