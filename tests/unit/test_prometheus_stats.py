"""`prometheus.variant_stats` over canned query results: a number Prometheus lacks, or holds as
NaN or ±Inf, reaches the decision as None (missing), never as 0 and never as a crash."""

from __future__ import annotations

import pytest

from abfleet import metrics, prometheus
from abfleet.decision import decide


class Canned(prometheus.Prometheus):
    """A Prometheus whose instant queries answer from a table: metric name → result vector."""

    def __init__(self, answers: dict[str, list[dict]]):
        super().__init__("http://prometheus.invalid")
        self.answers = answers

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        if expr.startswith("sum(resets("):
            return []
        # The error query also names the request counter: it is matched first.
        for name in sorted(self.answers, key=lambda n: "status" not in n):
            if name in expr:
                return self.answers[name]
        return []


def one(value: str) -> list[dict]:
    return [{"metric": {}, "value": [0, value]}]


def stars(**values: str) -> list[dict]:
    return [{"metric": {"stars": s.removeprefix("s")}, "value": [0, v]} for s, v in values.items()]


def healthy(**changes: list[dict]) -> dict[str, list[dict]]:
    answers = {
        "histogram_quantile": one("0.012"), f"{metrics.LATENCY}_sum": one("0.006"),
        'status=~"5.."': one("0"), metrics.REQUESTS: one("400"),
        metrics.RATINGS: stars(s1="2", s2="4", s3="10", s4="30", s5="40"),
        metrics.QUICK_FEEDBACK: [{"metric": {"kind": "accurate"}, "value": [0, "3"]}],
        metrics.APE_COUNT: one("30"), metrics.APE_SUM_SQ: one("0.3"), metrics.APE_SUM: one("1.5"),
    }
    return {**changes, **{k: v for k, v in answers.items() if k not in changes}}


def stats_of(answers: dict[str, list[dict]]) -> dict:
    return prometheus.variant_stats(Canned(answers), "candidate", "2", since=0.0, window="3600s")


def test_complete_series_give_numbers():
    s = stats_of(healthy())
    assert s["ape"] == {"count": 30, "sum": 1.5, "sum_sq": 0.3}
    assert s["ratings"] == {"1": 2, "2": 4, "3": 10, "4": 30, "5": 40} and s["errors"] == 0


@pytest.mark.parametrize("value", ["+Inf", "-Inf", "NaN"])
@pytest.mark.parametrize("name", [metrics.APE_SUM, metrics.APE_SUM_SQ, metrics.APE_COUNT])
def test_a_non_finite_ape_number_is_missing_not_zero(name, value):
    s = stats_of(healthy(**{name: one(value)}))
    key = {metrics.APE_SUM: "sum", metrics.APE_SUM_SQ: "sum_sq", metrics.APE_COUNT: "count"}[name]
    assert s["ape"][key] is None


@pytest.mark.parametrize("name", [metrics.APE_SUM, metrics.APE_COUNT, 'status=~"5.."'])
def test_an_absent_series_is_missing_not_zero(name):
    s = stats_of(healthy(**{name: []}))
    assert (s["errors"] if "status" in name else s["ape"]["count" if name == metrics.APE_COUNT else "sum"]) is None


@pytest.mark.parametrize("value", ["+Inf", "-Inf", "NaN"])
def test_a_non_finite_rating_count_makes_the_ratings_missing_instead_of_crashing(value):
    s = stats_of(healthy(**{metrics.RATINGS: stars(s1="2", s2=value, s3="10", s4="30", s5="40")}))
    assert s["ratings"] is None


def test_an_infinite_ape_sum_never_promotes():
    # The attack: one poisoned price made the candidate's APE sum +Inf; read as 0.0 it was a
    # perfect score. Equal ratings, so only the APE could have promoted.
    production = {**stats_of(healthy(**{metrics.RATINGS: stars(s1="10", s2="20", s3="40", s4="50", s5="30"),
                                        metrics.REQUESTS: one("1600"), metrics.APE_SUM: one("9.0"),
                                        metrics.APE_SUM_SQ: one("3.0")})), "model_version": "1"}
    candidate = stats_of(healthy(**{metrics.RATINGS: stars(s1="10", s2="20", s3="40", s4="50", s5="30"),
                                    metrics.APE_SUM: one("+Inf")}))
    stats = {"window_hours": 48.0, "weights": {"production": 0.8, "candidate": 0.2},
             "variants": {"production": production, "candidate": candidate}}
    r = decide(stats)
    assert r["decision"] == "continue" and r["checks"]["ape"]["status"] == "missing", r["reasons"]
    # The same stats with the old reading (missing sum as 0.0) promoted.
    poisoned = {**stats, "variants": {**stats["variants"], "candidate": {**candidate, "ape": {**candidate["ape"], "sum": 0.0, "sum_sq": 0.0}}}}
    assert decide(poisoned)["decision"] == "promote"
