"""The JSON summary of one variant that /api/metrics answers (the original project's shape),
from one aggregate query on the store.

The query's cost is bounded whatever the number of rows: predictions are grouped into
latency buckets (10 µs wide below 100 ms, 1 ms wide above), so the database hands back at
most a few tens of thousands of small rows, and the feedback counts come in one more row of
the same statement. Count, mean, minimum and maximum are exact; p95 and p99 are the
midpoint of the bucket the percentile falls in (within 5 µs below 100 ms), kept within
[min, max].
"""

from __future__ import annotations

import datetime as dt
import math

import sqlalchemy as sa

from abfleet.store import feedback, predictions

FINE_MS = 100.0  # below it, buckets are 1/FINE_STEPS ms wide
FINE_STEPS = 100
COARSE_BASE = int(FINE_MS * FINE_STEPS)  # bucket numbers from here on are whole milliseconds


def _bucket(latency: sa.ColumnElement) -> sa.ColumnElement:
    return sa.case((latency < FINE_MS, sa.cast(latency * FINE_STEPS, sa.Integer)),
                   else_=COARSE_BASE + sa.cast(latency, sa.Integer))


def bucket_range(bucket: int) -> tuple[float, float]:
    """The latencies (ms) a bucket number holds: [low, high)."""
    if bucket < COARSE_BASE:
        return bucket / FINE_STEPS, (bucket + 1) / FINE_STEPS
    whole = bucket - COARSE_BASE
    return float(whole), float(whole + 1)


def query(variant: str, since: dt.datetime) -> sa.CompoundSelect:
    """One statement: a row per latency bucket of the variant's predictions since `since`
    (part 0: bucket, count, sum, min, max), then one row of its feedback since then (part 1:
    count, sum of ratings, number of ratings, accurate, too_high, too_low)."""
    lat = predictions.c.latency_ms
    bucket = _bucket(lat)
    preds = (sa.select(sa.literal(0).label("part"), bucket.label("bucket"), sa.func.count().label("n"),
                       sa.func.sum(lat).label("a"), sa.func.min(lat).label("b"), sa.func.max(lat).label("c"),
                       sa.null().label("d"), sa.null().label("e"))
             .where(predictions.c.variant == variant, predictions.c.created_at >= since)
             .group_by(bucket))

    def counted(condition) -> sa.ColumnElement:
        return sa.func.coalesce(sa.func.sum(sa.case((condition, 1), else_=0)), 0)

    rating = feedback.c.feedback_type == "rating"
    fb = (sa.select(sa.literal(1), sa.null(), sa.func.count(),
                    sa.func.sum(sa.case((rating, feedback.c.feedback_value), else_=None)),
                    counted(rating), counted(feedback.c.feedback_type == "accurate"),
                    counted(feedback.c.feedback_type == "too_high"), counted(feedback.c.feedback_type == "too_low"))
          .where(feedback.c.variant == variant, feedback.c.created_at >= since))
    return sa.union_all(preds, fb)


def percentile(buckets: list[tuple[int, int]], total: int, q: float) -> float:
    """The q-th percentile (0..1, nearest rank) of `total` values given as sorted (bucket, count)."""
    rank = max(1, math.ceil(q * total))
    seen = 0
    for bucket, count in buckets:
        seen += count
        if seen >= rank:
            low, high = bucket_range(bucket)
            return (low + high) / 2
    raise ValueError("rank beyond the counts")


def summarise(rows, variant: str, hours: int, now: dt.datetime) -> dict:
    """The /api/metrics body from the rows of `query`."""
    buckets, lows, highs, total, latency_sum, fb = [], [], [], 0, 0.0, (0, None, 0, 0, 0, 0)
    for part, bucket, n, a, b, c, d, e in rows:
        if part == 0:
            buckets.append((int(bucket), int(n)))
            total += int(n)
            latency_sum += float(a)
            lows.append(float(b))
            highs.append(float(c))
        else:
            fb = (int(n), a, int(b or 0), int(c or 0), int(d or 0), int(e or 0))
    buckets.sort()
    low, high = (min(lows), max(highs)) if total else (0.0, 0.0)

    def pct(q: float) -> float:
        return round(min(high, max(low, percentile(buckets, total, q))), 3) if total else 0.0

    fb_count, rating_sum, ratings, accurate, too_high, too_low = fb
    return {
        "variant": variant,
        "time_period_hours": hours,
        "timestamp": now.isoformat(),
        "predictions": {
            "total_count": total,
            "avg_latency_ms": round(latency_sum / total, 3) if total else 0.0,
            "p95_latency_ms": pct(0.95),
            "p99_latency_ms": pct(0.99),
            "min_latency_ms": round(low, 3),
            "max_latency_ms": round(high, 3),
        },
        "feedback": {
            "total_count": fb_count,
            "avg_rating": round(float(rating_sum) / ratings, 3) if ratings else None,
            "accurate_count": accurate,
            "too_high_count": too_high,
            "too_low_count": too_low,
        },
    }


def variant_summary(engine: sa.Engine, variant: str, hours: int, now: dt.datetime | None = None) -> dict:
    """The summary of `variant` over the last `hours`, in one round trip to the database."""
    now = now or dt.datetime.now(dt.timezone.utc)
    with engine.connect() as conn:
        rows = conn.execute(query(variant, now - dt.timedelta(hours=hours))).all()
    return summarise(rows, variant, hours, now)
