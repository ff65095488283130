"""The prediction store: every answered prediction and every accepted piece of feedback.

SQLAlchemy over a SQLite file by default, PostgreSQL when DATABASE_URL says so.
Feedback is recorded against the variant and model version that made the prediction,
whichever server receives it.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

metadata = sa.MetaData()

predictions = sa.Table(
    "predictions",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, index=True),
    sa.Column("variant", sa.String(16), nullable=False),
    sa.Column("model_version", sa.String(32), nullable=False),
    sa.Column("location", sa.String(128), nullable=False),
    sa.Column("total_sqft", sa.Float, nullable=False),
    sa.Column("bhk", sa.Integer, nullable=False),
    sa.Column("bath", sa.Integer, nullable=False),
    sa.Column("estimated_price", sa.Float, nullable=False),
    sa.Column("latency_ms", sa.Float, nullable=False),
    sa.Column("user_id", sa.String(128)),
)

# One star rating, one quick verdict and one actual price per prediction: `kind` is the class.
feedback = sa.Table(
    "feedback",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("prediction_id", sa.String(32), sa.ForeignKey("predictions.id"), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("feedback_type", sa.String(16), nullable=False),
    sa.Column("feedback_value", sa.Float),
    sa.Column("ape", sa.Float),
    sa.Column("variant", sa.String(16), nullable=False),
    sa.Column("model_version", sa.String(32), nullable=False),
    sa.Column("received_by", sa.String(16)),
    sa.UniqueConstraint("prediction_id", "kind", name="one_feedback_of_a_kind"),
)

decisions = sa.Table(
    "decisions",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, index=True),
    sa.Column("decision", sa.String(16), nullable=False),
    sa.Column("source", sa.String(32), nullable=False),
    sa.Column("production_version", sa.String(32)),
    sa.Column("candidate_version", sa.String(32)),
    sa.Column("applied", sa.Boolean, nullable=False),
    sa.Column("reasons", sa.Text, nullable=False),
    sa.Column("details", sa.Text, nullable=False),
)

# Small facts about the fleet that several processes need: the router's weight, the latest drift summary.
fleet_state = sa.Table(
    "fleet_state",
    metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)

FEEDBACK_KIND = {"rating": "rating", "accurate": "quick", "too_high": "quick", "too_low": "quick", "actual_price": "actual_price"}


class NotFound(LookupError):
    """No prediction with that id."""


class Duplicate(ValueError):
    """Feedback of that kind was already recorded for the prediction."""


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class Store:
    """Reads and writes the prediction store; safe to share between threads."""

    def __init__(self, url: str):
        self.url = url
        kwargs: dict[str, Any] = {"pool_pre_ping": True}
        if url.startswith("sqlite"):
            kwargs["connect_args"] = {"timeout": 30, "check_same_thread": False}
        self.engine = sa.create_engine(url, **kwargs)
        if url.startswith("sqlite"):
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)

    def init_schema(self) -> None:
        """Create missing tables (idempotent; safe when several workers start at once)."""
        try:
            metadata.create_all(self.engine)
        except sa.exc.OperationalError:
            metadata.create_all(self.engine)  # another worker raced us to CREATE TABLE

    def ping(self) -> bool:
        try:
            with self.engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
            return True
        except sa.exc.SQLAlchemyError:
            return False

    # ---- predictions -------------------------------------------------------
    def record_prediction(self, row: dict) -> None:
        self.record_predictions([row])

    def record_predictions(self, rows: list[dict]) -> None:
        if not rows:
            return
        with self.engine.begin() as conn:
            conn.execute(predictions.insert(), [{"created_at": now(), **r} for r in rows])

    def get_prediction(self, prediction_id: str) -> dict | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(predictions).where(predictions.c.id == prediction_id)).mappings().first()
        return dict(row) if row else None

    def count_predictions(self, **where) -> int:
        query = sa.select(sa.func.count()).select_from(predictions)
        for column, value in where.items():
            query = query.where(predictions.c[column] == value)
        with self.engine.connect() as conn:
            return int(conn.execute(query).scalar_one())

    def predictions_since(self, since: dt.datetime) -> list[dict]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(predictions).where(predictions.c.created_at >= since)).mappings().all()
        return [dict(r) for r in rows]

    # ---- feedback ----------------------------------------------------------
    def record_feedback(
        self, prediction_id: str, feedback_type: str, value: float | None, received_by: str | None = None
    ) -> dict:
        """Store one piece of feedback against the prediction's own variant and version.

        Raises NotFound for an unknown prediction id and Duplicate when feedback of the same
        kind (star rating, quick verdict, actual price) was already recorded for it.
        """
        kind = FEEDBACK_KIND[feedback_type]
        pred = self.get_prediction(prediction_id)
        if pred is None:
            raise NotFound(prediction_id)
        ape = None
        if feedback_type == "actual_price" and value:
            ape = abs(pred["estimated_price"] - value) / value
        row = {
            "prediction_id": prediction_id,
            "created_at": now(),
            "kind": kind,
            "feedback_type": feedback_type,
            "feedback_value": value,
            "ape": ape,
            "variant": pred["variant"],
            "model_version": pred["model_version"],
            "received_by": received_by,
        }
        try:
            with self.engine.begin() as conn:
                conn.execute(feedback.insert(), [row])
        except IntegrityError:
            raise Duplicate(f"{kind} already recorded for prediction {prediction_id}") from None
        return row

    def feedback_for(self, prediction_id: str) -> list[dict]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(feedback).where(feedback.c.prediction_id == prediction_id)).mappings().all()
        return [dict(r) for r in rows]

    def actual_prices_since(self, since: dt.datetime) -> dict[str, float]:
        """prediction id → the actual price a user reported, for predictions made since then."""
        query = (sa.select(feedback.c.prediction_id, feedback.c.feedback_value)
                 .join(predictions, predictions.c.id == feedback.c.prediction_id)
                 .where(feedback.c.kind == "actual_price", predictions.c.created_at >= since))
        with self.engine.connect() as conn:
            return {pid: float(value) for pid, value in conn.execute(query).all()}

    # ---- decisions ---------------------------------------------------------
    def record_decision(self, decision: str, source: str, applied: bool, reasons: list[str], details: dict,
                        production_version: str | None, candidate_version: str | None) -> int:
        with self.engine.begin() as conn:
            result = conn.execute(decisions.insert().values(
                created_at=now(), decision=decision, source=source, applied=applied,
                reasons=json.dumps(reasons), details=json.dumps(details, default=str),
                production_version=production_version, candidate_version=candidate_version,
            ))
            return int(result.inserted_primary_key[0])

    def decision_counts(self) -> tuple[dict[str, int], dt.datetime | None]:
        """Decisions by kind, and the time of the latest one (None when there was none)."""
        with self.engine.connect() as conn:
            counts = dict(conn.execute(sa.select(decisions.c.decision, sa.func.count()).group_by(decisions.c.decision)).all())
            last = conn.execute(sa.select(sa.func.max(decisions.c.created_at))).scalar_one()
        if last is not None and last.tzinfo is None:  # SQLite hands back naive UTC
            last = last.replace(tzinfo=dt.timezone.utc)
        return {k: int(v) for k, v in counts.items()}, last

    # ---- fleet state -------------------------------------------------------
    def set_state(self, key: str, value) -> None:
        row = {"key": key, "value": json.dumps(value), "updated_at": now()}
        with self.engine.begin() as conn:
            if conn.execute(sa.update(fleet_state).where(fleet_state.c.key == key).values(**row)).rowcount == 0:
                conn.execute(fleet_state.insert(), [row])

    def get_state(self, key: str, default=None):
        with self.engine.connect() as conn:
            value = conn.execute(sa.select(fleet_state.c.value).where(fleet_state.c.key == key)).scalar_one_or_none()
        return default if value is None else json.loads(value)

    def decision_history(self, limit: int = 100) -> list[dict]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(decisions).order_by(decisions.c.id.desc()).limit(limit)).mappings().all()
        out = []
        for r in rows:
            item = dict(r)
            item["reasons"] = json.loads(item["reasons"])
            item["details"] = json.loads(item["details"])
            out.append(item)
        return out


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    # WAL lets readers and several gunicorn workers write without "database is locked".
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()
