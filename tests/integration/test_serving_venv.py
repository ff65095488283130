"""The serving dependencies alone run a model server: what the slim serving image holds."""

from __future__ import annotations

import subprocess
import venv

import pytest
import requests

from abfleet import procs
from abfleet.api import FLAT, PREDICT
from tests.helpers import ROOT, free_port, wait_for
from tests.helpers import health, start_model_server

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
    # The migrations ship in the installed package: its own command creates the tables.
    env = procs.child_env(settings)
    env.pop("PYTHONPATH", None)
    upgrade = subprocess.run([str(env_dir / "bin" / "abfleet"), "db", "upgrade"], env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=120)
    assert upgrade.returncode == 0 and "upgraded from an empty database to" in upgrade.stdout, upgrade.stderr[-3000:]
    server = start_model_server(settings, "production", log=tmp_path / "server.log", metrics_dir=tmp_path / "metrics",
                                abfleet=env_dir / "bin" / "abfleet", cwd=tmp_path, inherit_pythonpath=False)
    try:
        url = f"http://{settings.host}:{port}"
        wait_for(lambda: health(url).get("model_version") == fleet.versions["production"], 90,
                 what="the slim server to load the model")
        r = requests.post(f"{url}{PREDICT}", json=FLAT, timeout=10)
        assert r.status_code == 200 and r.json()["estimated_price"] > 0
    finally:
        procs.stop_child(server, timeout=30)
