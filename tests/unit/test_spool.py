"""The prediction spool loses nothing and hides nothing from readers: a spooled prediction is
found by its own process and by others, replayed when its writer died, and never taken from a
live writer."""

from __future__ import annotations

import datetime as dt
import json
import time
import uuid

import pytest
import sqlalchemy as sa

from abfleet.serving import ModelHolder
from abfleet.settings import Settings, default_run_dir
from abfleet.spool import PredictionSpool, default_spool_dir
from abfleet.store import PREDICTION_COLUMNS, Duplicate, NotFound, Store, predictions
from inference.backend.app import create_app
from tests.helpers import migrate


def prediction(**changes) -> dict:
    row = {"id": uuid.uuid4().hex, "variant": "production", "model_version": "3", "location": "Indira Nagar",
           "total_sqft": 1200.0, "bhk": 2, "bath": 2, "estimated_price": 150.25, "latency_ms": 0.02, "user_id": "u-1"}
    return {**row, **changes}


@pytest.fixture
def spooling(tmp_path):
    """A store whose spool never flushes on its own: what is spooled stays spooled until asked."""
    store = Store(f"sqlite:///{tmp_path / 'store.db'}")
    store.init_schema()
    store.start_spool(linger=3600)
    yield store
    store.stop_spool()


def in_table(store: Store, prediction_id: str) -> bool:
    """Whether the row is in the database itself (not found through a spool)."""
    with store.engine.connect() as conn:
        return conn.execute(sa.select(predictions.c.id).where(predictions.c.id == prediction_id)).first() is not None


def test_the_default_spool_folder_depends_on_the_database_url_alone(tmp_path):
    db = (tmp_path / "store.db").resolve()
    assert default_spool_dir(f"sqlite:///{db}") == db.with_name("store.db-spool")
    url = "postgresql+psycopg://abfleet@db:5432/abfleet"
    assert default_spool_dir(url) == default_spool_dir(url)
    assert default_spool_dir(url).parent == default_run_dir() / "spool"
    assert default_spool_dir(url) != default_spool_dir(url + "-other")


def test_a_spooled_prediction_is_found_by_this_process_and_by_others(spooling, tmp_path):
    row = prediction()
    spooling.record_prediction(row)
    assert not in_table(spooling, row["id"]), "the answer did not wait for the database"
    other = Store(spooling.url)  # another worker or a test process reading the same database
    assert other.spool_dir == spooling.spool_dir
    found = other.get_prediction(row["id"])
    assert found is not None and found["estimated_price"] == 150.25 and found["user_id"] == "u-1"
    second = prediction()
    spooling.record_prediction(second)
    assert spooling.get_prediction(second["id"])["variant"] == "production"
    assert other.count_predictions() == 2


def test_spooled_rows_read_back_like_directly_inserted_ones(spooling):
    direct, spooled = prediction(), prediction(created_at=dt.datetime(2024, 5, 6, 7, 8, 9, 10, tzinfo=dt.timezone.utc))
    spooling.record_predictions([direct])
    spooling.record_prediction(spooled)
    a, b = spooling.get_prediction(direct["id"]), spooling.get_prediction(spooled["id"])
    assert {k: type(v) for k, v in a.items()} == {k: type(v) for k, v in b.items()}
    assert b["created_at"].replace(tzinfo=dt.timezone.utc) == dt.datetime(2024, 5, 6, 7, 8, 9, 10, tzinfo=dt.timezone.utc)
    since = dt.datetime(2024, 5, 6, 7, 8, 9, tzinfo=dt.timezone.utc)
    assert {r["id"] for r in spooling.predictions_since(since)} == {direct["id"], spooled["id"]}


def test_feedback_finds_a_spooled_prediction_and_keeps_404_and_409(spooling):
    row = prediction()
    spooling.record_prediction(row)
    other = Store(spooling.url)  # the feedback lands on another worker
    recorded = other.record_feedback(row["id"], "actual_price", 100.0, received_by="candidate")
    assert recorded["variant"] == "production" and recorded["ape"] == pytest.approx(0.5025)
    with pytest.raises(Duplicate):
        other.record_feedback(row["id"], "actual_price", 120.0)
    with pytest.raises(NotFound):
        other.record_feedback(uuid.uuid4().hex, "rating", 3.0)
    spooling.record_prediction(third := prediction())
    assert spooling.record_feedback(third["id"], "rating", 4.0)["kind"] == "rating"


def test_the_spool_empties_into_the_database_in_batches(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'store.db'}")
    store.init_schema()
    spool = store.start_spool(linger=0.01)
    rows = [prediction() for _ in range(300)]
    for row in rows:
        store.record_prediction(row)
    deadline = time.monotonic() + 30
    while spool.pending() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert spool.pending() == 0
    assert all(in_table(store, r["id"]) for r in rows)
    assert all(p.read_bytes().strip(b"\0") == b"" for p in store.spool_dir.glob("*.jsonl")), "inserted lines are dropped"
    store.stop_spool()
    assert not list(store.spool_dir.glob("*.jsonl")), "a clean stop leaves no spool file"


def test_a_full_spool_file_is_replaced_and_removed_once_inserted(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'store.db'}")
    store.init_schema()
    spool = store.spool = PredictionSpool(store.spool_dir, store.insert_spooled, PREDICTION_COLUMNS,
                                          linger=3600, capacity=4096)
    rows = [prediction() for _ in range(60)]  # ~300 bytes each: several files
    for row in rows:
        store.record_prediction(row)
    assert len(list(store.spool_dir.glob("*.jsonl"))) > 2
    assert spool.flush() == 60
    assert len(list(store.spool_dir.glob("*.jsonl"))) == 1
    assert all(in_table(store, r["id"]) for r in rows)
    store.stop_spool()


def test_a_dead_writers_spool_is_replayed_at_start_and_a_torn_line_skipped(tmp_path):
    url = f"sqlite:///{tmp_path / 'store.db'}"
    store = Store(url)
    store.init_schema()
    store.spool_dir.mkdir(parents=True)
    rows = [prediction() for _ in range(5)]
    lines = [json.dumps({**r, "created_at": "2025-01-02T03:04:05.000006+00:00"}) for r in rows]
    # What a killed writer leaves: complete lines, a line cut short, and unused (NUL) space.
    (store.spool_dir / "deadhost-4242-0-000001.jsonl").write_bytes(
        ("\n".join(lines) + "\n").encode() + b'{"id": "feed", "varia' + b"\0" * 512)
    assert not any(in_table(store, r["id"]) for r in rows)
    server = Store(url)
    server.start_spool(linger=3600)
    try:
        assert server.spool.replayed == 5
        assert all(in_table(server, r["id"]) for r in rows)
        assert not (store.spool_dir / "deadhost-4242-0-000001.jsonl").exists()
        assert server.get_prediction(rows[0]["id"])["created_at"] == dt.datetime(2025, 1, 2, 3, 4, 5, 6)
    finally:
        server.stop_spool()


def test_a_live_writers_spool_is_never_taken_for_a_dead_ones(spooling):
    row = prediction()
    spooling.record_prediction(row)
    [path] = spooling.spool.paths()
    other = Store(spooling.url)
    other.start_spool(linger=3600)  # a second worker starting: it replays only dead writers' files
    try:
        assert other.spool.replayed == 0 and path.exists()
        assert spooling.spool.holds(row["id"])
    finally:
        other.stop_spool()


def test_feedback_right_after_predict_on_another_worker(tmp_path, tiny_predictor):
    """Two app instances (two gunicorn workers) on one database: the rating reaches a worker
    that never saw the prediction, before any batch was inserted."""
    fast = tiny_predictor
    settings = migrate(Settings(run_dir=tmp_path, variant="production"))
    apps = [create_app(settings, holder=ModelHolder.fixed(settings, fast, "1"), store=Store(settings.db_url))
            for _ in range(2)]
    for app in apps:
        app.extensions["abfleet"]["store"].spool.linger = 3600
    try:
        flat = {"location": "Indira Nagar", "total_sqft": 1200, "bhk": 2, "bath": 2}
        pid = apps[0].test_client().post("/api/predict_home_price", json=flat).get_json()["prediction_id"]
        rating = {"prediction_id": pid, "feedback_type": "rating", "feedback_value": 5}
        assert apps[1].test_client().post("/api/feedback", json=rating).status_code == 201
        assert apps[1].test_client().post("/api/feedback", json=rating).status_code == 409
        unknown = {**rating, "prediction_id": uuid.uuid4().hex}
        assert apps[1].test_client().post("/api/feedback", json=unknown).status_code == 404
        assert apps[0].test_client().get("/api/ping").get_json() == {"status": "ok"}
    finally:
        for app in apps:
            app.extensions["abfleet"]["store"].stop_spool()
