"""The prediction spool: answered predictions on their way to the database.

A server appends each answered prediction as a JSON line to its own memory-mapped spool file
before answering (`PredictionSpool.append`); a thread inserts the lines in batches through the
`insert(lines, values)` callable the store hands it. Readers see answered-but-not-inserted
predictions through a `SpoolReader` over the same folder: none is missing, none is lost.

Promises every part keeps:
- a line leaves a spool file only after the INSERT holding it committed;
- a live writer holds an flock on its files; a file nobody holds was left by a dead writer
  and may be replayed (inserted, then removed) by anyone;
- a line starts with the prediction's id (`{"id": "<id>", ...`), so a lookup needs no parse.

It knows nothing of the tables: the store gives it the insert callable and the column order.
"""

from __future__ import annotations

import atexit
import datetime as dt
import errno
import fcntl
import hashlib
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
from typing import Callable, Collection, Sequence

import sqlalchemy as sa

from abfleet.settings import default_run_dir

log = logging.getLogger(__name__)

SPOOL_SUFFIX = ".jsonl"

# Inserts spooled lines idempotently (a replayed row may be stored already); `values` are the
# same rows as tuples in the column order given to `PredictionSpool`, or None.
Insert = Callable[[list[str], list[tuple] | None], None]


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
    return default_run_dir() / "spool" / hashlib.sha256(url.encode()).hexdigest()[:16]


# ---- the line format and the files ----------------------------------------------

def _line_prefix(prediction_id: str) -> str:
    # Spool lines start with the id (see PredictionSpool.append): a lookup needs no JSON parse.
    return '{"id": ' + json.dumps(prediction_id) + ","


def spool_files(directory: Path | None) -> list[Path]:
    """The spool files in a folder, live writers' and dead ones', sorted by name."""
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


def _replay(insert: Insert, path: Path, fd: int) -> int:
    """Insert a dead writer's spool file (claimed as fd) and remove it; return its row count."""
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    lines = _valid_lines(b"".join(chunks), path)
    insert(lines, None)
    os.unlink(path)  # only now: the INSERT above committed
    if lines:
        log.info("replayed %d spooled predictions from %s", len(lines), path.name)
    return len(lines)


# ---- reading the spools of a folder ----------------------------------------------

class SpoolReader:
    """The spool files of one folder, seen by any process that reads the database.

    It finds a prediction that was answered but not inserted yet, inserts the rows of live
    writers' files (they stay theirs), and replays dead writers' files (inserted, then
    removed). Everything it inserts goes through `insert`, idempotently.
    """

    def __init__(self, directory: Path, insert: Insert):
        self.directory = Path(directory)
        self.insert = insert

    def find_line(self, prediction_id: str) -> str | None:
        """The spooled line of that prediction in any spool file of the folder, else None."""
        prefix = _line_prefix(prediction_id)
        needle = prefix.encode()
        for path in spool_files(self.directory):
            data = _read_bytes(path)
            if needle in data:
                found = [line for line in _valid_lines(data, path) if line.startswith(prefix)]
                if found:
                    return found[0]
        return None

    def insert_if_spooled(self, prediction_id: str, writer: PredictionSpool | None = None) -> bool:
        """Insert the prediction if it is answered but still spooled (by `writer`, this
        process's own spool, or in any file of the folder); True when it was."""
        if writer is not None and writer.holds(prediction_id):
            writer.flush()
            return True
        line = self.find_line(prediction_id)
        if line is None:
            return False
        self.insert([line], None)
        return True

    def sweep(self, *, import_live: bool, skip: Collection[Path] = ()) -> int:
        """Replay (and remove) the spool files of dead writers; with import_live, also insert
        the rows of live writers' files (they stay theirs). Files in `skip` are left alone.
        Returns the rows replayed."""
        replayed = 0
        for path in spool_files(self.directory):
            if path in skip:
                continue
            fd = _claim(path)
            if fd is None:
                if import_live:
                    self.insert(_valid_lines(_read_bytes(path), path), None)
                continue
            try:
                replayed += _replay(self.insert, path, fd)
            finally:
                os.close(fd)
        return replayed

    def settle(self, writer: PredictionSpool | None = None) -> None:
        """Insert every spooled prediction of the folder: `writer`'s (this process's own
        spool), other live writers', and any a dead process left."""
        if writer is not None:
            writer.flush()
        self.sweep(import_live=True, skip=writer.paths() if writer is not None else ())


# ---- writing: one process's spool -----------------------------------------------

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

    `append` copies the row as one JSON line into this process's mapped spool file (plus an
    msync when `fsync`) before the caller answers. A thread wakes on the first row after a
    quiet spell, lets `linger` seconds of rows gather, hands the batch to `insert` (lines, and
    values in `columns` order), then empties the file if nothing new came in. A full file
    (`capacity` bytes) is replaced, and removed once its rows are inserted. The file is
    flock-ed while this process lives; one nobody holds was left by a dead process and is
    replayed at start, every `rescan_interval` seconds, and by `SpoolReader.settle`.

    Durability: a row is in the database or in a spool file from the moment `append` returns.
    Without fsync that survives the process being killed (the kernel holds the page); with
    fsync it also survives the machine losing power.
    """

    def __init__(self, directory: Path, insert: Insert, columns: Sequence[str], *, fsync: bool = False,
                 linger: float = 0.2, capacity: int = 256 << 10, rescan_interval: float = 60.0,
                 max_retry_delay: float = 5.0):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.insert = insert
        self.columns = list(columns)
        self._column_values = operator.itemgetter(*self.columns)
        self.fsync = fsync
        self.linger = linger
        self.capacity = capacity
        self.rescan_interval = rescan_interval
        self.max_retry_delay = max_retry_delay
        self._reader = SpoolReader(self.directory, insert)
        self._lock = threading.Lock()  # pending rows and segments
        self._wake = threading.Condition(self._lock)
        self._flushing = threading.Lock()  # one flush at a time
        self._pending: list[tuple[str, str, tuple]] = []  # (id, spooled line, column values) not inserted yet
        self._pending_ids: set[str] = set()
        self._inserting = 0  # rows of the batch being inserted: taken from _pending, not stored yet
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
        """How many appended rows are not inserted yet (the batch being inserted counts)."""
        with self._lock:
            return len(self._pending) + self._inserting

    def holds(self, prediction_id: str) -> bool:
        with self._lock:
            return prediction_id in self._pending_ids

    def append(self, row: dict) -> None:
        """Make one prediction durable; raises when it could not be (then do not answer)."""
        created = row.get("created_at") or dt.datetime.now(dt.timezone.utc)
        if created.tzinfo is not None:
            created = created.astimezone(dt.timezone.utc)
        # The id first: readers find a line by its start without parsing (see _line_prefix).
        record = {"id": row["id"], **row, "created_at": created.isoformat(timespec="microseconds")}
        line = json.dumps(record)  # the default encoder: no encoder built per call
        data = line.encode() + b"\n"
        try:
            values = self._column_values(record)
        except KeyError:
            values = tuple(record.get(c) for c in self.columns)
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

    def flush(self) -> int:
        """Insert everything appended so far; return how many rows. Raises on a database error
        (the rows stay spooled and pending)."""
        with self._flushing:
            with self._lock:
                batch, self._pending = self._pending, []
                self._inserting = len(batch)
                retired = list(self._retired)
                current, size = self._current, self._current.size
            try:
                self.insert([line for _id, line, _v in batch], [v for _id, _line, v in batch])
            except BaseException:
                with self._lock:
                    self._pending[:0] = batch
                    self._inserting = 0
                raise
            # The INSERT committed: only now may its lines leave the files.
            with self._lock:
                self._inserting = 0
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
            count = self._reader.sweep(import_live=False, skip=self.paths())
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
