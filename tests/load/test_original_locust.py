"""The original project's Locust user (tests/load/original_locustfile.py), 20 users for 30 s
through the router of the live fleet, in Locust's own process: not one request fails."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from abfleet import api
from abfleet.settings import process_environ, project_root
from tests.helpers import OUTPUT_DIR

pytestmark = pytest.mark.slow

LOCUSTFILE = Path(__file__).with_name("original_locustfile.py")


def test_the_original_load_test_passes_through_the_router(fleet):
    out = OUTPUT_DIR / "original-locust"
    out.mkdir(parents=True, exist_ok=True)
    argv = [str(Path(sys.executable).parent / "locust"), "-f", str(LOCUSTFILE), "--headless",
            "--host", fleet.router_url, "--users", "20", "--spawn-rate", "10", "--run-time", "30s",
            "--stop-timeout", "10", "--csv", str(out / "stats"), "--html", str(out / "report.html"),
            "--only-summary", "--loglevel", "WARNING", "--exit-code-on-error", "1"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=180, cwd=project_root(),
                          env=process_environ(python_path=[project_root()]))
    with (out / "stats_stats.csv").open(newline="") as f:
        rows = {(r["Type"], r["Name"]): r for r in csv.DictReader(f)}
    failures = (out / "stats_failures.csv").read_text()
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:] + failures
    assert int(rows[("", "Aggregated")]["Failure Count"]) == 0, failures
    for key in (("POST", api.PREDICT), ("GET", api.HEALTH), ("GET", api.METRICS_SUMMARY), ("GET", api.LOCATIONS)):
        assert int(rows[key]["Request Count"]) > 0, (key, list(rows))
