"""The DAG benchmark (`abfleet bench dags --rows N`): the hourly evaluation and the daily
drift DAG, run with `dag.test()` against a store of N predictions.

It brings up what the two DAGs read, on ports and in a run directory of its own
(<run_dir>/bench/dags-<time>/): MLflow with a trained @production (version 1) and @candidate
(version 2) whose experiment started a week ago, Prometheus (which scrapes no model server
here, so the evaluation finds no request counts, reports that as a problem and decides
"continue"; without a Prometheus binary it cannot reach one, with the same outcome), and a
store filled with N predictions over that week and their feedback by
`bench_pipeline.fill` (an SQLite file, or with --postgres a scratch database on that server,
dropped afterwards). Then `evaluate_ab` and `drift_monitoring` each run once through
`airflow_local.test_dag`, in a child process of their own, and the result says per task its
state, its duration and the execution_timeout the DAG gives it, with the peak resident
memory of the dag.test() process (all tasks run in it) and what each DAG concluded.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import re
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from abfleet import airflow_local, bench_pipeline, data, registry, stack, train
from abfleet.bench import machine
from abfleet.procs import free_port
from abfleet.settings import VARIANTS, Settings, process_environ
from abfleet.store import Store, open_store

DAGS = ("evaluate_ab", "drift_monitoring")
TRAIN_ROWS = 6000  # synthetic rows each model is trained on
FINAL = ("success", "skipped")
_RUN_LINE = re.compile(r"abfleet: dag run (\S+) of (\S+) finished (\w+)")


def isolated(settings: Settings, run_dir: Path, database_url: str) -> Settings:
    """The settings with every place and port the bench writes to or listens on its own: the
    fleet's registry, object store, Prometheus, webhook and servers are never touched."""
    ports = {name: free_port(settings.host) for name in
             ("router_port", "production_port", "candidate_port", "mlflow_port", "prometheus_port",
              "alertmanager_port", "airflow_port")}
    return settings.replace(
        run_dir=run_dir, database_url=database_url, mlflow_tracking_uri="", s3_bucket="", s3_endpoint_url="",
        prometheus_url="", webhook_url="", watchdog_url="", production_url="", candidate_url="", production_urls="",
        candidate_urls="", replicas=1, production_ports="", candidate_ports="", spool_dir="",
        prometheus_multiproc_dir="", admin_token_file="", **ports)


def services() -> tuple[str, ...]:
    return ("mlflow", "prometheus") if stack.prometheus_binary() else ("mlflow",)


def train_models(settings: Settings, since: dt.datetime, say: Callable[[str], None]) -> dict[str, str]:
    """@production and @candidate on synthetic rows, as `bench_pipeline.fill` labels the
    traffic (versions 1 and 2); the experiment's start moved back to `since`."""
    versions = {}
    for seed, variant in enumerate(VARIANTS):
        csv = settings.run_dir / f"train-{variant}.csv"
        data.write_raw(data.synth(TRAIN_ROWS, seed=seed + 1), csv)
        say(f"  training @{variant}")
        with contextlib.redirect_stdout(sys.stderr):  # MLflow prints its links; stdout is the result's
            versions[variant] = train.train(settings, csv, alias=variant, seed=seed)["version"]
    if versions != bench_pipeline.VERSIONS:
        raise RuntimeError(f"the scratch registry gave versions {versions}, the traffic says {bench_pipeline.VERSIONS}")
    registry.tag_version(settings, versions["candidate"], {"candidate_since": since.isoformat(timespec="seconds")})
    return versions


def run_dag(settings: Settings, dag_id: str, timeout: float) -> dict:
    """One dag.test() in a child process (`python -m abfleet.bench_dags DAG`), which measures it."""
    done = subprocess.run([sys.executable, "-m", "abfleet.bench_dags", dag_id, str(timeout)],
                          env=process_environ(settings.env()), capture_output=True, text=True, timeout=timeout + 120)
    if done.returncode != 0:
        raise RuntimeError(f"bench dags: the runner of {dag_id} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def child(dag_id: str, timeout: float) -> dict:
    """In the runner process: dag.test() of `dag_id` (a grandchild), its wall time and peak RSS."""
    settings = Settings.from_env()
    started = time.perf_counter()
    try:
        out, error = airflow_local.test_dag(settings, dag_id, timeout=timeout).stdout, None
    except (airflow_local.AirflowLocalError, subprocess.TimeoutExpired) as exc:
        out, error = str(exc), str(exc)[-3000:]
    seconds = time.perf_counter() - started
    found = _RUN_LINE.findall(out)
    run_id, state = (found[-1][0], found[-1][2]) if found else (None, "failed")
    # The largest child this process waited for: the dag.test() process, which runs every task.
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"run_id": run_id, "state": state, "seconds": round(seconds, 2), "peak_rss_mb": round(peak_kb / 1024, 1),
            "error": error}


def outcome(settings: Settings, dag_id: str) -> dict:
    """What the DAG concluded, as the store holds it."""
    with open_store(settings, create_schema=False) as store:
        if dag_id == "evaluate_ab":
            last = next(iter(store.decision_history(limit=1)), None)
            if last is None:
                return {}
            arms = last["details"].get("arms") or {}
            return {"decision": last["decision"], "applied": last["applied"], "reasons": last["reasons"],
                    "problems": last["details"].get("problems"), "arm_rows": arms.get("arm_rows"),
                    "arms_drift_detected": arms.get("drift_detected")}
        summary = store.get_state("drift_summary") or {}
    return {key: summary.get(key) for key in ("drift_detected", "drifted_columns", "current_rows", "sampled_rows",
                                              "window_days")} | {"experiment_touched": (summary.get("experiment") or {}).get("touched")}


def measure(settings: Settings, dag_id: str, timeout: float) -> dict:
    timeouts = airflow_local.task_timeouts(settings, dag_id)
    ran = run_dag(settings, dag_id, timeout)
    ran_tasks = airflow_local.task_runs(settings, dag_id, ran["run_id"]) if ran["run_id"] else {}
    tasks = {}  # in the DAG's order
    for task, limit in timeouts.items():
        entry = tasks[task] = ran_tasks.get(task, {"state": None, "seconds": None})
        entry["timeout_s"] = limit
        entry["within_timeout"] = (entry["state"] in FINAL and (limit is None or (entry["seconds"] or 0) < limit))
    return {**ran, "tasks": tasks, "outcome": outcome(settings, dag_id),
            "all_within_timeouts": bool(tasks) and all(t["within_timeout"] for t in tasks.values())}


def run(settings: Settings, rows: int, *, postgres: str | None = None, dag_timeout: float = 3600.0,
        say: Callable[[str], None] = lambda _m: None) -> dict:
    """Bring up the scratch stack, fill the store, run both DAGs; the result (also in result.json)."""
    stamp = dt.datetime.now(dt.timezone.utc)
    run_dir = settings.run_dir / "bench" / f"dags-{stamp:%Y%m%dT%H%M%SZ}"
    run_dir.mkdir(parents=True, exist_ok=True)
    name = f"abfleet_bench_dags_{stamp:%Y%m%d%H%M%S}"
    if postgres:  # a plain postgresql:// names the installed driver, as the fleet's own URL does
        postgres = settings.replace(database_url=postgres).db_url
    url = bench_pipeline.scratch_postgres(postgres, name) if postgres else f"sqlite:///{run_dir / 'store.db'}"
    bench = isolated(settings, run_dir, url)
    wanted = services()
    result: dict = {"date": stamp.isoformat(timespec="seconds"), "machine": machine(),
                    "config": {"rows": rows, "backend": "postgresql" if postgres else "sqlite",
                               "sample_rows": bench.pipeline_sample_rows, "window_days": bench_pipeline.WINDOW_DAYS,
                               "drift_days": bench.drift_days, "services": list(wanted)},
                    "run_dir": str(run_dir), "dags": {}}
    try:
        say(f"bench dags: starting {', '.join(wanted)} in {run_dir}")
        stack.up(bench, only=wanted, say=lambda m: say(f"  {m.strip()}"))
        now = dt.datetime.now(dt.timezone.utc)
        since = now - dt.timedelta(days=bench_pipeline.WINDOW_DAYS)
        train_models(bench, since, say)
        say(f"bench dags: filling {rows:,} predictions ({result['config']['backend']})")
        store = Store.from_settings(bench)
        try:
            result["loaded"] = bench_pipeline.fill(store, rows, now=now)
        finally:
            store.close()
        airflow_local.migrate(bench)
        for dag_id in DAGS:
            say(f"bench dags: dag.test() of {dag_id}")
            result["dags"][dag_id] = measure(bench, dag_id, dag_timeout)
    finally:
        stack.down(bench, say=lambda _m: None)
        if postgres:
            bench_pipeline.drop_postgres(postgres, name)
        else:
            Path(url.removeprefix("sqlite:///")).unlink(missing_ok=True)
    result["ok"] = bool(result["dags"]) and all(d["all_within_timeouts"] for d in result["dags"].values())
    (run_dir / "result.json").write_text(json.dumps(result, indent=2))
    return result


def text(result: dict) -> str:
    cfg = result["config"]
    lines = [f"{result['date']}  {result['machine']['nproc']} CPUs  {cfg['rows']:,} predictions on {cfg['backend']} "
             f"(loaded in {result.get('loaded', {}).get('load_seconds', 0):.1f} s)",
             f"  {'DAG':<18} {'task':<14} {'state':<9} {'s':>8} {'timeout s':>10}"]
    for dag_id, d in result["dags"].items():
        for task, t in d["tasks"].items():
            seconds = "-" if t["seconds"] is None else f"{t['seconds']:.2f}"
            limit = "none" if t["timeout_s"] is None else f"{t['timeout_s']:.0f}"
            lines.append(f"  {dag_id:<18} {task:<14} {t['state'] or 'not run':<9} {seconds:>8} {limit:>10}")
        lines.append(f"  {dag_id:<18} whole run {d['state']} in {d['seconds']:.1f} s, peak RSS {d['peak_rss_mb']:.0f} MB; "
                     f"{json.dumps(d['outcome'], default=str)[:200]}")
    lines.append(("every task ended within its timeout" if result["ok"] else "NOT every task ended within its timeout")
                 + f"  ({result['run_dir']})")
    return "\n".join(lines)


def cmd(args: argparse.Namespace, settings: Settings) -> int:
    """`abfleet bench dags`: exit 1 when a task failed or ran past its timeout."""
    result = run(settings, args.rows, postgres=args.postgres or settings.bench_postgres_url or None,
                 say=lambda m: print(m, file=sys.stderr, flush=True))
    print(json.dumps(result, indent=2) if args.json else text(result))
    return 0 if result["ok"] else 1


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("dags", help="the evaluation and drift DAGs with dag.test() against a scratch store of N rows")
    p.add_argument("--rows", type=int, default=1_000_000, help="predictions to load (default 1,000,000)")
    p.add_argument("--postgres", default="", help="a PostgreSQL URL whose server gets a scratch database "
                                                  "(created and dropped); default ABFLEET_BENCH_POSTGRES_URL, else SQLite")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(func=cmd)
    return p


if __name__ == "__main__":
    print(json.dumps(child(sys.argv[1], float(sys.argv[2]))))
