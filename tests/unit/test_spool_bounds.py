"""The spool under faults and at its bounds: a rollover that fails (disk full) changes nothing
and closes no descriptor twice; a full backlog refuses with SpoolFull and takes rows again once
drained; flush and replay insert in chunks and lose nothing; a refused prediction is a 503 with
Retry-After on both predict paths."""

from __future__ import annotations

import errno
import json
import os
import uuid

import pytest
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families

from abfleet.api import PREDICT
from abfleet.serving import ModelHolder
from abfleet.settings import Settings
from abfleet.spool import CHUNK_ROWS, PredictionSpool, SpoolFull
from abfleet.spool_segment import Segment
from abfleet.store import PREDICTION_COLUMNS, Store, predictions
from inference.backend.app import create_app
from tests.helpers import migrate


def prediction() -> dict:
    return {"id": uuid.uuid4().hex, "variant": "production", "model_version": "3", "location": "Indira Nagar",
            "total_sqft": 1200.0, "bhk": 2, "bath": 2, "estimated_price": 150.25, "latency_ms": 0.02, "user_id": "u-1"}


def stored_ids(store: Store) -> set[str]:
    with store.engine.connect() as conn:
        return set(conn.execute(sa.select(predictions.c.id)).scalars())


@pytest.fixture
def store(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'store.db'}")
    store.init_schema()
    yield store
    store.stop_spool()


def spool_of(store: Store, **options) -> PredictionSpool:
    """A spool that never flushes on its own (only when asked)."""
    store.spool = PredictionSpool(store.spool_dir, store.insert_spooled, PREDICTION_COLUMNS, linger=3600, **options)
    return store.spool


class Descriptors:
    """Watches os.open and os.close: `closed` lists every number closed, in order, and
    `twice` those closed when no os.open had handed them out since their last close (a
    second close of the same descriptor, which may belong to another file by then)."""

    def __init__(self, monkeypatch):
        self.open, self.closed, self.twice = set(), [], []
        real_open, real_close = os.open, os.close

        def opened(*args, **kwargs) -> int:
            fd = real_open(*args, **kwargs)
            self.open.add(fd)
            return fd

        def close(fd: int) -> None:
            self.closed.append(fd)
            if fd not in self.open:
                self.twice.append(fd)
            self.open.discard(fd)
            real_close(fd)

        monkeypatch.setattr(os, "open", opened)
        monkeypatch.setattr(os, "close", close)


@pytest.fixture
def fds(monkeypatch):
    return Descriptors(monkeypatch)


def fail_once(monkeypatch, name: str, code: int) -> list:
    """Make os.<name> raise OSError(code) on its next call only; returns the calls it failed."""
    failed, real = [], getattr(os, name)

    def call(*args):
        if not failed:
            failed.append(args)
            raise OSError(code, os.strerror(code))
        return real(*args)

    monkeypatch.setattr(os, name, call)
    return failed


def test_a_rollover_that_fails_once_keeps_the_spool_working(store, monkeypatch, fds):
    spool = spool_of(store, capacity=4096)
    first = spool._current
    rows = []
    while spool._current.fits(400):  # fill the first file
        rows.append(prediction())
        store.record_prediction(rows[-1])
    failed = fail_once(monkeypatch, "posix_fallocate", errno.ENOSPC)
    refused = prediction()
    with pytest.raises(SpoolFull, match="disk full"):
        store.record_prediction(refused)
    assert failed, "the rollover was tried"
    assert spool._current is first and spool._retired == [], "a failed rollover changes nothing"
    assert not list(store.spool_dir.glob(".*.tmp")), "the half-made file is removed"
    spool.flush()  # the full file is current: it is emptied and kept, not closed
    assert first.fd is not None and first.backlog == 0
    for _ in range(40):  # several rollovers later, predictions are still stored
        rows.append(prediction())
        store.record_prediction(rows[-1])
    assert spool.flush() > 0
    assert len(fds.closed) >= 3 and fds.twice == [], f"closed twice: {fds.twice} of {fds.closed}"
    live = spool._current
    assert os.fstat(live.fd).st_ino == live.path.stat().st_ino, "the live file's locked descriptor is open"
    assert live.path in spool.paths() and live.path.exists()
    assert {r["id"] for r in rows} <= stored_ids(store)
    assert refused["id"] not in stored_ids(store), "a refused prediction was not answered, so not stored"


def test_a_disk_full_rollover_recovers_by_itself_when_space_returns(store, monkeypatch):
    spool = spool_of(store, capacity=4096)
    while spool._current.fits(400):
        store.record_prediction(prediction())
    fail_once(monkeypatch, "posix_fallocate", errno.ENOSPC)
    with pytest.raises(SpoolFull):
        store.record_prediction(prediction())
    store.record_prediction(row := prediction())  # the next append makes the new file
    assert len(spool.paths()) == 2 and spool.holds(row["id"])


def test_another_rollover_failure_is_raised_as_it_is_and_changes_nothing(store, monkeypatch):
    spool = spool_of(store, capacity=4096)
    while spool._current.fits(400):
        store.record_prediction(prediction())
    current = spool._current
    fail_once(monkeypatch, "open", errno.EMFILE)
    with pytest.raises(OSError) as raised:
        store.record_prediction(prediction())
    assert raised.value.errno == errno.EMFILE and not isinstance(raised.value, SpoolFull)
    assert spool._current is current and spool._retired == []
    store.record_prediction(prediction())
    assert len(spool.paths()) == 2, "the next append made the new file"
    spool.flush()
    assert spool.backlog() == (0, 0) and len(spool.paths()) == 1


@pytest.mark.parametrize("twice", [("release", "release"), ("discard", "discard"), ("discard", "release"),
                                   ("release", "discard")])
def test_release_and_discard_act_once(tmp_path, fds, twice):
    segment = Segment(tmp_path, "seg", 4096)
    fd = segment.fd
    for name in twice:
        getattr(segment, name)()
    assert fds.closed == [fd] and fds.twice == [], "closed once, whatever is called after"
    assert segment.fd is None


def test_the_row_bound_refuses_and_takes_rows_again_after_a_flush(store):
    spool = spool_of(store, max_rows=10)
    for _ in range(10):
        store.record_prediction(prediction())
    with pytest.raises(SpoolFull, match="at most 10") as full:
        store.record_prediction(prediction())
    assert full.value.retry_after >= 1
    assert spool.backlog()[0] == 10
    assert spool.flush() == 10
    assert spool.backlog() == (0, 0)
    store.record_prediction(row := prediction())
    assert spool.holds(row["id"])


def test_the_byte_bound_refuses_and_takes_rows_again_after_a_flush(store):
    line = len(json.dumps({**prediction(), "created_at": "2025-01-02T03:04:05.000006+00:00"})) + 1
    spool = spool_of(store, max_bytes=3 * line + line // 2)
    for _ in range(3):
        store.record_prediction(prediction())
    assert spool.backlog() == (3, 3 * line)
    with pytest.raises(SpoolFull, match="bytes"):
        store.record_prediction(prediction())
    spool.flush()
    store.record_prediction(prediction())
    assert spool.backlog() == (1, line)


def recording(store: Store) -> tuple[list[int], callable]:
    sizes = []

    def insert(lines, values=None):
        sizes.append(len(lines))
        store.insert_spooled(lines, values)

    return sizes, insert


def test_a_large_orphan_spool_is_replayed_in_chunks_and_loses_nothing(store):
    store.spool_dir.mkdir(parents=True)
    rows = [prediction() for _ in range(5000)]
    lines = [json.dumps({**r, "created_at": "2025-01-02T03:04:05.000006+00:00"}) for r in rows]
    orphan = store.spool_dir / "deadhost-4242-0-000001.jsonl"
    orphan.write_bytes(("\n".join(lines) + "\n").encode() + b"\0" * 100)
    sizes, insert = recording(store)
    spool = store.spool = PredictionSpool(store.spool_dir, insert, PREDICTION_COLUMNS, linger=3600)
    assert spool.replayed == 5000
    assert len(sizes) >= 3 and max(sizes) <= CHUNK_ROWS and sum(sizes) == 5000
    assert stored_ids(store) == {r["id"] for r in rows}
    assert not orphan.exists()


def test_a_flush_inserts_in_chunks_and_a_failed_chunk_stays_spooled(store):
    sizes, insert = recording(store)
    fail = []

    def flaky(lines, values=None):
        if fail:
            raise RuntimeError("database away")
        insert(lines, values)
        fail.append(True)  # the chunk after the first fails

    spool = store.spool = PredictionSpool(store.spool_dir, flaky, PREDICTION_COLUMNS, linger=3600, chunk_rows=100)
    rows = [prediction() for _ in range(250)]
    for row in rows:
        store.record_prediction(row)
    with pytest.raises(RuntimeError):
        spool.flush()
    assert sizes == [100] and spool.pending() == 150
    assert sum(spool.holds(r["id"]) for r in rows) == 150
    fail.clear()
    spool.insert = insert
    assert spool.flush() == 150
    assert max(sizes) <= 100 and sum(sizes) == 250
    assert stored_ids(store) == {r["id"] for r in rows}
    assert spool.backlog() == (0, 0) and len(spool.paths()) == 1


@pytest.fixture
def app(tmp_path, tiny_predictor):
    settings = Settings(run_dir=tmp_path, variant="production")
    app = create_app(settings, holder=ModelHolder.fixed(settings, tiny_predictor, "3"), store=Store(migrate(settings).db_url))
    app.extensions["abfleet"]["store"].spool.linger = 3600
    yield app
    app.extensions["abfleet"]["store"].stop_spool()


def refused_count(app) -> float:
    text = app.test_client().get("/metrics").get_data(as_text=True)
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "abfleet_spool_refused_total")


@pytest.mark.parametrize("content_type", ["application/json", "application/json; charset=utf-8"])
def test_a_full_spool_is_a_503_with_retry_after_on_both_predict_paths(app, content_type):
    flat = json.dumps({"location": "Indira Nagar", "total_sqft": 1200, "bhk": 2, "bath": 2})
    client = app.test_client()
    assert client.post(PREDICT, data=flat, content_type=content_type).status_code == 200
    spool = app.extensions["abfleet"]["store"].spool
    spool.max_rows = 1
    before = refused_count(app)
    response = client.post(PREDICT, data=flat, content_type=content_type)
    assert response.status_code == 503
    assert response.headers["Retry-After"] == str(spool.retry_after)
    assert response.headers["Content-Type"] == "application/json"
    body = response.get_json()
    assert body["field"] is None and "spool full" in body["error"] and "try again" in body["error"]
    assert refused_count(app) == before + 1
    spool.flush()
    assert client.post(PREDICT, data=flat, content_type=content_type).status_code == 200
    metrics = app.extensions["abfleet"]["metrics"]
    assert metrics.spool_rows._value.get() == 0  # the gauges were set by the flush


def test_the_bounds_are_settings_a_server_hands_to_its_spool(tmp_path, tiny_predictor):
    settings = Settings.from_env({"ABFLEET_SPOOL_MAX_ROWS": "7", "ABFLEET_SPOOL_MAX_BYTES": "65536"}, run_dir=tmp_path)
    assert (settings.spool_max_rows, settings.spool_max_bytes) == (7, 65536)
    assert (Settings().spool_max_rows, Settings().spool_max_bytes) == (200_000, 256 << 20)
    app = create_app(settings, holder=ModelHolder.fixed(settings, tiny_predictor, "3"), store=Store(migrate(settings).db_url))
    spool = app.extensions["abfleet"]["store"].spool
    try:
        assert (spool.max_rows, spool.max_bytes) == (7, 65536)
    finally:
        app.extensions["abfleet"]["store"].stop_spool()
