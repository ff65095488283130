"""Training: raw CSV → cleaned rows → fitted model → held-out metrics → registered version."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import tempfile
from pathlib import Path
from typing import Callable

from abfleet import data, model, registry
from abfleet.settings import VARIANTS, Settings, decision_policy

# The tag a registered version gets when it was not made @candidate to keep a young experiment running.
DEFERRED_TAG = "candidate_deferred"


def train(
    settings: Settings,
    data_csv: Path,
    *,
    alias: str | None = None,
    seed: int = 0,
    params: model.ModelParams | None = None,
    rules: data.CleaningRules | None = None,
    force: bool = False,
    progress: Callable[[str], None] = lambda _msg: None,
) -> dict:
    """Train on a raw-schema CSV, log to MLflow, register a version, optionally set an alias.

    Returns {"version", "run_id", "metrics": {"median_ape", "mape", "mae", "r2"},
    "rows": {...}, "dropped": {...}, "alias"}. The cleaned train and test splits are logged
    with the model (`data/train.csv`, `data/test.csv`): drift checks use them as reference.
    With alias "candidate", a running experiment younger than its minimum run keeps its
    candidate unless `force`: then "alias" is None and "candidate_deferred" says why.
    """
    if alias is not None and alias not in VARIANTS:
        raise ValueError(f"--alias must be one of {', '.join(VARIANTS)}, got {alias!r}")
    result = _train(settings, data_csv, seed=seed, params=params, rules=rules, progress=progress)[0]
    if alias == "candidate":
        made, reason = offer_candidate(settings, result["version"], force=force, progress=progress)
        if not made:
            result["alias"], result["candidate_deferred"] = None, reason
            return result
    elif alias:
        registry.set_alias(settings, alias, result["version"])
        progress(f"version {result['version']} is now @{alias}")
    result["alias"] = alias
    return result


def deferral(current: str | None, version: str, age_hours: float, min_runtime_hours: float, force: bool) -> str | None:
    """Why `version` must not replace @candidate `current` (an experiment `age_hours` old),
    or None when it may: there is none, it is the same, the experiment ran its minimum, or forced."""
    if current is None or str(current) == str(version) or force or age_hours >= min_runtime_hours:
        return None
    return (f"the experiment with @candidate v{current} is {age_hours:.1f} h old, under its minimum run of "
            f"{min_runtime_hours:g} h: not replaced (train with force to replace it)")


def offer_candidate(settings: Settings, version: str, *, force: bool = False, source: str = "train",
                    progress: Callable[[str], None] = lambda _msg: None) -> tuple[bool, str]:
    """Make `version` @candidate unless that would cut short a running experiment (see
    `deferral`) or @candidate moves meanwhile; a version not made candidate is tagged
    `candidate_deferred` with the reason, a replaced one `superseded`. (made, reason)."""
    current = registry.version_for(settings, "candidate")
    age = 0.0
    if current is not None:
        age = (dt.datetime.now(dt.timezone.utc) - registry.experiment_start(settings, current)).total_seconds() / 3600
    reason = deferral(current, version, age, decision_policy().min_runtime_hours, force)
    if reason is None:
        try:
            replaced = registry.replace_candidate(settings, version, expected=current, source=source)
        except registry.AliasMoved as exc:
            reason = f"not made @candidate: {exc}"
        else:
            said = f" (replacing v{replaced}, tagged superseded)" if replaced and replaced != version else ""
            progress(f"version {version} is now @candidate{said}")
            return True, f"now @candidate{said}"
    registry.tag_version(settings, version, {DEFERRED_TAG: reason})
    progress(f"version {version} NOT made @candidate: {reason}")
    return False, reason


def _train(settings, data_csv, *, seed, params, rules, progress):
    import mlflow
    import mlflow.sklearn

    params = params or model.ModelParams(seed=seed)
    rules = rules or data.CleaningRules()

    progress(f"reading {data_csv}")
    cleaned = data.clean(data.read_raw(data_csv), rules)
    if cleaned.rows_out < 50:
        raise ValueError(f"only {cleaned.rows_out} usable rows in {data_csv}: too few to train")
    train_rows, test_rows = data.train_test_split_frame(cleaned.frame, test_size=0.2, seed=seed)
    progress(f"cleaned {cleaned.rows_in} rows: {cleaned.rows_out} usable; training on {len(train_rows)}")

    fitted = model.fit(train_rows, params)
    metrics = model.score(fitted, test_rows)
    progress("held-out: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))

    registry.client(settings)
    mlflow.set_experiment(settings.model_name)
    with mlflow.start_run() as run, tempfile.TemporaryDirectory() as tmp:
        mlflow.log_params({f"model.{k}": v for k, v in dataclasses.asdict(params).items()})
        mlflow.log_params({f"clean.{k}": v for k, v in dataclasses.asdict(rules).items()})
        mlflow.log_params({"data.source": Path(data_csv).name, "data.rows_in": cleaned.rows_in})
        mlflow.log_metrics(metrics)
        mlflow.log_metrics({f"dropped.{k}": v for k, v in cleaned.dropped.items()})
        folder = Path(tmp)
        train_rows.to_csv(folder / "train.csv", index=False)
        test_rows.to_csv(folder / "test.csv", index=False)
        (folder / "cleaning.json").write_text(
            json.dumps({"rows_in": cleaned.rows_in, "rows_out": cleaned.rows_out, "dropped": cleaned.dropped}, indent=2)
        )
        mlflow.log_artifacts(str(folder), artifact_path="data")
        progress("registering the model")
        info = mlflow.sklearn.log_model(
            fitted,
            name="model",
            registered_model_name=settings.model_name,
            # Counts as floats: MLflow's schema then accepts any JSON number for them.
            input_example=train_rows[data.FEATURES].head(3).astype({"bhk": float, "bath": float}),
            # skops whatever MLflow's default; servers refuse anything else (registry.load_model).
            serialization_format="skops",
            skops_trusted_types=model.SKOPS_TRUSTED_TYPES,
        )
        version = str(info.registered_model_version)
        registry.tag_version(settings, version, {"median_ape": f"{metrics['median_ape']:.4f}", "data": Path(data_csv).name})
        # Servers load only these bytes: the hash of what the store holds now, read back.
        registry.record_checksum(settings, version)
    return {
        "version": version,
        "run_id": run.info.run_id,
        "alias": None,
        "metrics": metrics,
        "rows": {"in": cleaned.rows_in, "usable": cleaned.rows_out, "train": len(train_rows), "test": len(test_rows)},
        "dropped": cleaned.dropped,
    }, fitted, test_rows


def train_candidate(settings: Settings, *, force: bool = False, progress: Callable[[str], None] = lambda _msg: None) -> dict:
    """The training DAG's job: newest `datasets/train_V{n}.csv` → a registered version, made
    @candidate only when, on the same held-out rows, its median APE is not worse than
    production's by more than `settings.offline_margin` (relative), and when that does not
    cut short an experiment younger than its minimum run (unless `force`)."""
    from abfleet import objects

    store = objects.open_store(settings)
    key = objects.newest_dataset(store)  # objects.NoDataset when there is none: nothing to train on
    with tempfile.TemporaryDirectory() as tmp:
        csv = store.get_file(key, Path(tmp) / Path(key).name)
        progress(f"newest dataset: {key}")
        result, fitted, test_rows = _train(settings, csv, seed=0, params=None, rules=None, progress=progress)
    result["dataset"] = key
    production = registry.version_for(settings, "production")
    if production is None:
        ok, reason = True, "no production model to compare with"
    else:
        baseline = model.score(registry.load_model(settings, production), test_rows)
        own = model.score(fitted, test_rows)
        limit = baseline["median_ape"] * (1 + settings.offline_margin)
        ok = own["median_ape"] <= limit
        reason = (f"median APE {own['median_ape']:.4f} vs production v{production} {baseline['median_ape']:.4f} "
                  f"on the same {len(test_rows)} held-out rows (limit {limit:.4f})")
        result["offline"] = {"candidate": own, "production": baseline, "production_version": production}
    if not ok:
        registry.tag_version(settings, result["version"], {"offline_rejected": reason})
        progress(f"version {result['version']} NOT made candidate: {reason}")
    else:
        ok, offered = offer_candidate(settings, result["version"], force=force, source="train_candidate", progress=progress)
        reason = f"{offered}; {reason}" if ok else f"{offered} (offline check passed: {reason})"
        result["alias"] = "candidate" if ok else None
    result["candidate_set"], result["reason"] = ok, reason
    return result
