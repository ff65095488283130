"""The drift path end to end: production's training data from MLflow, logged traffic from
the store, Evidently's report in the object store, and the daily DAG run with dag.test()."""

from __future__ import annotations

import sqlite3
import uuid
from pathlib import Path

import numpy as np
import pytest
import requests

from abfleet import airflow_local, data, registry
from abfleet.model import FastPredictor
from abfleet.store import Store
from tests.helpers import answering, wait_for

pytestmark = pytest.mark.slow


def log_traffic(settings, frame) -> None:
    """Predictions as the servers log them: every fifth to the candidate arm (estimates by
    the production model, which is all the drift job compares)."""
    versions = registry.aliases(settings)
    predictor = FastPredictor(registry.load_model(settings, versions["production"]))
    store = Store(settings.db_url)
    store.init_schema()
    estimates = predictor.predict_many(frame)
    arm = ["candidate" if i % 5 == 0 and versions["candidate"] else "production" for i in range(len(frame))]
    store.record_predictions([
        {"id": uuid.uuid4().hex, "variant": a, "model_version": versions[a], "location": r.location,
         "total_sqft": float(r.total_sqft), "bhk": int(r.bhk), "bath": int(r.bath), "estimated_price": float(e),
         "latency_ms": 1.0, "user_id": "drift-test"}
        for r, e, a in zip(frame.itertuples(), estimates, arm)
    ])


def location_mix_and_area_shift(frame):
    """Only two of the model's inputs move: 35% of requests go to three mid-sized localities
    and every flat is 30% larger; bedrooms and bathrooms stay as they were."""
    rng = np.random.default_rng(0)
    localities = list(frame.location.value_counts().index[11:14])
    out = frame.copy()
    moved = rng.random(len(out)) < 0.35
    out.loc[moved, "location"] = rng.choice(localities, moved.sum())
    return out.assign(total_sqft=out["total_sqft"] * 1.3)


def triggered_training_runs(settings) -> int:
    db = airflow_local.airflow_home(settings) / "airflow.db"
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT count(*) FROM dag_run WHERE dag_id = 'train_candidate'").fetchone()[0]


@pytest.fixture
def webhook():
    """A receiver for the fleet's webhook: its URL and the requests it got."""
    with answering(200) as receiver:
        yield receiver


@pytest.fixture
def drift_settings(fleet, tmp_path, webhook):
    """The fleet's registry, with a store of its own so the traffic is exactly what we log."""
    return fleet.settings.replace(database_url=f"sqlite:///{tmp_path / 'drift-store.db'}", webhook_url=f"{webhook[0]}/hook")


def test_too_little_traffic_gives_no_verdict(drift_settings):
    from abfleet import drift

    log_traffic(drift_settings, data.clean(data.synth(600, seed=40)).frame.head(50))
    summary = drift.run(drift_settings)
    assert summary["drift_detected"] is None and "insufficient data" in summary["reason"]


def test_drift_dag_retrains_on_drift_and_not_otherwise(fleet, drift_settings, webhook):
    settings, (_url, received) = drift_settings, webhook
    same = data.clean(data.synth(4000, seed=41)).frame
    log_traffic(settings, same.head(1500))
    airflow_local.migrate(settings)
    before = triggered_training_runs(settings)
    out = airflow_local.test_dag(settings, "drift_monitoring").stdout
    summary = Store(settings.db_url).get_state("drift_summary")
    assert summary["drift_detected"] is False, summary
    assert triggered_training_runs(settings) == before, out[-3000:]
    assert received == [], "no drift, no notification"

    # Now most recent traffic asks about other localities and larger flats; nothing else moved.
    log_traffic(settings, location_mix_and_area_shift(data.clean(data.synth(20000, seed=42)).frame).head(4000))
    out = airflow_local.test_dag(settings, "drift_monitoring").stdout
    summary = Store(settings.db_url).get_state("drift_summary")
    assert summary["drift_detected"] is True and summary["verdict"] == "features", summary
    assert {"total_sqft", "location"} <= set(summary["drifted_columns"]), summary
    assert not {"bhk", "bath"} & set(summary["drifted_columns"]), summary
    assert summary["current_rows"] == 5500 and summary["sampled_rows"] == settings.pipeline_sample_rows
    # Every fifth request went to the candidate: both arms see the shift.
    assert summary["experiment"]["touched"] is True, summary["experiment"]
    assert triggered_training_runs(settings) == before + 1, out[-3000:]

    # The team is told: the report's link, the drifted columns and their scores.
    [note] = [r["json"] for r in received if r["path"] == "/hook"]
    assert note["event"] == "drift" and note["report"] == summary["report"]
    assert note["drifted_columns"] == summary["drifted_columns"]
    assert note["scores"]["location"]["score"] == summary["columns"]["location"]["score"]

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
