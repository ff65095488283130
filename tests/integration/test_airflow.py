"""The DAGs against the real fleet: once with `dag.test()`, once through `airflow standalone`."""

from __future__ import annotations

import pytest

from abfleet import airflow_local, procs, registry, stack
from tests.helpers import wait_for

pytestmark = pytest.mark.slow


def _new_decisions(fleet, seen: set) -> list[dict]:
    return [d for d in fleet.store.decision_history() if d["id"] not in seen]


def test_evaluate_dag_records_a_continue_on_a_fresh_fleet(fleet):
    settings = fleet.settings
    airflow_local.migrate(settings)
    assert (airflow_local.airflow_home(settings) / "airflow.db").exists()
    aliases = registry.aliases(settings)
    assert aliases == fleet.versions, "the fleet is no longer fresh: another test moved an alias"
    seen = {d["id"] for d in fleet.store.decision_history()}

    proc = airflow_local.test_dag(settings, "evaluate_ab")

    assert "of evaluate_ab finished success" in proc.stdout
    new = _new_decisions(fleet, seen)
    assert [(d["decision"], d["source"], d["applied"]) for d in new] == [("continue", "airflow", False)], new
    assert registry.aliases(settings) == aliases


def test_evaluate_dag_dry_run_records_nothing(fleet):
    seen = {d["id"] for d in fleet.store.decision_history()}
    proc = airflow_local.test_dag(fleet.settings, "evaluate_ab", conf={"dry_run": True})
    assert "dry_run=True" in proc.stdout
    assert _new_decisions(fleet, seen) == []


@pytest.fixture
def airflow_server(fleet):
    """Airflow started the way `abfleet up --with-airflow` starts it; stopped afterwards."""
    settings = fleet.settings
    svc = airflow_local.service(settings)
    already = stack.running_pid(settings, svc) is not None
    stack.up(settings, only=("airflow",), with_airflow=True, say=lambda _m: None)
    try:
        wait_for(lambda: airflow_local.healthy(settings), 180, 1.0, what="the Airflow scheduler")
        yield settings
    finally:
        if not already:
            procs.stop(stack.running_pid(settings, svc))
            (settings.run_dir / "pids" / "airflow.pid").unlink(missing_ok=True)


def _task_logs(settings, dag_id: str, run_id: str) -> str:
    folder = airflow_local.airflow_home(settings) / "logs" / f"dag_id={dag_id}" / f"run_id={run_id}"
    return "\n".join(f"--- {p.relative_to(folder)}\n{p.read_text()[-1500:]}" for p in sorted(folder.rglob("*.log")))


def test_standalone_runs_the_evaluation_on_trigger(fleet, airflow_server):
    settings = airflow_server
    for dag_id in ("train_candidate", "drift_monitoring", "evaluate_ab"):
        airflow_local.set_paused(settings, dag_id, dag_id != "evaluate_ab")
    seen = {d["id"] for d in fleet.store.decision_history()}

    run_id = airflow_local.trigger_dag(settings, "evaluate_ab", timeout=180)
    state = airflow_local.wait_for_run(settings, "evaluate_ab", run_id, timeout=600)

    assert state == "success", _task_logs(settings, "evaluate_ab", run_id)
    new = _new_decisions(fleet, seen)
    # An hourly run may also have fired meanwhile; each of them decides "continue" too.
    assert new and {(d["decision"], d["source"]) for d in new} == {("continue", "airflow")}, new
    assert registry.aliases(settings) == fleet.versions
    # ...and `abfleet history` shows it.
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    out = subprocess.run([str(Path(sys.executable).parent / "abfleet"), "history", "--json"], capture_output=True,
                         text=True, env={**os.environ, **settings.env()}, check=True).stdout
    listed = {d["id"] for d in json.loads(out)["decisions"]}
    assert {d["id"] for d in new} <= listed
