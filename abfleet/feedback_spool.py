"""The feedback spool: feedback received while the database faulted, waiting to be recorded.

A server that cannot reach the database when a rating, quick verdict or actual price comes in
appends the request to its own small spool file (`FeedbackSpool.add`, fsync'd: feedback is low
volume) and answers 202. A thread (`FeedbackSpool.start`) hands each pending item to a
`resolve` callable, which runs the checks of a live request and stores it, until the database
answers; then the item leaves the spool.

Promises:
- the idempotency key is (prediction id, feedback type): a key is pending at most once per
  folder as far as the spool can see (`holds` looks into every file of the folder), and the
  feedback table's uniqueness (one of a kind per prediction) keeps a key that slipped in
  twice from being stored twice;
- an item leaves the spool only after `resolve` returned (its row committed, or it was refused);
- a live writer holds an flock on its file; a file nobody holds was left by a dead process and
  is adopted by any live one (its pending items copied into the adopter's file, then removed).

File format: JSON lines, `{"add": {...item...}}` and `{"done": [prediction_id, feedback_type]}`;
a file whose items are all done is emptied.
"""

from __future__ import annotations

import atexit
import datetime as dt
import errno
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from abfleet.spool_segment import DISK_FULL, claim

log = logging.getLogger(__name__)

SUFFIX = ".jsonl"
FOLDER = "feedback"  # under a server's spool folder: the prediction spool's readers never look in it
# What `resolve` says became of an item; None keeps it for the next round.
OUTCOMES = ("stored", "duplicate", "refused", "expired")


@dataclass(frozen=True)
class PendingFeedback:
    prediction_id: str
    feedback_type: str
    feedback_value: float | None
    user_id: str | None
    received_by: str
    received_at: str  # ISO time, UTC
    feedback_text: str | None = None  # a comment, or the words sent beside a rating

    @property
    def key(self) -> tuple[str, str]:
        return self.prediction_id, self.feedback_type

    @property
    def received(self) -> dt.datetime:
        return dt.datetime.fromisoformat(self.received_at)

    @classmethod
    def now(cls, prediction_id: str, feedback_type: str, feedback_value: float | None, user_id: str | None,
            received_by: str, feedback_text: str | None = None) -> "PendingFeedback":
        stamp = dt.datetime.now(dt.timezone.utc).isoformat(timespec="microseconds")
        return cls(prediction_id, feedback_type, feedback_value, user_id, received_by, stamp, feedback_text)


class FeedbackSpoolFull(Exception):
    """The feedback spool takes no more items for now (its bound, or a full disk): answer 503
    with Retry-After."""


def read_pending(data: bytes) -> dict[tuple[str, str], PendingFeedback]:
    """The items of a spool file's bytes that are added and not done. A torn last line (its
    writer died mid-write, before it could answer) is skipped."""
    items: dict[tuple[str, str], PendingFeedback] = {}
    for line in data.decode("utf-8", errors="replace").splitlines():
        try:
            entry = json.loads(line)
            if "add" in entry:
                item = PendingFeedback(**entry["add"])
                items.setdefault(item.key, item)
            else:
                items.pop(tuple(entry["done"]), None)
        except (ValueError, TypeError, KeyError):
            if line.strip():
                log.warning("skipping an unreadable line in a feedback spool file")
    return items


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return b""


class FeedbackSpool:
    """One process's pending feedback, in `directory` (the spool folder's `feedback/`)."""

    def __init__(self, directory: Path, *, max_rows: int = 10_000, on_change: Callable[[int], None] | None = None):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_rows = max_rows
        self.on_change = on_change  # called with the pending count after every change
        self._lock = threading.Lock()
        self._items: dict[tuple[str, str], PendingFeedback] = {}
        name = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp = self.directory / f".{name}.tmp"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self.path = self.directory / f"{name}{SUFFIX}"
            os.rename(tmp, self.path)  # named only once locked: never taken for an orphan
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        self._fd: int | None = fd
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        atexit.register(self.close)

    # ---- what is pending ----------------------------------------------------
    def pending(self) -> list[PendingFeedback]:
        with self._lock:
            return list(self._items.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def holds(self, prediction_id: str, feedback_type: str) -> bool:
        """Whether that key waits to be recorded here or in any other file of the folder."""
        key = (prediction_id, feedback_type)
        with self._lock:
            if key in self._items:
                return True
        needle = json.dumps(prediction_id).encode()
        for path in self._others():
            data = _read(path)
            if needle in data and key in read_pending(data):
                return True
        return False

    def _others(self) -> list[Path]:
        try:
            return sorted(p for p in self.directory.iterdir() if p.name.endswith(SUFFIX) and p != self.path)
        except FileNotFoundError:
            return []

    # ---- writing ------------------------------------------------------------
    def add(self, item: PendingFeedback) -> bool:
        """Make the item durable; False when its key is pending already (not spooled twice).
        Raises FeedbackSpoolFull at the bound or on a full disk."""
        if self.holds(*item.key):
            return False
        with self._lock:
            if item.key in self._items:
                return False
            if len(self._items) >= self.max_rows:
                raise FeedbackSpoolFull(f"{len(self._items)} pieces of feedback wait for the database (at most {self.max_rows})")
            self._write([{"add": asdict(item)}])
            self._items[item.key] = item
            count = len(self._items)
        self._changed(count)
        return True

    def done(self, item: PendingFeedback) -> None:
        """The item is recorded or refused: it leaves the spool (the file is emptied when
        nothing is left in it)."""
        with self._lock:
            if self._items.pop(item.key, None) is None:
                return
            if self._items:
                self._write([{"done": list(item.key)}])
            else:
                self._empty()
            count = len(self._items)
        self._changed(count)

    def _write(self, entries: list[dict]) -> None:
        if self._fd is None:
            raise RuntimeError("the feedback spool is closed")
        data = b"".join(json.dumps(e).encode() + b"\n" for e in entries)
        try:
            written = os.write(self._fd, data)  # O_APPEND: always at the end
            if written != len(data):  # a short write: the disk filled mid-line
                raise OSError(errno.ENOSPC, "short write")
            os.fsync(self._fd)
        except OSError as exc:
            if exc.errno in DISK_FULL:
                raise FeedbackSpoolFull(f"disk full: the feedback spool could not be written ({exc.strerror})") from exc
            raise

    def _empty(self) -> None:
        assert self._fd is not None
        os.ftruncate(self._fd, 0)
        os.fsync(self._fd)

    def _changed(self, count: int) -> None:
        if self.on_change is not None:
            self.on_change(count)

    # ---- dead processes' files ----------------------------------------------
    def adopt_orphans(self) -> int:
        """Copy the pending items of dead processes' files into this one, then remove those
        files; return how many items were adopted."""
        adopted = 0
        for path in self._others():
            fd = claim(path)
            if fd is None:  # a live process's file (or removed meanwhile)
                continue
            try:
                chunks = []
                while chunk := os.read(fd, 1 << 20):
                    chunks.append(chunk)
                with self._lock:
                    fresh = [i for k, i in read_pending(b"".join(chunks)).items() if k not in self._items]
                    if fresh:
                        self._write([{"add": asdict(i)} for i in fresh])  # durable here before the file goes
                        self._items.update((i.key, i) for i in fresh)
                    count = len(self._items)
                os.unlink(path)
            finally:
                os.close(fd)
            if fresh:
                adopted += len(fresh)
                log.info("adopted %d pending feedback items from %s", len(fresh), path.name)
                self._changed(count)
        return adopted

    # ---- resolving ----------------------------------------------------------
    def resolve_all(self, resolve: Callable[[PendingFeedback], str | None],
                    on_resolved: Callable[[str, PendingFeedback], None] | None = None) -> int:
        """Hand each pending item to `resolve` (which stores it or refuses it, returning one
        of OUTCOMES, or None to keep it); an item with an outcome leaves the spool. Stops at
        the first exception (the database faults again): it and the rest stay. Returns how
        many items left."""
        left = 0
        for item in self.pending():
            outcome = resolve(item)
            if outcome is None:
                continue
            self.done(item)
            left += 1
            if on_resolved is not None:
                on_resolved(outcome, item)
        return left

    def start(self, resolve: Callable[[PendingFeedback], str | None], interval: float,
              on_resolved: Callable[[str, PendingFeedback], None] | None = None,
              rescan_interval: float = 60.0) -> threading.Thread:
        """Adopt orphans now and every `rescan_interval` seconds, and resolve pending items
        every `interval` seconds, on a daemon thread until `close()`."""
        def loop() -> None:
            next_scan = time.monotonic()
            while not self._stop.is_set():
                try:
                    if time.monotonic() >= next_scan:
                        self.adopt_orphans()
                        next_scan = time.monotonic() + rescan_interval
                    if self.pending():
                        self.resolve_all(resolve, on_resolved)
                except Exception as exc:  # the database faults again: everything stays for the next round
                    log.warning("pending feedback not recorded yet (retrying in %.1fs): %s", interval, exc)
                self._stop.wait(interval)

        self._thread = threading.Thread(target=loop, name="feedback-spool", daemon=True)
        self._thread.start()
        return self._thread

    def close(self) -> None:
        """Stop the thread and release the file: removed when empty, else left for another
        process to adopt."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        with self._lock:
            fd, self._fd = self._fd, None
            if fd is None:
                return
            try:
                if not self._items:
                    self.path.unlink(missing_ok=True)
            finally:
                os.close(fd)
