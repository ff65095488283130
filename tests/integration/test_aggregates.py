"""`aggregates.people` on both store back ends, against the same numbers computed in Python."""

from __future__ import annotations

import datetime as dt
import math
import random
import uuid

import pytest
import sqlalchemy as sa

from abfleet import aggregates
from abfleet.store import Store, feedback


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    url = f"sqlite:///{tmp_path / 'store.db'}" if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    store = Store(url, spool_dir=tmp_path / "spool")
    store.init_schema()
    yield store
    with store.engine.begin() as conn:  # PostgreSQL's database lives for the session
        conn.execute(feedback.delete())
        conn.execute(sa.text("DELETE FROM predictions"))
    store.close()


def prediction(variant: str, version: str, user: str | None, estimate: float = 100.0) -> dict:
    return {"id": uuid.uuid4().hex, "created_at": dt.datetime.now(dt.timezone.utc), "variant": variant,
            "model_version": version, "location": "Whitefield", "total_sqft": 1200.0, "bhk": 2, "bath": 2,
            "estimated_price": estimate, "latency_ms": 1.0, "user_id": user}


def test_people_reduces_each_user_to_one_mean(store):
    since = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=1)
    rng = random.Random(5)
    ratings: dict[str, dict[str, list[float]]] = {"production": {}, "candidate": {}}
    apes: dict[str, dict[str, list[float]]] = {"production": {}, "candidate": {}}
    users = {"production": set(), "candidate": set()}
    versions = {"production": "3", "candidate": "4"}
    for i in range(120):
        arm = "candidate" if i % 4 == 0 else "production"
        user = f"u{i % 40}-{arm}"
        users[arm].add(user)
        row = prediction(arm, versions[arm], user)
        store.record_prediction(row)
        if i % 3:
            stars = rng.randint(1, 5)
            store.record_feedback(row["id"], "rating", stars, user_id=user)
            ratings[arm].setdefault(user, []).append(stars)
        if i % 5 == 0:
            actual = 100.0 * rng.uniform(0.6, 1.6)
            stored = store.record_feedback(row["id"], "actual_price", actual, user_id=user)
            apes[arm].setdefault(user, []).append(stored["ape"])
    # Another version's rows, and a row without a user: the first never counts, the second is one user.
    other = prediction("candidate", "2", "someone")
    store.record_prediction(other)
    store.record_feedback(other["id"], "rating", 1, user_id="someone")
    anonymous = prediction("production", "3", None)
    store.record_prediction(anonymous)
    store.record_feedback(anonymous["id"], "rating", 5)
    ratings["production"][f"prediction:{anonymous['id']}"] = [5.0]
    users["production"].add(f"prediction:{anonymous['id']}")

    got = aggregates.people(store, since, versions)
    for arm in versions:
        assert got[arm]["users"] == len(users[arm])
        for name, values in (("ratings", ratings[arm]), ("ape", apes[arm])):
            means = [sum(v) / len(v) for v in values.values()]
            block = got[arm][name]
            assert block["users"] == len(means) and block["count"] == sum(map(len, values.values()))
            assert math.isclose(block["sum"], sum(means), rel_tol=1e-9)
            assert math.isclose(block["sum_sq"], sum(m * m for m in means), rel_tol=1e-9)
    later = aggregates.people(store, dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=5), versions)
    assert later["candidate"] == {"users": 0, "ratings": {"users": 0, "count": 0, "sum": 0.0, "sum_sq": 0.0},
                                  "ape": {"users": 0, "count": 0, "sum": 0.0, "sum_sq": 0.0}}
