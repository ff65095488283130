"""`abfleet soak` end to end, short: its own PostgreSQL and fleet, every fault injected once,
nothing answered lost, the report in its documented shape, and nothing left running."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from abfleet import procs, soak
from abfleet.settings import Settings

pytestmark = pytest.mark.slow


def commands_naming(folder: Path) -> list[str]:
    """Command lines of running processes that mention `folder`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if str(folder) in cmdline:
                found.append(cmdline)
    return found


def test_a_short_soak_loses_nothing_and_reports_every_phase(tmp_path):
    run_dir = tmp_path / "run"
    report_path = tmp_path / "report.json"
    env = procs.child_env(Settings(run_dir=run_dir))
    done = subprocess.run([procs.venv_bin("abfleet"), "soak", "--minutes", "1", "--rate", "10",
                           "--report", str(report_path)], env=env, capture_output=True, text=True, timeout=900)
    print(done.stderr[-4000:])
    print(done.stdout)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(report_path.read_text())

    rows = report["rows"]
    assert rows["answered"] > 200 and rows["lost"] == 0 and rows["stored_twice"] == 0, rows
    assert rows["stored"] >= rows["answered"], rows
    assert report["requests"]["total"] == sum(report["requests"]["by_status"].values())
    assert report["requests"]["by_status"]["200"] == rows["answered"]
    names = [p["name"] for p in report["phases"]]
    assert names == ["baseline", *[n for f in soak.FAULTS for n in (f, f"recovery after {f}")]], names
    for phase in report["phases"]:
        assert phase["requests"] > 0 and phase["p99_ms"] is not None, phase
    assert set(report["memory_mb"]) == {"production", "candidate"}
    for mem in report["memory_mb"].values():
        assert mem["start"] > 0 and mem["end"] > 0, report["memory_mb"]
    assert "rows lost           0" in done.stdout and "recovery after server killed" in done.stdout
    assert "soak: database frozen" in done.stderr  # progress while it runs
    assert not commands_naming(run_dir), commands_naming(run_dir)
