"""The local stack on loopback: MLflow, both model servers, nginx and Prometheus.

Each process `up` starts gets a pid file and a log under the run directory; `down` stops
exactly the processes whose pid files it finds (checking the pid still runs what we
started), so it never touches anything else. State (MLflow's database, artifacts, the
prediction store) lives in the run directory and survives `down` / `up`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import requests

from abfleet import registry, router
from abfleet.settings import Settings, project_root


class StackError(RuntimeError):
    """Something stops the stack from starting; the message says what to do."""


@dataclass
class Service:
    name: str
    port: int
    command: list[str]
    health_url: str
    marker: str  # a word of the command line that proves a pid is still ours
    env: dict[str, str] = field(default_factory=dict)
    timeout: float = 60.0


def _bin(name: str) -> str:
    # The venv's own scripts first: `mlflow server` execs uvicorn from the same bin folder.
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else (shutil.which(name) or name)


def prometheus_binary() -> str | None:
    return shutil.which("prometheus") or ("/usr/bin/prometheus" if os.access("/usr/bin/prometheus", os.X_OK) else None)


def services(settings: Settings, *, candidate_weight: int | None = None) -> list[Service]:
    """The stack's services in start order."""
    run = settings.run_dir
    h = settings.host
    mlflow = Service(
        "mlflow", settings.mlflow_port,
        [_bin("mlflow"), "server", "--backend-store-uri", f"sqlite:///{run / 'mlflow.db'}",
         "--artifacts-destination", settings.artifact_destination, "--serve-artifacts",
         "--host", h, "--port", str(settings.mlflow_port), "--workers", "1"],
        f"http://{h}:{settings.mlflow_port}/health", "mlflow", timeout=120,
        # The server's background job runners cost ~2 GB of memory and serve nothing we use.
        env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
    )
    servers = [
        Service(
            variant, settings.port_of(variant), [_bin("abfleet"), "serve", "--variant", variant],
            f"http://{h}:{settings.port_of(variant)}/api/health", "abfleet",
            env={"VARIANT": variant, "PROMETHEUS_MULTIPROC_DIR": str(run / "metrics" / variant)},
        )
        for variant in ("production", "candidate")
    ]
    out = [mlflow, *servers]
    config = run / "nginx.conf"
    try:
        nginx_cmd = router.nginx_command(settings, config)
    except FileNotFoundError:
        nginx_cmd = ["nginx-missing"]
    out.append(Service("router", settings.router_port, nginx_cmd, f"http://{h}:{settings.router_port}/router/health", "nginx"))
    prom = prometheus_binary() or "prometheus-missing"
    out.append(Service(
        "prometheus", settings.prometheus_port,
        [prom, f"--config.file={run / 'prometheus.yml'}", f"--storage.tsdb.path={run / 'prometheus'}",
         f"--web.listen-address={h}:{settings.prometheus_port}", "--web.enable-lifecycle",
         "--storage.tsdb.retention.time=30d"],
        f"http://{h}:{settings.prometheus_port}/-/ready", "prometheus",
    ))
    from abfleet import airflow_local  # it builds on this module

    out.append(airflow_local.service(settings))  # started only with --with-airflow
    return out


OPTIONAL = ("airflow",)


# ---- pid bookkeeping ------------------------------------------------------------

def _pid_file(settings: Settings, name: str) -> Path:
    return settings.run_dir / "pids" / f"{name}.pid"


def running_pid(settings: Settings, svc: Service) -> int | None:
    """The pid of our running process for this service, or None (stale files are removed)."""
    path = _pid_file(settings, svc.name)
    try:
        pid = int(path.read_text().split()[0])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (OSError, ValueError, IndexError):
        path.unlink(missing_ok=True)
        return None
    if svc.marker not in cmdline:
        path.unlink(missing_ok=True)
        return None
    return pid


def port_taken(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def _healthy(url: str, *, any_answer: bool = False) -> bool:
    """True when the URL answers (any status with any_answer, else a non-5xx one)."""
    try:
        code = requests.get(url, timeout=2).status_code
    except requests.RequestException:
        return False
    return any_answer or code < 500


# ---- up / down / status -----------------------------------------------------------

def prepare(settings: Settings, candidate_weight: int) -> None:
    """Write the rendered configs and folders the processes need."""
    run = settings.run_dir
    for sub in ("pids", "logs", "objects", "metrics", "prometheus"):
        (run / sub).mkdir(parents=True, exist_ok=True)
    router.write_config(settings, candidate_weight=candidate_weight)
    from abfleet import monitoring

    monitoring.write_prometheus_config(settings)
    (run / "state.json").write_text(json.dumps({"candidate_weight": candidate_weight}))
    from abfleet.store import open_store

    with open_store(settings) as store:
        store.set_state("candidate_weight", candidate_weight)  # exported as a gauge for the SRM alert


def saved_weight(settings: Settings) -> int:
    try:
        return int(json.loads((settings.run_dir / "state.json").read_text())["candidate_weight"])
    except (OSError, ValueError, KeyError):
        return settings.candidate_weight


def up(settings: Settings, *, candidate_weight: int | None = None, only: tuple[str, ...] | None = None,
       with_airflow: bool = False, say: Callable[[str], None] = print) -> dict:
    """Start whatever is not running yet (all services, or `only` those named); return the status.

    Airflow (about 1 GB of memory) starts only with `with_airflow`; a running one is kept.
    """
    weight = saved_weight(settings) if candidate_weight is None else candidate_weight
    wanted = set(only) if only is not None else {s.name for s in services(settings)} - set(OPTIONAL)
    if with_airflow:
        wanted.add("airflow")
    todo = [svc for svc in services(settings) if svc.name in wanted]
    for svc in todo:
        if svc.command[0].endswith("-missing"):
            tool = svc.command[0].removesuffix("-missing")
            raise StackError(f"{tool} is not installed: run `sudo apt-get install -y {tool}` (or `make install-system`)")
    prepare(settings, weight)
    for svc in todo:
        pid = running_pid(settings, svc)
        if pid is not None:
            if svc.name == "router":
                _reload_nginx(settings, svc, pid)
            say(f"  {svc.name:<11} already running (pid {pid}) on :{svc.port}")
            continue
        if port_taken(settings.host, svc.port):
            env_name = {"production": "PRODUCTION", "candidate": "CANDIDATE"}.get(svc.name, svc.name.upper())
            raise StackError(
                f"port {svc.port} ({svc.name}) is taken by another process: stop it, or pick another port "
                f"with ABFLEET_{env_name}_PORT"
            )
        if svc.name == "airflow":
            from abfleet import airflow_local

            say("  airflow     preparing its metadata database (first time: ~10 s)")
            airflow_local.migrate(settings)
        proc = _start(settings, svc)
        _wait_ready(settings, svc, proc)
        say(f"  {svc.name:<11} started on :{svc.port}")
    return status(settings)


def admin_token(settings: Settings) -> str:
    """The token for the servers' reload endpoint: from settings, else one kept in the run dir."""
    if settings.admin_token:
        return settings.admin_token
    path = settings.run_dir / "admin-token"
    if not path.exists():
        import secrets

        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(secrets.token_urlsafe(24))
    return path.read_text().strip()


def _start(settings: Settings, svc: Service) -> subprocess.Popen:
    log = (settings.run_dir / "logs" / f"{svc.name}.log").open("ab")
    env = {**os.environ, **settings.env(), "ABFLEET_ADMIN_TOKEN": admin_token(settings), **svc.env}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    proc = subprocess.Popen(
        svc.command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        env=env, cwd=project_root(), start_new_session=True,
    )
    _pid_file(settings, svc.name).write_text(f"{proc.pid}\n")
    return proc


def _wait_ready(settings: Settings, svc: Service, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + svc.timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            _pid_file(settings, svc.name).unlink(missing_ok=True)
            raise StackError(f"{svc.name} exited at start: see {settings.run_dir / 'logs' / (svc.name + '.log')}")
        # A model server without a model answers 503 but is up: `status` tells the difference.
        if _healthy(svc.health_url, any_answer=True):
            return
        time.sleep(0.3)
    raise StackError(f"{svc.name} did not become ready in {svc.timeout:.0f}s: see {settings.run_dir / 'logs' / (svc.name + '.log')}")


def _reload_nginx(settings: Settings, svc: Service, pid: int) -> None:
    # A rendered config may carry new weights: nginx re-reads it without dropping a connection.
    os.kill(pid, signal.SIGHUP)


def down(settings: Settings, *, say: Callable[[str], None] = print) -> list[str]:
    """Stop the processes `up` started (newest first); return their names."""
    stopped = []
    for svc in reversed(services(settings)):
        pid = running_pid(settings, svc)
        if pid is None:
            continue
        _stop(pid)
        _pid_file(settings, svc.name).unlink(missing_ok=True)
        stopped.append(svc.name)
        say(f"  {svc.name:<11} stopped (pid {pid})")
    return stopped


def _stop(pid: int, timeout: float = 20.0) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        # Reap it if it is our own child (tests start the stack in-process).
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.1)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def status(settings: Settings) -> dict:
    """Processes, ports, alias → version, weights."""
    procs = {}
    for svc in services(settings):
        pid = running_pid(settings, svc)
        if pid is None and svc.name in OPTIONAL:
            continue  # not asked for: not part of this fleet's status
        procs[svc.name] = {"pid": pid, "port": svc.port, "running": pid is not None,
                           "healthy": pid is not None and _healthy(svc.health_url)}
    try:
        aliases = registry.aliases(settings) if procs["mlflow"]["healthy"] else None
    except registry.RegistryError:
        aliases = None
    weight = saved_weight(settings)
    return {
        "run_dir": str(settings.run_dir),
        "processes": procs,
        "aliases": aliases,
        "weights": {"production": 100 - weight, "candidate": weight},
        "urls": {
            "router": f"http://{settings.host}:{settings.router_port}/",
            "mlflow": settings.tracking_uri,
            "prometheus": f"http://{settings.host}:{settings.prometheus_port}/",
            **({"airflow": f"http://{settings.host}:{settings.airflow_port}/"} if "airflow" in procs else {}),
        },
    }
