"""Input drift: Evidently's DataDriftPreset between a reference frame and a current frame.

`check` is pure computation; the drift job at the end of the module (`run`) adds the I/O the
daily DAG and `abfleet drift` need. Evidently is imported lazily, so this module imports in
the serving image too; only `check` and its callers need the `pipeline` extra.

Per-column tests are the distances Evidently 0.7 picks for a reference of more than 1000 rows,
at every size (below that it would switch to p-value tests, whose 5% false alarms per column
add up when any drifted input is drift): location -> "Jensen-Shannon distance"; numerical
columns with > 5 distinct reference values -> "Wasserstein distance (normed)", with <= 5 ->
"Jensen-Shannon distance". location drifts when score >= 0.1 (Evidently's threshold),
numerical columns when score >= `DriftPolicy.num_threshold`. `columns[name]["test"]` is the
name Evidently reports.

One deliberate deviation: before testing, locations holding < `location_min_share` of the
reference rows (and any location unknown to the reference) are folded into "other". Jensen-Shannon
on the raw ~240 sparse Bengaluru locations flags same-distribution data as drifted at any size we
measured (score ~0.11 at 5000 vs 5000 rows, ~0.47 at 100 current rows; threshold 0.1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from abfleet import data, objects, sampling
from abfleet.settings import VARIANTS
from abfleet.store import open_store

DRIFT_COLUMNS: list[str] = list(data.FEATURES)  # ["location", "total_sqft", "bhk", "bath"]
PREDICTION: str = "estimated_price"
OPTIONAL_COLUMNS: list[str] = [PREDICTION, data.TARGET]  # compared only when present in both frames
CATEGORICAL: list[str] = ["location"]


# Dataset verdicts (`DriftPolicy.verdict`): "features" = drift when any of the model's inputs
# (DRIFT_COLUMNS) drifted; "share" = Evidently's rule, at least drift_share of all compared
# columns (the estimate and the actual price included) drifted.
VERDICTS = ("features", "share")
FEW_VALUES = 5  # a numerical column with at most this many distinct values is compared as categories
# Evidently's names of the tests we ask for by id (what its own choice would report).
TEST_NAMES = {"jensenshannon": "Jensen-Shannon distance", "wasserstein": "Wasserstein distance (normed)"}


@dataclass(frozen=True)
class DriftPolicy:
    """How a drift check runs; the defaults are the fleet's."""

    min_rows: int = 100  # fewer current (or reference) rows -> drift_detected None ("insufficient data")
    drift_share: float = 0.5  # the "share" verdict: drift when share of drifted columns >= this
    verdict: str = "features"  # see VERDICTS
    # A numerical column drifts when its distance (Wasserstein normed; Jensen-Shannon for <= 5
    # distinct values) is >= this. Evidently's 0.1 sits inside the noise of same-distribution
    # windows of 500-1000 rows (total_sqft up to 0.11 measured), and with "any input" as the
    # verdict each column's false alarms add up. Categorical columns keep Evidently's 0.1.
    num_threshold: float | None = 0.15
    max_rows: int = 5000  # each side is sampled down to this many rows (seeded) to bound runtime
    seed: int = 0
    location_min_share: float = 0.01  # rarer reference locations are compared as "other" (see module doc)


class NoReference(LookupError):
    """No @production model, so no training data to compare the traffic with: the drift job cannot run (yet)."""


@dataclass(frozen=True)
class DriftResult:
    """`summary` is the JSON-safe contract (see `check`); `html` is Evidently's report or None."""

    summary: dict[str, Any]
    html: str | None


def compared_columns(reference: pd.DataFrame, current: pd.DataFrame) -> list[str]:
    """DRIFT_COLUMNS plus each OPTIONAL_COLUMNS entry having a non-null value in both frames.

    Raises ValueError naming any DRIFT_COLUMNS missing from either frame.
    """
    for side, frame in (("reference", reference), ("current", current)):
        missing = [c for c in DRIFT_COLUMNS if c not in frame.columns]
        if missing:
            raise ValueError(f"{side} frame lacks drift columns: {', '.join(missing)}")
    optional = [c for c in OPTIONAL_COLUMNS if c in reference.columns and c in current.columns
                and reference[c].notna().any() and current[c].notna().any()]
    return DRIFT_COLUMNS + optional


def check(reference: pd.DataFrame, current: pd.DataFrame, policy: DriftPolicy = DriftPolicy()) -> DriftResult:
    """Run Evidently's DataDriftPreset on `compared_columns`; `reference` is the baseline.

    summary = {"drift_detected": bool | None, "share_drifted": float | None,
    "drifted_columns": [names, in compared order], "columns": {name: {"test", "score", "drifted"}},
    "reference_rows": int, "current_rows": int (rows received, before sampling to max_rows),
    "verdict": policy.verdict, "feature_drift": any input drifted, "prediction_drift" /
    "target_drift": the estimate / the actual price drifted (None when not compared)} and,
    only when drift_detected is None, "reason". drift_detected follows the policy's verdict
    (see VERDICTS); it is None (html None, columns empty) when either frame has fewer than
    policy.min_rows rows. Only builtin types, no NaN; a score is None only if Evidently
    returned a non-finite one. Same inputs and policy -> same summary.
    """
    columns = compared_columns(reference, current)
    if policy.verdict not in VERDICTS:
        raise ValueError(f"drift verdict must be one of {', '.join(VERDICTS)}, got {policy.verdict!r}")
    summary: dict[str, Any] = {"drift_detected": None, "share_drifted": None, "drifted_columns": [],
                               "columns": {}, "reference_rows": len(reference), "current_rows": len(current),
                               "verdict": policy.verdict, "feature_drift": None, "prediction_drift": None,
                               "target_drift": None}
    for side, frame in (("current", current), ("reference", reference)):
        if len(frame) < policy.min_rows:
            summary["reason"] = f"insufficient data: {len(frame)} {side} rows, need {policy.min_rows}"
            return DriftResult(summary=summary, html=None)
    ref, cur = _prepare(reference, columns, policy), _prepare(current, columns, policy)
    vocabulary = _vocabulary(ref["location"], policy.location_min_share)
    ref["location"], cur["location"] = _fold(ref["location"], vocabulary), _fold(cur["location"], vocabulary)
    methods = {c: "jensenshannon" if c in CATEGORICAL or ref[c].nunique() <= FEW_VALUES else "wasserstein"
               for c in columns}
    result, html = _run_evidently(ref, cur, columns, policy.drift_share, policy.num_threshold, methods)
    share_verdict = result.pop("share_drift")
    summary.update(result)
    drifted = set(summary["drifted_columns"])
    summary["feature_drift"] = bool(drifted & set(DRIFT_COLUMNS))
    summary["prediction_drift"] = PREDICTION in drifted if PREDICTION in columns else None
    summary["target_drift"] = data.TARGET in drifted if data.TARGET in columns else None
    summary["drift_detected"] = summary["feature_drift"] if policy.verdict == "features" else share_verdict
    return DriftResult(summary=summary, html=html)


def from_raw_files(reference_csv: str | Path, current_csv: str | Path,
                   policy: DriftPolicy = DriftPolicy()) -> DriftResult:
    """`check` on two raw Kaggle-schema CSVs after `data.clean` (so `price` is compared too).

    Both use the default CleaningRules (same rows kept as in training), but current rows get their
    raw location names back: in a small window the current file's own rare-location rule would
    rename reference-common locations to "other"; `check` maps names onto the reference's instead.
    """
    reference = data.clean(data.read_raw(reference_csv)).frame
    raw = data.read_raw(current_csv)
    current = data.clean(raw).frame
    current["location"] = raw.loc[current.index, "location"].str.strip().to_numpy()
    return check(reference, current, policy)


def arms_same_distribution(production_inputs: pd.DataFrame, candidate_inputs: pd.DataFrame,
                           policy: DriftPolicy = DriftPolicy()) -> dict[str, Any]:
    """Summary of `check` on the arms' DRIFT_COLUMNS only (production as reference).

    drift_detected True means the arms did not receive inputs from the same distribution (a
    broken split); None means too few rows in an arm.
    """
    def features(frame: pd.DataFrame) -> pd.DataFrame:
        return frame[[c for c in frame.columns if c in DRIFT_COLUMNS]]  # missing ones: ValueError in check

    return check(features(production_inputs), features(candidate_inputs), policy).summary


def report_key(now: datetime) -> str:
    """Object-store key for a report made at `now` (naive = UTC): drift/YYYY/MM/DD/drift-YYYYMMDDTHHMMSSZ.html."""
    now = now.replace(tzinfo=timezone.utc) if now.tzinfo is None else now.astimezone(timezone.utc)
    return f"drift/{now:%Y/%m/%d}/drift-{now:%Y%m%dT%H%M%SZ}.html"


def _prepare(frame: pd.DataFrame, columns: list[str], policy: DriftPolicy) -> pd.DataFrame:
    if len(frame) > policy.max_rows:
        frame = frame.sample(n=policy.max_rows, random_state=policy.seed)
    out = frame[columns].reset_index(drop=True).copy()
    out["location"] = out["location"].astype("string").str.strip().astype(object)
    for col in columns:
        if col not in CATEGORICAL:
            out[col] = pd.to_numeric(out[col], errors="coerce").astype(float)
    return out


def _vocabulary(reference_locations: pd.Series, min_share: float) -> set[str]:
    shares = reference_locations.value_counts(normalize=True)
    return {str(name) for name in shares.index[shares >= min_share] if name != data.OTHER}


def _fold(locations: pd.Series, vocabulary: set[str]) -> pd.Series:
    return locations.where(locations.isin(vocabulary), data.OTHER)


def _run_evidently(ref: pd.DataFrame, cur: pd.DataFrame, columns: list[str],
                   drift_share: float, num_threshold: float | None,
                   methods: dict[str, str]) -> tuple[dict[str, Any], str]:
    from evidently import DataDefinition, Dataset, Report, __version__
    from evidently.presets import DataDriftPreset

    definition = DataDefinition(categorical_columns=[c for c in columns if c in CATEGORICAL],
                                numerical_columns=[c for c in columns if c not in CATEGORICAL])
    report = Report([DataDriftPreset(columns=columns, drift_share=drift_share, num_threshold=num_threshold,
                                     per_column_method=methods)], include_tests=True)
    snapshot = report.run(Dataset.from_pandas(cur, data_definition=definition),
                          Dataset.from_pandas(ref, data_definition=definition))
    result = snapshot.dict()
    scores, share = {}, None
    for metric in result["metrics"]:
        kind = metric["config"]["type"]
        if kind.endswith(":ValueDrift"):
            scores[metric["config"]["column"]] = _finite(metric["value"])
        elif kind.endswith(":DriftedColumnsCount"):
            share = _finite(metric["value"]["share"])
    per_column: dict[str, dict[str, Any]] = {}
    dataset_drift = None
    for test in result["tests"]:  # FAIL = drift: per column (ValueDrift), dataset (share < drift_share)
        params = test["metric_config"]["params"]
        if params["type"].endswith(":ValueDrift"):
            per_column[params["column"]] = {"test": TEST_NAMES.get(str(params["method"]), str(params["method"])), "score": scores[params["column"]],
                                            "drifted": test["status"] == "FAIL"}
        elif params["type"].endswith(":DriftedColumnsCount"):
            dataset_drift = test["status"] == "FAIL"
    if set(per_column) != set(columns) or dataset_drift is None or share is None:
        raise RuntimeError(f"unexpected Evidently result: columns {sorted(per_column)}, share {share}")
    ordered = {name: per_column[name] for name in columns}
    return {"share_drift": dataset_drift, "share_drifted": share,
            "drifted_columns": [n for n, c in ordered.items() if c["drifted"]],
            "columns": ordered}, _label(snapshot.get_html_str(as_iframe=False), __version__)


def _label(html: str, version: str) -> str:
    # Evidently's standalone page has no <title> and never names Evidently; say what made it.
    head = f'<head>\n<meta name="generator" content="Evidently {version}">\n<title>abfleet input drift</title>'
    return html.replace("<head>", head, 1)


def _finite(value: Any) -> float | None:
    number = float(value)
    return number if math.isfinite(number) else None


def touches_experiment(reference: pd.DataFrame, arms: dict[str, pd.DataFrame],
                       policy: DriftPolicy = DriftPolicy()) -> dict[str, Any]:
    """Does the drift reach both arms of the running experiment? Each arm's inputs (arm →
    frame) are checked against `reference` on DRIFT_COLUMNS. {"touched": True when every arm
    drifted, False when one did not, None when an arm has too few rows; "arms": {arm:
    {"rows", "drift_detected", "drifted_columns"}}}. When both arms see the drift, the
    comparison between them stays fair but measures both models on the shifted inputs."""
    out: dict[str, Any] = {"touched": None, "arms": {}}
    for arm, frame in arms.items():
        s = check(reference[DRIFT_COLUMNS], frame[DRIFT_COLUMNS], policy).summary
        out["arms"][arm] = {"rows": len(frame), "drift_detected": s["drift_detected"],
                            "drifted_columns": s["drifted_columns"]}
    verdicts = [a["drift_detected"] for a in out["arms"].values()]
    if verdicts and None not in verdicts:
        out["touched"] = all(verdicts)
    return out


def notification(summary: dict[str, Any]) -> dict[str, Any]:
    """The webhook's body for a drift verdict: the report's link, the drifted columns and
    their scores (and tests) first, then the whole summary."""
    columns = summary.get("columns") or {}
    return {"event": "drift", "report": summary.get("report"), "drifted_columns": summary.get("drifted_columns", []),
            "scores": {name: {"score": columns[name]["score"], "test": columns[name]["test"]}
                       for name in summary.get("drifted_columns", []) if name in columns},
            "summary": summary}


# ---- the drift job: what the daily DAG and `abfleet drift` run ------------------------

def policy_from(settings) -> DriftPolicy:
    return DriftPolicy(min_rows=settings.drift_min_rows, drift_share=settings.drift_share,
                       verdict=settings.drift_verdict, max_rows=settings.pipeline_sample_rows,
                       num_threshold=settings.drift_num_threshold)


def reference_for(settings) -> tuple[str, pd.DataFrame]:
    """(production version, its training rows with the model's own estimates) — the data
    the production model was fitted on is stored with it as `data/train.csv`."""
    import tempfile

    import mlflow.artifacts

    from abfleet import registry
    from abfleet.model import FastPredictor

    version = registry.version_for(settings, "production")
    if version is None:
        raise NoReference("no @production model: nothing to compare the traffic with")
    info = registry.version_info(settings, version)
    with tempfile.TemporaryDirectory() as tmp:
        path = mlflow.artifacts.download_artifacts(run_id=info.run_id, artifact_path="data/train.csv", dst_path=tmp,
                                                   tracking_uri=settings.tracking_uri)
        reference = pd.read_csv(path)
    predictor = FastPredictor(registry.load_model(settings, version))
    reference["estimated_price"] = predictor.predict_many(reference)
    return version, reference


def current_for(settings, days: float, *, since: datetime | None = None, variant: str | None = None,
                version: str | None = None) -> tuple[int, pd.DataFrame]:
    """(predictions of the last `days` days (or since `since`; of one arm and version when
    given), a sample of at most `pipeline_sample_rows` of them drawn in the database: inputs
    and estimates, with actual prices where users gave them)."""
    since = since or datetime.now(timezone.utc) - timedelta(days=days)
    with open_store(settings, create_schema=False) as store:
        total, rows = sampling.sample(store, since, settings.pipeline_sample_rows, variant=variant, version=version,
                                      actual_price=True)
    frame = pd.DataFrame(rows, columns=[*DRIFT_COLUMNS, PREDICTION, data.TARGET])
    frame[data.TARGET] = pd.to_numeric(frame[data.TARGET]).astype(float)
    return total, frame


def experiment_for(settings, reference: pd.DataFrame, days: float, now: datetime) -> dict[str, Any]:
    """`touches_experiment` for the running experiment's arms, over the part of the window
    since it started; {"touched": None, "reason"} when no experiment runs."""
    from abfleet import registry

    versions = registry.aliases(settings)
    if not versions.get("candidate") or not versions.get("production"):
        return {"touched": None, "reason": "no experiment running (no @candidate)", "arms": {}}
    since = max(now - timedelta(days=days), registry.experiment_start(settings, versions["candidate"]))
    frames = {arm: current_for(settings, days, since=since, variant=arm, version=versions[arm])[1] for arm in VARIANTS}
    out = touches_experiment(reference, frames, policy_from(settings))
    for arm in VARIANTS:
        out["arms"][arm]["model_version"] = versions[arm]
    return {**out, "since": since.isoformat(timespec="seconds")}


def run(settings, *, days: float | None = None, now: datetime | None = None) -> dict:
    """One drift check of recent traffic against production's training data; the report goes
    to the object store under a dated key, the summary to the store (served by
    /api/drift_report and exported as gauges). When drift is found, `experiment` says whether
    both arms of the running experiment see it. Returns the summary with `report`."""
    now = now or datetime.now(timezone.utc)
    days = settings.drift_days if days is None else days
    version, reference = reference_for(settings)
    total, current = current_for(settings, days)
    result = check(reference, current, policy_from(settings))
    summary = {**result.summary, "current_rows": total, "sampled_rows": len(current), "production_version": version,
               "window_days": days, "checked_at": now.isoformat(timespec="seconds"), "report": None}
    summary["experiment"] = (experiment_for(settings, reference, days, now) if summary["drift_detected"]
                             else {"touched": None if summary["drift_detected"] is None else False, "arms": {}})
    if result.html is not None:
        store = objects.open_store(settings)
        summary["report"] = store.put_bytes(result.html.encode(), report_key(now), "text/html")
    with open_store(settings) as db:
        db.set_state("drift_summary", summary)
    return summary
