"""A DAG that cannot run for lack of data ends skipped with the reason, not failed: the
training DAG before any dataset is published, the drift DAG before any @production model."""

from __future__ import annotations

import sqlite3

import pytest

from abfleet import airflow_local

pytestmark = pytest.mark.slow


def task_states(settings, dag_id: str) -> dict[str, str]:
    with sqlite3.connect(airflow_local.airflow_home(settings) / "airflow.db") as conn:
        return dict(conn.execute("SELECT task_id, state FROM task_instance WHERE dag_id = ?", (dag_id,)).fetchall())


def test_without_data_the_dags_end_skipped_with_the_reason(fleet, tmp_path):
    # The fleet's MLflow, but a model nobody registered and a run directory (object store,
    # prediction store, Airflow) of its own: no dataset, no @production.
    settings = fleet.settings.replace(run_dir=tmp_path / "run", model_name="never-registered", database_url="")

    out = airflow_local.test_dag(settings, "train_candidate").stdout
    assert "of train_candidate finished success" in out
    assert "nothing to train on: no datasets/train_V{n}.csv in the object store" in out, out[-3000:]
    assert task_states(settings, "train_candidate") == {"train": "skipped", "report": "skipped"}

    out = airflow_local.test_dag(settings, "drift_monitoring").stdout
    assert "of drift_monitoring finished success" in out
    assert "no drift check: no @production model" in out, out[-3000:]
    states = task_states(settings, "drift_monitoring")
    assert states["check"] == "skipped" and set(states.values()) == {"skipped"}, states
