"""`abfleet.sampling` and the query indexes on both store back ends: counts and bounded,
deterministic samples drawn in the database."""

from __future__ import annotations

import datetime as dt
import random

import pytest
import sqlalchemy as sa

from abfleet import migrations, sampling
from abfleet.store import Store, feedback


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    url = f"sqlite:///{tmp_path / 'store.db'}" if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    store = Store(url, spool_dir=tmp_path / "spool")
    store.init_schema()
    empty(store)  # PostgreSQL's database lives for the session: other tests' rows may be in it
    yield store
    empty(store)
    store.close()


def empty(store: Store) -> None:
    with store.engine.begin() as conn:
        conn.execute(feedback.delete())
        conn.execute(sa.text("DELETE FROM predictions"))


def rows(n: int, rng: random.Random, start: dt.datetime, variant: str = "production", version: str = "3") -> list[dict]:
    return [{"id": rng.getrandbits(128).to_bytes(16, "big").hex(), "created_at": start + dt.timedelta(seconds=i),
             "variant": variant, "model_version": version, "location": rng.choice(["Whitefield", "Hebbal", "other"]),
             "total_sqft": rng.uniform(500, 3000), "bhk": rng.randint(1, 4), "bath": rng.randint(1, 4),
             "estimated_price": rng.uniform(30, 300), "latency_ms": 1.0, "user_id": f"u{i % 50}"} for i in range(n)]


def test_id_bound_covers_the_sample_with_a_margin():
    assert sampling.id_bound(5000, 5000) is None and sampling.id_bound(5000, 5300) is None
    bound = sampling.id_bound(5000, 1_000_000)
    fraction = int(bound, 16) / 16 ** sampling.ID_DIGITS
    assert len(bound) == sampling.ID_DIGITS and 0.005 < fraction < 0.0055
    # 4.5 standard deviations above the expected count: falling short is a rare event.
    assert fraction * 1_000_000 >= 5000 + 4 * 5000 ** 0.5


def test_sample_is_the_smallest_ids_of_the_window_bounded_and_repeatable(store):
    rng = random.Random(7)
    t0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    old = rows(300, rng, t0 - dt.timedelta(days=30))
    arm = rows(3000, rng, t0) + rows(1200, rng, t0, "candidate", "4") + rows(100, rng, t0, "candidate", "2")
    store.record_predictions(old + arm)
    actual = {r["id"]: 100.0 + i for i, r in enumerate(arm[:400])}
    with store.engine.begin() as conn:
        conn.execute(feedback.insert(), [
            {"prediction_id": pid, "created_at": t0, "kind": "actual_price", "feedback_type": "actual_price",
             "feedback_value": price, "ape": 0.1, "variant": "production", "model_version": "3"}
            for pid, price in actual.items()])

    assert sampling.count(store, t0) == 4300
    assert sampling.count(store, t0, variant="candidate", version="4") == 1200

    total, got = sampling.sample(store, t0, 500)
    assert total == 4300 and len(got) == 500
    window = sorted(r["id"] for r in arm)
    assert [r["id"] for r in got] == window[:500]  # exactly the smallest ids, in order
    assert set(got[0]) == set(sampling.SAMPLE_COLUMNS)
    assert sampling.sample(store, t0, 500) == (total, got)  # deterministic

    total, candidate = sampling.sample(store, t0, 300, variant="candidate", version="4")
    assert total == 1200 and len(candidate) == 300
    assert {(r["variant"], r["model_version"]) for r in candidate} == {("candidate", "4")}

    # Fewer rows than the limit: all of them; with actual prices joined in.
    total, everything = sampling.sample(store, t0, 10_000, actual_price=True)
    assert total == len(everything) == 4300
    assert {r["id"]: r["price"] for r in everything if r["price"] is not None} == actual

    # The join never multiplies rows nor changes which rows are sampled.
    assert [r["id"] for r in sampling.sample(store, t0, 500, actual_price=True)[1]] == window[:500]
    assert sampling.sample(store, t0 + dt.timedelta(days=1), 500) == (0, [])


def test_a_bound_that_falls_short_still_gives_the_whole_sample(store, monkeypatch):
    rng = random.Random(8)
    t0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    store.record_predictions(rows(2000, rng, t0))
    monkeypatch.setattr(sampling, "id_bound", lambda limit, total: "00000001")  # almost nothing below it
    total, got = sampling.sample(store, t0, 100)
    assert total == 2000 and len(got) == 100


def test_the_migration_creates_the_query_indexes(store):
    assert migrations.current(store.url) == migrations.head()
    inspector = sa.inspect(store.engine)
    columns = {t: {tuple(ix["column_names"]) for ix in inspector.get_indexes(t)} for t in ("predictions", "feedback")}
    assert ("variant", "model_version", "created_at") in columns["predictions"]
    assert ("user_id",) in columns["predictions"] and ("created_at",) in columns["predictions"]
    assert ("variant", "model_version", "kind", "created_at") in columns["feedback"]
    assert ("created_at",) in columns["feedback"] and ("user_id",) in columns["feedback"]
