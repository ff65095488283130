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
import hashlib
import json
import logging
import math
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
from abfleet.spool_segment import (CHUNK_ROWS, DISK_FULL, MAX_SEGMENT_BYTES, SPOOL_SUFFIX, Insert, Segment, SpoolFull,
                                   claim, insert_in_chunks, line_prefix, read_bytes, replay, spool_files, valid_lines)

__all__ = ["CHUNK_ROWS", "SPOOL_SUFFIX", "Insert", "PredictionSpool", "SpoolFull", "SpoolReader", "default_spool_dir",
           "spool_files"]

log = logging.getLogger(__name__)


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
        prefix = line_prefix(prediction_id)
        needle = prefix.encode()
        for path in spool_files(self.directory):
            data = read_bytes(path)
            if needle in data:
                found = [line for line in valid_lines(data, path) if line.startswith(prefix)]
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
            fd = claim(path)
            if fd is None:
                if import_live:
                    insert_in_chunks(self.insert, valid_lines(read_bytes(path), path))
                continue
            try:
                replayed += replay(self.insert, path, fd)
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

class PredictionSpool:
    """Answered predictions on their way to the database.

    `append` copies the row as one JSON line into this process's mapped spool file (plus an
    msync when `fsync`) before the caller answers. A thread wakes on the first row after a
    quiet spell, lets `linger` seconds of rows gather, hands them to `insert` (lines, and
    values in `columns` order) in chunks of at most `chunk_rows`, each its own transaction,
    and empties the file once every line in it is inserted. A full file (`capacity` bytes) is
    replaced, and removed once its rows are inserted; the replacement is made before the full
    one is retired, so a failure to make it leaves the spool as it was. The file is flock-ed
    while this process lives; one nobody holds was left by a dead process and is replayed at
    start, every `rescan_interval` seconds, and by `SpoolReader.settle`.

    Bounded: beyond `max_rows` rows or `max_bytes` bytes waiting for the database, or when
    the disk is full, `append` raises `SpoolFull` (the caller answers 503 and Retry-After);
    the next append tries again. Memory holds the ids of waiting rows and where they start
    in the files, not the rows: their bytes are in the mapped files already.
    `on_backlog(rows, bytes)` is called after every flush, whether it inserted or failed.

    Durability: a row is in the database or in a spool file from the moment `append` returns.
    Without fsync that survives the process being killed (the kernel holds the page); with
    fsync it also survives the machine losing power.
    """

    def __init__(self, directory: Path, insert: Insert, columns: Sequence[str], *, fsync: bool = False,
                 linger: float = 0.2, capacity: int = 256 << 10, rescan_interval: float = 60.0,
                 max_retry_delay: float = 5.0, max_rows: int = 200_000, max_bytes: int = 256 << 20,
                 chunk_rows: int = CHUNK_ROWS, on_backlog: Callable[[int, int], None] | None = None):
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
        self.retry_after = max(1, math.ceil(max_retry_delay))  # what a refused client is told to wait
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self.chunk_rows = chunk_rows
        self.on_backlog = on_backlog
        self._reader = SpoolReader(self.directory, insert)
        self._lock = threading.Lock()  # the backlog and the segments
        self._wake = threading.Condition(self._lock)
        self._flushing = threading.Lock()  # one flush at a time
        self._pending_ids: set[str] = set()  # appended, not inserted yet
        self._rows = 0  # the backlog: rows and line bytes appended, not inserted yet
        self._bytes = 0
        self._retired: list[Segment] = []  # full, replaced; removed once every line is inserted
        self._serial = 0
        self._name = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._current = self._new_segment(capacity)
        self._closed = False
        self._stopping = threading.Event()
        self._idle = False  # the flusher waits for a first row: wake it
        self.last_error: str | None = None
        self.replayed = self.replay_orphans()
        self._thread = threading.Thread(target=self._run, name="prediction-spool", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    def _new_segment(self, capacity: int) -> Segment:
        self._serial += 1
        return Segment(self.directory, f"{self._name}-{self._serial:06d}", capacity)

    def paths(self) -> set[Path]:
        with self._lock:
            return {self._current.path, *(s.path for s in self._retired)}

    def pending(self) -> int:
        """How many appended rows are not inserted yet (a chunk being inserted counts)."""
        with self._lock:
            return self._rows

    def backlog(self) -> tuple[int, int]:
        """(rows, bytes) appended and not inserted yet."""
        with self._lock:
            return self._rows, self._bytes

    def holds(self, prediction_id: str) -> bool:
        with self._lock:
            return prediction_id in self._pending_ids

    def append(self, row: dict) -> None:
        """Make one prediction durable; raises when it could not be (then do not answer):
        `SpoolFull` when the backlog is at its bounds or the disk is full."""
        created = row.get("created_at") or dt.datetime.now(dt.timezone.utc)
        if created.tzinfo is not None:
            created = created.astimezone(dt.timezone.utc)
        # The id first: readers find a line by its start without parsing (see line_prefix).
        record = {"id": row["id"], **row, "created_at": created.isoformat(timespec="microseconds")}
        data = json.dumps(record).encode() + b"\n"  # the default encoder: no encoder built per call
        with self._lock:
            if self._closed:
                raise RuntimeError("the prediction spool is closed")
            if self._rows >= self.max_rows:
                raise SpoolFull(f"spool full: {self._rows} predictions wait for the database "
                                f"(at most {self.max_rows})", self.retry_after)
            if self._bytes + len(data) > self.max_bytes:
                raise SpoolFull(f"spool full: {self._bytes} bytes of predictions wait for the database "
                                f"(at most {self.max_bytes})", self.retry_after)
            if not self._current.fits(len(data)):
                self._roll_over(len(data))
            try:
                self._current.write(data, self.fsync)
            except OSError as exc:
                if exc.errno in DISK_FULL:
                    raise SpoolFull(f"disk full: the spool file could not be synced ({exc.strerror})",
                                    self.retry_after) from exc
                raise
            self._pending_ids.add(row["id"])
            self._rows += 1
            self._bytes += len(data)
            if self._idle:  # only the first row after a quiet spell costs a wake-up
                self._idle = False
                self._wake.notify()

    def _roll_over(self, needed: int) -> None:
        """Make a new current segment, then retire the full one (called with the lock held).
        If the new one cannot be made, nothing changes: the next append tries again."""
        if needed > self.capacity:
            raise ValueError(f"a prediction of {needed} bytes does not fit a spool file")
        # While a backlog piles up (the database is away) each new file is twice the last.
        capacity = max(self.capacity, min(self.capacity << min(len(self._retired), 16), MAX_SEGMENT_BYTES))
        try:
            segment = self._new_segment(capacity)
        except OSError as exc:
            if exc.errno in DISK_FULL:
                raise SpoolFull(f"disk full: no room for a new spool file ({exc.strerror})", self.retry_after) from exc
            raise
        self._retired.append(self._current)  # removed once its rows are inserted
        self._current = segment

    def flush(self) -> int:
        """Insert everything appended so far, in chunks; return how many rows. Raises on a
        database error: the chunk that failed and those after it stay spooled."""
        with self._flushing:
            try:
                return self._flush()
            finally:
                if self.on_backlog is not None:
                    self.on_backlog(*self.backlog())

    def _flush(self) -> int:
        with self._lock:
            work = [(s, s.done, s.size) for s in [*self._retired, self._current] if s.backlog]
        count = 0
        for segment, start, end in work:
            # Lines are copied whole before `size` moves: start..end holds complete lines only.
            lines = segment.read(start, end).split(b"\n")[:-1]
            for first in range(0, len(lines), self.chunk_rows):
                chunk = lines[first:first + self.chunk_rows]
                texts = [line.decode() for line in chunk]
                rows = [json.loads(text) for text in texts]
                self.insert(texts, [self._values(row) for row in rows])
                start += sum(map(len, chunk)) + len(chunk)
                with self._lock:  # the chunk committed: only now may its lines leave the file
                    self._committed(segment, start, rows)
                count += len(chunk)
        return count

    def _values(self, row: dict) -> tuple:
        try:
            return self._column_values(row)
        except KeyError:
            return tuple(row.get(c) for c in self.columns)

    def _committed(self, segment: Segment, done: int, rows: list[dict]) -> None:
        """Account for inserted rows, up to byte `done` of `segment` (called with the lock held)."""
        self._bytes -= done - segment.done
        self._rows -= len(rows)
        self._pending_ids.difference_update(row["id"] for row in rows)
        segment.done = done
        if segment.backlog:
            return
        if segment is self._current:
            segment.truncate()  # every line in it is inserted: reuse it
        else:
            self._retired.remove(segment)
            segment.discard()

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
                while not self._rows and not self._closed and time.monotonic() < next_scan:
                    self._idle = True
                    self._wake.wait(timeout=max(0.01, next_scan - time.monotonic()))
                self._idle = False
                if self._closed:
                    return
            if self._rows:
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
        with self._flushing, self._lock:
            for segment in [*self._retired, self._current]:
                if segment.backlog == 0:
                    segment.discard()  # every line in it is inserted
                else:
                    segment.release()
            self._retired = []
