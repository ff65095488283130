"""The pipeline benchmark (`abfleet bench pipeline --rows N`): the jobs at production volume.

For each store back end (SQLite; PostgreSQL when a server is given) and each N it fills a
scratch store with N realistic predictions (a week of them, 80/20 between the arms, one user
in twenty asking again) and their feedback (a star rating on one in ten, an actual price on
one in fifty), loaded in bulk (COPY on PostgreSQL, executemany on SQLite), then runs in a
child process of its own, one at a time:
  evaluation: the hourly evaluation's store part: `aggregates.people` of both arms and the
              arms check (`evaluation.arms_check`: a sample per arm, Evidently);
  drift:      the daily drift job without MLflow: the window's sample against a training
              set's rows, Evidently's report, and the per-arm samples of the experiment;
  summary:    /api/metrics' aggregate query for production over the whole window (five
              times on one connection; its median, minimum and maximum);
and reports for each its time, the peak resident memory of its process (ru_maxrss, imports
included) and the peak of the Python allocations of the job itself (tracemalloc, measured in
a second run so it does not slow the timed one). The PostgreSQL store is a scratch database
created on the given server and dropped afterwards; the SQLite one is a file in the run dir.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import math
import resource
import statistics
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import sqlalchemy as sa

from abfleet import aggregates, data, drift, evaluation, summary
from abfleet.bench import machine
from abfleet.settings import VARIANTS, Settings, process_environ, with_driver
from abfleet.store import PREDICTION_COLUMNS, Store, open_store

JOBS = ("evaluation", "drift", "summary")
VERSIONS = {"production": "1", "candidate": "2"}
WINDOW_DAYS = 7.0
CHUNK = 100_000  # rows generated and loaded at a time: the bench's own memory stays bounded
FEEDBACK_COLUMNS = ["prediction_id", "created_at", "kind", "feedback_type", "feedback_value", "ape", "variant",
                    "model_version", "received_by", "user_id"]


# ---- realistic rows -----------------------------------------------------------------

def base_rows(seed: int = 0) -> pd.DataFrame:
    """Cleaned synthetic flats the predictions are drawn from (and the drift job's reference)."""
    return data.clean(data.synth(20_000, seed=seed)).frame.reset_index(drop=True)


def chunk(base: pd.DataFrame, start: int, rows: int, total: int, now: dt.datetime,
          rng: np.random.Generator) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(predictions, feedback) for rows start..start+rows of `total`, spread over the window."""
    pick = base.iloc[rng.integers(0, len(base), rows)].reset_index(drop=True)
    index = np.arange(start, start + rows)
    seconds = (WINDOW_DAYS * 86400) * (1 - (index + 0.5) / total)
    created = pd.to_datetime(now) - pd.to_timedelta(seconds, unit="s")
    arm = np.where(rng.random(rows) < 0.2, "candidate", "production")
    estimate = pick["price"].to_numpy() * rng.lognormal(0.0, 0.2, rows)
    digits = rng.bytes(16 * rows).hex()  # 32 random hex digits per id, as the servers make them
    ids = [digits[i:i + 32] for i in range(0, len(digits), 32)]
    users = rng.integers(0, max(1, total // 20), rows)
    predictions = pd.DataFrame({
        "id": ids, "created_at": created, "variant": arm, "model_version": np.where(arm == "candidate", "2", "1"),
        "location": pick["location"], "total_sqft": pick["total_sqft"].round(1), "bhk": pick["bhk"].astype(int),
        "bath": pick["bath"].astype(int), "estimated_price": estimate.round(2),
        "latency_ms": rng.gamma(2.0, 2.0, rows).round(3), "user_id": [f"user-{u}" for u in users]})
    rated = rng.random(rows) < 0.1
    priced = rng.random(rows) < 0.02
    rating = predictions[rated].assign(kind="rating", feedback_type="rating",
                                       feedback_value=rng.integers(1, 6, int(rated.sum())).astype(float), ape=np.nan)
    actual = pick["price"].to_numpy()[priced]
    price = predictions[priced].assign(kind="actual_price", feedback_type="actual_price", feedback_value=actual,
                                       ape=np.abs(estimate[priced] - actual) / actual)
    feedback = pd.concat([rating, price]).rename(columns={"id": "prediction_id"})
    feedback = feedback.assign(created_at=feedback["created_at"] + pd.Timedelta(seconds=30), received_by="bench")
    return predictions[PREDICTION_COLUMNS], feedback[FEEDBACK_COLUMNS]


def fill(store: Store, rows: int, *, seed: int = 0, now: dt.datetime | None = None) -> dict:
    """Load `rows` predictions and their feedback into `store` (schema migrated first)."""
    now = now or dt.datetime.now(dt.timezone.utc)
    store.init_schema()
    base, rng = base_rows(seed), np.random.default_rng(seed)
    counts = {"predictions": 0, "feedback": 0}
    started = time.perf_counter()
    for start in range(0, rows, CHUNK):
        preds, fb = chunk(base, start, min(CHUNK, rows - start), rows, now, rng)
        load(store, "predictions", preds)
        load(store, "feedback", fb)
        counts["predictions"] += len(preds)
        counts["feedback"] += len(fb)
    with store.engine.begin() as conn:  # fresh statistics, as autovacuum would gather after a load
        conn.exec_driver_sql("ANALYZE")
    return {**counts, "load_seconds": round(time.perf_counter() - started, 2)}


def load(store: Store, table: str, frame: pd.DataFrame) -> None:
    """Bulk insert: COPY on PostgreSQL, one executemany on SQLite."""
    columns = list(frame.columns)
    raw = store.engine.raw_connection()
    try:
        cursor = raw.cursor()
        if store.engine.dialect.name == "postgresql":
            buffer = io.StringIO()
            frame.to_csv(buffer, index=False, header=False, date_format="%Y-%m-%d %H:%M:%S.%f+00:00")
            buffer.seek(0)
            cursor.copy_expert(f"COPY {table} ({', '.join(columns)}) FROM STDIN WITH (FORMAT csv)", buffer)
        else:
            # SQLAlchemy's SQLite DateTime text: 'YYYY-MM-DD HH:MM:SS.ffffff' (UTC here).
            frame = frame.assign(created_at=frame["created_at"].dt.strftime("%Y-%m-%d %H:%M:%S.%f"))
            values = frame.astype(object).where(frame.notna(), None).itertuples(index=False, name=None)
            cursor.executemany(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
                               values)
        raw.commit()
    finally:
        raw.close()


# ---- the jobs, each in a process of its own ------------------------------------------

def job_evaluation(settings: Settings, since: dt.datetime) -> dict:
    """The hourly evaluation's store part: people per arm, and the arms check."""
    with open_store(settings, create_schema=False) as store:
        people = aggregates.people(store, since, VERSIONS)
    arms = evaluation.arms_check(settings, since, VERSIONS)
    return {"users": {v: people[v]["users"] for v in VARIANTS}, "arms_drift_detected": arms["drift_detected"],
            "arm_rows": arms.get("arm_rows"), "sampled_rows": arms.get("sampled_rows")}


def job_drift(settings: Settings, since: dt.datetime) -> dict:
    """The drift job without MLflow: a training set's rows as the reference."""
    reference = base_rows(seed=1)
    reference["estimated_price"] = reference["price"]
    days = (dt.datetime.now(dt.timezone.utc) - since).total_seconds() / 86400
    total, current = drift.current_for(settings, days)
    result = drift.check(reference, current, drift.policy_from(settings))
    arms = {arm: drift.current_for(settings, days, since=since, variant=arm, version=VERSIONS[arm])[1] for arm in VARIANTS}
    touched = drift.touches_experiment(reference, arms, drift.policy_from(settings))
    return {"current_rows": total, "sampled_rows": len(current), "drift_detected": result.summary["drift_detected"],
            "report_bytes": len(result.html or ""), "experiment_touched": touched["touched"]}


def job_summary(settings: Settings, since: dt.datetime) -> dict:
    """/api/metrics' query for production over the whole window (every row of the arm), five
    times: a server answers it on a warm connection, so the figure is the median of the five."""
    hours = max(1, math.ceil((dt.datetime.now(dt.timezone.utc) - since).total_seconds() / 3600))
    with open_store(settings, create_schema=False) as store:
        times, answer = [], None
        for _ in range(5):
            started = time.perf_counter()
            answer = summary.variant_summary(store.engine, "production", hours)
            times.append(time.perf_counter() - started)
    return {"hours": hours, "summarised_rows": answer["predictions"]["total_count"],
            "query_seconds": {"median": round(statistics.median(times), 3), "min": round(min(times), 3),
                              "max": round(max(times), 3)}}


JOB_FUNCTIONS: dict[str, Callable[[Settings, dt.datetime], dict]] = {
    "evaluation": job_evaluation, "drift": job_drift, "summary": job_summary}


def child(job: str, since: str) -> dict:
    """Run `job` twice in this process: timed, then under tracemalloc; with the peaks."""
    settings, start = Settings.from_env(), dt.datetime.fromisoformat(since)
    baseline_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    outcome = JOB_FUNCTIONS[job](settings, start)
    seconds = time.perf_counter() - started
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    JOB_FUNCTIONS[job](settings, start)
    traced_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {"seconds": round(seconds, 3), "peak_rss_mb": round(peak_kb / 1024, 1),
            "rss_before_job_mb": round(baseline_kb / 1024, 1), "traced_peak_mb": round(traced_peak / 2**20, 2),
            "outcome": outcome}


def run_job(settings: Settings, job: str, since: dt.datetime) -> dict:
    env = process_environ(settings.env())
    done = subprocess.run([sys.executable, "-m", "abfleet.bench_pipeline", job, since.isoformat()], env=env,
                          capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"bench job {job} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---- the benchmark ---------------------------------------------------------------------

def scratch_postgres(admin_url: str, name: str) -> str:
    """Create database `name` on the server of `admin_url`; its URL."""
    admin = sa.create_engine(with_driver(admin_url), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name}")
        conn.exec_driver_sql(f"CREATE DATABASE {name}")
    admin.dispose()
    return sa.engine.make_url(with_driver(admin_url)).set(database=name).render_as_string(hide_password=False)


def drop_postgres(admin_url: str, name: str) -> None:
    admin = sa.create_engine(with_driver(admin_url), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    admin.dispose()


def run(settings: Settings, rows: list[int], *, postgres: str | None = None, sqlite: bool = True,
        say: Callable[[str], None] = lambda _m: None) -> dict:
    """Fill a scratch store per back end and N, run each job in a child process, collect."""
    stamp = dt.datetime.now(dt.timezone.utc)
    run_dir = settings.run_dir / "bench" / f"pipeline-{stamp:%Y%m%dT%H%M%SZ}"
    run_dir.mkdir(parents=True, exist_ok=True)
    result: dict = {"date": stamp.isoformat(timespec="seconds"), "machine": machine(),
                    "config": {"rows": rows, "sample_rows": settings.pipeline_sample_rows, "window_days": WINDOW_DAYS,
                               "jobs": list(JOBS)}, "runs": []}
    backends = (["sqlite"] if sqlite else []) + (["postgresql"] if postgres else [])
    for backend in backends:
        for n in rows:
            name = f"abfleet_bench_{stamp:%Y%m%d%H%M%S}_{n}"
            url = f"sqlite:///{run_dir / f'store-{n}.db'}" if backend == "sqlite" else scratch_postgres(postgres, name)
            try:
                # The jobs run with the fleet's own settings (job_statement_timeout_s included);
                # only the bulk load gets all the time it needs.
                job_settings = settings.replace(database_url=url, run_dir=run_dir, spool_dir=str(run_dir / "spool"))
                say(f"bench pipeline: {backend}, filling {n:,} predictions")
                store = Store.from_settings(job_settings.replace(db_statement_timeout_s=3600.0))
                now = dt.datetime.now(dt.timezone.utc)
                try:
                    loaded = fill(store, n, now=now)
                finally:
                    store.close()
                entry = {"backend": backend, "rows": n, "loaded": loaded, "jobs": {}}
                since = now - dt.timedelta(days=WINDOW_DAYS)
                for job in JOBS:
                    say(f"  {job}")
                    entry["jobs"][job] = run_job(job_settings, job, since)
                result["runs"].append(entry)
            finally:
                if backend == "postgresql":
                    drop_postgres(postgres, name)
                else:
                    Path(url.removeprefix("sqlite:///")).unlink(missing_ok=True)
    (run_dir / "result.json").write_text(json.dumps(result, indent=2))
    result["run_dir"] = str(run_dir)
    return result


def text(result: dict) -> str:
    lines = [f"{result['date']}  {result['machine']['nproc']} CPUs  (sample of at most "
             f"{result['config']['sample_rows']} rows per side)",
             f"  {'backend':<10} {'rows':>10} {'load s':>8}  {'job':<10} {'s':>8} {'peak RSS MB':>12} {'traced MB':>10}"]
    for run_ in result["runs"]:
        for job, m in run_["jobs"].items():
            lines.append(f"  {run_['backend']:<10} {run_['rows']:>10,} {run_['loaded']['load_seconds']:>8.1f}  {job:<10} "
                         f"{m['seconds']:>8.2f} {m['peak_rss_mb']:>12.1f} {m['traced_peak_mb']:>10.2f}"
                         + (f"  (one query: median {q['median']:.3f} s over {m['outcome']['summarised_rows']:,} rows)"
                            if (q := m["outcome"].get("query_seconds")) else ""))
    return "\n".join(lines)


def cmd(args: argparse.Namespace, settings: Settings) -> int:
    """`abfleet bench pipeline`."""
    if args.sample_rows:
        settings = settings.replace(pipeline_sample_rows=args.sample_rows)
    result = run(settings, args.rows, postgres=args.postgres or settings.bench_postgres_url or None,
                 sqlite=not args.no_sqlite, say=lambda m: print(m, file=sys.stderr, flush=True))
    print(json.dumps(result, indent=2) if args.json else text(result))
    return 0


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("pipeline", help="the hourly evaluation's store part and the drift job on a scratch store of N rows")
    p.add_argument("--rows", type=int, nargs="+", default=[100_000], help="predictions to load (several N: one run each)")
    p.add_argument("--postgres", default="", help="a PostgreSQL URL whose server gets a scratch database "
                                                  "(created and dropped); default ABFLEET_BENCH_POSTGRES_URL, else SQLite only")
    p.add_argument("--no-sqlite", action="store_true", help="PostgreSQL only")
    p.add_argument("--sample-rows", type=int, default=0, help="override ABFLEET_PIPELINE_SAMPLE_ROWS")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(func=cmd)
    return p


if __name__ == "__main__":
    print(json.dumps(child(sys.argv[1], sys.argv[2])))
