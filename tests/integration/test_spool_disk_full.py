"""A model server whose spool folder fills up refuses predictions with 503 and Retry-After
instead of failing for good, and answers again by itself once space returns; every prediction
it answered reaches the database."""

from __future__ import annotations

import os
import sqlite3
import subprocess
from pathlib import Path

import pytest
import requests

from abfleet import procs
from abfleet.api import FLAT, PREDICT
from abfleet.store import Store
from tests.helpers import free_port, health, migrate, start_model_server, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MB tmpfs, unmounted afterwards; skipped (loudly) where mounting is not permitted."""
    where = tmp_path / "small-disk"
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(where)],
                             capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"SKIPPED, NOT RUN: cannot mount a small tmpfs for the spool (needs root): {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


def fill(disk: Path, leave: int) -> Path:
    """A filler file taking all but about `leave` bytes of the disk."""
    stats = os.statvfs(disk)
    path = disk / "filler"
    path.write_bytes(b"x" * max(0, stats.f_bavail * stats.f_frsize - leave))
    return path


def test_a_full_spool_disk_is_a_503_with_retry_after_and_recovers_when_space_returns(fleet, tmp_path, small_disk):
    port = free_port()
    db = tmp_path / "store.db"
    # The spool never flushes on its own (the database takes nothing while the server runs):
    # the backlog piles up on the small disk until it is full.
    settings = fleet.settings.replace(run_dir=tmp_path / "run", database_url=f"sqlite:///{db}", production_port=port,
                                      spool_dir=str(small_disk), spool_linger=3600.0, workers=1)
    url = f"http://{settings.host}:{port}"
    server = start_model_server(migrate(settings), "production", log=tmp_path / "server.log", metrics_dir=tmp_path / "metrics")
    answered: list[str] = []
    try:
        try:
            wait_for(lambda: health(url).get("model_version") == fleet.versions["production"], 90, what="the server")
        except AssertionError:
            raise AssertionError((tmp_path / "server.log").read_text()[-3000:]) from None
        filler = fill(small_disk, leave=600 << 10)
        session = requests.Session()

        def predict(i: int) -> requests.Response:
            r = session.post(f"{url}{PREDICT}", json={**FLAT, "total_sqft": 600 + i % 3000},
                             headers={"X-User-Id": "disk-full"}, timeout=30)
            if r.status_code == 200:
                answered.append(r.json()["prediction_id"])
            return r

        refused = None
        for i in range(20000):  # bounded: ~600 KB of lines is a few thousand predictions
            r = predict(i)
            if r.status_code == 503:
                refused = r
                break
            assert r.status_code == 200, r.text
        assert refused is not None, f"the disk never filled after {len(answered)} predictions"
        assert int(refused.headers["Retry-After"]) >= 1
        assert refused.headers["Content-Type"] == "application/json"
        assert "disk full" in refused.json()["error"]
        assert predict(0).status_code == 503, "still full: still refused"
        metrics = requests.get(f"{url}/metrics", timeout=10).text
        assert any(line.startswith("abfleet_spool_refused_total") and float(line.split()[-1]) >= 2
                   for line in metrics.splitlines()), "the refusals are counted"

        filler.unlink()  # space returns
        for i in range(20):
            r = predict(i)
            assert r.status_code == 200, f"not answered again once space returned: {r.status_code} {r.text}"
    finally:
        procs.stop_child(server, timeout=60)
    Store(f"sqlite:///{db}", spool_dir=small_disk).settle()  # what the stop left spooled (none if it flushed)
    with sqlite3.connect(db) as conn:
        stored = {row[0] for row in conn.execute("SELECT id FROM predictions")}
    assert len(answered) > 20 and set(answered) <= stored, "every answered prediction is in the database"
