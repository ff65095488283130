"""Helpers the test modules share (conftest holds fixtures; import helpers from here)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import requests

from abfleet import api, procs
from abfleet.procs import free_port
from abfleet.settings import Settings

__all__ = ["ROOT", "OUTPUT_DIR", "free_port", "wait_for", "fleet_settings", "start_model_server", "health"]

ROOT = Path(__file__).resolve().parents[1]
OUTPUT_DIR = ROOT / "test-output"


def wait_for(predicate, timeout: float = 60.0, interval: float = 0.25, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def fleet_settings(run_dir: Path, **overrides) -> Settings:
    ports = {name: free_port() for name in
             ("router_port", "production_port", "candidate_port", "mlflow_port", "prometheus_port", "airflow_port")}
    defaults = {"reload_interval": 2.0, "admin_token": "test-token"}
    return Settings(run_dir=run_dir, **{**defaults, **ports, **overrides})


def start_model_server(settings: Settings, variant: str = "production", *, log: Path, metrics_dir: Path,
                       abfleet: str | Path | None = None, cwd: Path | None = None,
                       inherit_pythonpath: bool = True) -> subprocess.Popen:
    """`abfleet serve` for one variant with these settings, as the stack starts it, in its own
    session; stop it with `procs.stop_child(proc)`. `abfleet` picks another installation's
    command (a venv of its own, started without our PYTHONPATH when inherit_pythonpath is False)."""
    settings = settings.replace(variant=variant, prometheus_multiproc_dir=str(metrics_dir))
    env = procs.child_env(settings)
    if not inherit_pythonpath:
        env.pop("PYTHONPATH", None)
    command = [str(abfleet or procs.venv_bin("abfleet")), "serve", "--variant", variant]
    return procs.start(command, env, log, cwd=cwd)


def health(url: str) -> dict:
    """A server's health document (api.HEALTH), or {} while it does not answer."""
    try:
        return requests.get(f"{url}{api.HEALTH}", timeout=3).json()
    except (requests.RequestException, ValueError):
        return {}
