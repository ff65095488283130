"""Unit tests of abfleet.decision: one hand-made stats dict per rule."""

from __future__ import annotations

import copy
import json
import math
from typing import Any

import pytest

from abfleet.decision import DecisionPolicy, decide, msprt
from abfleet.settings import decision_policy

PROD_HIST = [10, 20, 40, 50, 30]  # mean 3.47 stars
EQUAL_HIST = [10, 20, 40, 50, 30]
BETTER_HIST = [2, 4, 10, 30, 40]  # mean 4.19
WORSE_HIST = [30, 30, 20, 10, 5]  # mean 2.26


def arm(hist: list[int], requests: int, errors: int = 2, p95: float = 14.0,
        ape: dict | None = None) -> dict[str, Any]:
    return {"model_version": "3", "requests": requests, "errors": errors,
            "latency_p95_ms": p95, "latency_mean_ms": 6.1,
            "ratings": {str(i + 1): c for i, c in enumerate(hist)},
            "quick": {"accurate": 12, "too_high": 5, "too_low": 4},
            "ape": ape if ape is not None else {"count": 0, "sum": 0.0, "sum_sq": 0.0}}


def make(cand_hist: list[int] = EQUAL_HIST, window: float = 30.0, *, prod_req: int = 1600,
         cand_req: int = 400, **cand_kw: Any) -> dict[str, Any]:
    return {"window_hours": window, "weights": {"production": 0.8, "candidate": 0.2},
            "variants": {"production": arm(PROD_HIST, prod_req),
                         "candidate": arm(cand_hist, cand_req, **cand_kw)}}


def ape(mean: float, sd: float, n: int) -> dict[str, float]:
    return {"count": n, "sum": mean * n, "sum_sq": (sd * sd + mean * mean) * n}


def assert_json(result: dict[str, Any]) -> None:
    json.dumps(result, allow_nan=False)


def test_clearly_better_after_min_runtime_promotes() -> None:
    r = decide(make(BETTER_HIST, 30.0))
    assert r["decision"] == "promote", r["reasons"]
    assert r["checks"]["ratings"]["status"] == "better"
    assert r["score"]["relative_change"] >= 0.05
    assert_json(r)


def test_clearly_better_before_min_runtime_waits() -> None:
    r = decide(make(BETTER_HIST, 12.0, prod_req=640, cand_req=160))
    assert r["decision"] == "continue"
    assert "waiting until 24 h" in r["reasons"][0] and "would promote" in r["reasons"][0]
    assert "would_promote" in r["flags"]
    assert r["checks"]["runtime"]["status"] == "waiting"


def test_runtime_is_a_policy_field() -> None:
    r = decide(make(BETTER_HIST, 12.0, prod_req=640, cand_req=160),
               DecisionPolicy(min_runtime_hours=6))
    assert r["decision"] == "promote"


def test_clearly_worse_rolls_back() -> None:
    r = decide(make(WORSE_HIST, 10.0))
    assert r["decision"] == "rollback"
    assert "significantly worse" in r["reasons"][0]
    assert r["checks"]["ratings"]["status"] == "worse"
    assert r["checks"]["ratings"]["ci_high"] < 0


def test_score_loss_rolls_back_without_significance() -> None:
    r = decide(make([4, 2, 0, 2, 2], 10.0))  # mean 2.6 on 10 ratings: noisy but 20 % worse
    assert r["checks"]["ratings"]["status"] == "inconclusive"
    assert r["decision"] == "rollback"
    assert r["checks"]["score"]["status"] == "loss" and "score" in r["reasons"][0]


def test_no_difference_after_max_runtime_rolls_back() -> None:
    r = decide(make(EQUAL_HIST, 170.0))
    assert r["decision"] == "rollback"
    assert "no significant difference after 168 h" in r["reasons"][0]


def test_no_difference_before_max_runtime_continues() -> None:
    r = decide(make(EQUAL_HIST, 100.0))
    assert r["decision"] == "continue"
    assert r["checks"]["ratings"]["status"] == "inconclusive"


def test_max_runtime_also_ends_a_starved_experiment() -> None:
    r = decide(make([1, 0, 1, 1, 0], 170.0))  # too few ratings even after a week
    assert r["decision"] == "rollback" and "168 h" in r["reasons"][0]


def test_too_few_requests_continues() -> None:
    r = decide(make(WORSE_HIST, 2.0, prod_req=160, cand_req=40))
    assert r["decision"] == "continue"
    assert "requests" in r["reasons"][0]
    assert r["checks"]["min_samples"]["status"] == "fail"


def test_too_few_ratings_continues() -> None:
    r = decide(make([0, 0, 1, 3, 5], 30.0))
    assert r["decision"] == "continue"
    assert "star ratings" in r["reasons"][0]


@pytest.mark.parametrize("path", [
    ("window_hours",), ("weights",), ("weights", "candidate"),
    ("variants", "candidate", "requests"), ("variants", "production", "requests"),
    ("variants", "candidate", "errors"), ("variants", "candidate", "latency_p95_ms"),
    ("variants", "production", "latency_p95_ms"), ("variants", "candidate", "ratings"),
    ("variants", "candidate", "ape"), ("variants", "candidate"),
])
@pytest.mark.parametrize("how", ["null", "absent"])
def test_missing_data_never_promotes(path: tuple[str, ...], how: str) -> None:
    stats = make(BETTER_HIST, 30.0)
    assert decide(stats)["decision"] == "promote"  # the same stats, complete, would promote
    broken = copy.deepcopy(stats)
    parent = broken
    for key in path[:-1]:
        parent = parent[key]
    if how == "null":
        parent[path[-1]] = None
    else:
        del parent[path[-1]]
    r = decide(broken)
    assert r["decision"] == "continue", r["reasons"]
    text = " ".join(r["reasons"])
    assert path[-1] in text or "weights" in text, text
    assert_json(r)


@pytest.mark.parametrize("stats", [None, {}, {"variants": None}, {"variants": {"x": 1}},
                                   {"window_hours": "soon", "variants": {"production": []}}])
def test_garbage_input_continues(stats: Any) -> None:
    r = decide(stats)
    assert r["decision"] == "continue"
    assert_json(r)


def test_srm_continues_and_flags() -> None:
    r = decide(make(BETTER_HIST, 30.0, prod_req=1900, cand_req=300))
    assert r["decision"] == "continue"
    assert "srm" in r["flags"]
    assert r["checks"]["srm"]["status"] == "fail" and r["checks"]["srm"]["p_value"] < 0.001
    assert "sample ratio mismatch" in r["reasons"][0]


def test_srm_passes_on_ordinary_noise() -> None:
    r = decide(make(EQUAL_HIST, 30.0, prod_req=1620, cand_req=380))
    assert r["checks"]["srm"]["status"] == "pass" and "srm" not in r["flags"]


def test_srm_does_not_block_a_guardrail_rollback() -> None:
    r = decide(make(EQUAL_HIST, 30.0, prod_req=1900, cand_req=300, p95=80.0))
    assert r["decision"] == "rollback"
    assert r["checks"]["srm"]["status"] == "fail"


def test_error_rate_guardrail_rolls_back() -> None:
    r = decide(make(BETTER_HIST, 30.0, errors=40))  # 10 % vs 0.125 %
    assert r["decision"] == "rollback"
    assert r["checks"]["error_rate"]["status"] == "fail"
    assert "error rate" in r["reasons"][0]


@pytest.mark.parametrize("errors", [1, 3, 8])
def test_error_rate_noise_does_not_roll_back(errors: int) -> None:
    r = decide(make(EQUAL_HIST, 30.0, errors=errors))  # <= 2 pp above production
    assert r["checks"]["error_rate"]["status"] == "pass"
    assert r["decision"] == "continue"


def test_few_rare_errors_are_not_significant() -> None:
    # 2 errors in 60 requests is 3.3 % (> limit) but two events prove nothing.
    r = decide(make(EQUAL_HIST, 30.0, prod_req=240, cand_req=60, errors=2))
    assert r["checks"]["error_rate"]["rate_candidate"] > r["checks"]["error_rate"]["limit"]
    assert r["checks"]["error_rate"]["status"] == "pass"


def test_latency_guardrail_rolls_back() -> None:
    r = decide(make(BETTER_HIST, 30.0, p95=60.0))
    assert r["decision"] == "rollback"
    assert r["checks"]["latency_p95"]["status"] == "fail"
    assert "p95" in r["reasons"][0]


@pytest.mark.parametrize("p95", [20.0, 30.0])  # +6 ms, and 2.1x but only +16 ms
def test_latency_within_tolerance_passes(p95: float) -> None:
    r = decide(make(EQUAL_HIST, 30.0, p95=p95))
    assert r["checks"]["latency_p95"]["status"] == "pass"


def test_guardrail_runs_before_rating_minimum() -> None:
    r = decide(make([0, 0, 0, 1, 1], 5.0, errors=80))
    assert r["decision"] == "rollback"


def test_ape_better_promotes() -> None:
    stats = make(EQUAL_HIST, 30.0, ape=ape(0.05, 0.05, 60))
    stats["variants"]["production"]["ape"] = ape(0.25, 0.15, 200)
    r = decide(stats)
    assert r["checks"]["ape"]["status"] == "better"
    assert r["checks"]["ratings"]["alpha"] == pytest.approx(0.025)  # alpha split
    assert r["score"]["uses_ape"] is True
    assert r["decision"] == "promote", r["reasons"]


def test_ape_worse_rolls_back_even_with_better_ratings() -> None:
    stats = make(BETTER_HIST, 30.0, ape=ape(0.40, 0.15, 60))
    stats["variants"]["production"]["ape"] = ape(0.10, 0.08, 200)
    r = decide(stats)
    assert r["checks"]["ape"]["status"] == "worse"
    assert r["decision"] == "rollback" and "ape" in r["reasons"][0]


def test_ape_below_min_count_is_unused() -> None:
    stats = make(BETTER_HIST, 30.0, ape=ape(0.40, 0.15, 5))
    r = decide(stats)
    assert r["checks"]["ape"]["status"] == "unused"
    assert r["checks"]["ratings"]["alpha"] == pytest.approx(0.05)
    assert r["decision"] == "promote"


def test_score_formula() -> None:
    r = decide(make(BETTER_HIST, 30.0))
    prod = r["score"]["production"]
    assert prod["accuracy"] == pytest.approx((520 / 150 - 1) / 4)
    assert prod["latency"] == pytest.approx(1 / (1 + 14.0 / 100))
    assert prod["score"] == pytest.approx(0.7 * prod["accuracy"] + 0.3 * prod["latency"])
    cand = r["score"]["candidate"]["score"]
    assert r["score"]["relative_change"] == pytest.approx((cand - prod["score"]) / prod["score"])


def test_non_finite_inputs_give_json_safe_output() -> None:
    stats = make(BETTER_HIST, 30.0, p95=float("nan"))
    stats["variants"]["production"]["requests"] = float("inf")
    stats["variants"]["production"]["latency_p95_ms"] = -3
    for s in (stats, make(BETTER_HIST, 30.0, p95=0.0), make([5, 0, 0, 0, 5], 30.0)):
        r = decide(s)
        assert r["decision"] != "promote" or s is not stats
        assert_json(r)


def test_constant_ratings_do_not_crash() -> None:
    stats = make([0, 0, 0, 100, 0], 30.0)
    stats["variants"]["production"]["ratings"] = {"4": 300}
    r = decide(stats)
    assert r["decision"] == "continue" and r["checks"]["ratings"]["status"] == "inconclusive"
    assert_json(r)


def test_msprt_significance_matches_confidence_sequence() -> None:
    for diff in (-0.5, -0.2, 0.0, 0.1, 0.3, 0.8):
        out = msprt(diff, 0.01, 1.4, 0.05, 0.25)
        excludes_zero = out["ci_low"] > 0 or out["ci_high"] < 0
        assert out["significant"] == excludes_zero
        assert math.isclose(out["log_threshold"], math.log(20))


def test_policy_from_env_overrides_with_types() -> None:
    pol = decision_policy({"ABFLEET_DECISION_MIN_REQUESTS": "75",
                           "ABFLEET_DECISION_ALPHA": "0.01",
                           "ABFLEET_DECISION_MAX_RUNTIME_HOURS": " 72 ",
                           "ABFLEET_DECISION_MIN_RATINGS": "", "UNRELATED": "x"})
    assert pol.min_requests == 75 and isinstance(pol.min_requests, int)
    assert pol.alpha == 0.01 and pol.max_runtime_hours == 72.0
    assert pol.min_ratings == DecisionPolicy().min_ratings
    assert decision_policy({}) == DecisionPolicy()


@pytest.mark.parametrize("env", [{"ABFLEET_DECISION_MIN_REQUESTS": "lots"},
                                 {"ABFLEET_DECISION_ALPHA": "1.5"},
                                 {"ABFLEET_DECISION_MIN_RUNTIME_HOURS": "200"}])
def test_policy_from_env_rejects_bad_values(env: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        decision_policy(env)


def test_defaults() -> None:
    p = DecisionPolicy()
    assert (p.min_requests, p.min_ratings, p.srm_p_value, p.alpha) == (50, 10, 0.001, 0.05)
    assert (p.min_runtime_hours, p.max_runtime_hours) == (24.0, 168.0)
    assert (p.promote_score_gain, p.rollback_score_loss) == (0.05, 0.20)
    assert (p.accuracy_weight, p.latency_weight, p.min_ape_count) == (0.7, 0.3, 20)


@pytest.mark.parametrize("arm_name", ["production", "candidate"])
@pytest.mark.parametrize("bad", [None, math.nan, math.inf, -math.inf, -1.0, "inf"])
@pytest.mark.parametrize("key", ["sum", "sum_sq", "count"])
def test_an_unknown_ape_number_is_no_ape_data_and_never_promotes(arm_name: str, bad: Any, key: str) -> None:
    # Equal ratings; the candidate's APE alone is clearly better, so complete stats promote.
    stats = make(EQUAL_HIST, 30.0, ape=ape(0.05, 0.03, 60))
    stats["variants"]["production"]["ape"] = ape(0.30, 0.10, 60)
    assert decide(stats)["decision"] == "promote"
    stats["variants"][arm_name]["ape"][key] = bad
    r = decide(stats)
    assert r["decision"] == "continue", r["reasons"]
    assert r["checks"]["ape"]["status"] == "missing" and f"{arm_name}.ape" in " ".join(r["reasons"])
    assert_json(r)
