"""Sessions: which program each block belongs to, hinted by engines or inferred from chains.

A *session* is one agentic program (a conversation): a sequence of turns whose prompts
extend one another. Engines and routers may say so (session events with an id); without
hints the table infers it: a request whose prefix extends an earlier request's chain, up to
that chain's last and possibly partial block, continues that session.

The table also keeps, per block, how many live sessions' chains hold it (:mod:`kvd.core.
sharing`): a block in two or more is a *shared prefix* (system prompt, repository context).
A session's next turn may be announced (:meth:`SessionTable.expect`). Like the rest of the
core it does no I/O and reads time only from the ``now`` it is given (seconds).

Invariants (checked by :meth:`check`): the sharing counts agree with the live chains; each
session's chain tail keys are indexed in ``_tails`` unless they are shared.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from kvd.core.errors import InvalidArgument, SessionStateError, UnknownSession, check_name
from kvd.core.sharing import Sharing

BlockKey = tuple[str, int]


class SessionState(StrEnum):
    ACTIVE = "active"  # a turn is under way
    IDLE = "idle"  # between turns, no tool named
    TOOL_PAUSE = "tool_pause"  # waiting for a tool's result
    ENDED = "ended"  # the program said it is done (or went quiet too long)


class SessionEvent(StrEnum):
    """What an engine, a router or an agent framework says about a session."""

    TURN_START = "turn_start"
    TURN_END = "turn_end"
    TOOL_PAUSE = "tool_pause"
    TOOL_RESUME = "tool_resume"
    SESSION_END = "session_end"
    TURN_AHEAD = "turn_ahead"  # a turn will arrive, with these hashes, in about this many seconds


class ObservationKind(StrEnum):
    PAUSE = "pause"  # a pause ended: its length
    TURN = "turn"  # a turn started: the session's turn count
    END = "end"  # a session ended, its end reported or not: the seconds since its last sign of life


ACTIVE, IDLE, TOOL_PAUSE, ENDED = SessionState
STATES = tuple(SessionState)
SESSION_EVENTS = tuple(SessionEvent)
MAX_SESSION_ID_LEN = 256
MAX_EXPECTED_PAUSE_S = 86_400.0  # a tool pause hint of more than a day is refused


@dataclass(eq=False)
class Session:
    """One program. ``turns`` counts turn starts seen; times are seconds on the core clock.

    ``last_active`` is when the session last did anything (a turn start, a store, a turn
    end); ``paused_at`` when its current tool pause began.
    """

    namespace: str
    id: str
    inferred: bool
    state: SessionState = ACTIVE
    tool: str | None = None
    expected_pause_s: float | None = None
    turns: int = 0
    chain: list[int] = field(default_factory=list)
    last_partial: bool = False  # the chain's last block holds fewer than block_tokens tokens
    started_at: float = 0.0
    last_active: float = 0.0
    paused_at: float | None = None
    seq: int = 0  # creation order in its table: a deterministic tie-break
    resumed: bool = False  # a tool_resume was seen and its turn has not started yet
    last_reported: tuple[SessionState, str | None] | None = None  # (state, tool) last put in the event log
    grown: int = 0  # blocks the latest turn added to the chain (the whole chain on turn 1)
    head: int = 0  # full blocks of the first turn's prompt: the context the program started from
    ahead: list[int] = field(default_factory=list)  # the announced next turn's prompt (hashes)
    expected_at: float | None = None  # when the announced turn arrives (seconds, core clock)

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.id)

    @property
    def live(self) -> bool:
        return self.state != ENDED


@dataclass(frozen=True, slots=True)
class Observation:
    """What one session event taught: ``pause`` — a pause of ``tool`` ended after
    ``seconds`` (its hint had said ``expected_s``, when there was one); ``turn`` —
    ``session`` started its ``turns``-th turn; ``end`` — a session ended ``seconds`` after
    its last sign of life, ``reported`` by its end event or not (it went quiet too long)."""

    kind: ObservationKind
    tool: str | None
    seconds: float = 0.0
    turns: int = 0
    session: Session | None = None
    expected_s: float | None = None
    reported: bool = False


@dataclass(frozen=True)
class SessionConfig:
    max_sessions: int = 100_000  # the least recently active are forgotten beyond this
    idle_expiry_s: float = 3600.0  # a session idle this long is treated as ended
    ended_expiry_s: float = 60.0  # an ended session is forgotten this long after its end
    max_shared_keys: int = 1_000_000  # keys remembered as once shared, and as released (the oldest forgotten)
    # Keys in all live chains together (memory: ~200 bytes each with their sharing counts);
    # beyond it the least recently active sessions end, as beyond max_sessions.
    max_chain_keys: int = 2_000_000


class SessionTable:
    """Live sessions of every namespace, their chains, and per-block sharing counts."""

    def __init__(self, config: SessionConfig | None = None) -> None:
        self.config = config or SessionConfig()
        self._sessions: OrderedDict[tuple[str, str], Session] = OrderedDict()  # least recent first
        self.sharing = Sharing(self.config.max_shared_keys)
        self._tails: dict[BlockKey, Session] = {}  # a chain's last two keys -> its session
        self._ids = itertools.count(1)
        self._changed: list[Session] = []  # state changes since take_changes()
        self._observations: list[Observation] = []
        self._ended: OrderedDict[tuple[str, str], float] = OrderedDict()  # ended sessions -> end time
        self._chain_keys = 0  # sum of len(chain) over every session

    # -- queries --------------------------------------------------------------------------
    def get(self, namespace: str, session_id: str) -> Session | None:
        return self._sessions.get((namespace, session_id))

    def sessions(self) -> list[Session]:
        return list(self._sessions.values())

    def __len__(self) -> int:
        return len(self._sessions)

    @property
    def refs(self) -> dict[BlockKey, int]:
        """Key -> the live sessions' chains holding it (see :mod:`kvd.core.sharing`)."""
        return self.sharing.refs

    @property
    def hinted_refs(self) -> dict[BlockKey, int]:
        """Key -> the chains holding it of sessions an engine named."""
        return self.sharing.hinted_refs

    def owner(self, key: BlockKey) -> Session | None:
        """The one live session holding ``key`` in its chain; None when shared or orphaned."""
        return self.sharing.owner(key)

    def latest(self, key: BlockKey) -> Session | None:
        """The session that most recently took ``key`` into its chain."""
        return self.sharing.latest(key)

    def is_shared(self, key: BlockKey) -> bool:
        """In two or more live chains now, or once was (a shared prefix stays one)."""
        return self.sharing.is_shared(key)

    # -- events ---------------------------------------------------------------------------
    def turn_start(
        self,
        namespace: str,
        session_id: str | None,
        hashes: Sequence[int],
        now: float,
        last_partial: bool = False,
    ) -> Session:
        """A turn's prompt (its chained block hashes) arrived. Without an id, infer one."""
        session = self._resolve(namespace, session_id, hashes, now)
        if session.turns and not session.resumed:
            self._learn_resume(session, now)
        session.resumed = False
        session.ahead, session.expected_at = [], None
        session.turns += 1
        self._observations.append(Observation(ObservationKind.TURN, None, turns=session.turns, session=session))
        self._set_chain(session, hashes, last_partial)
        was = session.state
        self._set_state(session, ACTIVE, now)
        if was == ACTIVE:
            self._changed.append(session)  # a new turn changes its value even without a state change
        return session

    def observe_store(
        self,
        namespace: str,
        session_id: str | None,
        hashes: Sequence[int],
        now: float,
        last_partial: bool = False,
        parent: int | None = None,
    ) -> Session:
        """An engine stored ``hashes`` (a chain, or its continuation after ``parent``).

        The store of a turn already started (a turn_start, or an earlier part of the same
        store) extends that turn's chain. Otherwise the store is the evidence: a chain that
        extends a session's continues it (a new turn), else it starts a new session.
        """
        chain = list(hashes)
        session = self._sessions.get((namespace, session_id)) if session_id is not None else None
        part = False  # a later part of a store already under way
        if parent is not None:
            owner = session if session is not None else self._tails.get((namespace, parent))
            if owner is None and chain:
                owner = self.sharing.latest((namespace, chain[0]))  # a part stored again (a retry)
            if owner is not None and owner.live:
                at = _rindex(owner.chain, parent)
                if at is not None:
                    chain = owner.chain[: at + 1] + chain
                    session = owner if session is None else session
                    part = True
        if session is None and session_id is None:
            candidate = self._continued(namespace, chain)
            if candidate is not None and candidate.chain == chain:
                session = candidate  # the very chain again: a retried store, not a new turn
                part = True
        same_turn = part or (session is not None and not session.inferred)
        common = min(len(chain), len(session.chain)) if session is not None else 0
        if same_turn and session.state == ACTIVE and chain[:common] == session.chain[:common]:
            # The turn under way storing (more of) its prompt: not a new turn. A part may
            # also come again after later parts (a store retried while it waited for room,
            # its successors pipelined behind it): then the chain already holds it.
            longer = len(chain) > len(session.chain)
            if longer or (len(chain) == len(session.chain) and last_partial != session.last_partial):
                self._set_chain(session, chain, last_partial, same_turn=True)
            session.last_active = now
            self._sessions.move_to_end(session.key)
            self._changed.append(session)
            return session
        return self.turn_start(namespace, session_id, chain, now, last_partial)

    def expect(
        self, namespace: str, session_id: str | None, hashes: Sequence[int], arrives_in_s: float, now: float
    ) -> Session | None:
        """A turn of the session will arrive in about ``arrives_in_s`` seconds with the prompt
        ``hashes``. A named session not known yet starts idle, waiting for it; without a name
        the session is the live one whose chain ``hashes`` continue (None when there is none)."""
        if not 0 <= arrives_in_s <= MAX_EXPECTED_PAUSE_S:
            raise InvalidArgument(f"arrives_in_s must be in [0, {MAX_EXPECTED_PAUSE_S:.0f}]")
        if session_id is None:
            session = self._continued(namespace, hashes)
            if session is None:
                return None
        else:
            session = self._resolve(namespace, session_id, hashes, now)
            if not session.turns:
                session.state = IDLE
        session.ahead, session.expected_at = list(hashes), now + arrives_in_s
        self._changed.append(session)
        return session

    def find(self, namespace: str, hashes: Sequence[int]) -> Session | None:
        """The live session whose chain ``hashes`` continue (or repeat), if any."""
        return self._continued(namespace, hashes)

    def turn_end(self, namespace: str, session_id: str, now: float) -> Session:
        session = self._require(namespace, session_id)
        self._set_state(session, IDLE, now)
        return session

    def tool_pause(
        self, namespace: str, session_id: str, tool: str, expected_s: float | None, now: float
    ) -> Session:
        if not tool:
            raise InvalidArgument("a tool pause needs the tool's name")
        check_name("tool", tool)
        if expected_s is not None and not 0 < expected_s <= MAX_EXPECTED_PAUSE_S:
            raise InvalidArgument(f"expected pause seconds must be in (0, {MAX_EXPECTED_PAUSE_S:.0f}]")
        session = self._require(namespace, session_id)
        session.tool, session.expected_pause_s, session.paused_at = tool, expected_s, now
        self._set_state(session, TOOL_PAUSE, now)
        return session

    def tool_resume(self, namespace: str, session_id: str, now: float) -> Session:
        session = self._require(namespace, session_id)
        if session.state != TOOL_PAUSE:
            raise SessionStateError(f"session {session_id!r} is {session.state}, not in a tool pause")
        self._learn_resume(session, now)
        session.resumed = True
        self._set_state(session, ACTIVE, now)
        return session

    def end(self, namespace: str, session_id: str, now: float) -> Session:
        session = self._require(namespace, session_id)
        self._observe_end(session, now, reported=True)
        self._set_state(session, ENDED, now)
        self._release(session)
        return session

    def _forget_chain(self, session: Session) -> None:
        """An ended session holds nothing: its chain goes (memory), its record stays a
        while (``ended_expiry_s``) so late events about it are refused, not taken as new."""
        self._chain_keys -= len(session.chain)
        session.chain = []
        session.last_partial = False
        session.ahead, session.expected_at = [], None
        self._ended[session.key] = session.last_active

    def expire(self, now: float) -> int:
        """End sessions idle past ``idle_expiry_s`` or beyond ``max_sessions``, and forget
        those ended ``ended_expiry_s`` ago; returns how many were ended or forgotten."""
        ended = 0
        while self._ended:
            key, at = next(iter(self._ended.items()))
            if now - at < self.config.ended_expiry_s:
                break
            del self._ended[key]
            session = self._sessions.get(key)
            if session is not None and not session.live:
                del self._sessions[key]
            ended += 1
        while self._sessions:
            session = next(iter(self._sessions.values()))
            too_many = (len(self._sessions) > self.config.max_sessions
                        or self._chain_keys > self.config.max_chain_keys)
            if not too_many and now - session.last_active < self.config.idle_expiry_s:
                break
            if session.live:
                self._observe_end(session, now, reported=False)
                self._set_state(session, ENDED, now)
                self._release(session)
            del self._sessions[session.key]
            self._ended.pop(session.key, None)
            ended += 1
        return ended

    # -- drained by the core --------------------------------------------------------------
    def take_changes(self) -> list[Session]:
        out, self._changed = self._changed, []
        return out

    def take_reclassified(self) -> set[BlockKey]:
        out, self.sharing.reclassified = self.sharing.reclassified, set()
        return out

    def take_observations(self) -> list[Observation]:
        out, self._observations = self._observations, []
        return out

    def check(self) -> list[str]:
        problems = []
        counts: dict[BlockKey, int] = {}
        hinted: dict[BlockKey, int] = {}
        for session in self._sessions.values():
            if session.state not in STATES:
                problems.append(f"session {session.id}: unknown state {session.state}")
            if session.live:
                for h in set(session.chain):
                    key = (session.namespace, h)
                    counts[key] = counts.get(key, 0) + 1
                    if not session.inferred:
                        hinted[key] = hinted.get(key, 0) + 1
        keys = sum(len(session.chain) for session in self._sessions.values())
        if keys != self._chain_keys:
            problems.append(f"chain keys counted {self._chain_keys}, held {keys}")
        return problems + self.sharing.check(counts, hinted)

    # -- internals ------------------------------------------------------------------------
    def _require(self, namespace: str, session_id: str) -> Session:
        session = self._sessions.get((namespace, session_id))
        if session is None:
            raise UnknownSession(f"session {session_id!r} of namespace {namespace!r} is unknown")
        if not session.live:
            raise SessionStateError(f"session {session_id!r} has ended")
        return session

    def _resolve(self, namespace: str, session_id: str | None, hashes: Sequence[int], now: float) -> Session:
        if session_id is not None:
            check_name("session", session_id, MAX_SESSION_ID_LEN)
            session = self._sessions.get((namespace, session_id))
            if session is not None and session.live:
                self._sessions.move_to_end(session.key)
                return session
            if session is not None:  # an ended session's id used again: a new program
                del self._sessions[session.key]
                self._ended.pop(session.key, None)  # or its expiry would drop the new one
            return self._new(namespace, session_id, False, now)
        session = self._continued(namespace, hashes)
        if session is not None:
            self._sessions.move_to_end(session.key)
            return session
        return self._new(namespace, None, True, now)

    def _continued(self, namespace: str, hashes: Sequence[int]) -> Session | None:
        """The live session whose chain (all of it, or all but its last block) the request
        extends, preferring the longest match. A key held by two sessions' chains says
        nothing about which one continues, so shared keys are not indexed."""
        tails = self._tails
        for i in range(len(hashes) - 1, -1, -1):
            session = tails.get((namespace, hashes[i]))
            if session is not None and session.live and i >= len(session.chain) - 2 and i < len(session.chain):
                return session
        return None

    def _new(self, namespace: str, session_id: str | None, inferred: bool, now: float) -> Session:
        seq = next(self._ids)
        name = session_id if session_id is not None else f"~{seq}"
        session = Session(namespace, name, inferred, seq=seq, started_at=now, last_active=now)
        self._sessions[session.key] = session
        return session

    def _set_chain(self, session: Session, hashes: Sequence[int], last_partial: bool, same_turn: bool = False) -> None:
        old, new = session.chain, list(hashes)
        ns = session.namespace
        common = 0
        for a, b in zip(old, new):
            if a != b:
                break
            common += 1
        self._untail(session)
        if session.live:
            for h in old[common:]:
                self._unref((ns, h), session)
            for h in new[common:]:
                self._ref((ns, h), session)
        # A turn's store may come in parts: they add to the same turn's growth.
        session.grown = len(new) - common + (session.grown if same_turn else 0)
        self._chain_keys += len(new) - len(old)
        session.chain = new
        session.last_partial = last_partial
        if session.turns <= 1:  # the first turn, or a part of its store
            session.head = len(new) - (1 if last_partial else 0)
        self._tail(session)

    def _ref(self, key: BlockKey, session: Session) -> None:
        if self.sharing.ref(key, session) == 2:
            self._tails.pop(key, None)  # a shared key says nothing about which chain continues

    def _unref(self, key: BlockKey, session: Session) -> None:
        self.sharing.unref(key, session)

    def _tail(self, session: Session) -> None:
        for h in session.chain[-2:]:
            key = (session.namespace, h)
            if self.refs.get(key, 0) <= 1:
                self._tails[key] = session

    def _untail(self, session: Session) -> None:
        for h in session.chain[-2:]:
            key = (session.namespace, h)
            if self._tails.get(key) is session:
                del self._tails[key]

    def _release(self, session: Session) -> None:
        """An ended session no longer holds its chain: its private blocks are orphans — all
        but the context a named program of several turns started from (system prompt,
        repository, task), which the next program on that repository starts from too: a
        shared prefix. An inferred session is a conversation's chain, not a program: its first
        prompt is its own (a prefix it shares with live chains is shared already)."""
        self._untail(session)
        if session.turns >= 2 and not session.inferred:
            for h in session.chain[: session.head]:
                self.sharing.mark_shared((session.namespace, h))
        self.sharing.release(session, [(session.namespace, h) for h in set(session.chain)])
        self._forget_chain(session)

    def _learn_resume(self, session: Session, now: float) -> None:
        if session.state == TOOL_PAUSE and session.paused_at is not None:
            self._observations.append(
                Observation(ObservationKind.PAUSE, session.tool, now - session.paused_at, session.turns, expected_s=session.expected_pause_s)
            )
        elif session.state != ACTIVE or session.inferred:
            # Without a turn end the last sign of life stands in for it (inferred sessions).
            self._observations.append(Observation(ObservationKind.PAUSE, None, now - session.last_active, session.turns))

    def _observe_end(self, session: Session, now: float, reported: bool) -> None:
        seconds = max(now - session.last_active, 0.0)
        self._observations.append(
            Observation(ObservationKind.END, session.tool, seconds, session.turns, session, reported=reported)
        )

    def _set_state(self, session: Session, state: SessionState, now: float) -> None:
        if state != TOOL_PAUSE:
            session.tool = session.tool if state == ENDED else None
            session.expected_pause_s = None
            session.paused_at = None
        if state != session.state or state == TOOL_PAUSE:
            session.state = state
            self._changed.append(session)
        session.last_active = now
        self._sessions.move_to_end(session.key)


def _rindex(chain: list[int], h: int) -> int | None:
    for i in range(len(chain) - 1, -1, -1):
        if chain[i] == h:
            return i
    return None
