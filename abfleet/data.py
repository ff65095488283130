"""Raw Bengaluru house data: reading, parsing, cleaning, synthesis and splitting.

The raw schema is the Kaggle "Bengaluru House Data" CSV (price in lakhs of rupees).
`clean` turns raw rows into model-ready rows and accounts for every dropped row;
`synth` produces seeded raw-schema rows shaped like the real data (see locations.csv).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

RAW_COLUMNS: list[str] = ["area_type", "availability", "location", "size", "society",
                          "total_sqft", "bath", "balcony", "price"]
FEATURES: list[str] = ["location", "total_sqft", "bhk", "bath"]
TARGET: str = "price"
REQUIRED_COLUMNS: list[str] = ["location", "size", "total_sqft", "bath", "price"]
OTHER: str = "other"
# The repo sits beside a `shared/` folder; the real CSV is never copied into the repo.
REAL_DATASET: Path = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "bengaluru_house_data.csv"
LOCATIONS_CSV: Path = Path(__file__).resolve().with_name("locations.csv")

# Square feet per unit; keys are the suffix lower-cased with spaces and dots removed.
SQFT_PER_UNIT: dict[str, float] = {
    "sqmeter": 10.7639, "sqmetre": 10.7639, "sqyards": 9.0, "sqyard": 9.0,
    "acres": 43560.0, "acre": 43560.0, "perch": 272.25, "cents": 435.6, "cent": 435.6,
    "guntha": 1089.0, "grounds": 2400.0, "ground": 2400.0,
}
_NUM = r"(\d+(?:\.\d*)?|\.\d+)"
_SIZE_RE = re.compile(r"^\s*(\d+)\s*(bhk|bedroom|rk)\s*$", re.IGNORECASE)
_SQFT_RE = re.compile(rf"^\s*{_NUM}\s*([A-Za-z. ]*?)\s*$")
_RANGE_RE = re.compile(rf"^\s*{_NUM}\s*-\s*{_NUM}\s*$")


def real_dataset_available() -> bool:
    """True when the real Kaggle CSV exists at REAL_DATASET."""
    return REAL_DATASET.is_file()


def read_raw(path: str | Path) -> pd.DataFrame:
    """Read a raw-schema CSV; text columns stay strings. Raises ValueError naming missing REQUIRED_COLUMNS."""
    text_cols = {c: str for c in ["area_type", "availability", "location", "size", "society", "total_sqft"]}
    frame = pd.read_csv(path, dtype=text_cols)
    _require(frame, REQUIRED_COLUMNS)
    return frame


def write_raw(frame: pd.DataFrame, path: str | Path) -> Path:
    """Write the RAW_COLUMNS of `frame` (in order, no index) to CSV, creating parent dirs; returns the path."""
    _require(frame, RAW_COLUMNS)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frame[RAW_COLUMNS].to_csv(path, index=False)
    return path


def _require(frame: pd.DataFrame, columns: list[str]) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"missing required columns: {', '.join(missing)}")


def parse_size(s: object) -> int | None:
    """'2 BHK' / '4 Bedroom' -> bedroom count; '1 RK' -> 1 (one room + kitchen); anything else -> None."""
    if not isinstance(s, str):
        return None
    m = _SIZE_RE.match(s)
    if m is None:
        return None
    return 1 if m.group(2).lower() == "rk" else int(m.group(1))


def parse_sqft(s: object) -> float | None:
    """Area in square feet: plain number, 'a - b' range (midpoint) or number+unit ('34.46Sq. Meter').

    Returns None for missing, non-positive, non-finite or unrecognised values.
    """
    if isinstance(s, (int, float)) and not isinstance(s, bool):
        value = float(s)
    elif isinstance(s, str):
        if (r := _RANGE_RE.match(s)) is not None:
            value = (float(r.group(1)) + float(r.group(2))) / 2.0
        elif (m := _SQFT_RE.match(s)) is not None:
            unit = re.sub(r"[\s.]", "", m.group(2)).lower()
            if unit and unit not in SQFT_PER_UNIT:
                return None
            value = float(m.group(1)) * (SQFT_PER_UNIT[unit] if unit else 1.0)
        else:
            return None
    else:
        return None
    return value if math.isfinite(value) and value > 0 else None


@dataclass(frozen=True)
class CleaningRules:
    """Every threshold `clean` applies; rows failing a rule are dropped under the named reason."""

    location_min_rows: int = 10  # locations with fewer valid rows become "other"
    min_bhk: int = 1  # bhk outside [min_bhk, max_bhk] -> "bhk_out_of_range"
    max_bhk: int = 20
    min_total_sqft: float = 300.0  # area outside [min, max] -> "sqft_out_of_range"
    max_total_sqft: float = 30_000.0  # bigger "homes" are land parcels (acres), not houses
    min_sqft_per_bhk: float = 300.0  # total_sqft / bhk below this -> "sqft_per_bhk_too_small"
    max_bath_over_bhk: int = 2  # bath > bhk + this -> "bath_over_bhk"
    # Per-location price-per-sqft outlier rule, robust and in log space (prices are multiplicative):
    # keep |log(pps) - median| <= k * max(1.4826 * MAD, pps_min_log_spread); else "price_per_sqft_outlier".
    pps_outlier_k: float = 3.0
    pps_min_log_spread: float = 0.1  # floor so near-identical groups don't drop everything else
    pps_outlier_min_rows: int = 5  # smaller location groups are not filtered (statistics too noisy)
    # Optional (off by default): drop n-bhk rows priced per sqft below the mean of (n-1)-bhk rows in
    # the same location, when that (n-1) group has > bhk_consistency_min_rows rows -> "bhk_price_inconsistent".
    bhk_consistency: bool = False
    bhk_consistency_min_rows: int = 5


DROP_REASONS: list[str] = [
    "missing_location", "missing_size", "unparseable_size", "missing_sqft", "unparseable_sqft",
    "missing_bath", "invalid_bath", "missing_price", "invalid_price", "bhk_out_of_range",
    "sqft_out_of_range", "sqft_per_bhk_too_small", "bath_over_bhk", "price_per_sqft_outlier",
    "bhk_price_inconsistent",
]


@dataclass
class CleanResult:
    """Output of `clean`: model-ready rows plus an account of every raw row that was dropped.

    `frame` has exactly the columns location (str), total_sqft (float), bhk (int), bath (int),
    price (float, lakhs); its index holds the raw row labels. `dropped` maps every DROP_REASONS entry
    to a count (zeros included) and rows_in == rows_out + sum(dropped.values()).
    """

    frame: pd.DataFrame
    dropped: dict[str, int]
    rows_in: int
    rows_out: int
    locations: list[str] = field(default_factory=list)  # sorted, "other" included

    def report(self) -> str:
        """Human-readable multi-line summary."""
        lines = [f"rows in: {self.rows_in}, kept: {self.rows_out} ({self.rows_out / max(self.rows_in, 1):.1%}),"
                 f" dropped: {sum(self.dropped.values())}, locations: {len(self.locations)} (incl. '{OTHER}')"]
        lines += [f"  {reason}: {n}" for reason, n in self.dropped.items() if n]
        return "\n".join(lines)


def clean(raw: pd.DataFrame, rules: CleaningRules = CleaningRules()) -> CleanResult:
    """Clean raw-schema rows; each dropped row is counted under the first rule it fails (DROP_REASONS order)."""
    _require(raw, REQUIRED_COLUMNS)
    loc = raw["location"].astype("string").str.strip()
    bhk = pd.to_numeric(raw["size"].map(parse_size), errors="coerce")
    sqft = pd.to_numeric(raw["total_sqft"].map(parse_sqft), errors="coerce")
    bath = pd.to_numeric(raw["bath"], errors="coerce")
    price = pd.to_numeric(raw["price"], errors="coerce")
    checks = {  # row-level rules, applied in order; NaN comparisons are False so order matters
        "missing_location": loc.isna() | (loc == ""),
        "missing_size": raw["size"].isna(),
        "unparseable_size": bhk.isna(),
        "missing_sqft": raw["total_sqft"].isna(),
        "unparseable_sqft": sqft.isna(),
        "missing_bath": bath.isna(),
        "invalid_bath": (bath < 1) | (bath != bath.round()),
        "missing_price": price.isna(),
        "invalid_price": ~(price > 0) | ~np.isfinite(price),
        "bhk_out_of_range": (bhk < rules.min_bhk) | (bhk > rules.max_bhk),
        "sqft_out_of_range": (sqft < rules.min_total_sqft) | (sqft > rules.max_total_sqft),
        "sqft_per_bhk_too_small": sqft / bhk < rules.min_sqft_per_bhk,
        "bath_over_bhk": bath > bhk + rules.max_bath_over_bhk,
    }
    dropped = dict.fromkeys(DROP_REASONS, 0)
    keep = pd.Series(True, index=raw.index)
    for reason, bad in checks.items():
        hit = keep & bad.fillna(False).astype(bool)
        dropped[reason] = int(hit.sum())
        keep &= ~hit
    frame = pd.DataFrame({"location": loc[keep].astype(object), "total_sqft": sqft[keep].astype(float),
                          "bhk": bhk[keep].astype("int64"), "bath": bath[keep].astype("int64"),
                          "price": price[keep].astype(float)})
    # Rare locations are counted on valid rows, so the vocabulary reflects usable data only.
    counts = frame["location"].value_counts()
    known = sorted(str(x) for x in counts.index[counts >= rules.location_min_rows] if x != OTHER)
    frame.loc[~frame["location"].isin(known), "location"] = OTHER
    log_pps = np.log(frame["price"] * 1e5 / frame["total_sqft"])
    grp = log_pps.groupby(frame["location"])
    med = grp.transform("median")
    spread = (log_pps - med).abs().groupby(frame["location"]).transform("median") * 1.4826
    limit = rules.pps_outlier_k * np.maximum(spread, rules.pps_min_log_spread)
    outlier = ((log_pps - med).abs() > limit) & (grp.transform("size") >= rules.pps_outlier_min_rows)
    dropped["price_per_sqft_outlier"] = int(outlier.sum())
    frame, log_pps = frame[~outlier], log_pps[~outlier]
    if rules.bhk_consistency:
        bad = _bhk_inconsistent(frame, np.exp(log_pps), rules.bhk_consistency_min_rows)
        dropped["bhk_price_inconsistent"] = int(bad.sum())
        frame = frame[~bad]
    return CleanResult(frame=frame, dropped=dropped, rows_in=len(raw), rows_out=len(frame),
                       locations=sorted([*known, OTHER]))


def _bhk_inconsistent(frame: pd.DataFrame, pps: pd.Series, min_rows: int) -> pd.Series:
    """Rows whose pps is below the mean pps of (bhk-1) homes in the same location (well-known notebook rule)."""
    stats = pps.groupby([frame["location"], frame["bhk"]]).agg(["mean", "count"]).reset_index()
    stats["bhk"] += 1  # the (n-1)-bhk statistics are the reference for n-bhk rows
    ref = frame[["location", "bhk"]].merge(stats, on=["location", "bhk"], how="left").set_index(frame.index)
    return (ref["count"] > min_rows) & (pps < ref["mean"])


@lru_cache(maxsize=1)
def _locations_table() -> pd.DataFrame:
    return pd.read_csv(LOCATIONS_CSV, keep_default_na=False)


def known_locations() -> frozenset[str]:
    """Every location the fleet accepts, whatever a given model was trained on."""
    return frozenset(_locations_table()["location"].astype(str))


def load_locations() -> pd.DataFrame:
    """The packaged aggregate table derived from the cleaned real data (no raw rows).

    One row per known location plus a last 'other' row for rare ones: rows (valid rows before the
    price-per-sqft filter), median_price_per_sqft (rupees), pps_log_spread (robust sd of log pps),
    median_sqft, sqft_scale (area vs the city norm for the same home type), median_bath, share_bhk_1..5plus.
    """
    return _locations_table().copy()


# Shapes measured on the cleaned real data when locations.csv was built (global, not per location).
_BHK_TAIL = (np.arange(5, 11), np.array([0.52, 0.24, 0.11, 0.07, 0.04, 0.02]))  # bhk given "5+"
_P_BEDROOM = np.array([0.0, 0.148, 0.055, 0.087, 0.488, 0.743, 0.747])  # P("Bedroom" wording | bhk), 6+ shared
# Price-per-sqft factor vs the location median, [bhk][bedroom?]: houses/plots and big flats cost more per sqft.
_PPS_FACTOR = np.array([[1, 1], [0.99, 1.21], [0.96, 1.2], [1.0, 1.29], [1.12, 1.51], [1.15, 1.41], [0.85, 1.06]])
_SQFT_MEDIAN = np.array([[0, 0], [645, 700], [1141, 1200], [1580, 1550], [3000, 2400], [3692, 2500],
                         [4000, 3000]], dtype=float)  # [bhk][bedroom?]; 6+ shared
_SQFT_LOG_SD = np.array([0.2, 0.4])  # [bedroom?]
_BATH_DIFF = np.arange(-2, 4)  # bath - bhk
_P_BATH_DIFF = np.array([[0, 0, .939, .061, 0, 0], [0, .027, .962, .01, .001, 0], [0, .318, .617, .059, .006, 0],
                         [.032, .135, .56, .2, .068, .005], [.125, .17, .535, .105, .058, .007]])  # rows: bhk 1..4, 5+
_SHARES = ["share_bhk_1", "share_bhk_2", "share_bhk_3", "share_bhk_4", "share_bhk_5plus"]
_MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]


def _pick(rng: np.random.Generator, probs: np.ndarray) -> np.ndarray:
    """Row-wise categorical draw: probs has one row of (unnormalised) probabilities per sample."""
    cum = np.cumsum(probs, axis=1)
    return (rng.random(len(probs))[:, None] * cum[:, -1:] > cum).sum(axis=1)


def synth(rows: int, seed: int) -> pd.DataFrame:
    """`rows` seeded synthetic rows in the raw schema (RAW_COLUMNS, real string formats).

    Locations are drawn by real frequency from locations.csv (the 'other' bucket becomes unique rare
    names with < 10 rows each); price per sqft follows each location's real median and spread; area grows
    with bhk; bath is near bhk. A small share of rows is malformed or extreme so `clean` drops it.
    Same (rows, seed) -> identical frame.
    """
    rng = np.random.default_rng(seed)
    t = _locations_table()
    li = rng.choice(len(t), size=rows, p=(t["rows"] / t["rows"].sum()).to_numpy())
    bucket = _pick(rng, t[_SHARES].to_numpy()[li])
    bhk = np.where(bucket < 4, bucket + 1, rng.choice(_BHK_TAIL[0], size=rows, p=_BHK_TAIL[1]))
    bi = np.minimum(bhk, 6)
    bedroom = rng.random(rows) < _P_BEDROOM[bi]
    sqft = _SQFT_MEDIAN[bi, bedroom.astype(int)] * t["sqft_scale"].to_numpy()[li]
    sqft *= np.exp(rng.normal(0.0, _SQFT_LOG_SD[bedroom.astype(int)]))
    # Location medians already include their home mix; divide out its mean factor so re-applying is unbiased.
    log_f = np.log(_PPS_FACTOR[1:6])
    mix = _P_BEDROOM[1:6] * log_f[:, 1] + (1 - _P_BEDROOM[1:6]) * log_f[:, 0]
    base = t["median_price_per_sqft"].to_numpy() / np.exp(t[_SHARES].to_numpy() @ mix)
    z = rng.normal(0.0, 1.0, rows)
    z *= np.where(z > 0, 1.15, 0.85) * np.where(rng.random(rows) < 0.03, 4.0, 1.0)  # right skew, heavy tail
    pps = base[li] * _PPS_FACTOR[bi, bedroom.astype(int)] * np.exp(z * t["pps_log_spread"].to_numpy()[li])
    price = np.round(sqft * pps / 1e5, 2)
    bath = np.maximum(bhk + _BATH_DIFF[_pick(rng, _P_BATH_DIFF[np.minimum(bhk, 5) - 1])], 1).astype(float)
    names = t["location"].to_numpy(dtype=object)[li]
    rare = names == OTHER  # rare bucket: at most 3 rows per invented name, so clean() groups them
    names[rare] = [f"Rare Layout {i // 3 + 1}" for i in range(int(rare.sum()))]
    names = np.where(rng.random(rows) < 0.01, names + " ", names)  # real data has stray whitespace
    sqft_i = np.maximum(np.round(sqft), 1).astype(int)
    sqft_txt = sqft_i.astype(str).astype(object)
    u = rng.random(rows)
    half = np.maximum(np.round(sqft_i * rng.uniform(0.03, 0.15, rows)), 1).astype(int)
    rng_txt = (sqft_i - half).astype(str).astype(object) + " - " + (sqft_i + half).astype(str)
    sqft_txt = np.where(u < 0.015, rng_txt, sqft_txt)  # ~1.5% ranges, like the real data
    meters = np.char.add(np.round(sqft / 10.7639, 2).astype(str), "Sq. Meter").astype(object)
    yards = np.char.add(np.round(sqft / 9.0, 2).astype(str), "Sq. Yards").astype(object)
    sqft_txt = np.where((u >= 0.015) & (u < 0.017), meters, np.where((u >= 0.017) & (u < 0.019), yards, sqft_txt))
    size = np.where(bedroom, bhk.astype(str).astype(object) + " Bedroom", bhk.astype(str).astype(object) + " BHK")
    size = np.where((bhk == 1) & ~bedroom & (rng.random(rows) < 0.025), "1 RK", size)
    area_type = np.where(bedroom, np.where(rng.random(rows) < 0.8, "Plot  Area", "Built-up  Area"),
                         rng.choice(["Super built-up  Area", "Built-up  Area", "Carpet  Area"], size=rows,
                                    p=[0.815, 0.177, 0.008]))
    year = rng.choice(np.arange(15, 23), size=rows, p=[.01, .03, .16, .40, .18, .10, .09, .03])
    dated = np.char.add(np.char.add(year.astype(str), "-"), rng.choice(_MONTHS, size=rows))
    a = rng.random(rows)
    availability = np.where(a < 0.794, "Ready To Move", np.where(a < 0.795, "Immediate Possession", dated))
    letters = rng.integers(0, 26, size=(400, 7)) + ord("a")
    pool = np.array(["".join(map(chr, r)).capitalize() for r in letters], dtype=object)
    society = np.where(rng.random(rows) < 0.41, None, pool[rng.integers(0, len(pool), rows)])
    balcony = rng.choice([0.0, 1.0, 2.0, 3.0], size=rows, p=[0.08, 0.38, 0.41, 0.13])
    frame = pd.DataFrame({"area_type": area_type, "availability": availability, "location": names,
                          "size": size, "society": society, "total_sqft": sqft_txt, "bath": bath,
                          "balcony": np.where(rng.random(rows) < 0.046, np.nan, balcony), "price": price})
    for col, share in (("location", 0.002), ("size", 0.002), ("bath", 0.005)):  # real-style gaps
        frame.loc[rng.random(rows) < share, col] = np.nan if col == "bath" else None
    return frame.astype({c: object for c in ["area_type", "availability", "location", "size", "society",
                                             "total_sqft"]})


def train_test_split_frame(frame: pd.DataFrame, test_size: float = 0.2,
                           seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Deterministic shuffled split into (train, test); test has ceil(len * test_size) rows.

    Rows keep their index labels; the two parts are disjoint and together are `frame`.
    """
    if not 0.0 < test_size < 1.0:
        raise ValueError(f"test_size must be in (0, 1), got {test_size}")
    order = np.random.default_rng(seed).permutation(len(frame))
    n_test = math.ceil(len(frame) * test_size)
    return frame.iloc[order[n_test:]], frame.iloc[order[:n_test]]
