"""`Store.init_schema` brings a store created by an earlier version up to date: the feedback
table gains its `user_id` column in place, on SQLite and PostgreSQL, however often it runs."""

from __future__ import annotations

import uuid

import pytest
import sqlalchemy as sa

from abfleet.store import Store

# The feedback table as the first release created it: no user_id.
OLD_FEEDBACK = """CREATE TABLE feedback (
    id INTEGER PRIMARY KEY, prediction_id VARCHAR(32) NOT NULL, created_at TIMESTAMP NOT NULL,
    kind VARCHAR(16) NOT NULL, feedback_type VARCHAR(16) NOT NULL, feedback_value FLOAT, ape FLOAT,
    variant VARCHAR(16) NOT NULL, model_version VARCHAR(32) NOT NULL, received_by VARCHAR(16),
    CONSTRAINT one_feedback_of_a_kind UNIQUE (prediction_id, kind))"""


def columns(store: Store) -> set[str]:
    return {c["name"] for c in sa.inspect(store.engine).get_columns("feedback")}


def upgrade_keeps_old_rows(url: str) -> None:
    store = Store(url, spool_dir=None)
    with store.engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE IF EXISTS feedback")
        conn.exec_driver_sql(OLD_FEEDBACK.replace("INTEGER PRIMARY KEY", "SERIAL PRIMARY KEY")
                             if store.engine.dialect.name == "postgresql" else OLD_FEEDBACK)
    assert "user_id" not in columns(store)
    store.init_schema()
    store.init_schema()  # idempotent
    assert "user_id" in columns(store)
    pid = uuid.uuid4().hex
    store.record_predictions([{"id": pid, "variant": "production", "model_version": "1", "location": "x",
                               "total_sqft": 1000.0, "bhk": 2, "bath": 2, "estimated_price": 80.0,
                               "latency_ms": 1.0, "user_id": "u-1"}])
    row = store.record_feedback(pid, "actual_price", 100.0, "production", user_id="u-1")
    assert row["ape"] == pytest.approx(0.2)
    assert [f["user_id"] for f in store.feedback_for(pid)] == ["u-1"]
    store.close()


def test_sqlite_store_gains_the_user_column(tmp_path):
    upgrade_keeps_old_rows(f"sqlite:///{tmp_path / 'old.db'}")


def test_postgres_store_gains_the_user_column(postgres_url):
    upgrade_keeps_old_rows(postgres_url)
