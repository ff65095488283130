"""The drift path end to end: production's training data from MLflow, logged traffic from
the store, Evidently's report in the object store, and the daily DAG run with dag.test()."""

from __future__ import annotations

import sqlite3
import uuid
from pathlib import Path

import pytest
import requests

from abfleet import airflow_local, data, registry
from abfleet.model import FastPredictor
from abfleet.store import Store
from tests.helpers import wait_for

pytestmark = pytest.mark.slow


def log_traffic(settings, frame) -> None:
    """Predictions as the servers log them, made by the production model."""
    version = registry.version_for(settings, "production")
    predictor = FastPredictor(registry.load_model(settings, version))
    store = Store(settings.db_url)
    store.init_schema()
    estimates = predictor.predict_many(frame)
    store.record_predictions([
        {"id": uuid.uuid4().hex, "variant": "production", "model_version": version, "location": r.location,
         "total_sqft": float(r.total_sqft), "bhk": int(r.bhk), "bath": int(r.bath), "estimated_price": float(e),
         "latency_ms": 1.0, "user_id": "drift-test"}
        for r, e in zip(frame.itertuples(), estimates)
    ])


def drifted(frame):
    out = frame[frame.location.isin(frame.location.value_counts().index[:5])].copy()
    out["total_sqft"] = out["total_sqft"] * 1.5
    return out


def triggered_training_runs(settings) -> int:
    db = airflow_local.airflow_home(settings) / "airflow.db"
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT count(*) FROM dag_run WHERE dag_id = 'train_candidate'").fetchone()[0]


@pytest.fixture
def drift_settings(fleet, tmp_path):
    """The fleet's registry, with a store of its own so the traffic is exactly what we log."""
    return fleet.settings.replace(database_url=f"sqlite:///{tmp_path / 'drift-store.db'}")


def test_too_little_traffic_gives_no_verdict(drift_settings):
    from abfleet import drift

    log_traffic(drift_settings, data.clean(data.synth(600, seed=40)).frame.head(50))
    summary = drift.run(drift_settings)
    assert summary["drift_detected"] is None and "insufficient data" in summary["reason"]


def test_drift_dag_retrains_on_drift_and_not_otherwise(fleet, drift_settings):
    settings = drift_settings
    same = data.clean(data.synth(4000, seed=41)).frame
    log_traffic(settings, same.head(1500))
    airflow_local.migrate(settings)
    before = triggered_training_runs(settings)
    out = airflow_local.test_dag(settings, "drift_monitoring").stdout
    summary = Store(settings.db_url).get_state("drift_summary")
    assert summary["drift_detected"] is False, summary
    assert triggered_training_runs(settings) == before, out[-3000:]

    # Now most recent traffic is for bigger flats in a few places.
    log_traffic(settings, drifted(data.clean(data.synth(20000, seed=42)).frame).head(4000))
    out = airflow_local.test_dag(settings, "drift_monitoring").stdout
    summary = Store(settings.db_url).get_state("drift_summary")
    assert summary["drift_detected"] is True, summary
    assert {"total_sqft", "location"} <= set(summary["drifted_columns"])
    assert triggered_training_runs(settings) == before + 1, out[-3000:]

    # The stored report is Evidently's HTML and names the drifted columns.
    assert summary["report"].startswith("file://") and "/drift/" in summary["report"]
    html = Path(summary["report"].removeprefix("file://")).read_text(encoding="utf-8")
    assert "Evidently" in html and "total_sqft" in html and "location" in html


def test_api_serves_the_latest_drift_summary(fleet):
    from abfleet.store import Store as FleetStore

    store = FleetStore(fleet.settings.db_url)
    store.set_state("drift_summary", {"drift_detected": True, "share_drifted": 0.6, "drifted_columns": ["bhk"],
                                      "columns": {"bhk": {"test": "t", "score": 0.3, "drifted": True}}, "report": "x"})
    r = requests.get(f"{fleet.router_url}/api/drift_report", timeout=10)
    assert r.status_code == 200 and r.json()["drifted_columns"] == ["bhk"]
    # The servers read the store's fleet state on a background thread, never on a scrape.
    exported = ("abfleet_drift_detected 1.0", 'abfleet_drift_column_score{column="bhk"} 0.3')
    wait_for(lambda: all(line in fleet.metrics_text("production") for line in exported), 30, 0.5,
             what="the production server to export the new drift summary")
