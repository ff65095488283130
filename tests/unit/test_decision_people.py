"""`decide` counts people: per-user means, the users split, failovers and a dead candidate."""

from __future__ import annotations

import copy
import json
import random

from abfleet.decision import PROMOTE, ROLLBACK, DecisionPolicy, decide
from tests.unit.test_decision import EQUAL_HIST, PROD_HIST, make


def people_of(per_user: dict[str, list[float]], ape: dict[str, list[float]] | None = None) -> dict:
    """The `people` block of users → their ratings (and actual-price APEs)."""
    def block(values: dict[str, list[float]]) -> dict:
        means = [sum(v) / len(v) for v in values.values() if v]
        return {"users": len(means), "count": sum(len(v) for v in values.values()),
                "sum": sum(means), "sum_sq": sum(m * m for m in means)}

    return {"users": len(per_user), "ratings": block(per_user), "ape": block(ape or {})}


def organic(users: int, seed: int, prefix: str) -> dict[str, list[float]]:
    """Each user rates one estimate; the same star mix on both arms (PROD_HIST's)."""
    rng = random.Random(seed)
    stars = [s + 1 for s, c in enumerate(PROD_HIST) for _ in range(c)]
    return {f"{prefix}{i}": [float(rng.choice(stars))] for i in range(users)}


def flooded_stats() -> tuple[dict, dict]:
    """300 organic users split 80/20, plus 5 candidate users rating 80 estimates one star:
    (stats with `people`, the same stats as raw histograms only)."""
    prod, cand = organic(240, 1, "p"), organic(60, 2, "c")
    cand.update({f"flood{i}": [1.0] * 80 for i in range(5)})
    stats = make(EQUAL_HIST, window=48.0, prod_req=240, cand_req=460)
    raw = copy.deepcopy(stats)
    for arm, users in (("production", prod), ("candidate", cand)):
        hist = {str(s): sum(1 for v in users.values() for x in v if x == s) for s in range(1, 6)}
        raw["variants"][arm]["ratings"] = stats["variants"][arm]["ratings"] = hist
        stats["variants"][arm]["people"] = people_of(users)
    return stats, raw


def test_five_flooders_weigh_as_five_users_and_do_not_roll_back() -> None:
    stats, raw = flooded_stats()
    counted = decide(stats)
    assert counted["decision"] != ROLLBACK, counted["reasons"]
    assert counted["checks"]["ratings"]["status"] != "worse"
    people = counted["checks"]["people"]["candidate"]
    assert people["rating_users"] == 65 and people["ratings"] == 460, people
    assert counted["checks"]["srm"]["unit"] == "users" and counted["checks"]["srm"]["status"] == "pass"
    # The contrast: the same ratings counted as events roll the candidate back.
    assert decide(raw, DecisionPolicy(srm_p_value=1e-300))["decision"] == ROLLBACK
    json.dumps(counted, allow_nan=False)


def test_a_better_candidate_by_its_users_is_promoted() -> None:
    stats = make(EQUAL_HIST, window=48.0)
    rng = random.Random(3)
    prod = {f"p{i}": [float(rng.choice([2, 3, 3, 4]))] for i in range(1200)}
    cand = {f"c{i}": [float(rng.choice([4, 4, 5, 5]))] for i in range(300)}
    stats["variants"]["production"]["people"] = people_of(prod)
    stats["variants"]["candidate"]["people"] = people_of(cand)
    out = decide(stats)
    assert out["decision"] == PROMOTE, out["reasons"]
    assert out["checks"]["min_samples"]["unit"] == "users"


def test_unknown_people_never_decides_on_ratings() -> None:
    stats = make([30, 30, 20, 10, 5], window=48.0)  # the histograms alone would roll back
    stats["variants"]["production"]["people"] = None
    stats["variants"]["candidate"]["people"] = None
    out = decide(stats)
    assert out["decision"] == "continue" and "missing_data" in out["flags"], out["reasons"]


def test_failovers_count_against_the_arm_the_router_meant() -> None:
    # 300 of the candidate's 400 requests were served by production: a failing candidate.
    stats = make(EQUAL_HIST, prod_req=1900, cand_req=100)
    stats["variants"]["candidate"]["failovers"] = 300
    out = decide(stats)
    assert out["checks"]["min_samples"]["requests"] == {"production": 1600, "candidate": 400}
    assert out["checks"]["error_rate"]["status"] == "fail"
    assert out["decision"] == ROLLBACK, out["reasons"]


def test_an_unreachable_candidate_is_rolled_back_before_anything_else() -> None:
    stats = make(EQUAL_HIST, prod_req=10, cand_req=0)  # too few requests for any other rule
    stats["variants"]["candidate"]["unreachable_minutes"] = 12.5
    out = decide(stats)
    assert out["decision"] == ROLLBACK and "unreachable" in out["reasons"][0], out["reasons"]
    stats["variants"]["candidate"]["unreachable_minutes"] = 2.0
    assert decide(stats)["decision"] == "continue"
    assert decide(stats, DecisionPolicy(max_unreachable_minutes=1.0))["decision"] == ROLLBACK
