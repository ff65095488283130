"""`abfleet soak`: a bounded run of steady traffic with faults injected on a schedule.

It starts a fleet of its own (MLflow, both model servers, the router) on free ports, in a run
directory of its own (<run_dir>/soak/<timestamp>/), on a PostgreSQL server it starts itself
(`abfleet.pgserver`), registers two small models trained on synthetic rows, and drives
predictions through the router with Locust at a steady rate for the given minutes. The run
is cut into phases: a baseline, then each fault followed by a recovery phase:

  database stopped   pg_ctl stop (fast), then start
  database frozen    SIGSTOP on the postmaster and its backends, then SIGCONT
  mlflow killed      SIGKILL on MLflow's process group, then started again
  server killed      SIGKILL on the production server's gunicorn master, then started again

Afterwards the servers' spools are drained into the database and the report says how many
requests were answered (by status), how many rows were stored, how many answered predictions
are missing from the store (rows lost: must be 0), the p99 latency of each phase, and each
server's memory (master and workers) at the start and the end. Nothing running elsewhere (a
local stack, the machine's PostgreSQL) is touched.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import requests
import sqlalchemy as sa

from abfleet import pgserver, procs, router, soak_report, stack
from abfleet.pgserver import PostgresServer
from abfleet.procs import free_port
from abfleet.settings import Settings, process_environ, project_root

FAULTS = ("database stopped", "database frozen", "mlflow killed", "server killed")
SERVICES = ("mlflow", "production", "candidate", "router")  # Prometheus and Alertmanager are not under test
KILLED_SERVER = "production"  # the busier arm: its users fail over to the candidate meanwhile
WARMUP_S = 5.0
DRAIN_S = 180.0
LOCUSTFILE = Path("abfleet") / "soak_users.py"


@dataclass
class Phase:
    name: str
    start: float  # wall-clock seconds
    end: float = 0.0


class SoakError(RuntimeError):
    """The soak could not run; the message says what to do."""


# Tuning the soak keeps from the caller's settings; everything else (where MLflow, the object
# store, the database, Prometheus and the servers are) is the soak's own.
KEPT = ("model_name", "candidate_weight", "workers", "threads", "spool_fsync", "spool_linger", "spool_max_rows",
        "spool_max_bytes", "db_connect_timeout_s", "db_statement_timeout_s", "db_check_interval_s", "reload_interval",
        "max_body_bytes", "debug")


def soak_settings(settings: Settings, run_dir: Path, database_url: str) -> Settings:
    """The soak fleet's settings: its own run directory, spool, free ports, database, MLflow and
    artifact folder; the router's limits lifted (all the traffic comes from one address)."""
    ports = {name: free_port() for name in ("router_port", "production_port", "candidate_port", "mlflow_port",
                                            "prometheus_port", "alertmanager_port", "airflow_port")}
    return Settings(run_dir=run_dir, database_url=database_url, spool_dir=str(run_dir / "spool"),
                    admin_token=secrets.token_urlsafe(24), **{name: getattr(settings, name) for name in KEPT},
                    **router.ONE_ADDRESS_LIMITS, **ports)


def server_rss_mb(settings: Settings) -> dict[str, float | None]:
    """Each model server's resident memory in MB: its gunicorn master and workers summed."""
    out: dict[str, float | None] = {}
    for svc in stack.services(settings):
        if svc.name not in ("production", "candidate"):
            continue
        pid = stack.running_pid(settings, svc)
        if pid is None:
            out[svc.name] = None
            continue
        total = 0
        for member in pgserver.family(pid):
            with contextlib.suppress(OSError, ValueError, IndexError):
                for line in Path(f"/proc/{member}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        out[svc.name] = round(total / 1024, 1)
    return out


def service(settings: Settings, name: str) -> procs.Service:
    [svc] = [s for s in stack.services(settings) if s.name == name]
    return svc


class Faults:
    """Each fault's injection and its undoing, on the soak's own PostgreSQL and fleet."""

    def __init__(self, settings: Settings, pg: PostgresServer):
        self.settings, self.pg = settings, pg
        self.frozen: list[int] = []

    def inject(self, fault: str) -> None:
        if fault == "database stopped":
            self.pg.stop("fast")
        elif fault == "database frozen":
            self.frozen = self.pg.freeze()
        elif fault == "mlflow killed":
            os.killpg(self._pid("mlflow"), signal.SIGKILL)  # the CLI and its web server
        elif fault == "server killed":
            os.kill(self._pid(KILLED_SERVER), signal.SIGKILL)  # the master; its workers notice and exit

    def undo(self, fault: str) -> None:
        if fault == "database stopped":
            self.pg.start()
        elif fault == "database frozen":
            self.pg.thaw(self.frozen)
            self.frozen = []
        elif fault == "mlflow killed":
            self._restart("mlflow")
        elif fault == "server killed":
            self._restart(KILLED_SERVER)

    def _pid(self, name: str) -> int:
        pid = stack.running_pid(self.settings, service(self.settings, name))
        if pid is None:
            raise SoakError(f"{name} is not running: see {self.settings.run_dir / 'logs' / (name + '.log')}")
        return pid

    def _restart(self, name: str) -> None:
        svc = service(self.settings, name)
        deadline = time.monotonic() + 30
        while procs.port_taken(self.settings.host, svc.port) and time.monotonic() < deadline:
            time.sleep(0.2)  # orphaned workers finish what they hold, then exit
        if procs.port_taken(self.settings.host, svc.port):
            raise SoakError(f"{name}'s port {svc.port} is still held 30 s after the kill")
        stack.up(self.settings, only=(name,), say=lambda _m: None)


def train_models(settings: Settings, folder: Path, say: Callable[[str], None]) -> dict[str, str]:
    """@production and @candidate: two small models on seeded synthetic rows."""
    from abfleet import data, train  # pandas and scikit-learn: only for this command

    versions = {}
    for seed, alias in enumerate(("production", "candidate")):
        csv = folder / f"{alias}.csv"
        data.write_raw(data.synth(4000, seed=seed + 1), csv)
        versions[alias] = train.train(settings, csv, alias=alias, seed=seed)["version"]
        say(f"soak: version {versions[alias]} registered as @{alias}")
    return versions


def wait_serving(settings: Settings, versions: dict[str, str]) -> None:
    for variant, version in versions.items():
        url = f"{settings.server_url(variant)}/api/health"
        deadline = time.monotonic() + 90
        while True:
            with contextlib.suppress(Exception):
                if requests.get(url, timeout=3).json().get("model_version") == version:
                    break
            if time.monotonic() > deadline:
                raise SoakError(f"the {variant} server did not load version {version}: see {settings.run_dir / 'logs'}")
            time.sleep(0.5)


def start_locust(settings: Settings, run_dir: Path, seconds: float, rate: float) -> subprocess.Popen:
    """Locust in a process of its own (see abfleet/load.py), `rate` predictions per second in all."""
    locust = Path(sys.executable).parent / "locust"
    if not locust.exists():
        raise SoakError("locust is not installed in this environment: run `make install`")
    users = max(1, math.ceil(rate / 2))
    argv = [str(locust), "-f", str(project_root() / LOCUSTFILE), "--headless", "--host", settings.router_url,
            "--users", str(users), "--spawn-rate", str(users), "--run-time", f"{math.ceil(seconds)}s",
            "--stop-timeout", "30", "--only-summary", "--loglevel", "WARNING",
            "--soak-log", str(run_dir / "requests.jsonl"), "--soak-user-rate", f"{rate / users:g}"]
    env = process_environ(python_path=[project_root()])
    return procs.start(argv, env, run_dir / "logs" / "locust.log")


def read_answers(path: Path) -> list[dict]:
    answers = []
    with contextlib.suppress(FileNotFoundError), path.open() as f:
        for line in f:
            with contextlib.suppress(ValueError):
                answers.append(json.loads(line))
    return answers


def stored_ids(url: str) -> dict[str, int]:
    """prediction id → rows the store holds for it."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return dict(conn.execute(sa.text("SELECT id, count(*) FROM predictions GROUP BY id")).all())
    finally:
        engine.dispose()


def drain(settings: Settings, answered: set[str], say: Callable[[str], None]) -> dict[str, int]:
    """Wait until the store holds every answered prediction (or DRAIN_S passes), then stop the
    fleet (each server flushes its spool as it stops) and read the store once more."""
    deadline = time.monotonic() + DRAIN_S
    rows: dict[str, int] = {}
    while time.monotonic() < deadline:
        with contextlib.suppress(sa.exc.SQLAlchemyError):
            rows = stored_ids(settings.db_url)
        if answered <= rows.keys():
            break
        time.sleep(2)
    stack.down(settings, say=lambda _m: None)
    return stored_ids(settings.db_url)


def run(settings: Settings, minutes: float, *, rate: float = 20.0, report_path: Path | None = None,
        say: Callable[[str], None] = print) -> dict:
    """The whole soak; returns the report (also written as JSON to `report_path`)."""
    if minutes <= 0 or rate <= 0:
        raise ValueError("--minutes and --rate must be above 0")
    seconds = minutes * 60.0
    slot = seconds / (1 + 2 * len(FAULTS))
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = (settings.run_dir / "soak" / stamp).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    report_path = Path(report_path) if report_path else run_dir / "report.json"
    say(f"soak: {minutes:g} min at {rate:g} predictions/s, phases of {slot:.0f} s; everything in {run_dir}")
    with pgserver.postgres_server() as pg:
        fleet = soak_settings(settings, run_dir, pg.url)
        say(f"soak: PostgreSQL 15 of its own on :{pg.port}; fleet: router :{fleet.router_port}, "
            f"production :{fleet.production_port}, candidate :{fleet.candidate_port}, MLflow :{fleet.mlflow_port}")
        locust = None
        try:
            stack.up(fleet, only=("mlflow",), say=lambda _m: None)
            with contextlib.redirect_stdout(sys.stderr):  # MLflow prints run links: stdout is the report's
                versions = train_models(fleet, run_dir, say)
            stack.up(fleet, only=SERVICES, say=lambda _m: None)
            wait_serving(fleet, versions)
            memory_start = server_rss_mb(fleet)
            # Locust runs until the phases are over (its --run-time is only a bound).
            locust = start_locust(fleet, run_dir, 2 * seconds + 600, rate)
            time.sleep(WARMUP_S)
            phases = drive(fleet, pg, slot, run_dir / "requests.jsonl", say)
            memory_end = server_rss_mb(fleet)
            procs.stop_child(locust, timeout=60)
            answers = read_answers(run_dir / "requests.jsonl")
            answered = {a["id"] for a in answers if a["status"] == 200 and a["id"]}
            say(f"soak: load stopped; waiting for the store to hold all {len(answered)} answered predictions")
            rows = drain(fleet, answered, say)
        finally:
            if locust is not None:
                procs.stop_child(locust)
            stack.down(fleet, say=lambda _m: None)
    report = soak_report.build(answers, rows, phases, memory_start, memory_end,
                               {"minutes": minutes, "rate": rate, "run_dir": str(run_dir), "versions": versions,
                                "restarted": [KILLED_SERVER]})
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps(report, indent=2))
    report["report_path"] = str(report_path)
    return report


def drive(settings: Settings, pg: PostgresServer, slot: float, log: Path, say: Callable[[str], None]) -> list[Phase]:
    """The phases in turn: baseline, then each fault and its recovery, `slot` seconds each (a
    fault's phase also holds the time its undoing takes: restarting MLflow or a server whose
    orphaned workers finish their requests first); progress every 10 s."""
    faults = Faults(settings, pg)
    plan = [("baseline", None)] + [p for f in FAULTS for p in ((f, f), (f"recovery after {f}", None))]
    phases: list[Phase] = []
    progress = Progress(log, say, time.time(), slot * len(plan))
    for name, fault in plan:
        phase = Phase(name, time.time())
        phases.append(phase)
        if fault:
            say(f"soak: {fault}")
            faults.inject(fault)
        until = phase.start + slot
        while time.time() < until:
            time.sleep(min(1.0, max(0.0, until - time.time())))
            progress.tick(name)
        if fault:
            faults.undo(fault)
            say(f"soak: {fault}: undone after {time.time() - phase.start:.0f} s")
        phase.end = time.time()
    return phases


class Progress:
    """One line every 10 s: time, phase, predictions answered so far by status."""

    def __init__(self, log: Path, say: Callable[[str], None], t0: float, total: float):
        self.log, self.say, self.t0, self.total = log, say, t0, total
        self.next = t0 + 10
        self.offset = 0
        self.counts: dict[int, int] = {}

    def tick(self, phase: str) -> None:
        if time.time() < self.next:
            return
        self.next = time.time() + 10
        with contextlib.suppress(FileNotFoundError), self.log.open("rb") as f:
            f.seek(self.offset)
            chunk = f.read()
            complete = chunk[:chunk.rfind(b"\n") + 1]
            self.offset += len(complete)
            for line in complete.splitlines():
                with contextlib.suppress(ValueError, KeyError):
                    status = json.loads(line)["status"]
                    self.counts[status] = self.counts.get(status, 0) + 1
        shown = ", ".join(f"{n} × {s}" for s, n in sorted(self.counts.items())) or "none yet"
        self.say(f"soak: {time.time() - self.t0:4.0f} s of ~{self.total:.0f}  {phase:<34} answers: {shown}")


def cmd_soak(args: argparse.Namespace, settings: Settings) -> int:
    """`abfleet soak`: exit 1 when an answered prediction was lost (or none was answered)."""
    say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    report = run(settings, args.minutes, rate=args.rate, report_path=Path(args.report) if args.report else None, say=say)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(soak_report.table(report))
    ok = report["rows"]["lost"] == 0 and report["rows"]["stored_twice"] == 0 and report["rows"]["answered"] > 0
    if not ok:
        print(f"abfleet soak: {report['rows']['lost']} answered predictions lost, {report['rows']['stored_twice']} "
              f"stored twice: see {report['report_path']}", file=sys.stderr)
    return 0 if ok else 1


def add_soak_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "soak", help="steady load with faults injected on a schedule; report losses, p99 per phase, memory",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("\n", 2)[2].rstrip() + "\n\nProgress goes to stderr; the report table (or --json) "
                    "to stdout, and the JSON report to <run_dir>/soak/<timestamp>/report.json (or --report). "
                    "Exits 1 when an answered prediction is missing from the store or stored twice. Needs "
                    "PostgreSQL 15 (postgresql-15), nginx and locust; runs as root (the database as the postgres "
                    "user) or as any user allowed to run initdb.")
    p.add_argument("--minutes", type=float, default=10.0, help="length of the traffic, faults included (default 10)")
    p.add_argument("--rate", type=float, default=20.0, help="predictions per second through the router (default 20)")
    p.add_argument("--report", help="write the JSON report here (default: in the soak's run directory)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON document")
    p.set_defaults(func=cmd_soak)
    return p
