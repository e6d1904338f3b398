"""Online predictors for typed retention: how long a tool pauses a session, and whether a
session comes back for another turn.

Pure objects: fed observations, asked for probabilities; time is seconds, given by the caller.

- :class:`LognormalFit` fits a lognormal by Welford's running mean and variance of
  ``log(x)`` (tool pauses are lognormal: many short calls, a long tail).
- :class:`PausePredictor` keeps one fit per tool and a pooled fit, each shrunk towards a
  prior until it has seen enough samples; a hint's expected seconds becomes the median,
  corrected by how far the tool's hints have been off (learned from hinted pauses).
- :class:`ContinuePredictor` estimates P(another turn | turns so far) per turn bucket. A
  turn's outcome is known when the next turn starts, or, for the rest, once the turn is
  older than a maturity age (by then a session that was coming back would have).
- :class:`EndReports` learns whether sessions that end say so, and how late: a session that
  has been quiet longer than its end would take to be reported is coming back.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from dataclasses import dataclass

SQRT2 = math.sqrt(2.0)


@dataclass
class LognormalFit:
    """Running fit of ``log(x)``; ``x`` in seconds, clamped to at least ``floor_s``."""

    floor_s: float = 0.01
    n: int = 0
    mean: float = 0.0
    m2: float = 0.0

    def add(self, x: float, count: int = 1) -> None:
        """``count`` observations of ``x``, one by one (the float operations of ``count``
        calls, so that a fit never depends on how its observations were batched)."""
        y = math.log(max(x, self.floor_s))
        n, mean, m2 = self.n, self.mean, self.m2
        for _ in range(count):
            n += 1
            delta = y - mean
            mean += delta / n
            m2 += delta * (y - mean)
        self.n, self.mean, self.m2 = n, mean, m2

    @property
    def mu(self) -> float:
        return self.mean

    @property
    def sigma(self) -> float:
        return math.sqrt(self.m2 / (self.n - 1)) if self.n > 1 else 0.0


@dataclass(frozen=True, slots=True)
class Lognormal:
    """A lognormal distribution of seconds: ``log(x) ~ N(mu, sigma^2)``."""

    mu: float
    sigma: float

    def cdf(self, x: float) -> float:
        if x <= 0:
            return 0.0
        return 0.5 * (1.0 + math.erf((math.log(x) - self.mu) / (self.sigma * SQRT2)))

    def quantile(self, q: float) -> float:
        if not 0 < q < 1:
            raise ValueError("q must be in (0, 1)")
        return math.exp(self.mu + self.sigma * SQRT2 * _erfinv(2 * q - 1))

    @property
    def median(self) -> float:
        return math.exp(self.mu)

    @property
    def mean(self) -> float:
        return math.exp(self.mu + self.sigma * self.sigma / 2)


class Empirical:
    """A distribution of seconds from counts in log-spaced bins (``edges``, ascending),
    linear in log(x) within a bin. Pauses are often not lognormal at all (in the Mooncake
    conversation trace a quarter of follow-ups come within 3 s, the rest after minutes), so
    the predictor keeps the shape it sees."""

    __slots__ = ("edges", "cum", "total", "_mu", "sigma")

    def __init__(self, edges: list[float], counts: list[float], mu: float, sigma: float) -> None:
        self.edges = edges  # len(counts) + 1 edges
        cum = [0.0]
        for c in counts:
            cum.append(cum[-1] + c)
        self.cum = cum
        self.total = cum[-1]
        self._mu = mu
        self.sigma = sigma

    @property
    def mu(self) -> float:
        return self._mu

    def cdf(self, x: float) -> float:
        edges = self.edges
        if x <= edges[0]:
            return 0.0
        if x >= edges[-1]:
            return 1.0
        i = bisect.bisect_right(edges, x) - 1
        lo, hi = edges[i], edges[i + 1]
        frac = math.log(x / lo) / math.log(hi / lo)
        return (self.cum[i] + frac * (self.cum[i + 1] - self.cum[i])) / self.total

    def quantile(self, q: float) -> float:
        if not 0 < q < 1:
            raise ValueError("q must be in (0, 1)")
        target = q * self.total
        i = bisect.bisect_left(self.cum, target) - 1
        i = min(max(i, 0), len(self.edges) - 2)
        mass = self.cum[i + 1] - self.cum[i]
        frac = (target - self.cum[i]) / mass if mass > 0 else 0.0
        lo, hi = self.edges[i], self.edges[i + 1]
        return lo * (hi / lo) ** frac

    @property
    def median(self) -> float:
        return self.quantile(0.5)


def _erfinv(y: float) -> float:
    """Inverse error function: Giles' single-precision approximation refined by two Newton
    steps (accurate to ~1e-12 on (-1, 1))."""
    w = -math.log((1.0 - y) * (1.0 + y))
    if w < 5.0:
        w -= 2.5
        p = 2.81022636e-08
        for c in (3.43273939e-07, -3.5233877e-06, -4.39150654e-06, 0.00021858087, -0.00125372503,
                  -0.00417768164, 0.246640727, 1.50140941):
            p = c + p * w
    else:
        w = math.sqrt(w) - 3.0
        p = -0.000200214257
        for c in (0.000100950558, 0.00134934322, -0.00367342844, 0.00573950773, -0.0076224613,
                  0.00943887047, 1.00167406, 2.83297682):
            p = c + p * w
    x = p * y
    for _ in range(2):
        err = math.erf(x) - y
        x -= err / (2.0 / math.sqrt(math.pi) * math.exp(-x * x))
    return x


@dataclass(frozen=True)
class PriorConfig:
    """What a tool pause looks like before any is seen: median seconds and log-spread, and
    how many samples' worth of weight the prior carries."""

    median_s: float = 10.0
    sigma: float = 1.0
    weight: float = 3.0


BIN_EDGES = [0.05 * 10 ** (i / 8) for i in range(41)]  # 0.05 s .. 500,000 s, 8 bins a decade
MIN_SIGMA = 0.05  # the sharpest a predicted pause gets (log seconds): ~5% either way
# actual / expected is clamped to [1/HINT_RATIO_LIMIT, HINT_RATIO_LIMIT]: a log of 0 or of
# infinity (a hint of 1e-300 s) has no mean, and one absurd hint must not ruin the rest.
HINT_RATIO_LIMIT = 1e3


class PausePredictor:
    """Per-tool pause distributions learned online; unknown tools use the pooled one.

    Each is a histogram over log-spaced bins plus the prior's mass (``prior.weight``
    samples' worth of a lognormal), so the first few samples move it gently.

    A hint's expected seconds replaces the location: a lognormal around the hint. How much
    to trust it is learned from the tool's hinted pauses: the log of actual / expected has
    a running mean (the hints' bias, added to the location) and spread (the sigma), both
    shrunk towards "unbiased, as spread as the tool's own pauses" by ``prior.weight``
    samples. Hints that come true make the prediction sharp; hints that say little leave
    it as wide as the tool.
    """

    def __init__(self, prior: PriorConfig | None = None, model: str = "lognormal") -> None:
        if model not in ("lognormal", "empirical"):
            raise ValueError(f"unknown pause model {model!r}: lognormal or empirical")
        self.prior = prior or PriorConfig()
        self.model = model
        self._fits: dict[str | None, LognormalFit] = {}
        self._counts: dict[str | None, list[float]] = {}
        self._pooled = LognormalFit()
        self._pooled_counts = [0.0] * (len(BIN_EDGES) - 1)
        self._hints: dict[str | None, LognormalFit] = {}  # tool -> fit of actual / expected
        self._pooled_hints = LognormalFit(floor_s=1 / HINT_RATIO_LIMIT)  # of a ratio, not seconds
        self._cache: dict[str | None, Empirical] = {}
        prior_dist = Lognormal(math.log(self.prior.median_s), self.prior.sigma)
        mass = [prior_dist.cdf(b) - prior_dist.cdf(a) for a, b in zip(BIN_EDGES, BIN_EDGES[1:])]
        norm = sum(mass) or 1.0
        self._prior_mass = [m / norm * self.prior.weight for m in mass]

    def observe(self, tool: str | None, seconds: float, expected_s: float | None = None, count: int = 1) -> None:
        """A pause of ``tool`` lasted ``seconds`` (``count`` pauses of that length);
        ``expected_s``: what its hint said, if any."""
        if seconds < 0 or math.isnan(seconds):
            return
        if expected_s is not None and expected_s > 0 and math.isfinite(expected_s):
            ratio = min(seconds / expected_s, HINT_RATIO_LIMIT)
            self._hints.setdefault(tool, LognormalFit(floor_s=1 / HINT_RATIO_LIMIT)).add(ratio, count)
            self._pooled_hints.add(ratio, count)
        x = min(max(seconds, BIN_EDGES[0] * 1.0001), BIN_EDGES[-1] * 0.9999)
        i = bisect.bisect_right(BIN_EDGES, x) - 1
        self._fits.setdefault(tool, LognormalFit()).add(seconds, count)
        self._counts.setdefault(tool, [0.0] * (len(BIN_EDGES) - 1))[i] += count
        self._pooled.add(seconds, count)
        self._pooled_counts[i] += count
        self._cache.clear()  # every tool seen less than twice follows the pooled fit

    def samples(self, tool: str | None) -> int:
        fit = self._fits.get(tool)
        return fit.n if fit is not None else 0

    def hinted_samples(self, tool: str | None) -> int:
        """Pauses of ``tool`` seen with a hint's expected seconds."""
        fit = self._hints.get(tool)
        return fit.n if fit is not None else 0

    def distribution(self, tool: str | None, expected_s: float | None = None) -> Empirical | Lognormal:
        """The predicted pause of ``tool``; with a hint, a lognormal around ``expected_s``
        (times the tool's hints' learned bias, as spread as they proved)."""
        base = self._cache.get(tool)
        if base is None:
            counts = self._counts.get(tool)
            if counts is None or sum(counts) < 2:
                base = self.pooled()
            else:
                fit = self._fits[tool]
                base = self._build(counts, fit)
            self._cache[tool] = base
        if expected_s is not None and expected_s > 0:
            bias, sigma = self._hint_error(tool, base.sigma)
            return Lognormal(math.log(expected_s) + bias, sigma)
        return base

    def _hint_error(self, tool: str | None, spread: float) -> tuple[float, float]:
        """(mean, sigma) of log(actual / expected) for ``tool``'s hints.

        Two levels, each a normal-inverse-gamma update with ``prior.weight`` samples of
        prior: every tool's hints shrunk towards (0, ``spread``) — unbiased, as spread as
        the tool's own pauses — then the tool's own hints shrunk towards that. A tool with
        few hints follows the others' and moves smoothly to its own as they come.
        """
        pooled = _shrunk(self._pooled_hints, 0.0, spread**2, self.prior.weight)
        fit = self._hints.get(tool)
        mean, var = _shrunk(fit, *pooled, self.prior.weight) if fit is not None else pooled
        return mean, max(math.sqrt(var), MIN_SIGMA)

    def pooled(self) -> Empirical | Lognormal:
        base = self._cache.get(_POOLED)
        if base is None:
            base = self._cache[_POOLED] = self._build(self._pooled_counts, self._pooled)
        return base

    def _build(self, counts: list[float], fit: LognormalFit) -> Empirical | Lognormal:
        w = self.prior.weight
        n = fit.n
        mu = (n * fit.mu + w * math.log(self.prior.median_s)) / (n + w) if n else math.log(self.prior.median_s)
        var = (max(n - 1, 0) * fit.sigma**2 + w * self.prior.sigma**2) / (max(n - 1, 0) + w)
        if self.model == "lognormal":
            return Lognormal(mu, max(math.sqrt(var), MIN_SIGMA))
        mass = [c + p for c, p in zip(counts, self._prior_mass)]
        return Empirical(BIN_EDGES, mass, mu, max(math.sqrt(var), MIN_SIGMA))


_POOLED = "\0pooled"


def _shrunk(fit: LognormalFit, mean0: float, var0: float, weight: float) -> tuple[float, float]:
    """(mean, variance) of ``fit``'s log samples shrunk towards a prior of ``weight``
    samples with ``mean0`` and ``var0``; the variance also counts how far the data's mean
    lies from the prior's (so hints that are consistently off are not taken as sharp)."""
    n = fit.n
    if n == 0:
        return mean0, var0
    mean = (n * fit.mu + weight * mean0) / (n + weight)
    ss = max(n - 1, 0) * fit.sigma**2 + weight * var0 + n * weight / (n + weight) * (fit.mu - mean0) ** 2
    return mean, ss / (n + weight)


TURN_BUCKETS = (1, 2, 3, 5, 9, 17)  # bucket i holds turns in [TURN_BUCKETS[i], TURN_BUCKETS[i+1])
GROWTH_BUCKETS = (0, 3, 5, 10, 20, 40)  # blocks the latest turn added, likewise


def _bucket(edges: tuple[int, ...], n: int) -> int:
    for i in range(len(edges) - 1, -1, -1):
        if n >= edges[i]:
            return i
    return 0


def turn_bucket(turns: int) -> int:
    return _bucket(TURN_BUCKETS, turns)


class ContinuePredictor:
    """P(a session that has had ``turns`` turns, the latest adding ``blocks``, starts another).

    Per (turn bucket, growth bucket) cell, smoothed towards the pooled rate: in the Mooncake
    conversation trace sessions that have gone on for a while keep going, and a turn that
    added a little (a short exchange) is followed more often than one that added a long
    document. ``reached(session, turns, blocks, now)`` is called when a session starts its
    ``turns``-th turn; :meth:`resolve` settles turns older
    than the maturity age (a session that kept going has ``session.turns > turns`` by then).
    """

    def __init__(self, prior_p: float = 0.5, prior_weight: float = 2.0, cell_weight: float = 2.0) -> None:
        self.prior_p = prior_p
        self.prior_weight = prior_weight
        self.cell_weight = cell_weight
        self._pending: deque[tuple[float, object, int, int]] = deque()
        shape = (len(TURN_BUCKETS), len(GROWTH_BUCKETS))
        self._continued = [[0] * shape[1] for _ in range(shape[0])]
        self._stopped = [[0] * shape[1] for _ in range(shape[0])]
        self._estimates: list[list[float]] | None = None

    def reached(self, session: object, turns: int, blocks: int, now: float) -> None:
        self._pending.append((now, session, turns, blocks))

    def resolve(self, now: float, maturity_s: float) -> None:
        pending = self._pending
        changed = False
        while pending and now - pending[0][0] >= maturity_s:
            _, session, turns, blocks = pending.popleft()
            cell = self._continued if getattr(session, "turns", 0) > turns else self._stopped
            cell[turn_bucket(turns)][_bucket(GROWTH_BUCKETS, blocks)] += 1
            changed = True
        if changed:
            self._estimates = None

    def p(self, turns: int, blocks: int = 0) -> float:
        if self._estimates is None:
            c_all = sum(map(sum, self._continued))
            s_all = sum(map(sum, self._stopped))
            pooled = (c_all + self.prior_p * self.prior_weight) / (c_all + s_all + self.prior_weight)
            w = self.cell_weight
            self._estimates = [
                [(c + pooled * w) / (c + s + w) for c, s in zip(crow, srow)]
                for crow, srow in zip(self._continued, self._stopped)
            ]
        return self._estimates[turn_bucket(turns)][_bucket(GROWTH_BUCKETS, blocks)]

    def counts(self, turns: int, blocks: int = 0) -> tuple[int, int]:
        """(continued, stopped) resolved so far in the cell of ``turns`` and ``blocks``."""
        t, b = turn_bucket(turns), _bucket(GROWTH_BUCKETS, blocks)
        return self._continued[t][b], self._stopped[t][b]


class EndReports:
    """How sessions end: the share whose end is reported (an end event, against those that
    went quiet until they expired), and how long after its last sign of life a session's end
    is reported (the latest ``window`` reports, seconds).

    :meth:`continuing` turns P(another turn) into P(another turn | no end reported after
    ``e`` seconds of quiet)::

        p' = p / (p + (1 - p) (1 - R(e)))

    with R(e) the share of ending sessions whose end has been reported by ``e``. Where no end
    was ever reported R is 0 and p' = p: a namespace without end events keeps its guess.
    ``prior_weight`` counts as unreported ends, so R stays below 1 and p' below 1 for p < 1.
    """

    def __init__(self, window: int = 1024, prior_weight: float = 2.0) -> None:
        if window < 1:
            raise ValueError("the window of end reports holds at least one")
        self.window = window
        self.prior_weight = prior_weight
        self.reported = 0
        self.unreported = 0
        self._recent: deque[float] = deque()
        self._sorted: list[float] = []

    def observe(self, seconds: float, reported: bool) -> None:
        """A session ended ``seconds`` after its last sign of life, ``reported`` or not."""
        if not reported:
            self.unreported += 1
            return
        if seconds < 0 or math.isnan(seconds):
            return
        self.reported += 1
        self._recent.append(seconds)
        bisect.insort(self._sorted, seconds)
        if len(self._recent) > self.window:
            old = self._recent.popleft()
            del self._sorted[bisect.bisect_left(self._sorted, old)]

    def reported_by(self, seconds: float) -> float:
        """P(an ending session's end has been reported ``seconds`` after its last sign of life)."""
        if not self._sorted:
            return 0.0
        share = self.reported / (self.reported + self.unreported + self.prior_weight)
        return share * bisect.bisect_right(self._sorted, seconds) / len(self._sorted)

    def continuing(self, p_continue: float, quiet_s: float) -> float:
        """P(another turn | ``p_continue`` before, no end reported after ``quiet_s`` seconds)."""
        silent_end = (1.0 - p_continue) * (1.0 - self.reported_by(quiet_s))
        total = p_continue + silent_end
        return p_continue / total if total > 0 else 0.0


def reuse_probability(dist: Lognormal | Empirical, p_continue: float, elapsed_s: float, horizon_s: float) -> float:
    """P(the next use falls within ``horizon_s`` | none in the ``elapsed_s`` so far), when a
    next use comes with probability ``p_continue`` after a gap distributed as ``dist``."""
    f_now = dist.cdf(elapsed_s)
    f_then = dist.cdf(elapsed_s + horizon_s)
    alive = 1.0 - p_continue * f_now
    if alive <= 1e-12:
        return 0.0
    return p_continue * (f_then - f_now) / alive
