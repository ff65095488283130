"""The prediction store: every answered prediction and every accepted piece of feedback.

SQLAlchemy over a SQLite file by default, PostgreSQL when DATABASE_URL says so.
Feedback is recorded against the variant and model version that made the prediction,
whichever server receives it.

A model server writes predictions through a prediction spool (`Store.start_spool`, see
abfleet.spool): the row is appended to a local file before the answer leaves, and a
background thread inserts spooled rows in batches through `Store.insert_spooled`. Reads make
answered-but-not-yet-inserted predictions visible first (see `Store.get_prediction` and
`Store.settle`), so an answered prediction is never missing from what the store says, and
never lost when a process dies.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import itertools
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from abfleet.api import PriceBounds
from abfleet.spool import PredictionSpool, SpoolReader, default_spool_dir

if TYPE_CHECKING:
    from abfleet.settings import Settings

# The tables at the newest migration: a change here needs a revision in abfleet/migrations/versions
# (servers never create or alter tables; `abfleet db upgrade` does).
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
# /api/metrics' one query (abfleet.summary) reads only this index: a variant's latencies in a window.
sa.Index("ix_predictions_summary", predictions.c.variant, predictions.c.created_at, predictions.c.latency_ms)
# The order of the value tuples a spool hands to `Store.insert_spooled`.
PREDICTION_COLUMNS = [c.name for c in predictions.columns]

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
    sa.Column("user_id", sa.String(128)),  # who rated: the prediction's own user
    sa.Column("feedback_text", sa.Text),  # free text (migration 0002): kept, never part of a decision
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

# Indexes of the jobs' queries (revision 0003): windows by time, arms by
# variant and version, people by user.
sa.Index("ix_predictions_arm", predictions.c.variant, predictions.c.model_version, predictions.c.created_at)
sa.Index("ix_predictions_user_id", predictions.c.user_id)
sa.Index("ix_feedback_arm", feedback.c.variant, feedback.c.model_version, feedback.c.kind, feedback.c.created_at)
sa.Index("ix_feedback_created_at", feedback.c.created_at)
sa.Index("ix_feedback_user_id", feedback.c.user_id)

FEEDBACK_KIND = {"rating": "rating", "accurate": "quick", "too_high": "quick", "too_low": "quick", "actual_price": "actual_price",
                 "comment": "comment"}


# Database timeouts of a store made from a URL alone: Settings.db_connect_timeout_s and
# Settings.db_statement_timeout_s have the same defaults.
CONNECT_TIMEOUT_S = 3.0
STATEMENT_TIMEOUT_S = 5.0


class NotFound(LookupError):
    """No prediction with that id."""


class Duplicate(ValueError):
    """Feedback of that kind was already recorded for the prediction."""


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _as_datetime(value, default: dt.datetime) -> dt.datetime:
    if value is None:
        return default
    return dt.datetime.fromisoformat(value) if isinstance(value, str) else value


class Store:
    """Reads and writes the prediction store; safe to share between threads.

    `spool_dir` is where spooling servers of this database keep their spool files; reads
    look there for predictions answered but not inserted yet. The default depends on the
    database URL alone (`default_spool_dir`), so every process on the machine that opens
    the same database finds the same folder.
    """

    def __init__(self, url: str, spool_dir: str | Path | None = None, *,
                 connect_timeout: float = CONNECT_TIMEOUT_S, statement_timeout: float = STATEMENT_TIMEOUT_S):
        self.url = url
        self.connect_timeout, self.statement_timeout = connect_timeout, statement_timeout
        # Every wait on the database is bounded: a hung database gives errors, not hung threads.
        kwargs: dict[str, Any] = {"pool_pre_ping": True}
        if url.startswith("sqlite"):
            kwargs["connect_args"] = {"timeout": statement_timeout, "check_same_thread": False}
        else:
            kwargs["pool_timeout"] = connect_timeout  # waiting for a pooled connection
        if url.startswith("postgresql"):
            # Options the URL already has (a search_path, say) are kept: connect_args replace them.
            given = sa.engine.make_url(url).query.get("options", "")
            kwargs["connect_args"] = {"connect_timeout": max(1, math.ceil(connect_timeout)),  # libpq: whole seconds
                                      "options": " ".join(filter(None, [
                                          given if isinstance(given, str) else " ".join(given),
                                          f"-c statement_timeout={round(statement_timeout * 1000)}"]))}
        self.engine = sa.create_engine(url, **kwargs)
        if url.startswith("sqlite"):
            sa.event.listen(self.engine, "connect", functools.partial(_sqlite_pragmas, busy_ms=round(statement_timeout * 1000)))
        self.spool_dir: Path = Path(spool_dir) if spool_dir is not None else default_spool_dir(url)
        self.spool: PredictionSpool | None = None  # this process's own, once started
        self.spool_reader = SpoolReader(self.spool_dir, self.insert_spooled)

    @classmethod
    def from_settings(cls, settings: "Settings") -> "Store":
        """The store at `settings.db_url`, with the settings' spool folder and database timeouts."""
        return cls(settings.db_url, spool_dir=settings.spool_dir or None,
                   connect_timeout=settings.db_connect_timeout_s, statement_timeout=settings.db_statement_timeout_s)

    def close(self) -> None:
        """Insert what is spooled, stop spooling and release the database connections."""
        self.stop_spool()
        self.engine.dispose()

    # ---- the spool ---------------------------------------------------------
    def start_spool(self, *, fsync: bool = False, linger: float = 0.2, max_rows: int = 200_000,
                    max_bytes: int = 256 << 20, on_backlog: Callable[[int, int], None] | None = None) -> PredictionSpool:
        """From now on `record_prediction` appends to a spool file in `spool_dir` and returns; a
        background thread inserts the rows in batches. Spool files that a dead process left
        behind are replayed into the database first. Beyond `max_rows` or `max_bytes` waiting
        for the database, `record_prediction` raises `SpoolFull` (see abfleet.spool)."""
        if self.spool is None:
            self.spool = PredictionSpool(self.spool_dir, self.insert_spooled, PREDICTION_COLUMNS,
                                         fsync=fsync, linger=linger, max_rows=max_rows, max_bytes=max_bytes,
                                         on_backlog=on_backlog)
        return self.spool

    def stop_spool(self) -> None:
        """Insert what is spooled and stop spooling (later writes go straight to the database)."""
        spool, self.spool = self.spool, None
        if spool is not None:
            spool.close()

    def settle(self) -> None:
        """Insert every spooled prediction this process can see (its own, other live servers',
        and any a dead process left) so that queries over the table count them all."""
        self.spool_reader.settle(self.spool)

    def insert_spooled(self, lines: list[str], values: list[tuple] | None = None) -> None:
        """Insert spooled predictions (JSON lines as abfleet.spool writes them) idempotently:
        a row whose id is stored already is left as it is. `values` are the same rows as tuples
        in `PREDICTION_COLUMNS` order (created_at as ISO text), when the caller has them."""
        if not lines:
            return
        dialect = self.engine.dialect.name
        if dialect == "sqlite":
            if values is None:
                values = [tuple(row.get(c) for c in PREDICTION_COLUMNS) for row in map(json.loads, lines)]
            with self.engine.begin() as conn:
                # One multi-row INSERT per chunk: one sqlite3_step (and one GIL release) per
                # chunk rather than per row, so request threads are not handed the GIL 500 times.
                for start in range(0, len(values), _SQLITE_CHUNK):
                    chunk = values[start:start + _SQLITE_CHUNK]
                    conn.exec_driver_sql(_sqlite_insert(len(chunk)), tuple(itertools.chain.from_iterable(chunk)))
        elif dialect == "postgresql":
            # One INSERT for the whole batch: PostgreSQL parses the lines as one JSON document.
            with self.engine.begin() as conn:
                conn.execute(_POSTGRES_INSERT_SPOOLED, {"batch": "[" + ",".join(lines) + "]"})
        else:  # other databases: row dicts through SQLAlchemy
            self.insert_missing_predictions([json.loads(line) for line in lines])

    def insert_missing_predictions(self, rows: list[dict]) -> None:
        """Insert rows whose id is not stored yet (`created_at` may be ISO text; none means now)."""
        if not rows:
            return
        stamp = now()
        rows = [{**r, "created_at": _as_datetime(r.get("created_at"), stamp)} for r in rows]
        with self.engine.begin() as conn:
            have = set(conn.execute(sa.select(predictions.c.id).where(
                predictions.c.id.in_([r["id"] for r in rows]))).scalars())
            fresh = {r["id"]: r for r in rows if r["id"] not in have}
            if fresh:
                conn.execute(predictions.insert(), list(fresh.values()))

    def init_schema(self) -> None:
        """Bring the database's schema to the newest migration (`abfleet.migrations.upgrade`:
        idempotent, one migrator at a time). Commands and tests call it; servers never do."""
        from abfleet import migrations

        migrations.upgrade(self.url)

    def ping(self) -> bool:
        try:
            with self.engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
            return True
        except sa.exc.SQLAlchemyError:
            return False

    # ---- predictions -------------------------------------------------------
    def record_prediction(self, row: dict) -> None:
        """Record one answered prediction: durably spooled when spooling, else inserted.

        Raises when the row could not be made durable: the caller must not give the answer.
        """
        spool = self.spool
        if spool is not None:
            spool.append(row)
        else:
            self.record_predictions([row])

    def record_predictions(self, rows: list[dict]) -> None:
        if not rows:
            return
        with self.engine.begin() as conn:
            conn.execute(predictions.insert(), [{"created_at": now(), **r} for r in rows])

    def get_prediction(self, prediction_id: str) -> dict | None:
        row = self._select_prediction(prediction_id)
        if row is None:
            # Not inserted when we looked: it may still be in a spool file. Look there, then
            # look in the table again whatever the spools said. A spooled line is removed only
            # after the INSERT holding it committed, so a row that left the spools between our
            # first SELECT and our read of the files is visible to the second SELECT.
            self.spool_reader.insert_if_spooled(prediction_id, self.spool)
            row = self._select_prediction(prediction_id)
        return row

    def _select_prediction(self, prediction_id: str) -> dict | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(predictions).where(predictions.c.id == prediction_id)).mappings().first()
        return dict(row) if row else None

    def count_predictions(self, **where) -> int:
        self.settle()
        query = sa.select(sa.func.count()).select_from(predictions)
        for column, value in where.items():
            query = query.where(predictions.c[column] == value)
        with self.engine.connect() as conn:
            return int(conn.execute(query).scalar_one())

    def predictions_since(self, since: dt.datetime) -> list[dict]:
        """Every prediction since then, as dicts: for tests and small stores only. The jobs
        read counts and bounded samples instead (abfleet.aggregates, abfleet.sampling)."""
        self.settle()
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(predictions).where(predictions.c.created_at >= since)).mappings().all()
        return [dict(r) for r in rows]

    # ---- feedback ----------------------------------------------------------
    def record_feedback(
        self, prediction_id: str, feedback_type: str, value: float | None, received_by: str | None = None, *,
        user_id: str | None = None, bounds: PriceBounds | None = None, prediction: dict | None = None,
        received_at: dt.datetime | None = None,
        text: str | None = None,
    ) -> dict:
        """Store one piece of feedback from `user_id` against the prediction's own variant and
        version; an actual price gets its APE, bounded by `bounds` (default: api.PriceBounds()).
        `prediction` is the prediction's row when the caller has read it already; `received_at`
        the time the feedback came in when that was earlier than now (it waited in the feedback spool).

        Everything is computed before the row is written. Raises NotFound for an unknown
        prediction id, api.Refused for an actual price out of bounds, and Duplicate when feedback
        of the same kind (star rating, quick verdict, actual price) was already recorded for it.
        """
        kind = FEEDBACK_KIND[feedback_type]
        pred = prediction if prediction is not None else self.get_prediction(prediction_id)
        if pred is None:
            raise NotFound(prediction_id)
        ape = None
        if feedback_type == "actual_price":
            ape = (bounds or PriceBounds()).ape(value, pred["estimated_price"])
        row = {
            "prediction_id": prediction_id,
            "created_at": received_at or now(),
            "kind": kind,
            "feedback_type": feedback_type,
            "feedback_value": value,
            "ape": ape,
            "variant": pred["variant"],
            "model_version": pred["model_version"],
            "received_by": received_by,
            "user_id": user_id,
            "feedback_text": text,
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
        self.settle()
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


def _sqlite_pragmas(dbapi_conn, _record, *, busy_ms: int) -> None:
    # WAL lets readers and several gunicorn workers write without "database is locked"; a lock
    # held longer than the statement timeout is an error rather than a thread stuck waiting.
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute(f"PRAGMA busy_timeout={int(busy_ms)}")
    cur.close()


# ---- bulk inserts of spooled rows ---------------------------------------------------

# SQLite keeps SQLAlchemy's DateTime as 'YYYY-MM-DD HH:MM:SS.ffffff' (UTC here); spooled
# times are ISO text in UTC with microseconds: its first 26 characters, T made a space.
_SQLITE_ROW = "(" + ", ".join("replace(substr(?, 1, 26), 'T', ' ')" if c == "created_at" else "?" for c in PREDICTION_COLUMNS) + ")"
_SQLITE_CHUNK = 500  # rows per statement: 500 * 11 parameters, well under SQLite's 32766


@functools.lru_cache(maxsize=16)
def _sqlite_insert(rows: int) -> str:
    return f"INSERT OR IGNORE INTO predictions ({', '.join(PREDICTION_COLUMNS)}) VALUES " + ", ".join([_SQLITE_ROW] * rows)


_POSTGRES_INSERT_SPOOLED = sa.text(
    f"INSERT INTO predictions ({', '.join(PREDICTION_COLUMNS)}) SELECT {', '.join(PREDICTION_COLUMNS)} "
    "FROM json_populate_recordset(CAST(NULL AS predictions), CAST(:batch AS json)) ON CONFLICT (id) DO NOTHING"
)


@contextlib.contextmanager
def open_store(settings: "Settings", *, create_schema: bool = True) -> Iterator[Store]:
    """The fleet's prediction store for the length of a `with` block, closed afterwards, as a
    command or a job opens it (statements may take `settings.job_statement_timeout_s`); with
    `create_schema`, its migrations run first (a command's own tables; never a server's)."""
    store = Store(settings.db_url, spool_dir=settings.spool_dir or None, connect_timeout=settings.db_connect_timeout_s,
                  statement_timeout=settings.job_statement_timeout_s)
    try:
        if create_schema:
            store.init_schema()
        yield store
    finally:
        store.close()
