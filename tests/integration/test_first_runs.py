"""Out of the box, as a new user: what `make demo` runs (`python -m abfleet.demo`), then
`abfleet up --with-airflow`. Every DAG's first run ends in success, each of its tasks
succeeded or was skipped (a task that skipped itself says why), none failed; checked through
Airflow's REST API, as `abfleet status` reports it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from abfleet import airflow_local
from abfleet.settings import process_environ
from tests.helpers import fleet_settings, wait_for

pytestmark = pytest.mark.slow

ABFLEET = str(Path(sys.executable).parent / "abfleet")


def _all_ended(settings) -> dict | None:
    runs = airflow_local.latest_runs(settings)
    return runs if all(run and run["state"] in airflow_local.FINAL_STATES for run in runs.values()) else None


def test_demo_then_up_with_airflow_every_first_run_succeeds_or_skips(tmp_path):
    settings = fleet_settings(tmp_path / "run")
    env = process_environ(settings.env())

    def abfleet(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run(args, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)

    try:
        # Not on a terminal, the demo stops its stack at the end, as it does in CI.
        demo = abfleet(sys.executable, "-m", "abfleet.demo", timeout=900)
        assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
        assert "airflow " not in demo.stdout and not (airflow_local.airflow_home(settings) / "airflow.db").exists(), \
            "the demo started Airflow: only --with-airflow does"
        up = abfleet(ABFLEET, "up", "--with-airflow")
        assert up.returncode == 0, up.stderr[-3000:]

        runs = wait_for(lambda: _all_ended(settings), 600, 5.0, what="every DAG's first run to end")
        print(json.dumps(runs, indent=1))
        assert set(runs) == {"evaluate_ab", "drift_monitoring", "train_candidate"}
        for dag_id, run in runs.items():
            assert run["state"] == "success", (dag_id, run)
            assert set(run["tasks"].values()) <= {"success", "skipped"}, (dag_id, run)
            assert all(run["skipped"].values()), ("a task skipped itself without a reason", dag_id, run)
        # The demo trained both models and published a dataset: the first runs do real work.
        assert runs["train_candidate"]["tasks"]["train"] == "success", runs["train_candidate"]
        assert runs["drift_monitoring"]["tasks"]["check"] == "success", runs["drift_monitoring"]

        status = abfleet(ABFLEET, "status", "--json")
        assert status.returncode == 0, status.stderr[-3000:]
        reported = json.loads(status.stdout)["dags"]
        assert {dag_id: run["state"] for dag_id, run in reported.items()} == {d: "success" for d in runs}
    finally:
        abfleet(ABFLEET, "down")
