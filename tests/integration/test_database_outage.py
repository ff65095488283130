"""A model server keeps answering predictions while its PostgreSQL hangs or is down: answers
wait for the spool, never for the database, and every answered prediction reaches the
database once it is back. The PostgreSQL is the test's own (tests.pg), frozen and stopped."""

from __future__ import annotations

import os
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests
import sqlalchemy as sa

from abfleet import api, procs
from tests.helpers import free_port, health, start_model_server, wait_for
from tests.pg import PostgresServer, family, postgres_server

pytestmark = pytest.mark.slow

OUTAGE_S = 30


class Steady:
    """Predictions sent to one server by two threads without pause: (sent at, seconds, status,
    prediction id) for each, and whether /api/live answered 200 every half second."""

    def __init__(self, url: str):
        self.url = url
        self.answers: list[tuple[float, float, int, str | None]] = []
        self.live_failures: list[str] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._predict, args=(n,), daemon=True) for n in range(2)]
        self.threads.append(threading.Thread(target=self._live, daemon=True))

    def _predict(self, n: int) -> None:
        session = requests.Session()
        i = 0
        while not self.stop.is_set():
            i += 1
            sent = time.monotonic()
            try:
                r = session.post(f"{self.url}{api.PREDICT}", json={**api.FLAT, "bhk": 1 + i % 4},
                                 headers={"X-User-Id": f"steady-{n}-{i}"}, timeout=60)
                status, pid = r.status_code, r.json().get("prediction_id")
            except requests.RequestException as exc:
                status, pid = 0, repr(exc)
            self.answers.append((sent, time.monotonic() - sent, status, pid))

    def _live(self) -> None:
        while not self.stop.wait(0.5):
            try:
                r = requests.get(f"{self.url}{api.LIVE}", timeout=5)
                if r.status_code != 200:
                    self.live_failures.append(f"{r.status_code} {r.text[:100]}")
            except requests.RequestException as exc:
                self.live_failures.append(repr(exc))

    def between(self, start: float, end: float) -> list[float]:
        return [seconds for sent, seconds, _s, _p in self.answers if start <= sent < end]

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(90)


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


@contextmanager
def model_server(fleet, pg: PostgresServer, tmp_path: Path):
    port = free_port()
    settings = fleet.settings.replace(database_url=pg.url, production_port=port, spool_dir=str(tmp_path / "spool"))
    proc = start_model_server(settings, "production", log=tmp_path / "server.log", metrics_dir=tmp_path / "metrics")
    url = f"http://{settings.host}:{port}"
    try:
        try:
            wait_for(lambda: health(url).get("status") == "healthy", 90, what="server on the test's PostgreSQL")
        except AssertionError:
            raise AssertionError(f"{health(url)}\n{(tmp_path / 'server.log').read_text()[-3000:]}") from None
        yield url
    finally:
        procs.stop_child(proc, timeout=30)


def stored(pg: PostgresServer) -> dict[str, int]:
    """prediction id → how many rows the database holds for it."""
    engine = sa.create_engine(pg.url)
    try:
        with engine.connect() as conn:
            return dict(conn.execute(sa.text("SELECT id, count(*) FROM predictions GROUP BY id")).all())
    finally:
        engine.dispose()


def answered_ids(load: Steady) -> set[str]:
    return {pid for _t, _s, status, pid in load.answers if status == 200}


def test_a_frozen_database_does_not_stall_predictions(fleet, tmp_path):
    with postgres_server() as pg, model_server(fleet, pg, tmp_path) as url:
        with Steady(url) as load:
            time.sleep(3)  # warm-up, left out of both phases
            calm_from = time.monotonic()
            time.sleep(15)
            # The whole server hangs: the postmaster (no new connection) and every backend (no
            # answer on the connections the pool holds). SIGSTOP the postmaster alone would leave
            # the pooled connections working.
            frozen = family(pg.postmaster_pid)
            frozen_from = time.monotonic()
            for pid in frozen:
                os.kill(pid, signal.SIGSTOP)
            try:
                time.sleep(OUTAGE_S)
                during = health(url)
            finally:
                frozen_until = time.monotonic()
                for pid in frozen:
                    os.kill(pid, signal.SIGCONT)
            time.sleep(3)
        failed = [a for a in load.answers if a[2] != 200]
        assert not failed, f"{len(failed)} of {len(load.answers)} predictions not answered 200: {failed[:5]}"
        assert not load.live_failures, load.live_failures[:5]
        calm, hung = load.between(calm_from, frozen_from), load.between(frozen_from, frozen_until)
        assert len(calm) > 100 and len(hung) > 100, (len(calm), len(hung))
        calm_p99, hung_p99 = p99(calm), p99(hung)
        assert hung_p99 < 10 * calm_p99, (f"p99 while frozen {hung_p99 * 1000:.1f} ms is not below 10x the p99 before "
                                          f"{calm_p99 * 1000:.1f} ms ({len(hung)} and {len(calm)} predictions)")
        print(f"p99 before the freeze {calm_p99 * 1000:.2f} ms ({len(calm)} predictions), "
              f"while frozen {hung_p99 * 1000:.2f} ms ({len(hung)} predictions)")
        assert during.get("database") == "unreachable" and during.get("model_loaded") is True, during
        ids = answered_ids(load)
        wait_for(lambda: ids <= set(stored(pg)), 120, what="every answered prediction in the database")
        assert wait_for(lambda: health(url).get("database") == "ok", 30, what="the database check to recover")


def test_a_stopped_database_loses_no_prediction(fleet, tmp_path):
    with postgres_server() as pg, model_server(fleet, pg, tmp_path) as url:
        with Steady(url) as load:
            time.sleep(5)
            pg.stop("fast")
            try:
                time.sleep(OUTAGE_S)
                during = health(url)
            finally:
                pg.start()
            time.sleep(3)
        failed = [a for a in load.answers if a[2] != 200]
        assert not failed, f"{len(failed)} of {len(load.answers)} predictions not answered 200: {failed[:5]}"
        assert not load.live_failures, load.live_failures[:5]
        assert during.get("database") == "unreachable", during
        ids = answered_ids(load)
        assert len(ids) == len(load.answers) > 100
        wait_for(lambda: ids <= set(stored(pg)), 120, what="every answered prediction in the database")
        rows = stored(pg)
        assert set(rows) == ids and set(rows.values()) == {1}, "a prediction stored twice, or one never answered"


def test_a_statement_timeout_answers_feedback_with_a_503(tmp_path):
    from abfleet.feedback import Feedback
    from abfleet.settings import Settings
    from abfleet.store import Store

    with postgres_server() as pg:
        settings = Settings(run_dir=tmp_path, database_url=pg.url, db_statement_timeout_s=0.5)
        store = Store.from_settings(settings)
        locker = sa.create_engine(pg.url)
        try:
            store.record_predictions([{"id": "ab" * 16, "variant": "production", "model_version": "1", "location": "x",
                                       "total_sqft": 1200.0, "bhk": 2, "bath": 2, "estimated_price": 50.0,
                                       "latency_ms": 1.0, "user_id": None}])
            rating = b'{"prediction_id": "' + b"ab" * 16 + b'", "feedback_type": "rating", "feedback_value": 4}'
            with locker.connect() as conn:  # another session holds the table: the INSERT waits
                conn.execute(sa.text("LOCK TABLE feedback IN ACCESS EXCLUSIVE MODE"))
                answer = Feedback(store, settings).record(rating)
                conn.rollback()
            assert answer.status == 503 and answer.failure == "store" and answer.retry_after, answer
            assert "within the statement timeout" in answer.body["error"], answer.body
            assert Feedback(store, settings).record(rating).status == 201  # the lock is gone
        finally:
            locker.dispose()
            store.close()
