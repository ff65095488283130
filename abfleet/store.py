"""The prediction store: every answered prediction and every accepted piece of feedback.

SQLAlchemy over a SQLite file by default, PostgreSQL when DATABASE_URL says so.
Feedback is recorded against the variant and model version that made the prediction,
whichever server receives it.

A model server writes predictions through a `PredictionSpool` (`Store.start_spool`): the
row is appended to a local file before the answer leaves, and a background thread moves
spooled rows into the database in batches. Reads make answered-but-not-yet-inserted
predictions visible first (see `Store.get_prediction` and `Store.settle`), so an answered
prediction is never missing from what the store says, and never lost when a process dies.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime as dt
import errno
import fcntl
import functools
import hashlib
import itertools
import json
import logging
import mmap
import operator
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

if TYPE_CHECKING:
    from abfleet.settings import Settings

log = logging.getLogger(__name__)

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

    def __init__(self, url: str, spool_dir: str | Path | None = None):
        self.url = url
        kwargs: dict[str, Any] = {"pool_pre_ping": True}
        if url.startswith("sqlite"):
            kwargs["connect_args"] = {"timeout": 30, "check_same_thread": False}
        self.engine = sa.create_engine(url, **kwargs)
        if url.startswith("sqlite"):
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
        self.spool_dir: Path = Path(spool_dir) if spool_dir is not None else default_spool_dir(url)
        self.spool: PredictionSpool | None = None

    def close(self) -> None:
        """Insert what is spooled, stop spooling and release the database connections."""
        self.stop_spool()
        self.engine.dispose()

    # ---- the spool ---------------------------------------------------------
    def start_spool(self, *, fsync: bool = False, linger: float = 0.2) -> "PredictionSpool":
        """From now on `record_prediction` appends to a spool file in `spool_dir` and returns; a
        background thread inserts the rows in batches. Spool files that a dead process left
        behind are replayed into the database first."""
        if self.spool is None:
            self.spool = PredictionSpool(self, self.spool_dir, fsync=fsync, linger=linger)
        return self.spool

    def stop_spool(self) -> None:
        """Insert what is spooled and stop spooling (later writes go straight to the database)."""
        spool, self.spool = self.spool, None
        if spool is not None:
            spool.close()

    def settle(self) -> None:
        """Insert every spooled prediction this process can see (its own, other live servers',
        and any a dead process left) so that queries over the table count them all."""
        if self.spool is not None:
            self.spool.flush()
        _sweep(self, self.spool_dir, import_live=True)

    def _find_spooled(self, prediction_id: str) -> bool:
        """Insert the prediction if it is answered but still spooled; True when it was."""
        if self.spool is not None and self.spool.holds(prediction_id):
            self.spool.flush()
            return True
        prefix = _line_prefix(prediction_id)
        for path in _spool_paths(self.spool_dir):
            data = _read_bytes(path)
            if prefix.encode() in data:
                found = [line for line in _valid_lines(data, path) if line.startswith(prefix)]
                if found:
                    self.insert_spooled(found[:1])
                    return True
        return False

    def insert_spooled(self, lines: list[str], values: list[tuple] | None = None) -> None:
        """Insert spooled predictions (JSON lines as `PredictionSpool` writes them) whose id is
        not stored yet: a replayed row may be there already. `values` are the same rows as
        tuples in column order (created_at as ISO text), when the caller has them at hand.
        SQLite gets multi-row INSERTs of the tuples (500 rows a statement), PostgreSQL one
        INSERT parsing the lines as one JSON document; other databases rows through SQLAlchemy."""
        if not lines:
            return
        dialect = self.engine.dialect.name
        if dialect == "sqlite":
            if values is None:
                values = [tuple(row.get(c) for c in _COLUMNS) for row in map(json.loads, lines)]
            with self.engine.begin() as conn:
                # One multi-row INSERT per chunk: one sqlite3_step (and one GIL release) per
                # chunk rather than per row, so request threads are not handed the GIL 500 times.
                for start in range(0, len(values), _SQLITE_CHUNK):
                    chunk = values[start:start + _SQLITE_CHUNK]
                    conn.exec_driver_sql(_sqlite_insert(len(chunk)), tuple(itertools.chain.from_iterable(chunk)))
        elif dialect == "postgresql":
            with self.engine.begin() as conn:
                conn.execute(_POSTGRES_INSERT_SPOOLED, {"batch": "[" + ",".join(lines) + "]"})
        else:
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
            self._find_spooled(prediction_id)
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
        self.settle()
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


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    # WAL lets readers and several gunicorn workers write without "database is locked".
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


# ---- the spool -------------------------------------------------------------------

SPOOL_SUFFIX = ".jsonl"
_COLUMNS = [c.name for c in predictions.columns]
_column_values = operator.itemgetter(*_COLUMNS)

# SQLite keeps SQLAlchemy's DateTime as 'YYYY-MM-DD HH:MM:SS.ffffff' (UTC here); spooled
# times are ISO text in UTC with microseconds: its first 26 characters, T made a space.
_SQLITE_ROW = "(" + ", ".join("replace(substr(?, 1, 26), 'T', ' ')" if c == "created_at" else "?" for c in _COLUMNS) + ")"
_SQLITE_CHUNK = 500  # rows per statement: 500 * 11 parameters, well under SQLite's 32766


@functools.lru_cache(maxsize=16)
def _sqlite_insert(rows: int) -> str:
    return f"INSERT OR IGNORE INTO predictions ({', '.join(_COLUMNS)}) VALUES " + ", ".join([_SQLITE_ROW] * rows)


_POSTGRES_INSERT_SPOOLED = sa.text(
    f"INSERT INTO predictions ({', '.join(_COLUMNS)}) SELECT {', '.join(_COLUMNS)} "
    "FROM json_populate_recordset(CAST(NULL AS predictions), CAST(:batch AS json)) ON CONFLICT (id) DO NOTHING"
)


@contextlib.contextmanager
def open_store(settings: "Settings", *, create_schema: bool = True) -> Iterator[Store]:
    """The fleet's prediction store for the length of a `with` block, closed afterwards."""
    store = Store(settings.db_url, spool_dir=settings.spool_dir or None)
    try:
        if create_schema:
            store.init_schema()
        yield store
    finally:
        store.close()


def default_spool_dir(url: str) -> Path:
    """Where the servers of a database spool, from its URL alone: `<file>-spool` beside a
    SQLite file; for any other database, a folder named by a hash of the URL under the
    installation's default run directory (what `Settings()` uses without ABFLEET_RUN_DIR)."""
    try:
        parsed = sa.engine.make_url(url)
        database = parsed.database or ""
        if parsed.get_backend_name() == "sqlite" and database not in ("", ":memory:") and not database.startswith("file:"):
            path = Path(database).resolve()
            return path.with_name(path.name + "-spool")
    except sa.exc.ArgumentError:
        pass
    from abfleet.settings import _default_run_dir

    return _default_run_dir() / "spool" / hashlib.sha256(url.encode()).hexdigest()[:16]


def _line_prefix(prediction_id: str) -> str:
    # Spool lines start with the id (see PredictionSpool.append): a lookup needs no JSON parse.
    return '{"id": ' + json.dumps(prediction_id) + ","


def _spool_paths(directory: Path | None) -> list[Path]:
    if directory is None:
        return []
    try:
        return sorted(p for p in directory.iterdir() if p.name.endswith(SPOOL_SUFFIX))
    except FileNotFoundError:
        return []


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:  # inserted and removed meanwhile
        return b""


def _lines(data: bytes) -> list[str]:
    """The lines of a spool file (its unused tail, and any zeroed stretch, are NUL bytes)."""
    data = data.rstrip(b"\0")
    chunks = [c for c in data.split(b"\0") if c] if b"\0" in data else [data]
    return [line for c in chunks for line in c.decode("utf-8", errors="replace").splitlines()]


def _valid_lines(data: bytes, path: Path) -> list[str]:
    """The complete rows of a spool file; a torn line (its writer died mid-copy, before it
    could answer) is skipped."""
    out = []
    for line in _lines(data):
        try:
            row = json.loads(line)
            dt.datetime.fromisoformat(row["created_at"])
            out.append(line)
        except (ValueError, KeyError, TypeError):
            if line.strip():
                log.warning("skipping an unreadable line in spool file %s", path.name)
    return out


def _claim(path: Path) -> int | None:
    """An open, exclusively locked descriptor of a spool file whose writer is gone, else None.

    A live writer holds an flock on its file for as long as it runs; the kernel drops it
    when the process dies, however it dies.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return None
        raise
    if os.fstat(fd).st_nlink == 0:  # replayed and removed by someone else meanwhile
        os.close(fd)
        return None
    return fd


def _replay(store: "Store", path: Path, fd: int) -> int:
    """Insert a dead writer's spool file (claimed as fd) and remove it; return its row count."""
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    lines = _valid_lines(b"".join(chunks), path)
    store.insert_spooled(lines)
    os.unlink(path)
    if lines:
        log.info("replayed %d spooled predictions from %s", len(lines), path.name)
    return len(lines)


def _sweep(store: "Store", directory: Path | None, *, import_live: bool) -> int:
    """Replay (and remove) the spool files of dead writers; with import_live, also insert
    the rows of live writers' files (they stay theirs). Returns the rows replayed."""
    own = store.spool.paths() if store.spool is not None else set()
    replayed = 0
    for path in _spool_paths(directory):
        if path in own:
            continue
        fd = _claim(path)
        if fd is None:
            if import_live:
                store.insert_spooled(_valid_lines(_read_bytes(path), path))
            continue
        try:
            replayed += _replay(store, path, fd)
        finally:
            os.close(fd)
    return replayed


class _Segment:
    """One spool file: created locked (flock), given its full size up front, and mapped.

    A line is appended by copying it into the shared mapping: no system call (so no
    release of the GIL, no thread hand-off), yet the bytes are in the kernel's page cache
    from that moment and outlive the process however it dies. The space is allocated when
    the file is made (a full disk fails then, not later); unused space reads as NUL bytes.
    """

    def __init__(self, directory: Path, name: str, capacity: int):
        tmp = directory / f".{name}.tmp"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.posix_fallocate(fd, 0, capacity)
            self.map = mmap.mmap(fd, capacity)
            # Only named *.jsonl once locked: nobody can take it for an orphan in between.
            self.path = directory / f"{name}{SPOOL_SUFFIX}"
            os.rename(tmp, self.path)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        self.fd = fd
        self.capacity = capacity
        self.size = 0

    def fits(self, n: int) -> bool:
        return self.size + n <= self.capacity

    def write(self, data: bytes, sync: bool) -> None:
        start, end = self.size, self.size + len(data)
        self.map[start:end] = data
        if sync:
            aligned = start - start % mmap.PAGESIZE
            self.map.flush(aligned, end - aligned)
        self.size = end

    def truncate(self) -> None:
        """Forget every line (all of them are in the database)."""
        self.map[:self.size] = bytes(self.size)
        self.size = 0

    def release(self) -> None:
        self.map.close()
        os.close(self.fd)

    def discard(self) -> None:
        """Remove the file (every row in it is in the database) and release it."""
        try:
            self.path.unlink(missing_ok=True)
        finally:
            self.release()


class PredictionSpool:
    """Answered predictions on their way to the database.

    `append` copies the row as one JSON line into this process's memory-mapped spool file
    (plus an msync when `fsync`) before the caller answers. A background thread wakes on the
    first row after a quiet spell, lets `linger` seconds of rows gather, and inserts what is
    pending in one statement per batch (idempotently: a replayed row may be in already),
    then empties the file when nothing new came in meanwhile. A full file (`capacity` bytes)
    is replaced by a new one, and removed once its rows are inserted. The file is flock-ed
    while this process lives; a file nobody holds was left by a dead process and is replayed
    at start, every `rescan_interval` seconds, and by readers (`Store.settle`).

    Durability: a row is in the database or in a spool file from the moment `append` returns.
    Without fsync that survives the process being killed (the kernel holds the page); with
    fsync it also survives the machine losing power.
    """

    def __init__(self, store: Store, directory: Path, *, fsync: bool = False, linger: float = 0.2,
                 capacity: int = 256 << 10, rescan_interval: float = 60.0, max_retry_delay: float = 5.0):
        self.store = store
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.fsync = fsync
        self.linger = linger
        self.capacity = capacity
        self.rescan_interval = rescan_interval
        self.max_retry_delay = max_retry_delay
        self._lock = threading.Lock()  # pending rows and segments
        self._wake = threading.Condition(self._lock)
        self._flushing = threading.Lock()  # one flush at a time
        self._pending: list[tuple[str, str, tuple]] = []  # (id, spooled line, column values) not inserted yet
        self._pending_ids: set[str] = set()
        self._retired: list[_Segment] = []
        self._serial = 0
        self._name = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._current = self._new_segment()
        self._closed = False
        self._stopping = threading.Event()
        self._idle = False  # the flusher waits for a first row: wake it
        self.last_error: str | None = None
        self.replayed = self.replay_orphans()
        self._thread = threading.Thread(target=self._run, name="prediction-spool", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    def _new_segment(self) -> _Segment:
        self._serial += 1
        return _Segment(self.directory, f"{self._name}-{self._serial:06d}", self.capacity)

    def paths(self) -> set[Path]:
        with self._lock:
            return {self._current.path, *(s.path for s in self._retired)}

    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def holds(self, prediction_id: str) -> bool:
        with self._lock:
            return prediction_id in self._pending_ids

    # ---- writing ---------------------------------------------------------------
    def append(self, row: dict) -> None:
        """Make one prediction durable; raises when it could not be (then do not answer)."""
        created = row.get("created_at") or now()
        if created.tzinfo is not None:
            created = created.astimezone(dt.timezone.utc)
        # The id first: readers find a line by its start without parsing (see _line_prefix).
        record = {"id": row["id"], **row, "created_at": created.isoformat(timespec="microseconds")}
        line = json.dumps(record)  # the default encoder: no encoder built per call
        data = line.encode() + b"\n"
        try:
            values = _column_values(record)
        except KeyError:
            values = tuple(record.get(c) for c in _COLUMNS)
        with self._lock:
            if self._closed:
                raise RuntimeError("the prediction spool is closed")
            if not self._current.fits(len(data)):
                if len(data) > self.capacity:
                    raise ValueError(f"a prediction of {len(data)} bytes does not fit a spool file")
                self._retired.append(self._current)  # removed once its rows are inserted
                self._current = self._new_segment()
            self._current.write(data, self.fsync)
            self._pending.append((row["id"], line, values))
            self._pending_ids.add(row["id"])
            if self._idle:  # only the first row after a quiet spell costs a wake-up
                self._idle = False
                self._wake.notify()

    # ---- moving rows to the database -------------------------------------------
    def flush(self) -> int:
        """Insert everything appended so far; return how many rows. Raises on a database error
        (the rows stay spooled and pending)."""
        with self._flushing:
            with self._lock:
                batch, self._pending = self._pending, []
                retired = list(self._retired)
                current, size = self._current, self._current.size
            try:
                self.store.insert_spooled([line for _id, line, _v in batch], [v for _id, _line, v in batch])
            except BaseException:
                with self._lock:
                    self._pending[:0] = batch
                raise
            with self._lock:
                self._pending_ids.difference_update(pid for pid, _line, _v in batch)
                if current is self._current and current.size == size and size:
                    current.truncate()  # nothing came in meanwhile: every line in it is inserted
                for segment in retired:
                    self._retired.remove(segment)
                    segment.discard()
            return len(batch)

    def replay_orphans(self) -> int:
        """Insert and remove the spool files of dead processes; return how many rows."""
        count = 0
        try:
            count = _sweep(self.store, self.directory, import_live=False)
        except Exception as exc:  # the database is down: they stay, and are retried later
            log.warning("spool replay failed: %s", exc)
        for tmp in self.directory.glob(".*.tmp"):  # a writer died between create and rename: empty
            try:
                if time.time() - tmp.stat().st_mtime > 60:
                    tmp.unlink()
            except FileNotFoundError:
                pass
        return count

    def _run(self) -> None:
        delay = 0.0
        next_scan = time.monotonic() + self.rescan_interval
        while True:
            with self._lock:
                while not self._pending and not self._closed and time.monotonic() < next_scan:
                    self._idle = True
                    self._wake.wait(timeout=max(0.01, next_scan - time.monotonic()))
                self._idle = False
                if self._closed:
                    return
            if self._pending:
                if self._stopping.wait(delay or self.linger):  # let a batch gather (or back off)
                    return  # closing: close() inserts what is pending
                try:
                    self.flush()
                    delay, self.last_error = 0.0, None
                except Exception as exc:
                    self.last_error = f"{type(exc).__name__}: {exc}"
                    delay = min(self.max_retry_delay, max(0.05, delay * 2))
                    log.warning("spooled predictions not inserted yet (retrying in %.2fs): %s", delay, self.last_error)
            if time.monotonic() >= next_scan:
                self.replay_orphans()
                next_scan = time.monotonic() + self.rescan_interval

    def close(self) -> None:
        """Insert what is pending, stop the thread, and remove this process's files when empty."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._stopping.set()
            self._wake.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        try:
            self.flush()
        except Exception as exc:  # left in the file: the next start replays it
            log.warning("spool not emptied at exit (it will be replayed): %s", exc)
        with self._lock:
            for segment in [*self._retired, self._current]:
                if segment.size == 0 and not self._pending:
                    segment.discard()
                else:
                    segment.release()
            self._retired = []
