"""Tests for abfleet.drift against real Evidently (no mocks)."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from abfleet import data as D
from abfleet import drift

CONTRACT_KEYS = {"drift_detected", "share_drifted", "drifted_columns", "columns", "reference_rows", "current_rows",
                 "verdict", "feature_drift", "prediction_drift", "target_drift"}


@pytest.fixture(scope="module")
def reference() -> pd.DataFrame:
    return D.clean(D.synth(6000, seed=1)).frame


@pytest.fixture(scope="module")
def same() -> pd.DataFrame:
    """Same distribution as `reference`, drawn with another seed and cleaned independently."""
    return D.clean(D.synth(6000, seed=2)).frame


@pytest.fixture(scope="module")
def shifted(same: pd.DataFrame) -> pd.DataFrame:
    """Bigger homes (area and price x1.5, same price per sqft) in only five locations."""
    five = same["location"].value_counts().index[1:6]  # the five busiest named locations
    rows = same[same["location"].isin(five)].sample(2000, replace=True, random_state=0)
    return rows.assign(total_sqft=rows["total_sqft"] * 1.5, price=rows["price"] * 1.5)


@pytest.fixture(scope="module")
def drifted(reference: pd.DataFrame, shifted: pd.DataFrame) -> drift.DriftResult:
    return drift.check(reference, shifted)


def test_same_distribution_is_not_drift(reference: pd.DataFrame, same: pd.DataFrame) -> None:
    summary = drift.check(reference, same).summary
    assert summary["drift_detected"] is False, summary
    assert summary["drifted_columns"] == []
    assert list(summary["columns"]) == ["location", "total_sqft", "bhk", "bath", "price"]
    assert summary["reference_rows"] == len(reference) and summary["current_rows"] == len(same)
    assert set(summary) == CONTRACT_KEYS  # "reason" only when drift_detected is None


def test_bigger_homes_in_few_locations_is_drift(drifted: drift.DriftResult) -> None:
    s = drifted.summary
    assert s["drift_detected"] is True, s
    assert {"total_sqft", "location"} <= set(s["drifted_columns"])
    assert s["share_drifted"] == pytest.approx(len(s["drifted_columns"]) / len(s["columns"]))
    assert s["drifted_columns"] == [name for name, col in s["columns"].items() if col["drifted"]]
    # Reference > 1000 rows: Evidently's defaults are distances with threshold 0.1.
    assert s["columns"]["location"]["test"] == "Jensen-Shannon distance"
    assert s["columns"]["total_sqft"]["test"] == "Wasserstein distance (normed)"
    assert s["columns"]["total_sqft"]["score"] > 0.5


def test_html_is_evidentlys_and_names_drifted_columns(drifted: drift.DriftResult, tmp_path: Path) -> None:
    assert drifted.html is not None
    path = tmp_path / "report.html"
    path.write_text(drifted.html, encoding="utf-8")
    html = path.read_text(encoding="utf-8")
    assert "window.drawDashboard(" in html  # Evidently's dashboard bootstrap
    assert '<meta name="generator" content="Evidently 0.7' in html  # added by drift: Evidently names itself nowhere
    for name in drifted.summary["drifted_columns"]:
        assert name in html


def test_summary_is_plain_json(drifted: drift.DriftResult) -> None:
    text = json.dumps(drifted.summary, allow_nan=False)
    assert json.loads(text) == drifted.summary
    for col in drifted.summary["columns"].values():
        assert type(col["score"]) is float and type(col["drifted"]) is bool and type(col["test"]) is str
    assert type(drifted.summary["share_drifted"]) is float and type(drifted.summary["drift_detected"]) is bool


def test_too_little_current_data(reference: pd.DataFrame, same: pd.DataFrame) -> None:
    result = drift.check(reference, same.head(12))
    s = result.summary
    assert s["drift_detected"] is None and s["share_drifted"] is None and result.html is None
    assert s["reason"] == "insufficient data: 12 current rows, need 100"
    assert s["columns"] == {} and s["drifted_columns"] == [] and s["current_rows"] == 12
    json.dumps(s, allow_nan=False)


def test_missing_feature_column_is_an_error(reference: pd.DataFrame, same: pd.DataFrame) -> None:
    with pytest.raises(ValueError, match="bath"):
        drift.check(reference, same.drop(columns=["bath"]))


def test_estimated_price_compared_only_when_in_both(reference: pd.DataFrame, same: pd.DataFrame) -> None:
    cur = same.assign(estimated_price=same["price"])
    assert "estimated_price" not in drift.check(reference, cur).summary["columns"]  # skipped on reference
    s = drift.check(reference.assign(estimated_price=reference["price"]), cur).summary
    assert s["columns"]["estimated_price"]["drifted"] is False


def test_report_key() -> None:
    ist = timezone(timedelta(hours=5, minutes=30))
    assert drift.report_key(datetime(2026, 11, 25, 15, 45, 0, tzinfo=ist)) == \
        "drift/2026/11/25/drift-20261125T101500Z.html"
    assert drift.report_key(datetime(2026, 1, 2, 3, 4, 5)) == "drift/2026/01/02/drift-20260102T030405Z.html"


def test_arms_same_distribution(reference: pd.DataFrame, same: pd.DataFrame) -> None:
    s = drift.arms_same_distribution(reference, same)
    assert s["drift_detected"] is False, s
    assert list(s["columns"]) == drift.DRIFT_COLUMNS  # features only, even though price is present


def test_arm_that_only_gets_large_flats_drifts(reference: pd.DataFrame, same: pd.DataFrame) -> None:
    large = same[same["total_sqft"] >= same["total_sqft"].quantile(0.75)]
    s = drift.arms_same_distribution(reference, large)
    assert s["drift_detected"] is True, s
    assert "total_sqft" in s["drifted_columns"]


def test_from_raw_files(tmp_path: Path) -> None:
    ref_csv = D.write_raw(D.synth(4000, seed=3), tmp_path / "ref.csv")
    cur_csv = D.write_raw(D.synth(600, seed=4), tmp_path / "cur.csv")
    s = drift.from_raw_files(ref_csv, cur_csv, drift.DriftPolicy()).summary
    assert s["drift_detected"] is False, s
    assert "price" in s["columns"] and s["current_rows"] < 600  # cleaned rows
    # A 600-row window has few rows per location; cleaning it alone would call most of them "other".
    assert s["columns"]["location"]["drifted"] is False, s


@pytest.mark.skipif(not D.real_dataset_available(), reason=f"real Kaggle CSV not found at {D.REAL_DATASET}")
def test_real_data_random_halves_do_not_drift() -> None:
    frame = D.clean(D.read_raw(D.REAL_DATASET)).frame
    first, second = D.train_test_split_frame(frame, test_size=0.5, seed=7)
    s = drift.check(first, second).summary
    assert s["drift_detected"] is False, s
    assert s["drifted_columns"] == [], s


# ---- the dataset verdict --------------------------------------------------------------

@pytest.fixture(scope="module")
def trained_on() -> pd.DataFrame:
    """Rows like the demo's training data (10,000 synthetic rows, cleaned)."""
    return D.clean(D.synth(10_000, seed=1)).frame


def window(rows: int, seed: int) -> pd.DataFrame:
    """`rows` requests as users send them: an independent draw of the same distribution,
    locations as asked (not renamed by cleaning a small window on its own)."""
    raw = D.synth(int(rows * 1.3), seed=seed)
    current = D.clean(raw).frame
    current["location"] = raw.loc[current.index, "location"].str.strip().to_numpy()
    return current.sample(rows, random_state=seed)


def location_mix_and_area_shift(frame: pd.DataFrame, reference: pd.DataFrame) -> pd.DataFrame:
    """Only two inputs move: 35% of requests go to three mid-sized localities, and every
    flat is 30% larger. Bedrooms, bathrooms and prices stay as they were."""
    rng = np.random.default_rng(0)
    localities = list(reference["location"].value_counts().index[11:14])
    out = frame.copy()
    moved = rng.random(len(out)) < 0.35
    out.loc[moved, "location"] = rng.choice(localities, moved.sum())
    return out.assign(total_sqft=out["total_sqft"] * 1.3)


def test_same_distribution_gives_no_false_alarm_in_20_windows_of_1000_rows(trained_on: pd.DataFrame) -> None:
    verdicts = []
    for seed in range(100, 120):
        s = drift.check(trained_on, window(1000, seed)).summary
        verdicts.append((s["drift_detected"], s["drifted_columns"]))
    assert verdicts == [(False, [])] * 20, verdicts


def test_a_shift_of_location_mix_and_area_is_drift_under_the_default_verdict(trained_on: pd.DataFrame) -> None:
    reference = trained_on.assign(estimated_price=trained_on["price"])
    current = location_mix_and_area_shift(window(1000, 500), trained_on)
    current = current.assign(estimated_price=current["price"])
    s = drift.check(reference, current).summary
    assert s["verdict"] == "features" and s["drift_detected"] is True and s["feature_drift"] is True, s
    assert s["drifted_columns"] == ["location", "total_sqft"], s
    assert s["prediction_drift"] is False and s["target_drift"] is False
    # Evidently's own rule (half of all six columns) does not call two drifted inputs drift.
    share = drift.check(reference, current, drift.DriftPolicy(verdict="share")).summary
    assert share["drift_detected"] is False and share["drifted_columns"] == ["location", "total_sqft"], share
    assert share["share_drifted"] == pytest.approx(2 / 6)


def test_an_unknown_verdict_is_an_error(reference: pd.DataFrame, same: pd.DataFrame) -> None:
    with pytest.raises(ValueError, match="features, share"):
        drift.check(reference, same, drift.DriftPolicy(verdict="most"))


def test_drift_touches_the_experiment_only_when_both_arms_see_it(trained_on: pd.DataFrame) -> None:
    shifted = location_mix_and_area_shift(window(1000, 600), trained_on)
    both = drift.touches_experiment(trained_on, {"production": shifted, "candidate": shifted.sample(frac=0.5, random_state=1)})
    assert both["touched"] is True and both["arms"]["candidate"]["drifted_columns"] == ["location", "total_sqft"], both
    one = drift.touches_experiment(trained_on, {"production": shifted, "candidate": window(1000, 601)})
    assert one["touched"] is False and one["arms"]["candidate"]["drift_detected"] is False, one
    few = drift.touches_experiment(trained_on, {"production": shifted, "candidate": shifted.head(10)})
    assert few["touched"] is None and few["arms"]["candidate"]["rows"] == 10


def test_the_notification_carries_the_report_link_and_drifted_scores(drifted: drift.DriftResult) -> None:
    summary = {**drifted.summary, "report": "s3://bucket/abfleet/drift/x.html"}
    body = drift.notification(summary)
    assert body["event"] == "drift" and body["report"] == "s3://bucket/abfleet/drift/x.html"
    assert body["drifted_columns"] == summary["drifted_columns"] and "total_sqft" in body["scores"]
    assert body["scores"]["total_sqft"]["score"] == summary["columns"]["total_sqft"]["score"]
    assert set(body["scores"]) == set(summary["drifted_columns"])
    json.dumps(body, allow_nan=False)


def test_small_samples_are_judged_by_the_same_distances(reference: pd.DataFrame, same: pd.DataFrame) -> None:
    # Below 1000 reference rows Evidently would switch to p-value tests (5% false alarms each).
    s = drift.check(reference.sample(800, random_state=3), same.sample(800, random_state=4)).summary
    assert {c["test"] for c in s["columns"].values()} <= {"Jensen-Shannon distance", "Wasserstein distance (normed)"}
    assert s["columns"]["location"]["test"] == "Jensen-Shannon distance" and s["drift_detected"] is False, s
