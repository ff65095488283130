"""Every file in dags/ parses cleanly, cheaply and without touching connections or variables.

Airflow is imported only in a child process: in this one it would reconfigure logging, and
its lazy deprecated attributes warn whenever a library scans `sys.modules` (skops does).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DAG_FILES = sorted(p for p in (ROOT / "dags").glob("*.py") if not p.name.startswith("_"))

# The schedules DESIGN.md promises.
SCHEDULES = {"evaluate_ab": "@hourly", "train_candidate": "@weekly", "drift_monitoring": "@daily"}
# What a DAG file must not import at parse time (task bodies import them).
HEAVY = ["mlflow", "sklearn", "pandas", "evidently", "abfleet.evaluation", "abfleet.train", "abfleet.drift"]

# Runs in the child: parse each file given, describe its DAGs as JSON, then probe the
# evaluation DAG's gate by calling its task functions directly.
_PARSE = r"""
import json, sys
from pathlib import Path
from airflow.models import DagBag
from airflow.sdk import BaseHook, Connection, Variable

def forbid(what):
    def fail(cls, *args, **kwargs):
        raise AssertionError(f"{what} {args[:1]} looked up at parse time: do it inside a task")
    return classmethod(fail)

# A look-up at import time hits the metadata database on every parse: make it an import error.
BaseHook.get_connection = forbid("connection")
Connection.get = forbid("connection")
Variable.get = forbid("variable")

def outcome(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"

heavy, paths = json.loads(sys.argv[1]), [Path(p) for p in sys.argv[2:]]
files, bags = {}, {}
for path in paths:
    bag = DagBag(dag_folder=str(path), safe_mode=False)
    bags.update(bag.dags)
    files[path.name] = {"errors": bag.import_errors, "dags": {
        dag_id: {
            "schedule": dag.schedule if isinstance(dag.schedule, str) else repr(dag.schedule),
            "catchup": dag.catchup,
            "max_active_runs": dag.max_active_runs,
            "start_date": dag.start_date.isoformat() if dag.start_date else None,
            "tags": sorted(dag.tags),
            "doc": bool(dag.doc_md or dag.description),
            "downstream": {t.task_id: sorted(t.downstream_task_ids) for t in dag.tasks},
        } for dag_id, dag in bag.dags.items()}}
imported = [m for m in heavy if m in sys.modules]

probes = {}
if "evaluate_ab" in bags:
    task = bags["evaluate_ab"].get_task
    probes["branch"] = {d: outcome(task("choose").python_callable, {"decision": d, "reasons": []})
                        for d in ("promote", "rollback", "continue", "advance")}
    wrong = {"promote": "continue", "rollback": "promote", "keep_testing": "rollback"}
    probes["guards"] = {a: outcome(task(a).python_callable, {}, {"decision": d, "reasons": []}, params={"dry_run": True})
                        for a, d in wrong.items()}
print(json.dumps({"files": files, "heavy": imported, "probes": probes}, default=str))
"""


def parse(paths: list[Path], home: Path) -> dict:
    """Parse the files in a fresh interpreter under a throwaway AIRFLOW_HOME, examples off."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")},
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
    }
    proc = subprocess.run([sys.executable, "-c", _PARSE, json.dumps(HEAVY), *map(str, paths)],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def parsed(tmp_path_factory) -> dict:
    return parse(DAG_FILES, tmp_path_factory.mktemp("airflow-home"))


@pytest.mark.parametrize("path", DAG_FILES, ids=[p.name for p in DAG_FILES])
def test_dag_file_imports_and_declares_its_schedule(parsed, path):
    result = parsed["files"][path.name]
    assert not result["errors"], result["errors"]
    assert result["dags"], f"{path.name} defines no DAG"
    for dag_id, dag in result["dags"].items():
        assert dag_id in SCHEDULES, f"{dag_id}: add its promised schedule to SCHEDULES"
        assert dag["schedule"] == SCHEDULES[dag_id], dag_id
        assert dag["catchup"] is False, dag_id
        assert dag["start_date"] and dt.datetime.fromisoformat(dag["start_date"]) < dt.datetime.now(dt.timezone.utc)
        assert "abfleet" in dag["tags"], dag_id
        assert dag["doc"], f"{dag_id} has no docstring"


def test_parsing_leaves_heavy_libraries_to_the_tasks(parsed):
    assert parsed["heavy"] == [], f"imported at parse time: {parsed['heavy']}"


def test_a_parse_time_connection_lookup_is_caught(tmp_path):
    bad = tmp_path / "bad_dag.py"
    bad.write_text(
        "import pendulum\n"
        "from airflow.sdk import BaseHook, dag, task\n"
        "URL = BaseHook.get_connection('prometheus').host\n"
        "@dag(dag_id='bad', schedule=None, start_date=pendulum.datetime(2025, 1, 1, tz='UTC'))\n"
        "def bad():\n"
        "    @task\n"
        "    def noop():\n"
        "        pass\n"
        "    noop()\n"
        "bad()\n"
    )
    errors = parse([bad], tmp_path / "home")["files"]["bad_dag.py"]["errors"]
    assert errors and "looked up at parse time" in next(iter(errors.values()))


# ---- the evaluation DAG's shape and its promotion gate --------------------------------

def test_evaluate_ab_runs_exactly_one_action_after_the_decision(parsed):
    dag = parsed["files"]["evaluate_ab_dag.py"]["dags"]["evaluate_ab"]
    actions = ["keep_testing", "promote", "rollback"]
    assert dag["max_active_runs"] == 1
    assert dag["downstream"] == {
        "collect": sorted(["judge", *actions]),
        "judge": sorted(["choose", *actions]),
        "choose": actions,
        **{a: [] for a in actions},
    }


def test_the_branch_routes_each_decision_to_its_action(parsed):
    branch = parsed["probes"]["branch"]
    assert {d: branch[d] for d in ("promote", "rollback", "continue")} == {
        "promote": "promote", "rollback": "rollback", "continue": "keep_testing"}
    assert branch["advance"].startswith("ValueError: unknown decision")


def test_an_action_task_never_acts_on_another_decision(parsed):
    for action, result in parsed["probes"]["guards"].items():
        assert isinstance(result, str) and result.startswith("ValueError") and "got decision" in result, (action, result)


def test_train_candidate_trains_then_reports(parsed):
    dag = parsed["files"]["train_candidate_dag.py"]["dags"]["train_candidate"]
    assert dag["downstream"] == {"train": ["report"], "report": []}
    assert dag["max_active_runs"] == 1
