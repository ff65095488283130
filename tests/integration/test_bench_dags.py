"""`abfleet bench dags --json` at small N on SQLite: both DAGs ran through dag.test() against
the filled store, every task succeeded or was skipped by its branch, and each task's
duration sits beside the execution_timeout read from the DAG (no timing assertion)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROWS = 20_000
ACTIONS = {"promote", "rollback", "keep_testing"}


def test_bench_dags_json(tmp_path):
    env = {**os.environ, "ABFLEET_RUN_DIR": str(tmp_path / "run")}
    env.pop("ABFLEET_BENCH_POSTGRES_URL", None)
    abfleet = str(Path(sys.executable).parent / "abfleet")
    done = subprocess.run([abfleet, "bench", "dags", "--rows", str(ROWS), "--json"], env=env, capture_output=True,
                          text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
    result = json.loads(done.stdout)
    print(json.dumps(result["dags"], indent=1))  # the figures, with -s
    assert result["ok"] is True and result["config"]["backend"] == "sqlite"
    assert result["loaded"]["predictions"] == ROWS
    assert set(result["dags"]) == {"evaluate_ab", "drift_monitoring"}

    for dag_id, dag in result["dags"].items():
        assert dag["state"] == "success" and dag["error"] is None, (dag_id, dag)
        assert dag["seconds"] > 0 and dag["peak_rss_mb"] > 0, dag
        for task, t in dag["tasks"].items():
            assert t["state"] in ("success", "skipped"), (dag_id, task, t)
            assert t["timeout_s"] is not None and t["timeout_s"] > 0, (dag_id, task, t)  # read from the DAG
            if t["state"] == "success":
                assert t["seconds"] > 0, (dag_id, task, t)
            assert t["within_timeout"] is True, (dag_id, task, t)

    evaluation = result["dags"]["evaluate_ab"]
    assert {"collect", "judge", "choose"} | ACTIONS == set(evaluation["tasks"])
    ran = [task for task in ACTIONS if evaluation["tasks"][task]["state"] == "success"]
    assert len(ran) == 1, evaluation["tasks"]  # the branch ran exactly one action
    decided = evaluation["outcome"]
    assert {"promote": "promote", "rollback": "rollback", "keep_testing": "continue"}[ran[0]] == decided["decision"]
    # The experiment started when the traffic did: the evaluation counted every row of both arms.
    assert sum(decided["arm_rows"].values()) == ROWS, decided

    drift = result["dags"]["drift_monitoring"]
    assert drift["tasks"]["check"]["state"] == "success"
    summary = drift["outcome"]
    assert 0.99 * ROWS <= summary["current_rows"] <= ROWS, summary  # the oldest minute may have left the window
    assert summary["sampled_rows"] == result["config"]["sample_rows"] and summary["drift_detected"] is False, summary

    assert not (Path(result["run_dir"]) / "store.db").exists()  # the scratch store is gone
