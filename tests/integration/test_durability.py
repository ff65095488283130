"""An answered prediction is never lost: a model server is killed (SIGKILL, the whole process
group) in the middle of a burst, restarted, and every prediction it answered is in the store."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import threading
from pathlib import Path

import pytest
import requests

from abfleet import procs
from abfleet.api import FLAT
from tests.helpers import free_port, migrate, wait_for
from tests.helpers import health, start_model_server

pytestmark = pytest.mark.slow


def start_server(settings, tmp_path: Path, log_name: str) -> subprocess.Popen:
    # Nothing reaches the database before the kill: every answer must come back from the spool.
    return start_model_server(settings.replace(spool_linger=3600.0), "production", log=tmp_path / log_name,
                              metrics_dir=tmp_path / "metrics")


def stored_ids(db: Path) -> set[str]:
    """The prediction ids in the database file itself (a plain SQLite read: no spool lookups)."""
    if not db.exists():
        return set()
    with sqlite3.connect(db) as conn:
        try:
            return {r[0] for r in conn.execute("SELECT id FROM predictions")}
        except sqlite3.OperationalError:  # no table yet
            return set()


def test_answered_predictions_survive_a_sigkill_mid_burst(fleet, tmp_path):
    port = free_port()
    db = tmp_path / "durable.db"
    settings = migrate(fleet.settings.replace(run_dir=tmp_path / "run", database_url=f"sqlite:///{db}", production_port=port))
    url = f"http://{settings.host}:{port}"
    version = fleet.versions["production"]

    server = start_server(settings, tmp_path, "first.log")
    try:
        wait_for(lambda: health(url).get("model_version") == version, 90, what="the first server")
    except AssertionError:
        os.killpg(server.pid, signal.SIGKILL)
        raise AssertionError((tmp_path / "first.log").read_text()[-3000:]) from None

    answered: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def fire(worker: int) -> None:
        session = requests.Session()
        i = 0
        while not stop.is_set() and i < 5000:  # bounded, and ends at the kill anyway
            i += 1
            try:
                r = session.post(f"{url}/api/predict_home_price", json={**FLAT, "total_sqft": 600 + (worker * 97 + i) % 3000},
                                 headers={"X-User-Id": f"durable-{worker}"}, timeout=10)
            except requests.RequestException:
                if stop.is_set():
                    return
                continue
            if r.status_code == 200:
                with lock:
                    answered.append(r.json()["prediction_id"])

    threads = [threading.Thread(target=fire, args=(w,), daemon=True) for w in range(12)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len(answered) >= 300, 120, interval=0.05, what="300 answered predictions")
    finally:
        os.killpg(server.pid, signal.SIGKILL)  # mid-burst: the threads are still firing
        stop.set()
        server.wait(timeout=30)
        for t in threads:
            t.join(timeout=30)
    with lock:
        answered_ids = set(answered)
    assert len(answered_ids) == len(answered) >= 300
    before_restart = stored_ids(db)
    assert len(before_restart & answered_ids) < len(answered_ids), "nothing was left in the spool: the kill proved nothing"

    server = start_server(settings, tmp_path, "second.log")
    try:
        wait_for(lambda: health(url).get("model_version") == version, 90, what="the restarted server")
        # The restarted workers replay the dead ones' spool files before they serve.
        wait_for(lambda: answered_ids <= stored_ids(db), 60, what="the spool to be replayed")
        stored = stored_ids(db)
        assert len(stored) >= len(answered_ids)
        assert answered_ids <= stored
        spool_dir = Path(str(db) + "-spool")
        leftovers = [p for p in spool_dir.glob("*.jsonl") if p.read_bytes().strip(b"\0")]
        assert not leftovers, f"spool files still holding rows after the replay: {leftovers}"
        # And the replayed predictions take feedback like any other.
        pid = sorted(answered_ids)[0]
        with sqlite3.connect(db) as conn:  # feedback comes from the user who got the estimate
            (user,) = conn.execute("SELECT user_id FROM predictions WHERE id = ?", (pid,)).fetchone()
        r = requests.post(f"{url}/api/feedback", json={"prediction_id": pid, "feedback_type": "rating", "feedback_value": 4},
                          headers={"X-User-Id": user}, timeout=10)
        assert r.status_code == 201, r.text
    finally:
        procs.stop_child(server, timeout=30)
