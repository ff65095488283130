"""`abfleet simulate`'s scenario files: every shipped one validates, a bad one is refused with
a message naming the field (exit 2, one line), and the simulator's pure parts are right."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from abfleet import cli, sim_scenario, simulate
from abfleet.decision import DecisionPolicy

SCENARIOS = sorted((Path(__file__).parents[1] / "sim" / "scenarios").glob("*.json"))


def test_the_scenarios_of_issue_17_ship() -> None:
    names = {p.stem for p in SCENARIOS}
    for expected in ("textbook_equal", "textbook_better", "novelty_fades", "ceiling_equal", "heavy_raters_equal",
                     "ramp_worse", "srm_heavy_users", "cold_start_equal", "errors_within_tolerance", "errors_1_to_3",
                     "better_ratings_worse_ape", "segment_ape_x2", "simpson", "low_traffic", "high_traffic_small_gain"):
        assert expected in names


@pytest.mark.parametrize("path", SCENARIOS, ids=[p.stem for p in SCENARIOS])
def test_every_shipped_scenario_validates_and_states_its_bar(path: Path) -> None:
    sc = sim_scenario.load(path, DecisionPolicy())
    assert sc["name"] == path.stem and sc["description"]
    assert sc["expect"], f"{path.name} states no bar"
    simulate.Plan(sc)  # the shared tables build


BAD = [
    ({"hours": 0}, "hours: must be >= 1"),
    ({"hourz": 5}, "hourz: unknown field"),
    ({"traffic": {"requests_per_day": -1}}, "traffic.requests_per_day: must be > 0"),
    ({"traffic": {"requests_per_day": "lots"}}, "traffic.requests_per_day: expected a number"),
    ({"users": {"count": 2.5}}, "users.count: expected a whole number"),
    ({"users": {"rating_icc": 1.5}}, "users.rating_icc: must be <= 1"),
    ({"arms": {"candidate": {"stars": [1, 2]}}}, "arms.candidate.stars: expected five"),
    ({"arms": {"candidate": {"ape": {"median": 0}}}}, "arms.candidate.ape.median: must be > 0"),
    ({"arms": {"challenger": {}}}, "arms.challenger: unknown field"),
    ({"arms": {"production": {"latency": {"cold_start_requests": -1}}}},
     "arms.production.latency.cold_start_requests: must be >= 0"),
    ({"effects": [{"arm": "both"}]}, "effects[0].arm: expected one of production, candidate"),
    ({"effects": [{"from_hour": 30, "to_hour": 10}]}, "effects[0].to_hour: must be >= 30"),
    ({"segments": [{"share": 0.5}]}, "segments: the shares add up to 0.5, not 1"),
    ({"weights": [{"from_hour": 5, "candidate": 0.2}]}, "weights[0].from_hour: the first weight starts at hour 0"),
    ({"weights": [{"from_hour": 0, "candidate": 1.0}]}, "weights[0].candidate: must be < 1"),
    ({"flooders": [{"stars": 6}]}, "flooders[0].stars: expected 1..5"),
    ({"flooders": [{"ratings_each": [50, 10]}]}, "flooders[0].ratings_each.high: must be >= 50"),
    ({"policy": {"alpha": 2}}, "policy: alpha must be in (0, 1)"),
    ({"policy": {"alfa": 0.1}}, "policy.alfa: not a decision policy field"),
    ({"expect": {"promote_at_most": 3}}, "expect.promote_at_most: must be <= 1"),
    ({"expect": {"promote_below": 0.1}}, "expect.promote_below: unknown field"),
]


@pytest.mark.parametrize("raw,message", BAD, ids=[m.split(":")[0] for _, m in BAD])
def test_a_bad_field_is_named(raw: dict, message: str) -> None:
    with pytest.raises(ValueError) as info:
        sim_scenario.validate(raw, DecisionPolicy())
    assert message in str(info.value)


def test_the_command_exits_2_with_one_line_naming_the_file_and_field(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"feedback": {"rating_rate": 2}}))
    assert cli.main(["simulate", "--scenario", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "abfleet simulate: bad.json: feedback.rating_rate: must be <= 1, got 2"
    bad.write_text("{not json")
    assert cli.main(["simulate", "--scenario", str(bad)]) == 2
    assert "not JSON" in capsys.readouterr().err
    assert cli.main(["simulate", "--scenario", str(tmp_path / "none.json")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_defaults_fill_every_field() -> None:
    sc = sim_scenario.validate({}, DecisionPolicy())
    assert sc["hours"] == 168 and sc["traffic"]["requests_per_day"] == 2000
    assert sc["arms"]["candidate"]["latency"]["median_ms"] == 6.0
    assert sc["weights"] == [{"from_hour": 0, "candidate": 0.2}]


def test_histogram_quantile_as_prometheus_computes_it() -> None:
    bounds = (0.1, 0.2, 0.5)
    # 100 observations: 50 <= 0.1, 40 in (0.1, 0.2], 10 in (0.2, 0.5]; rank 95 is half-way in the third bucket.
    cum = np.array([50.0, 90.0, 100.0, 100.0])
    assert simulate.histogram_quantile(0.95, cum, bounds) == pytest.approx(0.35)
    assert simulate.histogram_quantile(0.5, cum, bounds) == pytest.approx(0.1)
    # The rank in +Inf: the highest finite bound. No observations: NaN.
    assert simulate.histogram_quantile(0.95, np.array([0.0, 0.0, 0.0, 10.0]), bounds) == pytest.approx(0.5)
    assert np.isnan(simulate.histogram_quantile(0.95, np.zeros(4), bounds))


def test_per_user_means_aggregate_as_the_store_does() -> None:
    rng = np.random.default_rng(3)
    n, H = 400, 6
    arm, hour, user = rng.integers(0, 2, n), rng.integers(0, H, n), rng.integers(0, 30, n)
    value = rng.integers(1, 6, n).astype(float)
    got = simulate._people_series(arm, hour, user, value, H)
    for a in (0, 1):
        for h in range(H):
            sel = (arm == a) & (hour <= h)
            means = [value[sel & (user == u)].mean() for u in np.unique(user[sel])]
            assert got[:, a, h] == pytest.approx([len(means), sel.sum(), sum(means), sum(m * m for m in means)])


def test_tilt_moves_the_mean_and_keeps_a_shape() -> None:
    probs = np.array(sim_scenario.DEFAULT_STARS)
    for shift in (-0.4, 0.0, 0.4):
        tilted = simulate.tilt(probs, np.array(shift))
        assert tilted.sum() == pytest.approx(1.0)
        assert tilted @ simulate.STARS == pytest.approx(probs @ simulate.STARS + shift, abs=1e-6)
