"""Liveness, readiness and the database faults a server answers without hanging: the app over
a tiny model and a temporary SQLite store, as in test_app."""

from __future__ import annotations

import os
import sqlite3
import threading

import pytest
from prometheus_client.parser import text_string_to_metric_families

from abfleet.api import DRIFT_REPORT, FEEDBACK, FLAT, HEALTH, LIVE, METRICS, PREDICT, READY
from abfleet.fleet_state import FleetStateCollector
from abfleet.metrics import DECISIONS, ServerMetrics
from abfleet.readiness import DatabaseCheck
from abfleet.serving import ModelHolder
from abfleet.settings import Settings
from abfleet.store import Store
from inference.backend.app import create_app
from inference.backend.parts import stop_background
from tests.helpers import migrate, wait_for


@pytest.fixture
def make_app(tmp_path, tiny_predictor):
    """An app factory: with the tiny model or without any; stopped and closed afterwards."""
    made = []

    def make(*, model: bool = True, **overrides):
        settings = Settings(run_dir=tmp_path, **overrides)
        holder = ModelHolder.fixed(settings, tiny_predictor, "7") if model else ModelHolder(settings)
        store = Store.from_settings(migrate(settings))
        app = create_app(settings, holder=holder, store=store)
        made.append(app)
        return app

    yield make
    for app in made:
        stop_background(app.extensions["abfleet"])
        app.extensions["abfleet"]["store"].close()


def sample(client, name: str, **labels) -> float | None:
    text = client.get(METRICS).get_data(as_text=True)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None


def test_live_answers_without_a_model(make_app):
    client = make_app(model=False).test_client()
    r = client.get(LIVE)
    assert r.status_code == 200 and r.get_json() == {"status": "ok"}


def test_ready_needs_a_model_and_reports_the_last_database_check(make_app):
    without = make_app(model=False, variant="candidate")
    without.extensions["abfleet"]["database"].check()
    r = without.test_client().get(READY)
    assert r.status_code == 503 and r.get_json()["status"] == "unavailable" and r.get_json()["reason"]
    assert r.get_json()["database"] == "ok"
    assert sample(without.test_client(), "abfleet_ready") == 0.0

    with_model = make_app()
    with_model.extensions["abfleet"]["database"].check()
    r = with_model.test_client().get(READY)
    assert r.status_code == 200 and r.get_json() == {"status": "ready", "model_version": "7", "database": "ok"}
    assert sample(with_model.test_client(), "abfleet_ready") == 1.0


def test_ready_and_health_never_wait_for_the_database(make_app):
    app = make_app()
    p = app.extensions["abfleet"]
    p["database"].stop()
    release = threading.Event()
    # A ping stuck on a hung database: requests read the state, they do not join the wait.
    stuck = DatabaseCheck(lambda: release.wait(30), interval=60, deadline=0.0)
    p["database"] = stuck
    thread = threading.Thread(target=stuck.check, daemon=True)
    thread.start()
    try:
        client = app.test_client()
        ready, health = client.get(READY), client.get(HEALTH)
        assert ready.status_code == 200 and ready.get_json()["database"] == "unreachable"
        assert health.status_code == 200 and health.get_json()["database"] == "unreachable"
        assert health.get_json()["status"] == "degraded"
        assert health.get_json()["store_reachable"] is False and health.get_json()["model_loaded"] is True
        assert client.post(PREDICT, json=FLAT).status_code == 200
    finally:
        release.set()
        thread.join(10)
    assert stuck.state == "ok"


def test_database_check_states():
    now = [0.0]
    answers = iter([True, False])
    check = DatabaseCheck(lambda: next(answers), interval=5, deadline=8, clock=lambda: now[0])
    assert check.state == "unknown"
    assert check.check() == "ok" and check.state == "ok"
    assert check.check() == "unreachable"

    def raises():
        raise OSError("connection refused")

    assert DatabaseCheck(raises, interval=5, deadline=8).check() == "unreachable"


def locked(store: Store):
    """Another process holds the SQLite database's write lock until the block ends."""
    holder = sqlite3.connect(store.engine.url.database, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    return holder


def test_feedback_on_a_locked_database_is_pending_then_stored_once(make_app):
    # The statement timeout (SQLite's busy timeout) ends the wait for a lock another process holds;
    # the feedback waits in the feedback spool (202) and is stored once the lock is gone.
    app = make_app(db_statement_timeout_s=0.2, db_check_interval_s=0.5)
    client = app.test_client()
    pid = client.post(PREDICT, json=FLAT).get_json()["prediction_id"]
    store = app.extensions["abfleet"]["store"]
    assert store.get_prediction(pid) is not None  # inserted from the spool before the lock
    rating = {"prediction_id": pid, "feedback_type": "rating", "feedback_value": 4}
    holder = locked(store)
    try:
        r = client.post(FEEDBACK, json=rating)
        again = client.post(FEEDBACK, json={**rating, "feedback_value": 2})
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert r.status_code == 202 and r.get_json() == {"status": "pending", "prediction_id": pid, "feedback_type": "rating"}
    assert again.status_code == 409 and again.get_json()["field"] == "feedback_type"  # the key is pending already
    assert sample(client, "abfleet_store_errors_total", operation="feedback") == 1.0
    assert not sample(client, "abfleet_feedback_failures_total", reason="store")  # accepted: not a failure
    # The background thread records it with the live checks, once.
    wait_for(lambda: store.feedback_for(pid), 30, what="the pending rating to be stored")
    wait_for(lambda: sample(client, "abfleet_feedback_pending") == 0, 30, what="the pending gauge to drop")
    [row] = store.feedback_for(pid)
    assert row["feedback_value"] == 4 and row["received_by"] == "production"
    assert sample(client, "abfleet_feedback_pending_resolved_total", outcome="stored") == 1.0
    assert sample(client, "abfleet_ratings_total", stars="4") == 1.0  # counted like a live rating
    assert client.post(FEEDBACK, json=rating).status_code == 409


def test_feedback_on_a_locked_database_with_a_full_feedback_spool_is_a_503_with_retry_after(make_app):
    app = make_app(db_statement_timeout_s=0.2, db_check_interval_s=4.5, feedback_spool_max_rows=0)
    client = app.test_client()
    pid = client.post(PREDICT, json=FLAT).get_json()["prediction_id"]
    store = app.extensions["abfleet"]["store"]
    assert store.get_prediction(pid) is not None
    holder = locked(store)
    try:
        r = client.post(FEEDBACK, json={"prediction_id": pid, "feedback_type": "rating", "feedback_value": 4})
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert r.status_code == 503 and r.headers["Retry-After"] == "5"
    assert r.get_json()["error"].startswith("store unavailable: the database stayed locked past the statement timeout, "
                                            "and 0 pieces of feedback wait for the database (at most 0)"), r.get_json()
    assert sample(client, "abfleet_feedback_failures_total", reason="spool") == 1.0
    # Once the lock is gone the same feedback is accepted.
    again = client.post(FEEDBACK, json={"prediction_id": pid, "feedback_type": "rating", "feedback_value": 4})
    assert again.status_code == 201


def test_drift_report_on_a_broken_store_says_error(make_app, tmp_path):
    app = make_app()
    store = app.extensions["abfleet"]["store"]
    store.engine.dispose()
    (tmp_path / "store.db").unlink()  # a new, empty database file: no tables in it
    r = app.test_client().get(DRIFT_REPORT)
    assert r.status_code == 200 and r.get_json()["status"] == "error" and "store unavailable" in r.get_json()["message"]


def test_fleet_state_keeps_its_last_values_when_a_refresh_fails(tmp_path):
    from prometheus_client import CollectorRegistry

    settings = Settings(run_dir=tmp_path)
    store = Store.from_settings(settings)
    store.init_schema()
    store.record_decision("continue", "test", True, [], {}, "1", "2")
    metrics = ServerMetrics(CollectorRegistry())
    collector = FleetStateCollector(store, fallback_weight=20, errors=metrics.store_errors.labels("metrics"))
    assert list(collector.collect()) == []  # nothing read yet: nothing exported
    assert collector.refresh()
    before = {f.name: f.samples for f in collector.collect()}
    store.engine.dispose()
    (tmp_path / "store.db").unlink()  # the next read meets an empty database
    assert not collector.refresh()
    assert {f.name: f.samples for f in collector.collect()} == before
    assert metrics.registry.get_sample_value("abfleet_store_errors_total", {"operation": "metrics"}) == 1.0
    decided = {s.labels["decision"]: s.value for s in before[DECISIONS.removesuffix("_total")]}
    assert decided["continue"] == 1.0
    store.close()


def test_feedback_waiting_on_a_stuck_database_leaves_threads_for_predictions(make_app):
    # Two threads: one may wait on the database for feedback, the other stays for predictions.
    app = make_app(threads=2, db_statement_timeout_s=5)
    client = app.test_client()
    first, second = (client.post(PREDICT, json=FLAT).get_json()["prediction_id"] for _ in range(2))
    store = app.extensions["abfleet"]["store"]
    assert store.get_prediction(first) and store.get_prediction(second)
    service = app.extensions["abfleet"]["feedback"]
    holder = sqlite3.connect(store.engine.url.database, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    stuck: list = []
    waiting = threading.Thread(target=lambda: stuck.append(app.test_client().post(
        FEEDBACK, json={"prediction_id": first, "feedback_type": "rating", "feedback_value": 4})))
    try:
        waiting.start()
        wait_for(lambda: service._waiting._value == 0, 10, 0.01, what="the first feedback to wait on the lock")
        # No thread is left to wait on the database: the feedback is kept for later, not waited on.
        r = client.post(FEEDBACK, json={"prediction_id": second, "feedback_type": "rating", "feedback_value": 4})
        assert r.status_code == 202 and r.get_json()["status"] == "pending", r.get_json()
        assert client.post(PREDICT, json=FLAT).status_code == 200
    finally:
        holder.execute("ROLLBACK")
        holder.close()
        waiting.join(10)
    assert stuck[0].status_code == 201  # the lock went away before the busy timeout ran out
    wait_for(lambda: store.feedback_for(second), 30, what="the pending feedback to be stored")


def test_a_servers_metrics_show_its_saturation(make_app):
    from abfleet import metrics as m

    app = make_app(threads=6)
    text = app.test_client().get(METRICS).get_data(as_text=True)
    samples = {s.name: s for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples[m.REQUESTS_IN_FLIGHT].value == 1.0  # the scrape itself
    assert samples[m.WORKER_THREADS].value == 6.0
    assert samples[m.DB_CONNECTIONS_CHECKED_OUT].value >= 0.0 and samples[m.DB_POOL_SIZE].value > 0
    # Without gunicorn the server is this process alone.
    assert samples[m.PROCESS_RSS].labels == {"role": "master", "pid": str(os.getpid())}
    assert samples[m.PROCESS_RSS].value > 0
