"""Typed retention: every block has a class and a value; the lowest value goes first.

Classes (one per held copy, from the core's session table; the core reports an operator's
pinned copies as ``pinned`` itself):

- ``shared_prefix``: in two or more sessions' chains, at once or one after the other, or
  the context a finished named program of several turns started from (system prompt,
  repository).
- ``session``: the private context of one live session (active, idle or in a tool pause).
- ``ephemeral``: held by no live session — a chain's last, partial block (its next turn
  re-hashes it), a block the chain moved past, the turns an ended session added, a one-turn
  session's prompt. Value 0.

Value = P(reuse within the horizon) x (recompute cost - reload cost) / bytes. Within a
namespace every block has the same size and saves the same prefill, so the ranking is by
the probability, which comes from the predictors (policies/predictor.py): a session's next
turn comes with P(continue | turns so far) after a gap drawn from its tool's learned pause
distribution (or around the hint's expected seconds), and given the time already waited::

    P = p (F(e + H) - F(e)) / (1 - p F(e))

A named session's wait e starts when its turn ends (a turn end or a tool pause; for a turn
that says nothing, at most ``turn_grace_s`` after its last sign of life): a long answer is
no sign that the session went quiet. An inferred session's starts at its last store.

Where sessions report their ends, quiet says more: p becomes P(another turn | no end reported
after the quiet so far), from the share of ends reported and how late they come
(:class:`~kvd.policies.predictor.EndReports`) — a session quiet for longer than its end would
take to be reported is coming back.

The horizon H is the tier's residence time (Little's law: blocks held / insertions per
second). A shared block that n live named sessions hold (their engines said who they are,
so they also say when they end) is worth P(any of them turns within H) = 1 - (1 - q)^n,
with q the most a session is worth (one that just turned, sure to continue): a repository
three live sessions work on outlives one that a single session does, whatever was touched
last — under a stream of 100K-token contexts through a cache of two, keeping the contexts
most sessions come back to is what separates a hit rate from LRU's. A shared block no named
session holds (inferred sessions may have gone quiet without a word; a finished program's
context) is worth the larger of its own re-use hazard and its latest session's value. Both
add a margin so a shared prefix goes after the private blocks that depend on it.

Within a group (one session, the shared blocks of n holders, the other shared blocks) the
order is LRU with a chain's tail before its head, so a held prefix stays a prefix; a block
that changes group (a holder came or went) joins its new group at the recent end, its
chain's order kept. Victims merge the groups by value.

Prefetch: a paused session whose predicted resume is near (the ``prefetch_quantile`` of its
pause distribution, minus a lead for the transfer) asks for its blocks one tier up. A turn
announced (``turn_ahead``) is sure to come: its blocks are worth ``ANNOUNCED`` within the
horizon and move up first, making way. So is a hinted pause once its tool's hints have
proved sharp (``sure_hint_sigma``): its session's chain is announced for the pause's
predicted end. Pressure demotes one tier down; ephemeral blocks are dropped rather than
written down.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence, Set
from dataclasses import dataclass

from kvd.core.sessions import ACTIVE, ENDED, TOOL_PAUSE, Observation, ObservationKind, Session, SessionTable
from kvd.policies.announced import Announced
from kvd.policies.base import RETENTION_CLASSES, BlockKey, Policy, Prefetch
from kvd.policies.guard import LruGuard
from kvd.policies.lru import LruPolicy
from kvd.policies.predictor import ContinuePredictor, EndReports, PausePredictor, reuse_probability
from kvd.policies.residence import Residence

SHARED, EPHEMERAL = "shared_prefix", "ephemeral"
# The value of a block of a turn announced to arrive within the horizon: above any reuse
# probability (at most 1, plus a shared block's margin), so that nothing guessed displaces it
# and it displaces whatever is only guessed.
ANNOUNCED = 2.0
CLASSES = RETENTION_CLASSES


@dataclass(frozen=True)
class Holders:
    """The group of shared blocks that ``n`` live named sessions' chains hold (n >= 1)."""

    n: int


@dataclass(frozen=True)
class TypedConfig:
    """Knobs of the typed policy. Seconds for times."""

    pause_model: str = "empirical"  # or "lognormal": see policies/predictor.py
    monotone: bool = True
    initial_horizon_s: float = 60.0
    horizon_scale: float = 1.0  # the horizon as a multiple of the tier's mean residence time
    min_horizon_s: float = 1.0
    rate_halflife: int = 2000  # insertions over which the insertion-rate estimate decays
    revalue_s: float = 1.0  # group values are recomputed at most this often (dirty ones at once)
    shared_margin: float = 0.05  # added to a shared block's value: it outlives its users' tails
    prefetch_quantile: float = 0.25  # prefetch once this share of pauses would have ended ...
    prefetch_lead_s: float = 2.0  # ... minus this lead
    sure_hint_sigma: float = 0.25  # a hinted pause of a tool whose hints proved this sharp (log s) is announced
    turn_grace_s: float = 30.0  # a named session mid-turn starts its pause clock at most this long after its last sign of life
    maturity_min_s: float = 5.0  # bounds on the age at which an unanswered turn counts as the last
    maturity_max_s: float = 900.0
    shared_by_holders: bool = True  # value a shared block by how many live named sessions hold it


class TypedPolicy(Policy):
    name = "typed"

    def __init__(self, sessions: SessionTable | None = None, config: TypedConfig | None = None) -> None:
        self.sessions = sessions if sessions is not None else SessionTable()
        self.config = config or TypedConfig()
        self.pauses = PausePredictor(model=self.config.pause_model)
        self.turns = ContinuePredictor()
        self.ends = EndReports()
        self.shared_gaps = PausePredictor()
        # tier -> group -> key -> last access (seconds); a group is a Session or a class name
        self._groups: dict[str, dict[object, OrderedDict[BlockKey, float]]] = {}
        self._where: dict[str, dict[BlockKey, object]] = {}
        c = self.config
        self.residence = Residence(c.initial_horizon_s, c.horizon_scale, c.min_horizon_s, c.rate_halflife)
        self._values: dict[str, tuple[float, list[tuple[float, int, object]]]] = {}  # tier -> (at, sorted)
        self._dirty: dict[str, set[object]] = {}  # tier -> groups whose value changed since sorting
        self._paused: dict[Session, None] = {}  # sessions in a tool pause (ordered set)
        self.announced = Announced()
        self.guard = LruGuard()
        self._memo: dict[tuple[int, str], float] = {}
        self._memo_now = -math.inf
        self._recency = LruPolicy()  # the order the guard falls back to: recency over the hierarchy
        self._held_any: dict[BlockKey, int] = {}  # key -> tiers holding it
        self._holders: dict[int, Holders] = {}

    # -- classification -------------------------------------------------------------------
    def _group_of(self, key: BlockKey) -> object:
        sessions = self.sessions
        if sessions.is_shared(key):
            n = sessions.hinted_refs.get(key, 0)
            if n and self.config.shared_by_holders:
                group = self._holders.get(n)
                if group is None:
                    group = self._holders[n] = Holders(n)
                return group
            return SHARED
        owner = sessions.owner(key)
        if owner is None:
            return EPHEMERAL
        if owner.last_partial and owner.chain and owner.chain[-1] == key[1]:
            return EPHEMERAL
        return owner

    def retention_class(self, key: BlockKey, tier: str) -> str | None:
        """The class of ``key``'s copy in ``tier`` (None when not held there)."""
        group = self._where.get(tier, {}).get(key)
        if group is None:
            return None
        if isinstance(group, Session):
            return "tool_pause" if group.state == TOOL_PAUSE else ("session" if group.live else EPHEMERAL)
        if isinstance(group, Holders):
            return SHARED
        return group

    # -- events ---------------------------------------------------------------------------
    def on_stored(self, tier: str, keys: Sequence[BlockKey], now: float) -> None:
        groups = self._groups.setdefault(tier, {})
        where = self._where.setdefault(tier, {})
        held_any = self._held_any
        for key in reversed(keys):
            if key not in where:
                held_any[key] = held_any.get(key, 0) + 1
        self._recency.on_stored(tier, keys, now)
        # Sized with the blocks just stored counted: a count taken while a store was making
        # room (a demotion landing) dips, and a shadow trimmed to it holds less from then on.
        self.guard.resize(len(held_any))
        for key in reversed(keys):  # the root last: most recent within its group
            old = where.get(key)
            group = self._group_of(key)
            if old is not None and old is not group:
                self._take(tier, key, old)
            members = groups.get(group)
            if members is None:
                members = groups[group] = OrderedDict()
                self._dirty.setdefault(tier, set()).add(group)
            members[key] = now
            members.move_to_end(key)
            where[key] = group
        self.residence.stored(tier, len(keys), len(where), now)

    def on_accessed(self, keys: Sequence[BlockKey], now: float) -> None:
        last_seen: dict[BlockKey, float] = {}
        for tier, where in self._where.items():
            groups = self._groups[tier]
            # A load or store touches its whole chain (2,000 keys): the group of the previous
            # key is looked up again only when it changes.
            group = members = shared = None
            for key in reversed(keys):
                g = where.get(key)
                if g is None:
                    continue
                if g is not group:
                    group, members = g, groups[g]
                    shared = g is SHARED or isinstance(g, Holders)
                if shared:
                    seen = members[key]
                    if last_seen.get(key, -math.inf) < seen:
                        last_seen[key] = seen
                members[key] = now
                members.move_to_end(key)
        # One re-use gap per shared block, whatever its tiers; a prefix's blocks were last
        # used together, so their gaps come in runs of one value, each observed with its count.
        for last, run in itertools.groupby(last_seen.values()):
            self.shared_gaps.observe(None, now - last, count=sum(1 for _ in run))
        self._recency.on_accessed(keys, now)

    def _judge(self, session: Session) -> None:
        """Score a turn for the guard as it starts, before anything of it is stored: its
        prompt is the session's chain, and the real cache holds the prefix of it that some
        tier holds — what a lookup answers. (Judged at its stores instead, a turn stored in
        batches would be scored once a batch, each finding the ones before it held, and a
        batch of shared blocks would be put down to whichever session took them last.)"""
        chain = [(session.namespace, h) for h in session.chain]
        held = 0
        for key in chain:
            if key not in self._held_any:
                break
            held += 1
        self.guard.observe(chain, held)

    def on_removed(self, tier: str, key: BlockKey) -> None:
        group = self._where.get(tier, {}).pop(key, None)
        if group is not None:
            self._take(tier, key, group, forget=False)
            self._recency.on_removed(tier, key)
            n = self._held_any[key] - 1
            if n:
                self._held_any[key] = n
            else:
                del self._held_any[key]

    def on_sessions(
        self, changed: Sequence[Session], observations: Sequence[Observation], reclassified: Set[BlockKey], now: float
    ) -> None:
        self._memo.clear()  # a session's value may change within one instant
        for obs in observations:
            if obs.kind is ObservationKind.PAUSE:
                self.pauses.observe(obs.tool, obs.seconds, obs.expected_s)
            elif obs.kind is ObservationKind.TURN and obs.session is not None:
                self.turns.reached(obs.session, obs.turns, obs.session.grown, now)
                self._judge(obs.session)
            elif obs.kind is ObservationKind.END:
                self.ends.observe(obs.seconds, obs.reported)
        for tier in self._groups:
            self._dirty.setdefault(tier, set()).update(changed)
        for session in changed:
            if session.state == TOOL_PAUSE:
                self._paused[session] = None
            else:
                self._paused.pop(session, None)
            self._announce(session)
        if reclassified:
            for tier in self._where:
                self._refile(tier, reclassified)

    def _announce(self, session: Session) -> None:
        """File (or take back) ``session``'s announced turn: one announced by ``turn_ahead``,
        or a tool pause whose hint is sure (see :meth:`_sure_resume`), whose next turn carries
        the chain so far (but a partial last block, which it completes)."""
        if not session.live:
            self.announced.file(session, None)
        elif session.expected_at is not None:
            self.announced.file(session, session.expected_at, session.ahead)
        else:
            hashes = session.chain[:-1] if session.last_partial else session.chain
            self.announced.file(session, self._sure_resume(session), hashes)

    def _sure_resume(self, session: Session) -> float | None:
        """When a session in a hinted tool pause resumes, if its tool's hints have proved
        sharp (their log error's spread at most ``sure_hint_sigma``): the ``prefetch_quantile``
        of the pause predicted around the hint, so the move is done before most resumes."""
        if session.state != TOOL_PAUSE or session.paused_at is None or not session.expected_pause_s:
            return None
        dist = self.pauses.distribution(session.tool, session.expected_pause_s)
        if dist.sigma > self.config.sure_hint_sigma:
            return None
        return session.paused_at + dist.quantile(self.config.prefetch_quantile)

    def _refile(self, tier: str, keys: Set[BlockKey]) -> None:
        """Move ``keys`` held in ``tier`` to the groups they belong to now, keeping each old
        group's order (a chain's tail still goes before its head)."""
        where = self._where[tier]
        groups = self._groups[tier]
        by_group: dict[object, list[BlockKey]] = {}
        for key in sorted(keys):  # a set: sorted, so that runs repeat exactly
            old = where.get(key)
            if old is not None and self._group_of(key) is not old:
                by_group.setdefault(old, []).append(key)
        for old, moving in by_group.items():
            members = groups[old]
            if len(moving) > 1:
                rank = {k: i for i, k in enumerate(members)}
                moving.sort(key=rank.__getitem__)
            for key in moving:
                last = members[key]
                new = self._group_of(key)
                self._take(tier, key, old)
                target = groups.get(new)
                if target is None:
                    target = groups[new] = OrderedDict()
                    self._dirty.setdefault(tier, set()).add(new)
                target[key] = last
                where[key] = new

    # -- decisions ------------------------------------------------------------------------
    def victims(self, tier: str, now: float) -> Iterator[BlockKey]:
        groups = self._groups.get(tier)
        if not groups:
            return iter(())
        boosted = self._boosted(tier, now)
        if self.guard.prefer_lru:
            recency = self._recency.victims(tier, now)  # the sessions bet is losing here: plain recency
            if not boosted:
                return recency
            return itertools.chain((k for k in recency if k not in boosted), self._boosted_in(tier, boosted))
        ordered = self._ordered_groups(tier, now)
        # The streams read the groups in place, not copies (the caller calls no on_* while
        # it iterates, Policy.victims): see docs/decisions.md, "Cost".
        streams: list[Iterator[tuple[float, int, BlockKey]]] = []
        eph = groups.get(EPHEMERAL)
        if eph:
            streams.append(((0.0, 0, k) for k in eph))
        shared = groups.get(SHARED)
        if shared:
            streams.append(self._shared_stream(tier, shared.items(), now))
        held_by = sorted((g for g in groups if isinstance(g, Holders)), key=lambda g: g.n)
        if held_by:
            streams.append(self._holders_stream(tier, groups, held_by, now))
        streams.append(self._session_stream(groups, ordered))
        if boosted:
            # An announced turn's blocks leave their groups' order and go last of all.
            streams = [(item for item in stream if item[2] not in boosted) for stream in streams]
            streams.append((ANNOUNCED, 0, key) for key in self._boosted_in(tier, boosted))
        return (key for _, _, key in heapq.merge(*streams, key=lambda item: (item[0], item[1])))

    def _boosted(self, tier: str, now: float) -> frozenset[BlockKey]:
        """The keys of the turns announced to arrive within ``tier``'s horizon."""
        return self.announced.within(tier, self.horizon(tier), now) if self.announced else frozenset()

    def _boosted_in(self, tier: str, boosted: frozenset[BlockKey]) -> Iterator[BlockKey]:
        """The keys of ``boosted`` held in ``tier``, each announced chain's tail first."""
        return self.announced.held(self._where.get(tier, {}), boosted)

    def priority(self, key: BlockKey, tier: str, now: float) -> float:
        """The block's value in ``tier`` (its last use, while the guard prefers recency), at
        ``ANNOUNCED`` for a block of a turn announced to arrive within the horizon.
        A chain's root ranks first: a session's blocks share one value, a shared block is
        worth its latest user's value plus a margin, a block n sessions hold more than any
        one of them. (One gap: a shared block valued by its latest user may rank below an
        older user's more valuable tail.)"""
        due = self.announced.session_of(key) is not None and key in self._boosted(tier, now)
        if self.guard.prefer_lru:
            last_use = self._recency.priority(key, tier, now)
            return max(last_use, self._recency.newest_use + 1.0) if due else last_use
        group = self._where.get(tier, {}).get(key)
        if group is None:
            group = self._group_of(key)
        if isinstance(group, Holders):
            value = self._group_value(group, tier, now)
        elif group is SHARED:
            value = self._shared_value(key, now - self._shared_last_use(key, tier, now), tier, now)
        else:
            value = self._group_value(group, tier, now)
        # A block of a turn announced to come within the horizon is sure to be used, and
        # soon: it outranks every guess (by recency, under the guard: it ranks as the next one
        # used).
        return max(value, ANNOUNCED) if due else value

    def worth_demoting(self, key: BlockKey, tier: str, now: float) -> bool:
        """Ephemeral blocks and the tails of ended sessions are dropped, not written down."""
        group = self._where.get(tier, {}).get(key)
        if group is None:
            group = self._group_of(key)
        if group is EPHEMERAL:
            return False
        return not (isinstance(group, Session) and group.state == ENDED)

    def prefetches(self, tier: str, now: float) -> Iterator[Prefetch]:
        """Per session whose next turn is near, its blocks held below ``tier`` only: those
        announced (their announced prompt, or a surely hinted pause's chain; soonest first),
        then those in a tool pause whose predicted resume is near (their chain). Near: within
        ``prefetch_lead_s`` of the announced arrival, or of the ``prefetch_quantile`` of the
        pause's distribution."""
        here = self._where.get(tier, {})
        below = [where for t, where in self._where.items() if t != tier]
        lead = self.config.prefetch_lead_s
        groups = [(keys, True) for _, _, keys in self.announced.due(now, lead)]
        guesses: list[tuple[float, list[BlockKey]]] = []
        for session in list(self._paused):
            if session.state != TOOL_PAUSE or session.paused_at is None:
                self._paused.pop(session, None)
                continue
            if session in self.announced:
                continue
            dist = self.pauses.distribution(session.tool, session.expected_pause_s)
            resume = session.paused_at + dist.quantile(self.config.prefetch_quantile)
            if now >= resume - lead:
                guesses.append((resume, [(session.namespace, h) for h in session.chain]))
        guesses.sort(key=lambda item: item[0])
        groups += [(keys, False) for _, keys in guesses]
        for chain, announced in groups:
            keys = [key for key in chain if key not in here and any(key in where for where in below)]
            if keys:
                yield Prefetch(keys, announced)

    # -- values ---------------------------------------------------------------------------
    def horizon(self, tier: str) -> float:
        """Seconds a block stays in ``tier`` (:class:`~kvd.policies.residence.Residence`)."""
        return self.residence.horizon(tier)

    def _group_value(self, group: object, tier: str, now: float) -> float:
        # One value per group, tier and instant: every block of a session shares it.
        if now != self._memo_now:
            self._memo_now = now
            self._memo.clear()
        memo_key = (id(group), tier)
        value = self._memo.get(memo_key)
        if value is None:
            value = self._memo[memo_key] = self._compute_group_value(group, tier, now)
        return value

    def _compute_group_value(self, group: object, tier: str, now: float) -> float:
        if group is EPHEMERAL:
            return 0.0
        if isinstance(group, Holders):
            return self._holders_value(group.n, tier, now)
        if not isinstance(group, Session):
            return 0.0
        if group.state == ENDED:
            return 0.0
        horizon = self.horizon(tier)
        at = self.announced.arrival(group)
        if at is not None and at - now <= horizon:
            return ANNOUNCED  # its next turn was announced (or surely hinted) to come within the horizon
        self._resolve_turns(now)
        if group.state == TOOL_PAUSE and group.paused_at is not None:
            dist = self.pauses.distribution(group.tool, group.expected_pause_s)
            elapsed = now - group.paused_at
        else:
            dist = self.pauses.distribution(None)
            elapsed = now - group.last_active
            if group.state == ACTIVE and not group.inferred:
                # Its pause begins when the turn ends (a turn end or a tool pause says so);
                # an answer that takes long is no sign that the session went quiet.
                elapsed = max(elapsed - self.config.turn_grace_s, 0.0)
        p = self.ends.continuing(self.turns.p(group.turns, group.grown), now - group.last_active)
        value = reuse_probability(dist, p, max(elapsed, 0.0), horizon)
        if self.config.monotone:
            # Never rank a session above an otherwise equal one seen more recently.
            value = min(value, reuse_probability(dist, p, 0.0, horizon))
        return value

    def _shared_last_use(self, key: BlockKey, tier: str, now: float) -> float:
        """When ``key`` (a shared block) was last used: as ``tier`` saw it, else as the
        tiers holding it did (the core may ask what it would be worth where it is not
        held), else ``now`` (a block being stored)."""
        members = self._groups.get(tier, {}).get(SHARED)
        if members and key in members:
            return members[key]
        seen = [groups[SHARED][key] for groups in self._groups.values() if key in groups.get(SHARED, ())]
        return max(seen) if seen else now

    def _shared_value(self, key: BlockKey, elapsed: float, tier: str, now: float) -> float:
        own = reuse_probability(self.shared_gaps.pooled(), 1.0, max(elapsed, 0.0), self.horizon(tier))
        latest = self.sessions.latest(key)
        users = self._group_value(latest, tier, now) if latest is not None else 0.0
        return max(own, users) + self.config.shared_margin

    def _holders_value(self, n: int, tier: str, now: float) -> float:
        """P(any of ``n`` live sessions uses the block within the horizon), each taken at the
        most a session can be worth (one that just turned, sure to continue)."""
        one = reuse_probability(self.pauses.pooled(), 1.0, 0.0, self.horizon(tier))
        return 1.0 - (1.0 - min(one, 1.0)) ** n + self.config.shared_margin

    def _resolve_turns(self, now: float) -> None:
        pooled = self.pauses.pooled()
        maturity = min(max(pooled.quantile(0.95), self.config.maturity_min_s), self.config.maturity_max_s)
        self.turns.resolve(now, maturity)

    def _ordered_groups(self, tier: str, now: float) -> list[tuple[float, int, object]]:
        """Session groups by value, recomputed every ``revalue_s``; groups that changed
        since are valued afresh and merged in."""
        cached = self._values.get(tier)
        groups = self._groups[tier]
        if cached is None or now - cached[0] >= self.config.revalue_s:
            ordered = [
                (self._group_value(g, tier, now), g.seq, g) for g, m in groups.items() if m and isinstance(g, Session)
            ]
            ordered.sort(key=lambda item: (item[0], item[1]))
            self._values[tier] = (now, ordered)
            self._dirty[tier] = set()
            return ordered
        dirty = self._dirty.get(tier)
        if not dirty:
            return cached[1]
        fresh = [
            (self._group_value(g, tier, now), g.seq, g)
            for g in dirty
            if isinstance(g, Session) and groups.get(g)
        ]
        fresh.sort(key=lambda item: (item[0], item[1]))
        kept = [item for item in cached[1] if item[2] not in dirty]
        return list(heapq.merge(kept, fresh, key=lambda item: (item[0], item[1])))

    def _session_stream(
        self, groups: dict[object, OrderedDict[BlockKey, float]], ordered: list[tuple[float, int, object]]
    ) -> Iterator[tuple[float, int, BlockKey]]:
        for value, tiebreak, group in ordered:
            members = groups.get(group)
            if not members:
                continue
            for key in list(members):
                yield (value, tiebreak, key)

    def _shared_stream(
        self, tier: str, members: Iterable[tuple[BlockKey, float]], now: float
    ) -> Iterator[tuple[float, int, BlockKey]]:
        # LRU order; the value rises towards the recent end (close enough to sorted for
        # the merge: a shared block is never worth less than the tails that depend on it).
        for key, last in members:
            yield (self._shared_value(key, now - last, tier, now), 0, key)

    def _holders_stream(
        self, tier: str, groups: dict[object, OrderedDict[BlockKey, float]], held_by: list[Holders], now: float
    ) -> Iterator[tuple[float, int, BlockKey]]:
        # The value grows with n: fewest holders first, each group least recent (tail) first.
        for group in held_by:
            value = self._group_value(group, tier, now)
            for key in list(groups.get(group, ())):
                yield (value, 0, key)

    # -- bookkeeping ----------------------------------------------------------------------
    def _take(self, tier: str, key: BlockKey, group: object, forget: bool = True) -> None:
        members = self._groups[tier].get(group)
        if members is not None:
            members.pop(key, None)
            if not members:
                del self._groups[tier][group]
        if forget:
            self._where[tier].pop(key, None)

    def check(self, held: dict[str, set[BlockKey]]) -> list[str]:
        problems = []
        for tier in set(held) | set(self._where):
            keys = held.get(tier, set())
            tracked = set(self._where.get(tier, {}))
            if tracked != keys:
                problems.append(
                    f"typed[{tier}]: {len(tracked - keys)} tracked but not held, {len(keys - tracked)} held but not tracked"
                )
            grouped = sum(len(m) for m in self._groups.get(tier, {}).values())
            if grouped != len(tracked):
                problems.append(f"typed[{tier}]: {grouped} keys in groups, {len(tracked)} located")
            for key, group in self._where.get(tier, {}).items():
                if key not in self._groups[tier].get(group, {}):
                    problems.append(f"typed[{tier}]: {key} is filed under a group that lacks it")
                    break
        problems += [f"typed's recency: {p}" for p in self._recency.check(held)]
        return problems

