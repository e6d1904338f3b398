"""policies/predictor.py on known distributions.

Samples come from numpy lognormals with a fixed seed, so every run sees the same numbers;
each tolerance below is a few standard errors of the estimate at that sample size (worked
out next to it), so a correct fit passes with room and a wrong one (a mean of x instead of
log x, a biased variance, a shifted bin) fails.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from kvd.policies.predictor import (
    BIN_EDGES,
    MIN_SIGMA,
    ContinuePredictor,
    Empirical,
    EndReports,
    Lognormal,
    LognormalFit,
    PausePredictor,
    reuse_probability,
)

SQRT2 = math.sqrt(2.0)


def phi(z: float) -> float:
    """The standard normal cdf, precise in both tails."""
    return 0.5 * math.erfc(-z / SQRT2)


def pdf(z: float) -> float:
    return math.exp(-z * z / 2) / math.sqrt(2 * math.pi)


def z_of(q: float) -> float:
    """The standard normal quantile by bisection on phi (independent of the code under test)."""
    lo, hi = -40.0, 40.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if phi(mid) < q:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def samples(mu: float, sigma: float, n: int, seed: int) -> list[float]:
    return [float(x) for x in np.random.default_rng(seed).lognormal(mu, sigma, n)]


# -- LognormalFit ------------------------------------------------------------------------------


def test_lognormal_fit_recovers_mu_and_sigma():
    mu, sigma, n = 1.2, 0.7, 20_000
    xs = samples(mu, sigma, n, seed=7)
    fit = LognormalFit()
    for x in xs:
        fit.add(x)
    logs = np.log(xs)
    # Welford's running moments equal the two-pass ones.
    assert fit.n == n
    assert fit.mu == pytest.approx(logs.mean(), abs=1e-9)
    assert fit.sigma == pytest.approx(logs.std(ddof=1), abs=1e-9)
    # Against the truth: SE(mu) = sigma/sqrt(n) = 0.0049, SE(sigma) = sigma/sqrt(2n) = 0.0035;
    # 4 standard errors each.
    assert abs(fit.mu - mu) < 0.02
    assert abs(fit.sigma - sigma) < 0.014


def test_lognormal_fit_edge_cases():
    fit = LognormalFit()
    assert (fit.mu, fit.sigma) == (0.0, 0.0)
    fit.add(math.e)
    assert fit.mu == pytest.approx(1.0) and fit.sigma == 0.0  # one sample: no spread yet
    fit.add(0.0)  # clamped to floor_s = 0.01
    assert fit.mu == pytest.approx((1.0 + math.log(0.01)) / 2)


# -- PausePredictor on a known lognormal -------------------------------------------------------

MU, SIGMA, N = 1.2, 0.7, 5000
QS = (0.1, 0.25, 0.5, 0.75, 0.9)


def fitted(model: str) -> PausePredictor:
    pred = PausePredictor(model=model)
    for x in samples(MU, SIGMA, N, seed=11):
        pred.observe("run_tests", x)
    return pred


@pytest.mark.parametrize("model", ["lognormal", "empirical"])
def test_pause_distribution_matches_the_true_lognormal(model):
    pred = fitted(model)
    assert pred.samples("run_tests") == N
    dist = pred.distribution("run_tests")
    assert isinstance(dist, Lognormal if model == "lognormal" else Empirical)
    truth = Lognormal(MU, SIGMA)
    # mu, sigma: SE(mu) = 0.7/sqrt(5000) = 0.0099, SE(sigma) = 0.007; the prior (3 samples at
    # median 10 s, sigma 1) shifts mu by 3/5003 * (ln 10 - 1.2) = 0.0007. 4 SE:
    assert abs(dist.mu - MU) < 0.04
    assert abs(dist.sigma - SIGMA) < 0.03
    for q in QS:
        x = truth.quantile(q)
        if model == "lognormal":
            # F depends on mu through pdf(z)/sigma <= 0.57 per unit: 0.57 * 0.04 = 0.023, + sigma's part.
            tol = 0.025
        else:
            # Sampling: sqrt(q(1-q)/n) <= 0.0071 (4 SD = 0.028); linear-in-log interpolation within a
            # bin of width h = ln(10)/8: h^2/8 * max|f'| = 0.0104 * 0.494 = 0.005; prior mass 0.0006.
            tol = 0.035
        assert abs(dist.cdf(x) - q) < tol, (q, dist.cdf(x))
        # The quantile's error in log seconds is the cdf's error over the density there.
        density = pdf(z_of(q)) / SIGMA
        assert abs(math.log(dist.quantile(q) / x)) < tol / density, q
    # The median in particular (density 0.57 per log unit: 0.035 / 0.57 = 0.06).
    assert abs(math.log(dist.median) - MU) < 0.065


@pytest.mark.parametrize("model", ["lognormal", "empirical"])
def test_two_tools_are_told_apart_and_an_unseen_tool_gets_the_pooled_one(model):
    pred = PausePredictor(model=model)
    bash = samples(math.log(2.0), 0.5, 400, seed=1)
    tests = samples(math.log(60.0), 0.5, 400, seed=2)
    for a, b in zip(bash, tests):
        pred.observe("bash", a)
        pred.observe("run_tests", b)
    unseen = pred.distribution("grep")
    assert unseen is pred.pooled()
    d_bash, d_tests = pred.distribution("bash"), pred.distribution("run_tests")
    # SE(log median) = 0.5/sqrt(400) = 0.025; the prior pulls by 3/403 * |ln 10 - ln m| <= 0.014;
    # the empirical median adds interpolation: 0.12 is 4 SE + both.
    assert abs(math.log(d_bash.median / 2.0)) < 0.12
    assert abs(math.log(d_tests.median / 60.0)) < 0.12
    # 10 s is 3.2 sigma above bash's median and 3.6 below run_tests': a pause of 10 s is
    # almost surely over for bash and almost surely not for run_tests (the empirical model
    # carries the prior's 1.5/403 = 0.004 of mass on either side).
    assert d_bash.cdf(10.0) > 0.99 and d_tests.cdf(10.0) < 0.01
    # The pooled one is the even mixture: symmetric in log around sqrt(2 * 60) = 10.95 s.
    mid = math.sqrt(2.0 * 60.0)
    assert abs(unseen.cdf(mid) - 0.5) < 0.06  # SD of the split: sqrt(0.25/800) = 0.018
    assert unseen.cdf(4.0) < d_bash.cdf(4.0) and unseen.cdf(30.0) > d_tests.cdf(30.0)
    if model == "lognormal":
        # mu: the mixture's mean of logs; sigma^2 = 0.25 + (ln 30)^2/4 = 3.14 -> 1.77.
        assert abs(unseen.mu - math.log(mid)) < 0.1
        assert abs(unseen.sigma - math.sqrt(0.25 + math.log(30.0) ** 2 / 4)) < 0.1
    # A tool seen once is still unseen (fewer than 2 samples).
    pred.observe("once", 3.0)
    assert pred.distribution("once") is pred.pooled()


def test_an_unseen_tool_follows_the_pooled_distribution_as_it_learns():
    pred = PausePredictor(model="lognormal")
    assert pred.distribution("grep").median == pytest.approx(10.0)  # the prior, before any sample
    for _ in range(200):
        pred.observe("bash", 1.0)
    assert pred.pooled().median == pytest.approx(1.0, rel=0.05)  # (200*0 + 3*ln10)/203 -> 1.035
    assert pred.distribution("grep").median == pytest.approx(pred.pooled().median)  # got 10.0


def test_the_prior_before_any_sample():
    lognormal = PausePredictor(model="lognormal").distribution("bash")
    assert (lognormal.mu, lognormal.sigma) == (pytest.approx(math.log(10.0)), pytest.approx(1.0))
    empirical = PausePredictor(model="empirical").distribution("bash")
    # The prior discretized into bins: its median is 10 s up to the linear-in-log interpolation
    # (0.005 of cdf at density 0.4 per log unit: 0.013 in log seconds).
    assert abs(math.log(empirical.median / 10.0)) < 0.02


@pytest.mark.parametrize("model", ["lognormal", "empirical"])
def test_a_hints_expected_seconds_sets_the_median(model):
    pred = fitted(model)
    hinted = pred.distribution("run_tests", expected_s=30.0)
    assert isinstance(hinted, Lognormal)
    assert hinted.median == pytest.approx(30.0, rel=1e-12)
    assert hinted.sigma == pred.distribution("run_tests").sigma  # the tool's learned spread
    # An unseen tool with a hint: the prior's spread (1.0) around the hint.
    fresh = PausePredictor(model=model).distribution("make", expected_s=4.0)
    assert fresh.median == pytest.approx(4.0) and fresh.sigma == pytest.approx(1.0)
    assert fresh.cdf(4.0) == pytest.approx(0.5)
    # A zero or missing hint is ignored.
    assert pred.distribution("run_tests", expected_s=0.0) is pred.distribution("run_tests")


@pytest.mark.parametrize("model", ["lognormal", "empirical"])
def test_hints_that_come_true_sharpen_the_prediction(model):
    pred = fitted(model)
    rng = np.random.default_rng(5)
    for expected in rng.uniform(5, 60, 100):
        pred.observe("run_tests", float(expected), expected_s=float(expected))
    spread = pred.distribution("run_tests").sigma  # the tool's own pauses, hinted or not
    assert spread > 0.5
    hinted = pred.distribution("run_tests", expected_s=20.0)
    assert hinted.median == pytest.approx(20.0)  # no bias
    # Every tool's hints (all of run_tests here): variance 3 spread^2 / 103; the tool's own,
    # shrunk towards that: 3 (3 spread^2 / 103) / 103 -- down to the floor.
    assert hinted.sigma == pytest.approx(max(spread * 3 / 103, MIN_SIGMA))
    assert hinted.cdf(18.0) < 0.05 and hinted.cdf(22.0) > 0.95


def test_a_few_hints_move_the_prediction_by_their_weight():
    pred = PausePredictor()
    for _ in range(3):
        pred.observe("make", 20.0, expected_s=10.0)  # twice as long as said, three times
    spread = pred.distribution("make").sigma
    w, d = 3.0, math.log(2.0)  # the prior's weight in samples; the hints' log error
    pooled_mean = 3 * d / (3 + w)
    pooled_var = (w * spread**2 + 3 * w / (3 + w) * d**2) / (3 + w)
    mean = (3 * d + w * pooled_mean) / (3 + w)
    var = (w * pooled_var + 3 * w / (3 + w) * (d - pooled_mean) ** 2) / (3 + w)
    hinted = pred.distribution("make", expected_s=10.0)
    assert hinted.median == pytest.approx(10.0 * math.exp(mean)) and 10.0 < hinted.median < 20.0
    assert hinted.sigma == pytest.approx(math.sqrt(var))
    assert hinted.cdf(20.0) > 0.5  # what happened three times in a row stays likely


def test_hints_learn_their_bias_and_their_noise():
    pred = PausePredictor()
    rng = np.random.default_rng(9)
    for expected in rng.uniform(1, 100, 2000):  # bash runs twice as long as said, give or take
        pred.observe("bash", float(expected * 2.0 * math.exp(rng.normal(0.0, 0.5))), expected_s=float(expected))
    hinted = pred.distribution("bash", expected_s=10.0)
    assert hinted.median == pytest.approx(20.0, rel=0.05)
    assert hinted.sigma == pytest.approx(0.5, rel=0.05)
    # A tool with one hint of its own leans on every tool's: 3 parts in 4 (the prior's
    # weight against one sample), and moves smoothly towards its own as more come.
    pred.observe("grep", 3.0, expected_s=3.0)
    one = pred.distribution("grep", expected_s=10.0).median
    assert one == pytest.approx(10.0 * (hinted.median / 10.0) ** 0.75, rel=0.01)
    pred.observe("grep", 3.0, expected_s=3.0)
    two = pred.distribution("grep", expected_s=10.0).median
    assert 10.0 < two < one < hinted.median


def test_informative_and_useless_hints():
    pred = PausePredictor()
    rng = np.random.default_rng(4)
    for x in samples(MU, SIGMA, N, seed=3):  # the tool's own spread is SIGMA (0.7)
        pred.observe("web", x, expected_s=float(x * math.exp(rng.normal(0.0, 0.3))))
        pred.observe("ls", x, expected_s=30.0)  # a hint that says nothing
    web = pred.distribution("web", expected_s=5.0)
    assert web.median == pytest.approx(5.0, rel=0.02) and web.sigma == pytest.approx(0.3, rel=0.05)
    ls = pred.distribution("ls", expected_s=30.0)
    assert ls.median == pytest.approx(math.exp(MU), rel=0.05) and ls.sigma == pytest.approx(SIGMA, rel=0.05)


def test_absurd_hints_stay_finite():
    pred = PausePredictor()
    pred.observe("pytest", 2.0, expected_s=5e-324)  # a valid, absurd hint: the ratio is clamped
    pred.observe("pytest", 2.0, expected_s=math.inf)  # ignored, as are NaN and 0
    pred.observe("pytest", 2.0, expected_s=math.nan)
    pred.observe("pytest", 2.0, expected_s=0.0)
    assert pred.hinted_samples("pytest") == 1
    dist = pred.distribution("pytest", expected_s=10.0)
    assert math.isfinite(dist.mu) and math.isfinite(dist.sigma) and 0 < dist.cdf(10.0) < 1


def test_observe_ignores_negative_and_nan_seconds():
    pred = PausePredictor()
    pred.observe("bash", -1.0)
    pred.observe("bash", float("nan"))
    assert pred.samples("bash") == 0
    with pytest.raises(ValueError, match="unknown pause model"):
        PausePredictor(model="gamma")


# -- Empirical and Lognormal exactly -----------------------------------------------------------


def test_empirical_cdf_and_quantile_by_hand():
    # Bins [1,2), [2,4), [4,8) holding 1, 2, 1 of 4: cdf(2) = 1/4, cdf(4) = 3/4; linear in
    # log(x) within a bin: cdf(sqrt 2) = 1/8, cdf(2 sqrt 2) = (1 + 2/2)/4 = 1/2.
    e = Empirical([1.0, 2.0, 4.0, 8.0], [1, 2, 1], mu=0.0, sigma=1.0)
    assert e.cdf(0.5) == 0.0 and e.cdf(1.0) == 0.0 and e.cdf(8.0) == 1.0 and e.cdf(100.0) == 1.0
    assert e.cdf(2.0) == pytest.approx(0.25) and e.cdf(4.0) == pytest.approx(0.75)
    assert e.cdf(math.sqrt(2)) == pytest.approx(0.125)
    assert e.quantile(0.125) == pytest.approx(math.sqrt(2))
    assert e.quantile(0.5) == pytest.approx(2 * math.sqrt(2)) and e.median == pytest.approx(2 * math.sqrt(2))
    assert e.quantile(0.75) == pytest.approx(4.0)
    for q in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError):
            e.quantile(q)


def test_empirical_quantile_inverts_cdf_even_across_empty_bins():
    e = Empirical(BIN_EDGES, [0.0] * 10 + [3.0, 0.0, 0.0, 5.0, 1.0] + [0.0] * 25, mu=0.0, sigma=1.0)
    for q in np.linspace(0.001, 0.999, 101):
        assert e.cdf(e.quantile(float(q))) == pytest.approx(float(q), abs=1e-12)
    # All of the mass at 3/9 sits in bin 10: the 1/3 quantile is that bin's upper edge.
    assert e.quantile(3 / 9) == pytest.approx(BIN_EDGES[11])


def test_lognormal_quantile_matches_known_values():
    d = Lognormal(1.0, 0.5)
    assert d.quantile(0.5) == pytest.approx(math.e, rel=1e-12)
    assert d.median == pytest.approx(math.e, rel=1e-15)
    assert d.mean == pytest.approx(math.exp(1.0 + 0.125))
    # The 0.8413 quantile is exp(mu + sigma); likewise at -2, +3 sigma and far in both tails
    # (the approximation's second branch: |z| > 2.93), to 1e-9 in log seconds. (Beyond |z| = 5
    # q itself, a double near 0 or 1 that erfinv sees as 2q - 1, carries more error than that.)
    for z in (1.0, -2.0, 3.0, -4.5, 4.5, 0.1):
        got = math.log(d.quantile(phi(z)))
        assert got == pytest.approx(1.0 + 0.5 * z, abs=1e-9), z
    assert d.quantile(0.8413447460685429) == pytest.approx(math.exp(1.5), rel=1e-12)
    for q in (0.001, 0.2, 0.77, 0.999):
        assert d.cdf(d.quantile(q)) == pytest.approx(q, abs=1e-12)
    assert d.cdf(0.0) == 0.0 and d.cdf(-1.0) == 0.0
    with pytest.raises(ValueError):
        d.quantile(1.0)


# -- ContinuePredictor -------------------------------------------------------------------------


def test_continue_predictor_resolves_turns_only_after_the_maturity_age():
    cp = ContinuePredictor()
    kept, left = SimpleNamespace(turns=1), SimpleNamespace(turns=1)
    cp.reached(kept, 1, 0, now=0.0)
    cp.reached(left, 1, 0, now=2.0)
    kept.turns = 2  # kept started a second turn at some point
    cp.resolve(now=9.99, maturity_s=10.0)
    assert cp.counts(1) == (0, 0) and cp.p(1) == 0.5  # nothing mature: the prior
    cp.resolve(now=10.0, maturity_s=10.0)
    assert cp.counts(1) == (1, 0)  # kept's turn 1 is 10 s old: it continued
    cp.resolve(now=11.99, maturity_s=10.0)
    assert cp.counts(1) == (1, 0)
    cp.resolve(now=12.0, maturity_s=10.0)
    assert cp.counts(1) == (1, 1)  # left's turn 1: no second turn -> stopped
    # pooled = (1 + 0.5*2)/(2 + 2) = 0.5; cell = (1 + 0.5*2)/(2 + 2) = 0.5
    assert cp.p(1) == pytest.approx(0.5)


def test_continue_predictor_estimates_known_rates_per_cell():
    rng = np.random.default_rng(3)
    cp = ContinuePredictor()
    n = 1000
    for i in range(n):
        # Cell A: first turns that added 2 blocks, continuing with p = 0.8.
        a = SimpleNamespace(turns=1)
        cp.reached(a, 1, 2, now=float(i))
        if rng.random() < 0.8:
            a.turns = 2
        # Cell B: fifth turns that added 25 blocks, continuing with p = 0.2.
        b = SimpleNamespace(turns=5)
        cp.reached(b, 5, 25, now=float(i))
        if rng.random() < 0.2:
            b.turns = 6
    cp.resolve(now=n + 100.0, maturity_s=50.0)
    ca, sa = cp.counts(1, 2)
    cb, sb = cp.counts(5, 25)
    assert ca + sa == n and cb + sb == n
    # The estimate is the cell's rate shrunk 2 samples' worth towards the pooled rate, itself
    # shrunk 2 samples towards 0.5: exactly
    pooled = (ca + cb + 0.5 * 2) / (2 * n + 2)
    assert cp.p(1, 2) == pytest.approx((ca + pooled * 2) / (n + 2))
    assert cp.p(5, 25) == pytest.approx((cb + pooled * 2) / (n + 2))
    # ... and the truth within 4 SE (sqrt(0.16/1000) = 0.0126) plus the shrinkage (< 0.001).
    assert abs(cp.p(1, 2) - 0.8) < 0.052
    assert abs(cp.p(5, 25) - 0.2) < 0.052
    # Same buckets, same cell: turns 5..8 and 20..39 blocks; 1 turn and 0..2 blocks.
    assert cp.p(8, 39) == cp.p(5, 25) and cp.p(1, 0) == cp.p(1, 2)
    # An unseen cell gets the pooled rate (its own counts are zero).
    assert cp.p(3, 10) == pytest.approx(pooled)
    assert abs(pooled - 0.5) < 0.04


# -- reuse_probability -------------------------------------------------------------------------


def test_reuse_probability_by_hand():
    d = Lognormal(0.0, 1.0)  # median 1 s: F(1) = 0.5, F(e) = phi(1) = 0.8413
    # p = 1, nothing waited: P = F(H).
    assert reuse_probability(d, 1.0, 0.0, 1.0) == pytest.approx(0.5)
    assert reuse_probability(d, 1.0, 0.0, math.e) == pytest.approx(phi(1.0))
    # p = 0.5: half of it.
    assert reuse_probability(d, 0.5, 0.0, 1.0) == pytest.approx(0.25)
    # Waited 1 s, horizon to e s: p (F(e) - F(1)) / (1 - p F(1)).
    assert reuse_probability(d, 1.0, 1.0, math.e - 1.0) == pytest.approx((phi(1.0) - 0.5) / 0.5)
    assert reuse_probability(d, 0.5, 1.0, math.e - 1.0) == pytest.approx(0.5 * (phi(1.0) - 0.5) / 0.75)
    # Limits: an endless horizon after 1 s of waiting: p (1 - F) / (1 - p F).
    assert reuse_probability(d, 1.0, 1.0, 1e12) == pytest.approx(1.0)
    assert reuse_probability(d, 0.5, 1.0, 1e12) == pytest.approx(0.25 / 0.75)
    assert reuse_probability(d, 0.0, 0.0, 1e12) == 0.0  # never continues
    assert reuse_probability(d, 0.7, 0.3, 0.0) == 0.0  # no horizon
    # Waited past every pause (F(e) = 1) with p = 1: nothing is alive, 0 rather than 0/0.
    assert reuse_probability(d, 1.0, 1e12, 10.0) == 0.0
    # With an empirical distribution too: all the mass in [2, 4): P(within 3 s) = cdf(3).
    e = Empirical([1.0, 2.0, 4.0], [0.0, 1.0], mu=1.0, sigma=0.3)
    assert reuse_probability(e, 1.0, 0.0, 3.0) == pytest.approx(math.log(1.5) / math.log(2.0))
    assert reuse_probability(e, 1.0, 0.0, 1.5) == 0.0


def test_end_reports_without_any_report_leave_the_guess_alone():
    ends = EndReports()
    assert ends.reported_by(1e9) == 0.0
    assert ends.continuing(0.3, 1e9) == pytest.approx(0.3)
    for _ in range(5):
        ends.observe(40.0, reported=False)  # sessions that only went quiet
    assert ends.continuing(0.3, 1e9) == pytest.approx(0.3)


def test_end_reports_by_hand():
    ends = EndReports(prior_weight=2.0)
    for seconds in (10.0, 20.0, 30.0, 40.0):
        ends.observe(seconds, reported=True)
    ends.observe(5.0, reported=False)
    ends.observe(-1.0, reported=True)  # no such delay: ignored
    ends.observe(math.nan, reported=True)
    # 4 of 4 + 1 + 2 ends reported; by 25 s, 2 of the 4 delays.
    assert ends.reported_by(25.0) == pytest.approx(4 / 7 * 2 / 4)
    assert ends.reported_by(9.9) == 0.0
    assert ends.reported_by(40.0) == pytest.approx(4 / 7)
    # p' = p / (p + (1 - p)(1 - R)): past every delay, p = 0.5 -> 0.5 / (0.5 + 0.5 * 3/7).
    assert ends.continuing(0.5, 100.0) == pytest.approx(0.5 / (0.5 + 0.5 * 3 / 7))
    assert ends.continuing(0.5, 0.0) == pytest.approx(0.5)  # nothing is reported at once
    assert ends.continuing(1.0, 100.0) == 1.0 and ends.continuing(0.0, 100.0) == 0.0


def test_end_reports_keep_the_latest_window():
    ends = EndReports(window=2, prior_weight=0.0)
    for seconds in (100.0, 1.0, 2.0):
        ends.observe(seconds, reported=True)
    assert ends.reported_by(2.0) == 1.0  # 100 s fell out of the window
    with pytest.raises(ValueError):
        EndReports(window=0)


def test_a_fit_of_repeated_values_merged_at_once_equals_one_by_one():
    from kvd.policies.predictor import LognormalFit

    one, merged = LognormalFit(), LognormalFit()
    for x, count in ((3.0, 1), (0.5, 4), (12.0, 7), (0.001, 2)):
        for _ in range(count):
            one.add(x)
        merged.add(x, count)
    assert merged.n == one.n == 14
    assert merged.mu == pytest.approx(one.mu, rel=1e-12) and merged.sigma == pytest.approx(one.sigma, rel=1e-12)
