"""The serving hot path: compiled trees predict what the fitted pipeline predicts, and the
prediction spool loses nothing and hides nothing from readers."""

from __future__ import annotations

import datetime as dt
import json
import os
import time
import uuid

import numpy as np
import pandas as pd
import pytest

from abfleet import data, model
from abfleet.model import CompiledTrees, FastPredictor
from abfleet.store import Duplicate, NotFound, Store


@pytest.fixture(scope="module")
def trained():
    cleaned = data.clean(data.synth(8000, seed=11))
    train, test = data.train_test_split_frame(cleaned.frame, test_size=0.2, seed=0)
    return model.fit(train, model.ModelParams(max_iter=120)), test


def every_location_grid(fast: FastPredictor) -> pd.DataFrame:
    """Every location the model knows, and every location of the fleet's vocabulary it does not
    (priced as "other", the way the server maps them), over a spread of flats."""
    names = list(fast.locations) + sorted(data.known_locations() - set(fast.locations))
    rows = [(fast.model_location(name, data.known_locations()), sqft, bhk, bath)
            for name in names for sqft in (300.0, 555.5, 1200.0, 1875.25, 4000.0, 30000.0)
            for bhk, bath in ((1, 1), (2, 2), (3, 4), (10, 10))]
    return pd.DataFrame(rows, columns=data.FEATURES)


def test_compiled_trees_predict_what_the_pipeline_predicts(trained):
    fitted, test = trained
    fast = FastPredictor(fitted)
    assert fast._compiled is not None, "the fitted HistGradientBoostingRegressor should compile"
    frame = pd.concat([test[data.FEATURES], every_location_grid(fast)], ignore_index=True)
    assert frame["location"].notna().all()
    expected = fitted.predict(frame)
    many = fast.predict_many(frame)
    one = np.array([fast.predict_one(r.location, r.total_sqft, r.bhk, r.bath) for r in frame.itertuples()])
    assert np.isfinite(many).all() and np.isfinite(one).all()
    np.testing.assert_allclose(many, expected, rtol=1e-9)
    np.testing.assert_allclose(one, expected, rtol=1e-9)
    # The raw scores are sklearn's to the last bit: same comparisons, same order of additions.
    trees = fitted.regressor_.named_steps["trees"]
    encoded = fitted.regressor_.named_steps["encode"].transform(frame)
    np.testing.assert_array_equal(fast._compiled.raw_many(encoded), trees._raw_predict(encoded).ravel())


def test_unknown_location_is_priced_as_other(trained):
    fitted, _test = trained
    fast = FastPredictor(fitted)
    vocabulary = data.known_locations()
    unseen = sorted(vocabulary - set(fast.locations))
    assert unseen, "a model on 8000 synthetic rows misses some rare locations"
    assert fast.model_location(unseen[0], vocabulary) == "other"
    assert fast.model_location("Atlantis", vocabulary) is None
    other = fitted.predict(pd.DataFrame([["other", 1000.0, 2, 2]], columns=data.FEATURES))[0]
    assert fast.predict_one(fast.model_location(unseen[0], vocabulary), 1000.0, 2, 2) == pytest.approx(other, rel=1e-9)


def test_missing_and_unseen_category_codes_follow_sklearn(trained):
    """Codes the encoder never emits for known names still follow sklearn's rules: NaN,
    negative (the encoder's unknown_value) and codes outside the fitted categories go the
    node's missing-value way; NaN numbers too."""
    fitted, test = trained
    trees = fitted.regressor_.named_steps["trees"]
    compiled = CompiledTrees.build(trees)
    encoded = fitted.regressor_.named_steps["encode"].transform(test[data.FEATURES].head(50))
    odd = encoded.copy()
    odd[0::5, 0] = np.nan
    odd[1::5, 0] = -1.0
    odd[2::5, 0] = 254.0  # a code no fitted category has
    odd[3::5, 1] = np.nan
    odd[4::5, 3] = np.nan
    np.testing.assert_array_equal(compiled.raw_many(odd), trees._raw_predict(odd).ravel())
    for row in odd[:10]:
        assert compiled.raw_one(row) == trees._raw_predict(row[None, :])[0, 0]


def test_what_the_compiler_does_not_know_falls_back_to_sklearn(trained):
    from sklearn.ensemble import HistGradientBoostingRegressor

    fitted, test = trained
    assert CompiledTrees.build(object()) is None
    assert CompiledTrees.build(HistGradientBoostingRegressor()) is None  # not fitted
    fast = FastPredictor(fitted)
    fast._compiled = None
    np.testing.assert_allclose(fast.predict_many(test.head(20)), fitted.predict(test[data.FEATURES].head(20)), rtol=1e-12)


@pytest.mark.skipif(not data.real_dataset_available(), reason=f"the real dataset is not at {data.REAL_DATASET}")
def test_served_model_is_as_accurate_as_plain_sklearn_on_the_real_held_out_split():
    cleaned = data.clean(data.read_raw(data.REAL_DATASET))
    train, test = data.train_test_split_frame(cleaned.frame, test_size=0.2, seed=0)
    fitted = model.fit(train, model.ModelParams(seed=0))
    baseline = model.score(fitted, test)  # the pipeline's own predict

    fast = FastPredictor(fitted)
    truth = test[data.TARGET].to_numpy(dtype=float)
    for served in (fast.predict_many(test),
                   np.array([fast.predict_one(r.location, r.total_sqft, r.bhk, r.bath) for r in test.itertuples()])):
        ape = np.abs(served - truth) / truth
        assert np.isfinite(served).all()
        assert np.median(ape) <= baseline["median_ape"] + 1e-12
        assert np.mean(ape) <= baseline["mape"] + 1e-12


# ---- the prediction spool ----------------------------------------------------------

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
    return store._select_prediction(prediction_id) is not None


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
    from abfleet.spool import PredictionSpool
    from abfleet.store import PREDICTION_COLUMNS

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
        assert row["id"] in spooling.spool._pending_ids
    finally:
        other.stop_spool()


def test_prediction_ids_are_unique_hex_and_not_shared_with_a_forked_child():
    from inference.backend.app import new_prediction_id

    ids = [new_prediction_id() for _ in range(5000)]
    assert len(set(ids)) == len(ids) and all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next id and leave at once
        os.write(write, new_prediction_id().encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 64).decode()
    os.waitpid(pid, 0)
    os.close(read)
    assert child and child != new_prediction_id()


def test_feedback_right_after_predict_on_another_worker(tmp_path):
    """Two app instances (two gunicorn workers) on one database: the rating reaches a worker
    that never saw the prediction, before any batch was inserted."""
    from abfleet.serving import ModelHolder
    from abfleet.settings import Settings
    from inference.backend.app import create_app

    cleaned = data.clean(data.synth(3000, seed=5))
    fast = FastPredictor(model.fit(cleaned.frame, model.ModelParams(max_iter=20)))
    settings = Settings(run_dir=tmp_path, variant="production")
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
