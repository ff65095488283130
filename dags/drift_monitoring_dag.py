"""drift_monitoring: daily Evidently check of recent traffic against production's training data."""

from __future__ import annotations

import datetime

import pendulum

from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import dag, task
from airflow.sdk.exceptions import AirflowSkipException


@dag(
    dag_id="drift_monitoring",
    schedule="@daily",
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["abfleet"],
    default_args={"retries": 0, "execution_timeout": datetime.timedelta(minutes=30)},
)
def drift_monitoring():
    """
    ### Daily drift check

    `check` compares the prediction inputs (and estimates, and reported actual prices) of
    the last days with the production model's training data using Evidently's
    `DataDriftPreset`; the HTML report goes to the object store under a dated key and the
    summary to the store (`GET /api/drift_report`, Prometheus gauges). Drift → `retrain`
    triggers `train_candidate` and `notify` calls the webhook; no drift, or too little
    data for a verdict → `done`. With no @production model yet the run ends skipped, with
    the reason, rather than failed.
    """

    @task
    def check() -> dict:
        """The drift summary (`drift_detected` is None when there is too little data)."""
        from abfleet import drift
        from abfleet.settings import Settings

        try:
            summary = drift.run(Settings.from_env())
        except drift.NoReference as exc:
            raise AirflowSkipException(f"no drift check: {exc}") from None
        verdict = {True: "DRIFT", False: "no drift", None: f"no verdict ({summary.get('reason')})"}[summary["drift_detected"]]
        print(f"{verdict} ({summary['verdict']} verdict); drifted columns: {summary['drifted_columns']}; "
              f"prediction drift: {summary['prediction_drift']}; target drift: {summary['target_drift']}; "
              f"experiment touched: {summary['experiment'].get('touched')}; report: {summary['report']}")
        return summary

    @task.branch
    def choose(summary: dict) -> list[str]:
        """Only detected drift leads to retraining."""
        return ["retrain", "notify"] if summary["drift_detected"] else ["done"]

    @task
    def notify(summary: dict) -> str | None:
        """Tell the team through the webhook (when one is configured): the report's link, the
        drifted columns and their scores, and whether the running experiment sees the drift."""
        from abfleet import drift, fleet
        from abfleet.settings import Settings

        return fleet.notify(Settings.from_env(), drift.notification(summary))

    @task
    def done(summary: dict) -> None:
        """Nothing to do."""

    retrain = TriggerDagRunOperator(
        task_id="retrain",
        trigger_dag_id="train_candidate",
        conf={"reason": "drift detected by drift_monitoring"},
    )
    summary = check()
    choose(summary) >> [retrain, notify(summary), done(summary)]


drift_monitoring()
