"""train_candidate: train on the newest dataset and offer the result as @candidate."""

from __future__ import annotations

import datetime

import pendulum

from airflow.sdk import Param, dag, task
from airflow.sdk.exceptions import AirflowSkipException


@dag(
    dag_id="train_candidate",
    schedule="@weekly",
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["abfleet"],
    params={"force": Param(False, type="boolean",
                           description="replace @candidate even when its experiment is younger than the minimum run")},
    default_args={"retries": 0, "execution_timeout": datetime.timedelta(hours=1)},
)
def train_candidate():
    """
    ### Train a candidate

    Weekly, on demand, or when the drift DAG triggers it (`TriggerDagRunOperator` with
    `trigger_dag_id="train_candidate"`, optionally `conf={"reason": "..."}`).
    `train` fits a model on the newest dataset in the object store, compares it offline
    with production, registers it, and sets @candidate only when it is not worse by more
    than the configured margin. A running experiment younger than its minimum run keeps its
    candidate (the new version is registered and tagged `candidate_deferred`) unless the run
    is triggered with `{"force": true}`; so a drift-triggered retrain never resets a young
    experiment. `report` says what happened and why. With no dataset in the object store
    the run ends skipped, the reason in `train`'s log, rather than failed.
    """

    @task
    def train(params=None) -> dict:
        """`abfleet.train.train_candidate`: the registered version and whether it became
        @candidate; skipped, with the reason, when the object store holds no dataset yet."""
        from abfleet import objects
        from abfleet import train as training
        from abfleet.settings import Settings

        force = bool((params or {}).get("force"))
        try:
            return training.train_candidate(Settings.from_env(), force=force, progress=print)
        except objects.NoDataset as exc:
            raise AirflowSkipException(f"nothing to train on: {exc}") from None

    @task
    def report(result: dict, dag_run=None) -> dict:
        """One line for the log, the result for XCom."""
        reason = (dag_run.conf or {}).get("reason") if dag_run is not None else None
        verdict = "now @candidate" if result.get("candidate_set") else "not offered as @candidate"
        print(f"version {result.get('version')} {verdict}: {result.get('reason')}"
              + (f" (run reason: {reason})" if reason else ""))
        return {**result, "run_reason": reason}

    report(train())


train_candidate()
