"""Training: raw CSV → cleaned rows → fitted model → held-out metrics → registered version."""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path
from typing import Callable

from abfleet import data, model, registry
from abfleet.settings import VARIANTS, Settings


def train(
    settings: Settings,
    data_csv: Path,
    *,
    alias: str | None = None,
    seed: int = 0,
    params: model.ModelParams | None = None,
    rules: data.CleaningRules | None = None,
    progress: Callable[[str], None] = lambda _msg: None,
) -> dict:
    """Train on a raw-schema CSV, log to MLflow, register a version, optionally set an alias.

    Returns {"version", "run_id", "metrics": {"median_ape", "mape", "mae", "r2"},
    "rows": {...}, "dropped": {...}, "alias"}. The cleaned train and test splits are logged
    with the model (`data/train.csv`, `data/test.csv`): drift checks use them as reference.
    """
    return _train(settings, data_csv, alias=alias, seed=seed, params=params, rules=rules, progress=progress)[0]


def _train(settings, data_csv, *, alias, seed, params, rules, progress):
    import mlflow
    import mlflow.sklearn

    if alias is not None and alias not in VARIANTS:
        raise ValueError(f"--alias must be one of {', '.join(VARIANTS)}, got {alias!r}")
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
            skops_trusted_types=model.SKOPS_TRUSTED_TYPES,
        )
        version = str(info.registered_model_version)
        registry.tag_version(settings, version, {"median_ape": f"{metrics['median_ape']:.4f}", "data": Path(data_csv).name})
    if alias:
        registry.set_alias(settings, alias, version)
        progress(f"version {version} is now @{alias}")
    return {
        "version": version,
        "run_id": run.info.run_id,
        "alias": alias,
        "metrics": metrics,
        "rows": {"in": cleaned.rows_in, "usable": cleaned.rows_out, "train": len(train_rows), "test": len(test_rows)},
        "dropped": cleaned.dropped,
    }, fitted, test_rows


def train_candidate(settings: Settings, *, progress: Callable[[str], None] = lambda _msg: None) -> dict:
    """The training DAG's job: newest `datasets/train_V{n}.csv` → a registered version, made
    @candidate only when, on the same held-out rows, its median APE is not worse than
    production's by more than `settings.offline_margin` (relative)."""
    from abfleet import objects

    store = objects.open_store(settings)
    versions = objects.dataset_versions(store)
    if not versions:
        raise FileNotFoundError("no datasets/train_V{n}.csv in the object store: publish one with `abfleet data publish CSV`")
    n, key = versions[-1]
    with tempfile.TemporaryDirectory() as tmp:
        csv = store.get_file(key, Path(tmp) / Path(key).name)
        progress(f"newest dataset: {key}")
        result, fitted, test_rows = _train(settings, csv, alias=None, seed=0, params=None, rules=None, progress=progress)
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
    result["candidate_set"], result["reason"] = ok, reason
    if ok:
        registry.set_alias(settings, "candidate", result["version"])
        progress(f"version {result['version']} is now @candidate: {reason}")
    else:
        registry.tag_version(settings, result["version"], {"offline_rejected": reason})
        progress(f"version {result['version']} NOT made candidate: {reason}")
    return result
