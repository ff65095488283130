"""Tests for abfleet.data: parsing, cleaning accounting, synthesis realism, splitting, real-data facts."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from abfleet import data as D

NEEDS_REAL = pytest.mark.skipif(not D.real_dataset_available(),
                                reason=f"real Kaggle CSV not found at {D.REAL_DATASET}")


# ---------------------------------------------------------------- parsing

@pytest.mark.parametrize("text, expected", [
    ("2 BHK", 2), ("4 Bedroom", 4), ("1 RK", 1), (" 3 bhk ", 3), ("10 BHK", 10), ("43 Bedroom", 43),
    ("BHK", None), ("two BHK", None), ("", None), ("2 BHK flat", None), ("2", None),
    (None, None), (float("nan"), None), (3, None),
])
def test_parse_size(text: object, expected: int | None) -> None:
    assert D.parse_size(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("1056", 1056.0), (" 1200.5 ", 1200.5), (1056, 1056.0), (1056.5, 1056.5),
    ("2100 - 2850", 2475.0), ("1000-1200", 1100.0),
    ("34.46Sq. Meter", 34.46 * 10.7639), ("100 Sq. Meter", 1076.39),
    ("1100Sq. Yards", 9900.0), ("5.31Acres", 5.31 * 43560), ("4125Perch", 4125 * 272.25),
    ("3Cents", 3 * 435.6), ("24Guntha", 24 * 1089.0), ("1Grounds", 2400.0),
    ("abc", None), ("", None), ("12 furlongs", None), ("1-2-3", None), ("1200 - ", None),
    ("Sq. Meter", None), ("-5", None), ("0", None), (None, None), (float("nan"), None), (float("inf"), None),
])
def test_parse_sqft(text: object, expected: float | None) -> None:
    got = D.parse_sqft(text)
    if expected is None:
        assert got is None
    else:
        assert got == pytest.approx(expected, rel=1e-9)


# ---------------------------------------------------------------- read / write

def test_write_then_read_roundtrip_and_missing_columns(tmp_path: Path) -> None:
    raw = D.synth(50, seed=3)
    path = D.write_raw(raw, tmp_path / "sub" / "raw.csv")
    back = D.read_raw(path)
    assert list(back.columns) == D.RAW_COLUMNS
    for col in ["location", "size", "total_sqft", "availability"]:
        assert back[col].fillna("?").tolist() == raw[col].fillna("?").tolist()
    np.testing.assert_allclose(back["price"], raw["price"])
    raw.drop(columns=["price", "bath"]).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(ValueError, match="bath.*price"):
        D.read_raw(tmp_path / "bad.csv")


# ---------------------------------------------------------------- clean on a hand-written frame

def _row(location: object, size: object, sqft: object, bath: object, price: object) -> dict[str, object]:
    return {"area_type": "Super built-up  Area", "availability": "Ready To Move", "location": location,
            "size": size, "society": None, "total_sqft": sqft, "bath": bath, "balcony": np.nan, "price": price}


HAND_ROWS = [
    _row("Alpha", "2 BHK", "1000", 2, 50.0),            # 0 kept, pps 5000
    _row("Alpha", "2 BHK", "1000 - 1200", 2, 55.0),     # 1 kept, sqft 1100
    _row("Alpha ", "3 Bedroom", "1500", 3, 75.0),       # 2 kept, stripped to Alpha
    _row("Alpha", "2 BHK", "100Sq. Yards", 2, 45.0),    # 3 kept, sqft 900
    _row("Alpha", "1 RK", "400", 1, 20.0),              # 4 kept, bhk 1
    _row("Alpha", "2 BHK", "1000", 3, 60.0),            # 5 kept, pps 6000: within the 0.3 log floor
    _row("Alpha", "2 BHK", "1000", 2, 500.0),           # 6 price_per_sqft_outlier (10x)
    _row(" Beta", "2 BHK", "1200", 2, 96.0),            # 7 kept, Beta (3 valid rows >= min 3)
    _row("Beta", "3 BHK", "1500", 2, 120.0),            # 8 kept
    _row("Beta  ", "4 Bedroom", "2400", 4, 200.0),      # 9 kept
    _row("Gamma", "2 BHK", "1100", 2, 40.0),            # 10 kept as "other" (1 valid row)
    _row("Delta", "2 BHK", "1100", 2, 40.0),            # 11 kept as "other" (2 valid rows < 3)
    _row("Delta", "2 BHK", "1100", 2, 41.0),            # 12 kept as "other"
    _row("Gamma", None, "1100", 2, 40.0),               # 13 missing_size (does not count for Gamma)
    _row(None, "2 BHK", "1000", 2, 50.0),               # 14 missing_location
    _row("   ", "2 BHK", "1000", 2, 50.0),              # 15 missing_location (blank)
    _row("Alpha", "big house", "1000", 2, 50.0),        # 16 unparseable_size
    _row("Alpha", "2 BHK", None, 2, 50.0),              # 17 missing_sqft
    _row("Alpha", "2 BHK", "lots", 2, 50.0),            # 18 unparseable_sqft
    _row("Alpha", "2 BHK", "1000", None, 50.0),         # 19 missing_bath
    _row("Alpha", "2 BHK", "1000", 0, 50.0),            # 20 invalid_bath
    _row("Alpha", "2 BHK", "1000", 2, None),            # 21 missing_price
    _row("Alpha", "2 BHK", "1000", 2, 0.0),             # 22 invalid_price
    _row("Alpha", "25 BHK", "20000", 25, 900.0),        # 23 bhk_out_of_range
    _row("Alpha", "4 BHK", "40000", 4, 900.0),          # 24 sqft_out_of_range
    _row("Alpha", "3 BHK", "600", 3, 30.0),             # 25 sqft_per_bhk_too_small
    _row("Alpha", "2 BHK", "1200", 5, 60.0),            # 26 bath_over_bhk
]
HAND_RULES = D.CleaningRules(location_min_rows=3)


def test_clean_hand_frame_exact() -> None:
    raw = pd.DataFrame(HAND_ROWS, columns=D.RAW_COLUMNS)
    res = D.clean(raw, HAND_RULES)
    expected = pd.DataFrame({
        "location": ["Alpha"] * 6 + ["Beta"] * 3 + ["other"] * 3,
        "total_sqft": [1000.0, 1100.0, 1500.0, 900.0, 400.0, 1000.0, 1200.0, 1500.0, 2400.0, 1100.0, 1100.0, 1100.0],
        "bhk": [2, 2, 3, 2, 1, 2, 2, 3, 4, 2, 2, 2],
        "bath": [2, 2, 3, 2, 1, 3, 2, 2, 4, 2, 2, 2],
        "price": [50.0, 55.0, 75.0, 45.0, 20.0, 60.0, 96.0, 120.0, 200.0, 40.0, 40.0, 41.0],
    }, index=[0, 1, 2, 3, 4, 5, 7, 8, 9, 10, 11, 12])
    pd.testing.assert_frame_equal(res.frame, expected, check_index_type=False)
    assert list(res.frame.columns) == ["location", "total_sqft", "bhk", "bath", "price"]
    nonzero = {k: v for k, v in res.dropped.items() if v}
    assert nonzero == {
        "missing_location": 2, "missing_size": 1, "unparseable_size": 1, "missing_sqft": 1,
        "unparseable_sqft": 1, "missing_bath": 1, "invalid_bath": 1, "missing_price": 1, "invalid_price": 1,
        "bhk_out_of_range": 1, "sqft_out_of_range": 1, "sqft_per_bhk_too_small": 1, "bath_over_bhk": 1,
        "price_per_sqft_outlier": 1,
    }
    assert set(res.dropped) == set(D.DROP_REASONS)
    assert (res.rows_in, res.rows_out) == (27, 12)
    assert res.rows_in == res.rows_out + sum(res.dropped.values())
    assert res.locations == ["Alpha", "Beta", "other"]
    report = res.report()
    assert "27" in report and "12" in report and "price_per_sqft_outlier: 1" in report
    assert "bhk_price_inconsistent" not in report  # zero counts are not listed


def test_rare_locations_grouped_and_threshold_configurable() -> None:
    raw = pd.DataFrame(HAND_ROWS, columns=D.RAW_COLUMNS)
    strict = D.clean(raw, D.CleaningRules(location_min_rows=4))
    assert strict.locations == ["Alpha", "other"]
    assert (strict.frame["location"] == "other").sum() == 6
    loose = D.clean(raw, D.CleaningRules(location_min_rows=1))
    assert loose.locations == ["Alpha", "Beta", "Delta", "Gamma", "other"]
    assert not loose.frame["location"].str.contains(r"^\s|\s$").any()


def test_clean_rule_thresholds_and_missing_columns() -> None:
    raw = pd.DataFrame(HAND_ROWS, columns=D.RAW_COLUMNS)
    relaxed = D.clean(raw, D.CleaningRules(location_min_rows=3, max_bath_over_bhk=3, min_sqft_per_bhk=200,
                                           pps_outlier_k=100.0))
    assert relaxed.dropped["bath_over_bhk"] == 0
    assert relaxed.dropped["sqft_per_bhk_too_small"] == 0
    assert relaxed.dropped["price_per_sqft_outlier"] == 0
    assert relaxed.rows_out == 15
    with pytest.raises(ValueError, match="size"):
        D.clean(raw.drop(columns=["size"]))


def test_bhk_consistency_filter_optional() -> None:
    rows = [_row("Alpha", "2 BHK", str(1000 + 10 * i), 2, (1000 + 10 * i) * 0.05) for i in range(6)]
    rows += [_row("Alpha", "3 BHK", "1500", 3, 60.0), _row("Alpha", "3 BHK", "1500", 3, 90.0)]
    raw = pd.DataFrame(rows, columns=D.RAW_COLUMNS)
    off = D.clean(raw, D.CleaningRules(location_min_rows=1))
    on = D.clean(raw, D.CleaningRules(location_min_rows=1, bhk_consistency=True))
    assert off.rows_out == 8 and off.dropped["bhk_price_inconsistent"] == 0
    assert on.dropped["bhk_price_inconsistent"] == 1 and 6 not in on.frame.index
    assert on.rows_in == on.rows_out + sum(on.dropped.values())


# ---------------------------------------------------------------- synth

def test_synth_deterministic_schema_and_formats() -> None:
    a, b, c = D.synth(3000, seed=7), D.synth(3000, seed=7), D.synth(3000, seed=8)
    pd.testing.assert_frame_equal(a, b)
    assert not a.equals(c)
    assert list(a.columns) == D.RAW_COLUMNS and len(a) == 3000
    sizes = a["size"].dropna()
    assert sizes.str.fullmatch(r"\d+ (BHK|Bedroom)|1 RK").all()
    assert sizes.str.endswith("Bedroom").any() and sizes.str.endswith("BHK").any()
    assert set(a["area_type"]) <= {"Super built-up  Area", "Built-up  Area", "Plot  Area", "Carpet  Area"}
    assert a["availability"].str.fullmatch(r"Ready To Move|Immediate Possession|\d\d-[A-Z][a-z]{2}").all()
    sqft = a["total_sqft"]
    assert sqft.map(lambda s: isinstance(s, str)).all()
    assert sqft.str.contains(" - ").any() and sqft.str.contains("Sq. ").any()
    assert a["balcony"].isna().any() and a["society"].isna().any()
    assert a["bath"].dtype == float and a["price"].dtype == float


def test_synth_cleans_well_and_uses_table_locations() -> None:
    raw = D.synth(20000, seed=0)
    res = D.clean(raw)
    table = D.load_locations()
    assert res.rows_in == res.rows_out + sum(res.dropped.values())
    assert 0.9 < res.rows_out / res.rows_in < 0.995  # most kept, but some rows are meant to be dropped
    assert set(res.locations) <= set(table["location"])
    assert (res.frame["location"] == "other").mean() > 0.1  # the rare-location bucket exists
    f = res.frame
    pps = (f["price"] * 1e5 / f["total_sqft"]).groupby(f["location"]).median()
    big = table[(table["rows"] >= 50) & (table["location"] != "other")].set_index("location")
    common = big.index.intersection(pps.index)
    assert len(common) >= 40
    rho = pps[common].rank().corr(big.loc[common, "median_price_per_sqft"].rank())
    assert rho > 0.8
    # area grows with bhk, bath stays near bhk
    med_sqft = f.groupby("bhk")["total_sqft"].median()
    assert med_sqft[1] < med_sqft[2] < med_sqft[3] < med_sqft[4]
    assert ((f["bath"] - f["bhk"]).abs() <= 1).mean() > 0.95


def test_synth_is_fast() -> None:
    start = time.perf_counter()
    D.synth(20000, seed=1)
    assert time.perf_counter() - start < 1.5


def test_locations_table_is_aggregate_and_sane() -> None:
    t = D.load_locations()
    assert t["location"].is_unique and "other" in set(t["location"])
    assert (t.loc[t["location"] != "other", "rows"] >= D.CleaningRules().location_min_rows).all()
    shares = t[["share_bhk_1", "share_bhk_2", "share_bhk_3", "share_bhk_4", "share_bhk_5plus"]].sum(axis=1)
    assert np.allclose(shares, 1.0, atol=1e-3)
    assert t["median_price_per_sqft"].between(1000, 50000).all()


# ---------------------------------------------------------------- split and paths

def test_train_test_split_frame() -> None:
    frame = pd.DataFrame({"x": range(101)}, index=range(1000, 1101))
    tr, te = D.train_test_split_frame(frame, test_size=0.2, seed=5)
    tr2, te2 = D.train_test_split_frame(frame, test_size=0.2, seed=5)
    _, te3 = D.train_test_split_frame(frame, test_size=0.2, seed=6)
    assert len(te) == math.ceil(101 * 0.2) and len(tr) + len(te) == 101
    assert set(tr.index).isdisjoint(te.index) and set(tr.index) | set(te.index) == set(frame.index)
    assert tr.equals(tr2) and te.equals(te2) and not te.equals(te3)
    with pytest.raises(ValueError):
        D.train_test_split_frame(frame, test_size=1.0)


def test_real_dataset_path_is_relative_to_repo() -> None:
    repo = Path(D.__file__).resolve().parents[1]
    assert D.REAL_DATASET.resolve() == (repo.parent / "shared" / "data" / "bengaluru_house_data.csv").resolve()
    assert str(D.REAL_DATASET.resolve()) not in Path(D.__file__).read_text()  # no absolute path baked in


# ---------------------------------------------------------------- the real dataset

@NEEDS_REAL
def test_clean_real_dataset() -> None:
    res = D.clean(D.read_raw(D.REAL_DATASET))
    assert res.rows_in == 13320
    assert res.rows_in == res.rows_out + sum(res.dropped.values())
    assert 11_000 <= res.rows_out <= 12_500
    assert res.dropped["missing_location"] == 1 and res.dropped["missing_size"] == 16
    assert res.dropped["sqft_per_bhk_too_small"] > 500 and res.dropped["price_per_sqft_outlier"] > 100
    assert 150 <= len(res.locations) <= 350
    f = res.frame
    pps = (f["price"] * 1e5 / f["total_sqft"]).groupby(f["location"]).median()
    assert pps["Indira Nagar"] > pps["Anekal"]
    assert set(res.locations) == set(D.load_locations()["location"])  # the packaged table matches the data
    assert "sqft_per_bhk_too_small" in res.report()
