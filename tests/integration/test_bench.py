"""`abfleet bench --json` end to end, briefly: wrk through nginx against our server and
`mlflow models serve` of the session's @production model. Shape and correctness only; the
figures themselves are for the README, measured on an idle machine (no timing assertion)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_bench_json_measures_three_sides_without_errors(fleet, tmp_path):
    if shutil.which("wrk") is None:
        pytest.skip("wrk is NOT installed, so `abfleet bench` was NOT run: apt-get install -y wrk "
                    "(`make test` installs it when run as root)")
    settings = fleet.settings.replace(run_dir=tmp_path / "run")
    env = {**os.environ, **settings.env()}
    abfleet = str(Path(sys.executable).parent / "abfleet")
    done = subprocess.run([abfleet, "bench", "--json", "--duration", "1", "--connections", "8"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    result = json.loads(done.stdout)  # stdout is the JSON document and nothing else
    for side in ("trivial", "model", "mlflow"):
        numbers = result[side]
        assert numbers["errors"] == 0 and numbers["requests"] > 0, (side, numbers)
        assert numbers["rps"] > 0 and 0 < numbers["p50_ms"] <= numbers["p99_ms"], (side, numbers)
    ratios = result["ratios"]
    assert ratios["model_over_trivial"] == pytest.approx(result["model"]["rps"] / result["trivial"]["rps"], rel=1e-3)
    assert ratios["model_over_mlflow"] == pytest.approx(result["model"]["rps"] / result["mlflow"]["rps"], rel=1e-3)
    # Both servers priced the probe flat with the same registered model.
    assert result["agreement"]["same"], result["agreement"]
    assert result["config"]["model"].endswith(f"/{fleet.versions['production']}")
    assert Path(result["run_dir"], "result.json").exists()
    assert "bench: model" in done.stderr  # progress goes to stderr
