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
    }
