"""Bounded, deterministic samples of the predictions, drawn in the database.

The hourly arms check and the daily drift job compare distributions; a few thousand rows
per side decide that as well as millions do. So they never read a window of predictions:
they read its count (an aggregate) and a sample of at most `limit` rows of it.

The sample is "the `limit` rows of the window with the smallest prediction ids". A
prediction id is 32 random hex digits (`serving.PredictionIds`, uuid4-like), drawn
independently of everything the row holds, so those rows are a uniform random sample of the
window. It is deterministic (the same rows give the same sample, run after run), needs no
hash function (SQLite has none built in; PostgreSQL's md5 would cost a call per row) and is
the same on both back ends: lower-case hex strings of one length compare in the same order
byte by byte and in any collation (digits before letters).

To keep the database from ordering the whole window, the query also asks for ids below a
bound chosen from the window's count so that about `limit` plus a few standard deviations
of rows fall under it; the primary key's index then serves the range. When the bound
happens to leave fewer than `limit` rows (a chance of ~1e-5 per query) the query is run
again without it: the result is the same rows either way.
"""

from __future__ import annotations

import datetime as dt
import math
from typing import TYPE_CHECKING

import sqlalchemy as sa

from abfleet.store import feedback, predictions

if TYPE_CHECKING:
    from abfleet.store import Store

# The columns a sample holds: the model's inputs, its estimate, the arm that made it.
SAMPLE_COLUMNS = ["id", "variant", "model_version", "location", "total_sqft", "bhk", "bath", "estimated_price"]
ID_DIGITS = 8  # hex digits of the bound: 16^8 steps, far finer than any sample fraction


def _window(since: dt.datetime, variant: str | None, version: str | None) -> list[sa.ColumnElement]:
    where = [predictions.c.created_at >= since]
    if variant is not None:
        where.append(predictions.c.variant == variant)
    if version is not None:
        where.append(predictions.c.model_version == version)
    return where


def id_bound(limit: int, total: int) -> str | None:
    """The id below which about `limit` (+ 4.5 standard deviations) of `total` random ids
    fall, as a hex prefix; None when that is all of them."""
    wanted = limit + 4.5 * math.sqrt(limit) + 10
    if wanted >= total:
        return None
    return format(math.ceil(wanted / total * 16 ** ID_DIGITS), f"0{ID_DIGITS}x")


def count(store: "Store", since: dt.datetime, *, variant: str | None = None, version: str | None = None) -> int:
    """Predictions made since `since` (of one arm and version when given), counted in the database."""
    store.settle()
    with store.engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(predictions)
                                .where(*_window(since, variant, version))).scalar_one())


def sample(store: "Store", since: dt.datetime, limit: int, *, variant: str | None = None,
           version: str | None = None, actual_price: bool = False) -> tuple[int, list[dict]]:
    """(rows in the window, at most `limit` of them): the window's predictions with the
    smallest ids (see the module doc), with SAMPLE_COLUMNS, and `price` (the actual price a
    user reported, or None) when `actual_price`."""
    if limit < 1:
        raise ValueError(f"a sample needs a positive limit, got {limit}")
    total = count(store, since, variant=variant, version=version)
    if total == 0:
        return 0, []
    columns = [predictions.c[name] for name in SAMPLE_COLUMNS]
    query = sa.select(*columns)
    if actual_price:
        price = feedback.alias("price")
        query = (sa.select(*columns, price.c.feedback_value.label("price"))
                 .select_from(predictions.outerjoin(price, sa.and_(price.c.prediction_id == predictions.c.id,
                                                                     price.c.kind == "actual_price"))))
    query = query.where(*_window(since, variant, version)).order_by(predictions.c.id).limit(limit)
    bound = id_bound(limit, total)
    with store.engine.connect() as conn:
        rows = []
        if bound is not None:
            rows = conn.execute(query.where(predictions.c.id < bound)).mappings().all()
        if len(rows) < min(limit, total):  # no bound, or it fell short: the same rows, found the long way
            rows = conn.execute(query).mappings().all()
        return total, [dict(r) for r in rows]
