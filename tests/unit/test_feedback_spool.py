"""The feedback spool (abfleet.feedback_spool) and the feedback service's use of it: feedback that
meets a database fault is kept on disk and answered 202, a repeated key is a 409, and resolving
runs the live checks and stores each accepted item exactly once."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from abfleet.feedback import Feedback
from abfleet.feedback_spool import FeedbackSpool, FeedbackSpoolFull, PendingFeedback, read_pending
from abfleet.metrics import APE_COUNT, ServerMetrics
from abfleet.procs import free_port
from abfleet.settings import Settings
from abfleet.store import Store

PID = "ab" * 16
OTHER = "cd" * 16


def item(pid: str = PID, kind: str = "rating", value: float | None = 4.0, user: str | None = "u1") -> PendingFeedback:
    return PendingFeedback.now(pid, kind, value, user, "production")


def test_items_are_durable_keyed_and_bounded(tmp_path):
    spool = FeedbackSpool(tmp_path, max_rows=2)
    try:
        assert spool.add(item()) is True
        assert spool.add(item(value=5.0)) is False  # the key is pending: not spooled twice
        assert spool.holds(PID, "rating") and not spool.holds(PID, "accurate")
        assert spool.add(item(kind="accurate", value=None)) is True
        with pytest.raises(FeedbackSpoolFull):
            spool.add(item(OTHER))
        on_disk = read_pending(spool.path.read_bytes())  # fsync'd lines, read back as another process would
        assert set(on_disk) == {(PID, "rating"), (PID, "accurate")} and on_disk[(PID, "rating")].feedback_value == 4.0
        spool.done(spool.pending()[0])
        assert len(read_pending(spool.path.read_bytes())) == 1
        spool.done(spool.pending()[0])
        assert spool.path.read_bytes() == b""  # nothing pending: the file is emptied
    finally:
        spool.close()
    assert not spool.path.exists()  # empty at close: removed


def test_a_dead_process_file_is_seen_and_adopted(tmp_path):
    # A real process spools two items and dies without closing (its flock goes with it).
    script = ("import os, sys; from abfleet.feedback_spool import FeedbackSpool, PendingFeedback as P\n"
              "s = FeedbackSpool(sys.argv[1])\n"
              f"s.add(P.now({PID!r}, 'rating', 3.0, 'u1', 'candidate')); s.add(P.now({OTHER!r}, 'too_high', None, 'u2', 'candidate'))\n"
              f"s.done(P.now({OTHER!r}, 'too_high', None, 'u2', 'candidate'))\n"
              "s.add(P.now('ef' * 16, 'accurate', None, 'u3', 'candidate'))\n"
              "os._exit(0)\n")
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=True, timeout=60)
    spool = FeedbackSpool(tmp_path)
    try:
        assert spool.holds(PID, "rating") and not spool.holds(OTHER, "too_high")  # another file is looked into
        assert spool.add(item()) is False
        assert spool.adopt_orphans() == 2
        assert {i.key for i in spool.pending()} == {(PID, "rating"), ("ef" * 16, "accurate")}
        assert [p for p in tmp_path.iterdir() if p.suffix == ".jsonl"] == [spool.path]
        assert {i.received_by for i in spool.pending()} == {"candidate"}
    finally:
        spool.close()
    assert spool.path.exists(), "a file with pending items stays for another process to adopt"


@pytest.fixture
def stores(tmp_path):
    """A store that faults (PostgreSQL on a port nobody listens on) and one that answers (SQLite)."""
    down = Store(f"postgresql+psycopg2://postgres@127.0.0.1:{free_port()}/none", spool_dir=tmp_path / "spool",
                 connect_timeout=1.0)
    up = Store(f"sqlite:///{tmp_path / 'store.db'}", spool_dir=tmp_path / "spool")
    up.init_schema()
    up.record_predictions([
        {"id": PID, "variant": "production", "model_version": "3", "location": "x", "total_sqft": 1200.0, "bhk": 2,
         "bath": 2, "estimated_price": 50.0, "latency_ms": 1.0, "user_id": "u1"},
    ])
    yield down, up
    down.close()
    up.close()


def body(pid: str, kind: str, value: float | None = None) -> bytes:
    return json.dumps({"prediction_id": pid, "feedback_type": kind, "feedback_value": value}).encode()


def test_feedback_during_a_fault_is_pending_then_stored_once(tmp_path, stores):
    down, up = stores
    settings = Settings(run_dir=tmp_path, feedback_pending_max_age_s=3600)
    spool = FeedbackSpool(tmp_path / "spool" / "feedback")
    errors, stored = [], []
    feedback = Feedback(down, settings, spool, on_store_error=lambda: errors.append(1), on_stored=stored.append)
    try:
        first = feedback.record(body(PID, "rating", 4), "u1")
        assert first.status == 202 and first.body == {"status": "pending", "prediction_id": PID, "feedback_type": "rating"}
        assert first.failure is None and first.row is None and errors == [1]
        again = feedback.record(body(PID, "rating", 2), "u1")
        assert again.status == 409 and again.body["field"] == "feedback_type", again
        assert feedback.record(body(PID, "actual_price", 1500), "u1").status == 202  # refused later: beyond the ratio
        assert feedback.record(body(PID, "accurate"), "intruder").status == 202  # refused later: not their estimate
        assert feedback.record(body(OTHER, "rating", 5), "u9").status == 202  # its prediction is unknown
        assert len(spool) == 4

        # The database is back: the same checks as a live request, and each accepted item stored once.
        feedback.store = up
        outcomes = []
        spool.resolve_all(feedback.resolve, lambda outcome, i: outcomes.append((outcome, i.feedback_type)))
        assert sorted(outcomes) == [("refused", "accurate"), ("refused", "actual_price"), ("stored", "rating")]
        rows = up.feedback_for(PID)
        assert [(r["feedback_type"], r["feedback_value"], r["user_id"]) for r in rows] == [("rating", 4.0, "u1")]
        assert [r["feedback_type"] for r in stored] == ["rating"]
        assert {i.prediction_id for i in spool.pending()} == {OTHER}  # kept: its prediction may still land
        # A stored key answers 409 live, as any duplicate does.
        assert feedback.record(body(PID, "rating", 1), "u1").status == 409

        feedback.pending_max_age = dt.timedelta(0)  # past its bound: dropped
        spool.resolve_all(feedback.resolve, lambda outcome, i: outcomes.append((outcome, i.feedback_type)))
        assert outcomes[-1] == ("expired", "rating") and len(spool) == 0
        assert len(up.feedback_for(PID)) == 1 and up.feedback_for(OTHER) == []
    finally:
        spool.close()


def test_the_same_key_spooled_twice_is_stored_once(tmp_path, stores):
    # Two workers that both took the key (each looked before the other wrote): the table's
    # one-of-a-kind constraint keeps the second out.
    _down, up = stores
    feedback = Feedback(up, Settings(run_dir=tmp_path))
    one, two = FeedbackSpool(tmp_path / "a"), FeedbackSpool(tmp_path / "b")
    try:
        one.add(item(value=4.0))
        two.add(item(value=2.0))
        outcomes = []
        for spool in (one, two):
            spool.resolve_all(feedback.resolve, lambda outcome, _i: outcomes.append(outcome))
        assert outcomes == ["stored", "duplicate"]
        assert [r["feedback_value"] for r in up.feedback_for(PID)] == [4.0]
    finally:
        one.close()
        two.close()


def test_the_window_is_judged_when_the_feedback_came_in(tmp_path, stores):
    _down, up = stores
    settings = Settings(run_dir=tmp_path, feedback_window_days=1)
    feedback = Feedback(up, settings)
    made = up.get_prediction(PID)["created_at"]
    made = made.replace(tzinfo=dt.timezone.utc) if made.tzinfo is None else made
    inside = PendingFeedback(PID, "rating", 5.0, "u1", "production", (made + dt.timedelta(hours=1)).isoformat())
    late = PendingFeedback(PID, "accurate", None, "u1", "production", (made + dt.timedelta(days=2)).isoformat())
    assert feedback.resolve(inside) == "stored"
    assert feedback.resolve(late) == "refused"
    [row] = up.feedback_for(PID)
    stamp = row["created_at"].replace(tzinfo=dt.timezone.utc) if row["created_at"].tzinfo is None else row["created_at"]
    assert stamp == inside.received  # stored with the time it was received


def test_a_full_feedback_spool_is_a_503_with_retry_after(tmp_path, stores):
    down, _up = stores
    spool = FeedbackSpool(tmp_path / "fb", max_rows=0)
    try:
        answer = Feedback(down, Settings(run_dir=tmp_path), spool).record(body(PID, "rating", 3), "u1")
        assert answer.status == 503 and answer.failure == "spool" and answer.retry_after, answer
    finally:
        spool.close()


def test_without_a_spool_a_fault_is_a_503(tmp_path, stores):
    down, _up = stores
    answer = Feedback(down, Settings(run_dir=tmp_path)).record(body(PID, "rating", 3), "u1")
    assert answer.status == 503 and answer.failure == "store" and answer.retry_after
    assert not Path(tmp_path / "spool" / "feedback").exists()


def test_a_spooled_comment_is_stored_and_counted_as_nothing(tmp_path, stores):
    # A comment carries text alone: counted from the spool, as from a live 201, it moves no
    # experiment counter (no APE: it is not an actual price).
    _down, up = stores
    metrics = ServerMetrics(CollectorRegistry())
    feedback = Feedback(up, Settings(run_dir=tmp_path), on_stored=metrics.count_feedback)
    comment = PendingFeedback.now(PID, "comment", None, "u1", "production", "the garden is smaller")
    price = PendingFeedback.now(PID, "actual_price", 55.0, "u1", "production")
    assert feedback.resolve(comment) == "stored" and feedback.resolve(price) == "stored"
    assert [r["feedback_text"] for r in up.feedback_for(PID) if r["kind"] == "comment"] == ["the garden is smaller"]
    labels = {"variant": "production", "model_version": "3"}
    assert metrics.registry.get_sample_value(APE_COUNT, labels) == 1.0  # the price alone
