"""How long /api/metrics' query takes on a large store: `python scripts/bench_metrics_summary.py
[--rows 1000000] [--url DATABASE_URL]` fills a fresh store (a temporary SQLite file unless a URL
is given: use an empty database) with predictions over the last day on two variants, a tenth
of them rated, then times `abfleet.summary.variant_summary` and prints one JSON document."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import sqlalchemy as sa

from abfleet import migrations, summary
from abfleet.store import feedback, predictions

BATCH = 50_000


def fill(engine: sa.Engine, rows: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    now = dt.datetime.now(dt.timezone.utc)
    for start in range(0, rows, BATCH):
        n = min(BATCH, rows - start)
        ages = rng.uniform(0, 24 * 3600, n)
        latency = rng.lognormal(np.log(0.05), 0.6, n)  # ms: the model's own time, as servers record it
        batch = [{"id": f"{start + i:032x}", "created_at": now - dt.timedelta(seconds=float(ages[i])),
                  "variant": "production" if i % 5 else "candidate", "model_version": "1", "location": "Whitefield",
                  "total_sqft": 1200.0, "bhk": 2, "bath": 2, "estimated_price": 80.0, "latency_ms": float(latency[i]),
                  "user_id": f"u{i % 997}"} for i in range(n)]
        rated = [{"prediction_id": row["id"], "created_at": row["created_at"], "kind": "rating", "feedback_type": "rating",
                  "feedback_value": float(1 + i % 5), "variant": row["variant"], "model_version": "1"}
                 for i, row in enumerate(batch) if i % 10 == 1]
        with engine.begin() as conn:
            conn.execute(predictions.insert(), batch)
            conn.execute(feedback.insert(), rated)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--url", help="an empty database's SQLAlchemy URL (default: a temporary SQLite file)")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        url = args.url or f"sqlite:///{Path(tmp) / 'store.db'}"
        migrations.upgrade(url)
        engine = sa.create_engine(url)
        t0 = time.perf_counter()
        fill(engine, args.rows)
        filled = time.perf_counter() - t0
        times, result = [], None
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            result = summary.variant_summary(engine, "production", 24)
            times.append(time.perf_counter() - t0)
        engine.dispose()
    print(json.dumps({"database": engine.dialect.name, "rows": args.rows, "fill_s": round(filled, 1),
                      "query_s": {"median": round(statistics.median(times), 3), "min": round(min(times), 3),
                                  "max": round(max(times), 3)},
                      "answer": result}, indent=2))


if __name__ == "__main__":
    main()
