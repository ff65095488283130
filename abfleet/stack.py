"""The local stack on loopback: MLflow, both model servers, nginx, Prometheus and Alertmanager.

Each process `up` starts gets a pid file and a log under the run directory; `down` stops
exactly the processes whose pid files it finds (checking the pid still runs what we
started), so it never touches anything else. State (MLflow's database, artifacts, the
prediction store) lives in the run directory and survives `down` / `up`.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable

import requests

from abfleet import airflow_local, fleet, migrations, monitoring, procs, registry, router
from abfleet.procs import ProcessError, Service, answers_http, child_env, port_taken, venv_bin
from abfleet.settings import VARIANTS, Settings


class StackError(ProcessError):
    """Something stops the stack from starting; the message says what to do."""


def prometheus_binary() -> str | None:
    return shutil.which("prometheus") or ("/usr/bin/prometheus" if os.access("/usr/bin/prometheus", os.X_OK) else None)


def alertmanager_binary() -> str | None:
    # Debian's prometheus-alertmanager package names the binary after itself.
    for name in ("prometheus-alertmanager", "alertmanager"):
        found = shutil.which(name) or (f"/usr/bin/{name}" if os.access(f"/usr/bin/{name}", os.X_OK) else None)
        if found:
            return found
    return None


def services(settings: Settings) -> list[Service]:
    """The stack's services in start order."""
    run = settings.run_dir
    h = settings.host
    mlflow = Service(
        "mlflow", settings.mlflow_port,
        [venv_bin("mlflow"), "server", "--backend-store-uri", f"sqlite:///{run / 'mlflow.db'}",
         "--artifacts-destination", settings.artifact_destination, "--serve-artifacts",
         "--host", h, "--port", str(settings.mlflow_port), "--workers", "1"],
        f"{settings.local_url(settings.mlflow_port)}/health", "mlflow", timeout=120,
        # The server's background job runners cost ~2 GB of memory and serve nothing we use.
        env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
    )
    out = [mlflow, *server_services(settings)]
    config = run / "nginx.conf"
    try:
        nginx_cmd = router.nginx_command(settings, config)
    except FileNotFoundError:
        nginx_cmd = ["nginx-missing"]
    out.append(Service("router", settings.router_port, nginx_cmd, f"{settings.router_url}/router/health", "nginx"))
    # Alertmanager starts before Prometheus, which sends it its alerts; it passes them on to
    # settings.webhook_url (monitoring.py renders its config). No cluster address: a single
    # instance opens no gossip port.
    out.append(Service(
        "alertmanager", settings.alertmanager_port,
        [alertmanager_binary() or "prometheus-alertmanager-missing", f"--config.file={run / 'alertmanager.yml'}",
         f"--storage.path={run / 'alertmanager'}", f"--web.listen-address={h}:{settings.alertmanager_port}",
         f"--web.external-url={settings.local_url(settings.alertmanager_port)}", "--cluster.listen-address="],
        f"{settings.local_url(settings.alertmanager_port)}/-/ready", "alertmanager",
    ))
    prom = prometheus_binary() or "prometheus-missing"
    out.append(Service(
        "prometheus", settings.prometheus_port,
        [prom, f"--config.file={run / 'prometheus.yml'}", f"--storage.tsdb.path={run / 'prometheus'}",
         f"--web.listen-address={h}:{settings.prometheus_port}", "--web.enable-lifecycle",
         # Firing alerts are sent again every 15 s (default 1 min): after a reload Prometheus
         # rediscovers Alertmanager, and what it sent meanwhile reaches it 15 s later.
         "--rules.alert.resend-delay=15s", "--storage.tsdb.retention.time=30d"],
        f"{settings.local_url(settings.prometheus_port)}/-/ready", "prometheus",
    ))
    out.append(airflow_local.service(settings))  # started only with --with-airflow
    return out


OPTIONAL = ("airflow",)


def server_services(settings: Settings) -> list[Service]:
    """The model servers: `settings.replicas` per variant, each on its own port with its own
    metrics folder (where its workers also pass reload calls on) and, with several, its own
    spool folder, as each replica of compose has its own volume."""
    run, n = settings.run_dir, settings.replicas
    out = []
    for variant in VARIANTS:
        for name, port in zip(settings.replica_names(variant), settings.replica_ports(variant)):
            env = {"VARIANT": variant, "PROMETHEUS_MULTIPROC_DIR": str(run / "metrics" / name)}
            if n > 1:
                env.update({"ABFLEET_BIND": f"{settings.host}:{port}", "ABFLEET_SPOOL_DIR": str(run / "spool" / name)})
            out.append(Service(name, port, [venv_bin("abfleet"), "serve", "--variant", variant],
                               f"{settings.local_url(port)}/api/health", "abfleet", env=env))
    return out


def server_addresses(settings: Settings, variant: str) -> list[str]:
    """host:port of every replica of `variant`: the router's upstream and Prometheus's targets."""
    return [f"{settings.host}:{port}" for port in settings.replica_ports(variant)]


# ---- replicas: how many `up` started ----------------------------------------------

def _replicas_file(settings: Settings) -> Path:
    return settings.run_dir / "replicas"


def as_started(settings: Settings) -> Settings:
    """The settings with the replica count the last `up` used: `down` and `status` see every
    server it started, whatever ABFLEET_REPLICAS says now."""
    try:
        return settings.replace(replicas=max(1, int(_replicas_file(settings).read_text().strip())))
    except (OSError, ValueError):
        return settings


def check_replicas(settings: Settings) -> None:
    """Several replicas need PostgreSQL, and a running fleet keeps its replica count."""
    if settings.replicas > 1 and not settings.db_url.startswith("postgresql"):
        # SQLite on one machine would take the writes (WAL, one writer at a time), but the
        # replicas stand for compose's and AWS's, which cannot share a file: every server's
        # flushes and feedback would queue on one lock, and a test of them would prove nothing.
        raise StackError(f"--replicas {settings.replicas} needs a PostgreSQL store: set DATABASE_URL to a "
                         "postgresql:// URL (the local SQLite file serves one server per variant)")
    started = as_started(settings)
    if started.replicas != settings.replicas and any(running_pid(settings, svc) for svc in server_services(started)):
        raise StackError(f"the fleet runs {started.replicas} replica(s) per variant: run `abfleet down` before "
                         f"`abfleet up --replicas {settings.replicas}`")


# ---- pid bookkeeping ------------------------------------------------------------

def _pid_file(settings: Settings, name: str) -> Path:
    return settings.run_dir / "pids" / f"{name}.pid"


def _log_file(settings: Settings, name: str) -> Path:
    return settings.run_dir / "logs" / f"{name}.log"


def running_pid(settings: Settings, svc: Service) -> int | None:
    """The pid of our running process for this service, or None (stale files are removed)."""
    return procs.running_pid(_pid_file(settings, svc.name), svc.marker)


def current_weight(settings: Settings) -> int:
    """The fleet's candidate weight (see `fleet.candidate_weight`), the run directory created
    first: the local store is a file in it."""
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    return fleet.candidate_weight(settings)


# ---- up / down / status -----------------------------------------------------------

def prepare(settings: Settings, candidate_weight: int) -> None:
    """Write the rendered configs and folders the processes need."""
    run = settings.run_dir
    for sub in ("pids", "logs", "objects", "metrics", "prometheus", "alertmanager"):
        (run / sub).mkdir(parents=True, exist_ok=True)
    router.write_config(settings, candidate_weight=candidate_weight,
                        production_servers=server_addresses(settings, "production"),
                        candidate_servers=server_addresses(settings, "candidate"))
    monitoring.write_prometheus_config(settings)
    monitoring.write_alertmanager_config(settings)
    # The fleet's one record of the weight: the evaluation and the SRM alert's gauge read it.
    fleet.set_candidate_weight(settings, candidate_weight)


def chosen(settings: Settings, only: tuple[str, ...] | None = None, with_airflow: bool = False) -> list[Service]:
    """The services `up` starts, in start order: all but the optional ones (or `only` those
    named), Airflow only `with_airflow`."""
    wanted = set(only) if only is not None else {s.name for s in services(settings)} - set(OPTIONAL)
    if with_airflow:
        wanted.add("airflow")
    # A variant's name stands for all its replicas. By name only: every service's environment
    # may carry VARIANT (Airflow's holds all the settings), and a plain `up` must not start Airflow.
    for variant in VARIANTS:
        if variant in wanted:
            wanted.update(settings.replica_names(variant))
    return [svc for svc in services(settings) if svc.name in wanted]


def _is_server(svc: Service) -> bool:
    # Airflow's environment carries the fleet's settings, VARIANT included: not a model server.
    return bool(svc.env.get("VARIANT")) and svc.name not in OPTIONAL


def up(settings: Settings, *, candidate_weight: int | None = None, only: tuple[str, ...] | None = None,
       with_airflow: bool = False, say: Callable[[str], None] = print) -> dict:
    """Start whatever is not running yet (all services, or `only` those named); return the status.

    Airflow (about 1 GB of memory) starts only with `with_airflow`; a running one is kept.
    The store's migrations run first: servers never create or alter tables.
    """
    settings.run_dir.mkdir(parents=True, exist_ok=True)  # the local store is a file in it
    check_replicas(settings)
    say(f"  store       {migrations.upgrade(settings.db_url).describe()}")
    weight = current_weight(settings) if candidate_weight is None else candidate_weight
    todo = chosen(settings, only, with_airflow)
    for svc in todo:
        if svc.command[0].endswith("-missing"):
            tool = svc.command[0].removesuffix("-missing")
            raise StackError(f"{tool} is not installed: run `sudo apt-get install -y {tool}` (or `make install-system`)")
    prepare(settings, weight)
    _replicas_file(settings).write_text(f"{settings.replicas}\n")
    booting: list[tuple[Service, subprocess.Popen]] = []  # model servers, started together
    for svc in todo:
        if booting and not _is_server(svc):  # the router and the rest come after the servers
            _wait_all(settings, booting, say)
        pid = running_pid(settings, svc)
        if pid is not None:
            if svc.name == "router":
                _reload_nginx(pid)
            say(f"  {svc.name:<11} already running (pid {pid}) on :{svc.port}")
            continue
        if port_taken(settings.host, svc.port):
            variant = _variant_of(settings, svc)
            setting = (f"ABFLEET_{variant.upper()}_PORT" if settings.replicas == 1 else f"ABFLEET_{variant.upper()}_PORTS"
                       ) if variant else f"ABFLEET_{svc.name.upper()}_PORT"
            raise StackError(
                f"port {svc.port} ({svc.name}) is taken by another process: stop it, or pick another port "
                f"with {setting}"
            )
        if svc.name == "airflow":
            say("  airflow     preparing its metadata database (first time: ~10 s)")
            airflow_local.migrate(settings)
        if _is_server(svc):
            # Each server spends seconds importing its libraries and loading its model: all of
            # them boot at once, then each is waited for.
            booting.append((svc, _launch(settings, svc)))
            continue
        _wait(settings, svc, _launch(settings, svc))
        say(f"  {svc.name:<11} started on :{svc.port}")
    _wait_all(settings, booting, say)
    return status(settings)


def _variant_of(settings: Settings, svc: Service) -> str | None:
    """The variant a model server serves; None for every other service."""
    return next((v for v in VARIANTS if svc.name in settings.replica_names(v)), None)


def admin_token(settings: Settings) -> str:
    """The token for the servers' reload endpoint: from settings or its file, else a new one
    kept in that file (which the pipeline then reads, see `fleet.admin_token`)."""
    token = fleet.admin_token(settings)
    if token is None:
        path = settings.admin_token_path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        token = secrets.token_urlsafe(24)
        path.write_text(token)
    return token


def _launch(settings: Settings, svc: Service) -> subprocess.Popen:
    """Start a service's process (its pid file written), without waiting for it."""
    env = child_env(settings, {"ABFLEET_ADMIN_TOKEN": admin_token(settings), **svc.env})
    return procs.start(svc.command, env, _log_file(settings, svc.name), pid_file=_pid_file(settings, svc.name))


def _wait(settings: Settings, svc: Service, proc: subprocess.Popen) -> None:
    """Wait until a started service answers HTTP (any status)."""
    try:
        # A model server without a model answers 503 but is up: `status` tells the difference.
        procs.wait_ready(proc, lambda: answers_http(svc.health_url, any_answer=True), name=svc.name,
                         log=_log_file(settings, svc.name), timeout=svc.timeout, error=StackError)
    except StackError:
        if proc.poll() is not None:
            _pid_file(settings, svc.name).unlink(missing_ok=True)
        raise


def _wait_all(settings: Settings, booting: list[tuple[Service, subprocess.Popen]], say: Callable[[str], None]) -> None:
    """Wait for each of the services started together (and forget them: the list is emptied)."""
    while booting:
        svc, proc = booting.pop(0)
        _wait(settings, svc, proc)
        say(f"  {svc.name:<11} started on :{svc.port}")


def _reload_nginx(pid: int) -> None:
    # A rendered config may carry new weights: nginx re-reads it without dropping a connection.
    os.kill(pid, signal.SIGHUP)


def down(settings: Settings, *, say: Callable[[str], None] = print) -> list[str]:
    """Stop the processes `up` started (newest first); return their names."""
    settings = as_started(settings)
    stopped = []
    for svc in reversed(services(settings)):
        pid = running_pid(settings, svc)
        if pid is None:
            continue
        procs.stop(pid)
        _pid_file(settings, svc.name).unlink(missing_ok=True)
        stopped.append(svc.name)
        say(f"  {svc.name:<11} stopped (pid {pid})")
    return stopped


def status(settings: Settings) -> dict:
    """Processes (each replica of a model server by its name), ports, alias → version, weights."""
    settings = as_started(settings)
    processes = {}
    for svc in services(settings):
        pid = running_pid(settings, svc)
        if pid is None and svc.name in OPTIONAL:
            continue  # not asked for: not part of this fleet's status
        processes[svc.name] = {"pid": pid, "port": svc.port, "running": pid is not None,
                               "healthy": pid is not None and answers_http(svc.health_url)}
    try:
        aliases = registry.aliases(settings) if processes["mlflow"]["healthy"] else None
    except registry.RegistryError:
        aliases = None
    weight = current_weight(settings)
    out = {
        "run_dir": str(settings.run_dir),
        "processes": processes,
        "aliases": aliases,
        "weights": {"production": 100 - weight, "candidate": weight},
        "urls": {
            "router": f"{settings.router_url}/",
            "mlflow": settings.tracking_uri,
            "prometheus": f"{settings.local_url(settings.prometheus_port)}/",
            "alertmanager": f"{settings.local_url(settings.alertmanager_port)}/",
            **({"airflow": f"{settings.airflow_url}/"} if "airflow" in processes else {}),
        },
    }
    if (processes.get("airflow") or {}).get("healthy"):
        out["dags"] = dag_runs(settings)
    return out


def dag_runs(settings: Settings) -> dict:
    """Each DAG's latest run (`airflow_local.latest_runs`), or {"error": why} when Airflow's API
    does not tell."""
    try:
        return airflow_local.latest_runs(settings)
    except (ProcessError, requests.RequestException, ValueError, KeyError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"[:300]}


def wait_for_dag_runs(settings: Settings, timeout: float, say: Callable[[str], None] = print,
                      interval: float = 5.0) -> tuple[bool, dict]:
    """Wait until every DAG has a latest run that ended (`airflow_local.FINAL_STATES`), saying
    what is still open every 30 s. (True, runs) when they ended and none failed; (False, runs
    or {"error": ...}) when one failed, Airflow is not running, or `timeout` seconds passed."""
    deadline, told = time.monotonic() + timeout, 0.0
    runs: dict = {}
    while True:
        if not airflow_local.healthy(settings):
            return False, {"error": "Airflow is not running: start it with `abfleet up --with-airflow`"}
        runs = dag_runs(settings)
        open_ = [] if "error" in runs else [d for d, r in runs.items() if not r or r["state"] not in airflow_local.FINAL_STATES]
        if "error" not in runs and not open_:
            return all(r["state"] == "success" for r in runs.values()), runs
        if time.monotonic() >= deadline:
            return False, runs
        if time.monotonic() - told >= 30:
            told = time.monotonic()
            say(f"waiting for the first runs of {', '.join(open_) or 'the DAGs'} "
                f"({deadline - time.monotonic():.0f} s left)")
        time.sleep(interval)

