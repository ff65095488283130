"""Monte-Carlo decision quality of `abfleet.decision.decide` under hourly looks.

Each run simulates a 7-day experiment (2,000 requests/day, 10 % of them rated,
80/20 split), calls the real `decide` after every hour on the cumulative stats and
stops at the first promote/rollback. Latency and error rates are equal in both arms,
so only the star ratings differ (by `candidate_delta` stars on average).
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import numpy as np
import pytest

from abfleet.decision import DecisionPolicy, decide

pytestmark = pytest.mark.sim

RUNS = 1000
SEED = 20240611
# A realistic, mildly left-skewed 1..5 star shape; exponential tilting moves its mean.
BASE_STAR_PROBS = np.array([0.10, 0.13, 0.24, 0.30, 0.23])
ERROR_RATE = 0.002
P95_MS, MEAN_MS = 14.0, 6.0


def star_probs(mean: float) -> np.ndarray:
    """P(1..5 stars) with the given mean: BASE_STAR_PROBS tilted by exp(theta * stars)."""
    stars = np.arange(1, 6)
    lo, hi = -30.0, 30.0
    for _ in range(100):  # bisection: the tilted mean is increasing in theta
        theta = (lo + hi) / 2
        w = BASE_STAR_PROBS * np.exp(theta * (stars - 3))
        probs = w / w.sum()
        if probs @ stars < mean:
            lo = theta
        else:
            hi = theta
    return probs


def _hourly_cumulative(rng: np.random.Generator, candidate_delta: float, days: int,
                       requests_per_day: float, rated_share: float, prod_mean: float,
                       weights: tuple[float, float]) -> dict[str, Any]:
    """Cumulative per-hour counters for both arms, as plain Python lists."""
    hours = int(days * 24)
    total = rng.poisson(requests_per_day / 24.0, hours)
    cand = rng.binomial(total, weights[1] / (weights[0] + weights[1]))
    req = np.stack([total - cand, cand], axis=1)
    errors = rng.binomial(req, ERROR_RATE)
    rated = rng.binomial(req, rated_share)
    hist = np.stack([rng.multinomial(rated[:, 0], star_probs(prod_mean)),
                     rng.multinomial(rated[:, 1], star_probs(prod_mean + candidate_delta))],
                    axis=1)
    return {"hours": hours, "requests": np.cumsum(req, axis=0).tolist(),
            "errors": np.cumsum(errors, axis=0).tolist(),
            "ratings": np.cumsum(hist, axis=0).tolist()}


def _stats(cum: dict[str, Any], h: int, weights: tuple[float, float]) -> dict[str, Any]:
    variants = {}
    for i, arm in enumerate(("production", "candidate")):
        variants[arm] = {
            "model_version": str(3 + i), "requests": cum["requests"][h][i],
            "errors": cum["errors"][h][i], "latency_p95_ms": P95_MS, "latency_mean_ms": MEAN_MS,
            "ratings": dict(zip("12345", cum["ratings"][h][i])),
            "quick": {"accurate": 0, "too_high": 0, "too_low": 0},
            "ape": {"count": 0, "sum": 0.0, "sum_sq": 0.0},
        }
    total = weights[0] + weights[1]
    return {"window_hours": float(h + 1),
            "weights": {"production": weights[0] / total, "candidate": weights[1] / total},
            "variants": variants}


def reference_rule(stats: dict[str, Any], policy: Any = None) -> dict[str, Any]:
    """The reference project's rule: promote on volume when feedback is scarce, else
    promote if the candidate's mean rating > 1.1 x production's; never rolls back early."""
    def mean_n(arm: str) -> tuple[float, int]:
        h = stats["variants"][arm]["ratings"]
        n = sum(h.values())
        return (sum(int(k) * v for k, v in h.items()) / n if n else 0.0), n
    (m_p, _), (m_c, n_c) = mean_n("production"), mean_n("candidate")
    if n_c < 10:
        volume = stats["variants"]["candidate"]["requests"] >= 100
        return {"decision": "promote" if volume else "continue"}
    if m_c > 1.1 * m_p:
        return {"decision": "promote"}
    return {"decision": "rollback" if stats["window_hours"] >= 168 else "continue"}


def simulate_experiment(rng: np.random.Generator, candidate_delta: float, *, days: int = 7,
                        requests_per_day: float = 2000, rated_share: float = 0.10,
                        prod_mean: float = 3.35, weights: tuple[float, float] = (0.8, 0.2),
                        policy: DecisionPolicy | None = None,
                        rule: Callable[..., dict[str, Any]] = decide) -> dict[str, Any]:
    """One experiment, `rule` (the real `decide` by default) called after every hour.

    Returns {"outcome": "promote"|"rollback"|"continue", "hour": int | None, "reasons": [...]},
    the outcome being the first non-continue decision (hour = hours elapsed at that look).
    """
    cum = _hourly_cumulative(rng, candidate_delta, days, requests_per_day, rated_share,
                             prod_mean, weights)
    for h in range(cum["hours"]):
        result = rule(_stats(cum, h, weights), policy)
        if result["decision"] != "continue":
            return {"outcome": result["decision"], "hour": h + 1,
                    "reasons": result.get("reasons", [])}
    return {"outcome": "continue", "hour": None, "reasons": []}


def _monte_carlo(delta: float, seed: int, rule: Callable[..., dict[str, Any]] = decide
                 ) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    runs = [simulate_experiment(rng, delta, rule=rule) for _ in range(RUNS)]
    promo_hours = [r["hour"] for r in runs if r["outcome"] == "promote"]
    return {"promote": len(promo_hours) / RUNS,
            "rollback": sum(r["outcome"] == "rollback" for r in runs) / RUNS,
            "early_rollback": sum(r["outcome"] == "rollback" and r["hour"] < 168
                                  for r in runs) / RUNS,
            "median_promotion_hour": statistics.median(promo_hours) if promo_hours else None}


CASES = {"equal": (0.0, "<=", 0.05), "worse_0.4": (-0.4, "<=", 0.01),
         "better_0.4": (0.4, ">=", 0.80)}


@pytest.mark.parametrize("case", list(CASES))
def test_promotion_rates(case: str, record_property: Any, capsys: Any) -> None:
    delta, op, bound = CASES[case]
    started = time.perf_counter()
    res = _monte_carlo(delta, SEED + int(delta * 10))
    elapsed = time.perf_counter() - started
    line = (f"[decision sim] {case:>10}: promoted {res['promote']:.1%}, rolled back "
            f"{res['rollback']:.1%} ({res['early_rollback']:.1%} before 168 h), "
            f"median promotion hour {res['median_promotion_hour']} "
            f"({RUNS} runs, {elapsed:.1f} s)")
    if case == "equal":  # context: the reference project's rule on the same simulated data
        ref = _monte_carlo(delta, SEED, rule=reference_rule)
        line += f"\n[decision sim] reference rule promotes an equal candidate {ref['promote']:.1%}"
        record_property("reference_equal_promotion_rate", ref["promote"])
    with capsys.disabled():  # visible without -s
        print("\n" + line)
    for key, value in res.items():
        record_property(f"{case}_{key}", value)
    if op == "<=":
        assert res["promote"] <= bound, line
    else:
        assert res["promote"] >= bound, line


def test_decide_is_fast(record_property: Any, capsys: Any) -> None:
    cum = _hourly_cumulative(np.random.default_rng(SEED), 0.0, 7, 2000, 0.1, 3.35, (0.8, 0.2))
    stats = [_stats(cum, h, (0.8, 0.2)) for h in range(cum["hours"])]
    started = time.perf_counter()
    for _ in range(10):
        for s in stats:
            decide(s)
    per_call_us = (time.perf_counter() - started) / (10 * len(stats)) * 1e6
    record_property("decide_us_per_call", per_call_us)
    with capsys.disabled():
        print(f"\n[decision sim] decide: {per_call_us:.1f} us per call")
    assert per_call_us < 500  # loose bound for slow CI runners; typically ~30 us
