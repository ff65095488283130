"""The local Airflow of `abfleet up --with-airflow`: one `airflow standalone` on loopback.

Airflow keeps its home (config, SQLite metadata database, logs) under the run directory
and reads the repository's `dags/`. Its tasks inherit the fleet's settings as environment
variables, so a DAG run talks to the same registry, store and Prometheus as the CLI does.

This module never imports Airflow: importing it fixes AIRFLOW_HOME for the whole process.
Airflow runs in child processes with `airflow_env(settings)`.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import requests

from abfleet.procs import ProcessError, Service, child_env, venv_bin
from abfleet.settings import Settings, project_root

# The local stack's Airflow login: it listens on loopback only (SimpleAuthManager, dev-only).
ADMIN_USER = "admin"
ADMIN_PASSWORD = "admin"
SIMPLE_AUTH_MANAGER = "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"
FINAL_STATES = ("success", "failed")


class AirflowLocalError(ProcessError):
    """Airflow did not do what was asked; the message says what it answered."""


# ---- where and how Airflow runs ------------------------------------------------------

def airflow_home(settings: Settings) -> Path:
    return settings.run_dir / "airflow"


def dags_folder() -> Path:
    return project_root() / "dags"


def airflow_env(settings: Settings) -> dict[str, str]:
    """Environment for every Airflow process: Airflow's configuration plus the fleet's settings."""
    home = airflow_home(settings)
    base = settings.airflow_url
    return {
        **settings.env(),
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(dags_folder()),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        "AIRFLOW__API__HOST": settings.host,
        "AIRFLOW__API__PORT": str(settings.airflow_port),
        # Task processes reach the API server here; Airflow's default assumes :8080.
        "AIRFLOW__API__BASE_URL": base,
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{base}/execution/",
        # One LocalExecutor worker process per slot, all started at once: a few are plenty here.
        "AIRFLOW__CORE__PARALLELISM": "4",
        # Task logs are read from local files; port 0 keeps the log servers off fixed ports
        # (8793/8794 by default), so two local Airflows never collide.
        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": "0",
        "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": "0",
        "AIRFLOW__CORE__AUTH_MANAGER": SIMPLE_AUTH_MANAGER,
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{ADMIN_USER}:admin",
        # A password file written by us: otherwise Airflow generates a random password.
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(home / "passwords.json"),
    }


def prepare(settings: Settings) -> Path:
    """Create Airflow's home and the local login's password file; return the home."""
    home = airflow_home(settings)
    home.mkdir(parents=True, exist_ok=True)
    passwords = home / "passwords.json"
    try:
        current = json.loads(passwords.read_text() or "{}")
    except (OSError, ValueError):
        current = {}
    if current.get(ADMIN_USER) != ADMIN_PASSWORD:
        passwords.write_text(json.dumps({**current, ADMIN_USER: ADMIN_PASSWORD}) + "\n")
        passwords.chmod(0o600)
    return home


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def _cause(text: str) -> str:
    """The last exception line of a traceback in the output, or ""."""
    found = re.findall(r"^[\w.]+(?:Error|Exception|Exit|Interrupt): .*$", text, re.M)
    return f": {found[-1][:300]}" if found else ""


def migrate(settings: Settings, *, timeout: float = 300.0) -> None:
    """`airflow db migrate` on the local metadata database, once per Airflow version."""
    home = prepare(settings)
    stamp = home / ".migrated"
    version = metadata.version("apache-airflow-core")
    if (home / "airflow.db").exists() and stamp.exists() and stamp.read_text().strip() == version:
        return
    proc = subprocess.run(
        [venv_bin("airflow"), "db", "migrate"], env=child_env(settings, airflow_env(settings)), cwd=project_root(),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout,
    )
    if proc.returncode != 0:
        raise AirflowLocalError(f"`airflow db migrate` failed (exit {proc.returncode}):\n{_tail(proc.stdout)}")
    stamp.write_text(version + "\n")


def service(settings: Settings) -> Service:
    """`airflow standalone` (API server, scheduler, DAG processor, triggerer) as a stack service.

    Start it after `migrate(settings)`; its health URL answers as soon as the API server
    is up, while the scheduler may still be starting (`healthy(settings)` tells).
    """
    prepare(settings)
    return Service(
        "airflow", settings.airflow_port, [venv_bin("airflow"), "standalone"],
        f"{settings.airflow_url}/api/v2/monitor/health", "airflow standalone",
        env=airflow_env(settings), timeout=240,
    )


# ---- the REST API ------------------------------------------------------------------

def token(settings: Settings) -> str:
    """A JWT for the local admin (`POST /auth/token`)."""
    r = requests.post(f"{settings.airflow_url}/auth/token",
                      json={"username": ADMIN_USER, "password": ADMIN_PASSWORD}, timeout=30)
    if r.status_code != 201:
        raise AirflowLocalError(f"Airflow refused the login at {settings.airflow_url}: {r.status_code} {r.text[:200]}")
    return r.json()["access_token"]


def _session(settings: Settings) -> requests.Session:
    s = requests.Session()
    s.headers["Authorization"] = f"Bearer {token(settings)}"
    return s


def _check(r: requests.Response, what: str) -> dict:
    if r.status_code >= 400:
        raise AirflowLocalError(f"Airflow refused to {what}: {r.status_code} {r.text[:300]}")
    return r.json()


def _write(s: requests.Session, method: str, url: str, body: dict, what: str, tries: int = 6) -> dict:
    """A write through the API, retried while SQLite is busy: Airflow's own tasks hold its
    single writer lock for seconds, and the API then answers 500 ("database is locked")."""
    for attempt in range(tries):
        r = s.request(method, url, json=body, timeout=30)
        if r.status_code < 500 or attempt == tries - 1:
            return _check(r, what)
        time.sleep(2)
    raise AssertionError("unreachable")


def healthy(settings: Settings) -> bool:
    """True when the API server answers and the metadata database and scheduler are healthy."""
    try:
        body = requests.get(f"{settings.airflow_url}/api/v2/monitor/health", timeout=5).json()
    except (requests.RequestException, ValueError):
        return False
    return all((body.get(part) or {}).get("status") == "healthy" for part in ("metadatabase", "scheduler"))


def wait_for_dag(settings: Settings, dag_id: str, *, timeout: float = 120.0, session: requests.Session | None = None) -> dict:
    """The DAG as the API knows it, once the DAG processor has parsed it."""
    s = session or _session(settings)
    deadline = time.monotonic() + timeout
    while True:
        r = s.get(f"{settings.airflow_url}/api/v2/dags/{dag_id}", timeout=30)
        if r.status_code != 404 or time.monotonic() > deadline:
            return _check(r, f"show DAG {dag_id} (is it in {dags_folder()}?)")
        time.sleep(2)


def set_paused(settings: Settings, dag_id: str, paused: bool) -> None:
    s = _session(settings)
    wait_for_dag(settings, dag_id, session=s)
    _write(s, "PATCH", f"{settings.airflow_url}/api/v2/dags/{dag_id}", {"is_paused": paused},
           f"{'pause' if paused else 'unpause'} {dag_id}")


def trigger_dag(settings: Settings, dag_id: str, conf: dict | None = None, *, timeout: float = 120.0) -> str:
    """Start a manual run (waiting up to `timeout` for the DAG to be parsed); return its run id."""
    s = _session(settings)
    wait_for_dag(settings, dag_id, timeout=timeout, session=s)
    body = {"logical_date": None, "conf": conf or {}}
    run = _write(s, "POST", f"{settings.airflow_url}/api/v2/dags/{dag_id}/dagRuns", body, f"trigger {dag_id}")
    return run["dag_run_id"]


def wait_for_run(settings: Settings, dag_id: str, run_id: str, timeout: float = 600.0) -> str:
    """Poll a run until it ends; return its final state ("success" or "failed")."""
    s = _session(settings)
    url = f"{settings.airflow_url}/api/v2/dags/{dag_id}/dagRuns/{run_id}"
    deadline = time.monotonic() + timeout
    state = None
    while time.monotonic() < deadline:
        r = s.get(url, timeout=30)
        if r.status_code == 401:  # the token expired during a long run
            s = _session(settings)
            continue
        state = _check(r, f"show run {run_id} of {dag_id}")["state"]
        if state in FINAL_STATES:
            return state
        time.sleep(2)
    paused = wait_for_dag(settings, dag_id, timeout=0, session=s).get("is_paused")
    raise AirflowLocalError(f"run {run_id} of {dag_id} still {state} after {timeout:.0f}s"
                            + (" (the DAG is paused)" if paused else ""))


def dag_ids() -> list[str]:
    """The project's DAGs: one `dags/<id>_dag.py` each."""
    return sorted(p.name.removesuffix("_dag.py") for p in dags_folder().glob("*_dag.py"))


def _skip_reason(s: requests.Session, url: str, try_number: int) -> str | None:
    """The reason a task that ran gave for skipping itself (AirflowSkipException), from its log."""
    r = s.get(f"{url}/logs/{try_number}", headers={"Accept": "application/json"}, timeout=30)
    if r.status_code != 200:
        return None
    events = [e for e in (r.json().get("content") or []) if isinstance(e, dict) and e.get("reason")]
    return str(events[-1]["reason"]) if events else None


def latest_runs(settings: Settings) -> dict[str, dict | None]:
    """Each DAG's latest run as the REST API reports it: {"run_id", "state", "tasks": {task:
    state}, "skipped": {task: reason}} (tasks that ran and skipped themselves, with the reason
    from their log; a branch's unchosen tasks never ran and are not listed there); None for a
    DAG without a run yet or not parsed yet."""
    s = _session(settings)
    base = f"{settings.airflow_url}/api/v2/dags"
    out: dict[str, dict | None] = {}
    for dag_id in dag_ids():
        r = s.get(f"{base}/{dag_id}/dagRuns", params={"order_by": "-run_after", "limit": 1}, timeout=30)
        runs = [] if r.status_code == 404 else _check(r, f"list the runs of {dag_id}")["dag_runs"]
        if not runs:
            out[dag_id] = None
            continue
        run = runs[0]
        url = f"{base}/{dag_id}/dagRuns/{run['dag_run_id']}/taskInstances"
        tasks = _check(s.get(url, timeout=30), f"list the tasks of {run['dag_run_id']}")["task_instances"]
        out[dag_id] = {"run_id": run["dag_run_id"], "run_type": run.get("run_type"), "state": run["state"],
                       "tasks": {t["task_id"]: t["state"] for t in tasks},
                       "skipped": {t["task_id"]: _skip_reason(s, f"{url}/{t['task_id']}", t["try_number"])
                                   for t in tasks if t["state"] == "skipped" and t["try_number"] > 0}}
    return out


# ---- dag.test() ----------------------------------------------------------------------

# Runs in a child process with airflow_env(): parse one DAG file, run the DAG in-process.
_TEST_SCRIPT = """
import json, sys
from airflow.dag_processing.dagbag import DagBag

path, dag_id, conf = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
bag = DagBag(dag_folder=path, safe_mode=False)
if bag.import_errors:
    sys.exit("import errors: " + json.dumps(bag.import_errors, indent=1))
if not dag_id and len(bag.dags) == 1:
    dag_id = next(iter(bag.dags))
if dag_id not in bag.dags:
    sys.exit(f"no DAG {dag_id!r} in {path}: found {sorted(bag.dags)}")
run = bag.dags[dag_id].test(run_conf=conf or None)
state = str(getattr(run.state, "value", run.state))
print(f"abfleet: dag run {run.run_id} of {dag_id} finished {state}", flush=True)
sys.exit(0 if state == "success" else 1)
"""


def dag_file(dag_file_or_id: str | Path) -> tuple[Path, str]:
    """(file, dag id or "") for a DAG file path or a DAG id (`dags/<id>_dag.py`, else the folder)."""
    candidate = Path(dag_file_or_id)
    if candidate.suffix == ".py" and candidate.exists():
        return candidate.resolve(), ""
    by_name = dags_folder() / f"{dag_file_or_id}_dag.py"
    return (by_name if by_name.exists() else dags_folder()), str(dag_file_or_id)


def test_dag(settings: Settings, dag_file_or_id: str | Path, conf: dict | None = None, *,
             timeout: float = 900.0) -> subprocess.CompletedProcess:
    """Run one DAG end to end with `dag.test()` in a child process; its output is in `.stdout`.

    Migrates the metadata database first when needed; raises AirflowLocalError with the
    tail of the output when the run does not succeed.
    """
    migrate(settings)
    path, dag_id = dag_file(dag_file_or_id)
    env = child_env(settings, airflow_env(settings))
    if path.is_file() and path.parent != dags_folder():
        # dag.test() serialises the DAGs of the configured DAGs folder, not the file it was given.
        env["AIRFLOW__CORE__DAGS_FOLDER"] = str(path.parent)
    proc = subprocess.run(
        [sys.executable, "-c", _TEST_SCRIPT, str(path), dag_id, json.dumps(conf or {})],
        env=env, cwd=project_root(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, timeout=timeout,
    )
    if proc.returncode != 0:
        raise AirflowLocalError(f"dag.test() of {dag_id or path} failed (exit {proc.returncode}){_cause(proc.stdout)}\n"
                                f"{_tail(proc.stdout)}")
    return proc


test_dag.__test__ = False  # not a pytest test, even when a test module imports it


# Runs in a child process with airflow_env(): each task's execution_timeout as the DAG declares it.
_TIMEOUTS_SCRIPT = """
import json, sys
from airflow.dag_processing.dagbag import DagBag

path, dag_id = sys.argv[1], sys.argv[2]
bag = DagBag(dag_folder=path, safe_mode=False)
dag = bag.dags.get(dag_id) or sys.exit(f"no DAG {dag_id!r} in {path}: {bag.import_errors or sorted(bag.dags)}")
timeouts = {t.task_id: t.execution_timeout.total_seconds() if t.execution_timeout else None for t in dag.tasks}
print(json.dumps(timeouts))
"""


def task_timeouts(settings: Settings, dag_id: str, *, timeout: float = 300.0) -> dict[str, float | None]:
    """task id → its execution_timeout in seconds (None: no limit), read from the parsed DAG."""
    path, _ = dag_file(dag_id)
    proc = subprocess.run([sys.executable, "-c", _TIMEOUTS_SCRIPT, str(path), dag_id],
                          env=child_env(settings, airflow_env(settings)), cwd=project_root(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AirflowLocalError(f"could not read the tasks of {dag_id}{_cause(proc.stderr)}\n{_tail(proc.stderr)}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def task_runs(settings: Settings, dag_id: str, run_id: str) -> dict[str, dict]:
    """task id → {"state", "seconds"} of one run, from the local metadata database (the one
    dag.test() writes to)."""
    import sqlite3

    with contextlib.closing(sqlite3.connect(airflow_home(settings) / "airflow.db")) as conn:
        rows = conn.execute("SELECT task_id, state, duration FROM task_instance WHERE dag_id = ? AND run_id = ?",
                            (dag_id, run_id)).fetchall()
    return {task: {"state": state, "seconds": duration} for task, state, duration in rows}
