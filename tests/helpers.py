"""Helpers the test modules share (conftest holds fixtures; import helpers from here)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import requests

from abfleet import procs
from abfleet.settings import Settings


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
    """A server's /api/health document, or {} while it does not answer."""
    try:
        return requests.get(f"{url}/api/health", timeout=3).json()
    except (requests.RequestException, ValueError):
        return {}
