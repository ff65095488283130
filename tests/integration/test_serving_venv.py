"""The serving dependencies alone run a model server: what the slim serving image holds."""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest
import requests

from abfleet.api import FLAT, PREDICT
from tests.conftest import ROOT, free_port, wait_for

pytestmark = pytest.mark.slow


def test_a_venv_with_only_serving_dependencies_serves_predictions(fleet, tmp_path):
    env_dir = tmp_path / "serving-venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    install = subprocess.run([str(py), "-m", "pip", "install", "-q", "-c", str(ROOT / "constraints.txt"), str(ROOT)],
                             capture_output=True, text=True, timeout=900)
    assert install.returncode == 0, install.stderr[-3000:]
    for module in ("airflow", "evidently", "locust", "pulumi"):
        probe = subprocess.run([str(py), "-c", f"import {module}"], capture_output=True, text=True)
        assert probe.returncode != 0, f"{module} is importable in the serving venv"

    port = free_port()
    settings = fleet.settings.replace(database_url=f"sqlite:///{tmp_path / 'store.db'}", production_port=port)
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, **settings.env(),
           "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics")}
    server = subprocess.Popen([str(env_dir / "bin" / "abfleet"), "serve", "--variant", "production"], env=env,
                              cwd=tmp_path, stdout=(tmp_path / "server.log").open("wb"), stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        url = f"http://{settings.host}:{port}"
        wait_for(lambda: _version(url) == fleet.versions["production"], 90, what="the slim server to load the model")
        r = requests.post(f"{url}{PREDICT}", json=FLAT, timeout=10)
        assert r.status_code == 200 and r.json()["estimated_price"] > 0
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


def _version(url: str):
    try:
        return requests.get(f"{url}/api/health", timeout=3).json().get("model_version")
    except (requests.RequestException, ValueError):
        return None
