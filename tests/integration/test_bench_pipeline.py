"""`abfleet bench pipeline --json` at small N on SQLite and PostgreSQL: the JSON's shape, and
the jobs' memory does not grow with the store beyond the sample (no timing assertion)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa

pytestmark = pytest.mark.slow

SMALL, LARGE, SAMPLE = 6_000, 30_000, 1_000


def test_bench_pipeline_json_and_memory_bounded_by_the_sample(tmp_path, postgres_url):
    env = {**os.environ, "ABFLEET_RUN_DIR": str(tmp_path / "run"), "ABFLEET_ARMS_MIN_ROWS": "300",
           "ABFLEET_DRIFT_MIN_ROWS": "300"}
    abfleet = str(Path(sys.executable).parent / "abfleet")
    done = subprocess.run([abfleet, "bench", "pipeline", "--rows", str(SMALL), str(LARGE), "--sample-rows", str(SAMPLE),
                           "--postgres", postgres_url, "--json"], env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    print(json.dumps(result["runs"], indent=1))  # the figures, with -s
    assert result["config"]["sample_rows"] == SAMPLE and result["config"]["jobs"] == ["evaluation", "drift", "summary"]
    runs = {(r["backend"], r["rows"]): r for r in result["runs"]}
    assert set(runs) == {(b, n) for b in ("sqlite", "postgresql") for n in (SMALL, LARGE)}
    for (backend, n), run in runs.items():
        assert run["loaded"]["predictions"] == n and 0.08 * n < run["loaded"]["feedback"] < 0.16 * n, run["loaded"]
        evaluation, drift = run["jobs"]["evaluation"], run["jobs"]["drift"]
        for job in (evaluation, drift):
            assert job["seconds"] > 0 and job["peak_rss_mb"] >= job["rss_before_job_mb"] > 0 and job["traced_peak_mb"] > 0
        arms = evaluation["outcome"]
        assert sum(arms["arm_rows"].values()) == n and arms["arms_drift_detected"] is False, (backend, n, arms)
        assert all(rows <= SAMPLE for rows in arms["sampled_rows"].values())
        assert drift["outcome"]["current_rows"] == n and drift["outcome"]["sampled_rows"] == SAMPLE
        assert drift["outcome"]["drift_detected"] is False, (backend, n, drift["outcome"])
        # /api/metrics' query over the whole window sees every production row.
        summarised = run["jobs"]["summary"]["outcome"]
        assert summarised["summarised_rows"] == arms["arm_rows"]["production"], (backend, n, summarised)
        assert 0 < summarised["query_seconds"]["min"] <= summarised["query_seconds"]["median"] <= summarised["query_seconds"]["max"]
    for backend in ("sqlite", "postgresql"):
        for job in ("evaluation", "drift"):
            small, large = (runs[(backend, n)]["jobs"][job]["traced_peak_mb"] for n in (SMALL, LARGE))
            # Five times the rows, the same sample: reading every row would add tens of MB.
            assert large <= small * 1.2 + 2.0, (backend, job, small, large)
    # The scratch databases are gone; the SQLite files too.
    engine = sa.create_engine(postgres_url)
    with engine.connect() as conn:
        left = conn.execute(sa.text("SELECT datname FROM pg_database WHERE datname LIKE :like"),
                            {"like": "abfleet_bench_%"}).scalars().all()
    engine.dispose()
    assert not [name for name in left if name.endswith((f"_{SMALL}", f"_{LARGE}"))], left
    assert not list(Path(result["run_dir"]).glob("store-*.db"))
