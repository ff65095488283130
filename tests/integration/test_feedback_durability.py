"""Nothing answered is lost, nothing is stored twice: feedback sent while the database is stopped
is answered 202 and stored exactly once when it is back; a model server killed with SIGKILL while
its spool's rows are being inserted in chunks loses and duplicates none of them after a restart.
The PostgreSQL is the test's own (tests.pg), stopped and locked by the test."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from pathlib import Path

import pytest
import requests
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families

from abfleet import api, procs
from tests.helpers import free_port, health, start_model_server, wait_for
from tests.integration.test_database_outage import Steady, answered_ids, model_server, stored
from tests.pg import postgres_server

pytestmark = pytest.mark.slow


def metric(url: str, name: str, **labels: str) -> float:
    """The sum of a server's samples of `name` whose labels include `labels`."""
    text = requests.get(f"{url}{api.METRICS}", timeout=10).text
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == name and labels.items() <= s.labels.items())


def feedback_rows(url: str) -> list[tuple[str, str, float | None, str | None]]:
    """(prediction id, feedback type, value, user id) of every feedback row in the database."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(sa.text(
                "SELECT prediction_id, feedback_type, feedback_value, user_id FROM feedback"))]
    finally:
        engine.dispose()


def predict(session: requests.Session, url: str, user: str, sqft: int = 1200) -> str:
    r = session.post(f"{url}{api.PREDICT}", json={**api.FLAT, "total_sqft": sqft}, headers={"X-User-Id": user}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["prediction_id"]


def rate(session: requests.Session, url: str, pid: str, user: str, kind: str = "rating", value: float | None = 4):
    return session.post(f"{url}{api.FEEDBACK}", json={"prediction_id": pid, "feedback_type": kind, "feedback_value": value},
                        headers={"X-User-Id": user}, timeout=30)


def test_feedback_sent_while_the_database_is_stopped_is_stored_exactly_once(fleet, tmp_path):
    with postgres_server() as pg, model_server(fleet, pg, tmp_path) as url:
        session = requests.Session()
        accepted: dict[tuple[str, str], tuple[float | None, str]] = {}
        with Steady(url) as load:  # predictions keep coming throughout
            before = [(predict(session, url, f"early-{i}", 800 + i), f"early-{i}") for i in range(15)]
            pg.stop("fast")
            try:
                during = [(predict(session, url, f"late-{i}", 900 + i), f"late-{i}") for i in range(15)]  # spooled
                for n, (pid, user) in enumerate(before + during):
                    r = rate(session, url, pid, user, value=1 + n % 5)
                    assert r.status_code == 202, r.text
                    assert r.json() == {"status": "pending", "prediction_id": pid, "feedback_type": "rating"}
                    accepted[(pid, "rating")] = (float(1 + n % 5), user)
                for pid, user in before[:5] + during[:5]:
                    r = rate(session, url, pid, user, "actual_price", 60.0)
                    assert r.status_code == 202, r.text
                    accepted[(pid, "actual_price")] = (60.0, user)
                # A repeated pending key is a 409, whichever worker gets it, and is not spooled twice.
                for pid, user in before[:4] + during[:4]:
                    r = rate(session, url, pid, user, value=5)
                    assert r.status_code == 409 and r.json()["field"] == "feedback_type", r.text
                # Accepted for now, refused when resolved: not the user who got the estimate.
                intruder = rate(session, url, during[-1][0], "someone-else", "accurate", None)
                assert intruder.status_code == 202, intruder.text
                assert metric(url, "abfleet_feedback_pending") == len(accepted) + 1
            finally:
                pg.start()
            wait_for(lambda: len(feedback_rows(pg.url)) >= len(accepted), 120, what="the pending feedback to be stored")
        wait_for(lambda: metric(url, "abfleet_feedback_pending") == 0, 60, what="the feedback spool to empty")
        rows = feedback_rows(pg.url)
        keys = [(pid, kind) for pid, kind, _v, _u in rows]
        assert len(keys) == len(set(keys)) == len(accepted), "feedback stored twice, or some not stored"
        assert {(pid, kind): (value, user) for pid, kind, value, user in rows} == accepted
        resolved = {o: metric(url, "abfleet_feedback_pending_resolved_total", outcome=o) for o in ("stored", "refused")}
        assert resolved == {"stored": len(accepted), "refused": 1}, resolved
        assert rate(session, url, before[0][0], before[0][1], value=2).status_code == 409  # stored: a live 409
        failed = [a for a in load.answers if a[2] != 200]
        assert not failed, f"{len(failed)} of {len(load.answers)} predictions not answered 200: {failed[:5]}"
        predicted = answered_ids(load) | {pid for pid, _u in before + during}
        wait_for(lambda: predicted <= set(stored(pg)), 120, what="every answered prediction in the database")


def spool_rows(spool_dir: Path) -> int:
    return sum(len([line for line in p.read_bytes().strip(b"\0").splitlines() if line.strip()])
               for p in spool_dir.glob("*.jsonl"))


def waiting_inserts(conn, exclude: int) -> int:
    """Sessions other than `exclude` whose INSERT into predictions waits for a lock."""
    return conn.execute(sa.text(
        "SELECT count(*) FROM pg_stat_activity WHERE pid <> :me AND wait_event_type = 'Lock' "
        "AND query LIKE 'INSERT INTO predictions%'"), {"me": exclude}).scalar_one()


def kill_group(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def test_a_server_killed_during_a_chunked_batch_insert_loses_and_duplicates_nothing(fleet, tmp_path):
    spool_dir = tmp_path / "spool"
    with postgres_server() as pg:
        port = free_port()
        settings = fleet.settings.replace(database_url=pg.url, production_port=port, spool_dir=str(spool_dir), workers=1,
                                          db_statement_timeout_s=600.0)
        url = f"http://{settings.host}:{port}"
        version = fleet.versions["production"]

        def start(name: str, **changes) -> subprocess.Popen:
            proc = start_model_server(settings.replace(**changes), "production", log=tmp_path / f"{name}.log",
                                      metrics_dir=tmp_path / f"metrics-{name}")
            return proc

        # 1. A backlog of a few thousand answered predictions, all still in the spool (nothing is
        #    inserted for an hour), then the server is killed.
        first = start("first", spool_linger=3600.0)
        try:
            wait_for(lambda: health(url).get("model_version") == version, 90, what="the first server")
            answered: list[str] = []
            lock = threading.Lock()

            def fire(worker: int) -> None:
                session = requests.Session()
                for i in range(625):
                    pid = predict(session, url, f"kill-{worker}", 600 + (worker * 97 + i) % 3000)
                    with lock:
                        answered.append(pid)

            threads = [threading.Thread(target=fire, args=(w,)) for w in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(300)
            assert len(answered) == len(set(answered)) == 5000
            assert stored(pg) == {} and spool_rows(spool_dir) == 5000
        finally:
            kill_group(first)

        # 2. Another session holds an uncommitted row with the id answered last (in the last chunk
        #    of the last spool file): the restarted server replays the dead one's files in chunks
        #    (at most CHUNK_ROWS rows per statement and transaction), commits the first ones, and
        #    its INSERT of the last chunk waits on that row. It is killed then.
        engine = sa.create_engine(pg.url)
        blocker = engine.connect()
        # Autocommit: pg_stat_activity is a snapshot held for the length of a transaction.
        watcher = engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        try:
            blocker_pid = blocker.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
            blocker.execute(sa.text(
                "INSERT INTO predictions (id, created_at, variant, model_version, location, total_sqft, bhk, bath, "
                "estimated_price, latency_ms) VALUES (:id, now(), 'production', 'x', 'x', 1, 1, 1, 1, 1)"),
                {"id": answered[-1]})
            second = start("second")
            try:
                wait_for(lambda: waiting_inserts(watcher, blocker_pid) > 0, 120, interval=0.05,
                         what="the restarted server's replay to wait on the locked row")
                part = stored(pg)
                assert 0 < len(part) < len(answered), f"{len(part)} of {len(answered)} stored: not mid-replay"
            finally:
                kill_group(second)
            blocker.rollback()  # the test's row is never stored
        finally:
            blocker.close()
            watcher.close()
            engine.dispose()

        # 3. A third start: every answered prediction stored exactly once, nothing else, spool empty.
        third = start("third")
        try:
            wait_for(lambda: set(answered) <= set(stored(pg)), 180, what="every answered prediction to be stored")
            rows = stored(pg)
            assert set(rows) == set(answered) and set(rows.values()) == {1}
            assert sum(rows.values()) == len(answered)
            wait_for(lambda: spool_rows(spool_dir) == 0, 60, what="the spool files to be emptied")
        finally:
            procs.stop_child(third, timeout=30)
