"""The spool's files: the line format, one writer's segment file, and replaying a dead
writer's file (see abfleet.spool for the promises they keep)."""

from __future__ import annotations

import datetime as dt
import errno
import fcntl
import json
import logging
import mmap
import os
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

SPOOL_SUFFIX = ".jsonl"
# Rows per INSERT when the spool hands lines to the database: one statement (and one
# transaction) stays small however large the backlog grew while the database was away.
CHUNK_ROWS = 2000
# Segment files grow (doubling) while a backlog piles up, up to this size: a large backlog
# needs tens of files, not thousands of descriptors and mappings.
MAX_SEGMENT_BYTES = 32 << 20
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)

# Inserts spooled lines idempotently (a replayed row may be stored already); `values` are the
# same rows as tuples in the column order given to `PredictionSpool`, or None.
Insert = Callable[[list[str], list[tuple] | None], None]


class SpoolFull(Exception):
    """The spool takes no more rows for now: its backlog reached a bound, or the disk is full.
    Refuse the prediction (503) and ask the client to come back after `retry_after` seconds."""

    def __init__(self, cause: str, retry_after: int = 5):
        super().__init__(cause)
        self.cause = cause
        self.retry_after = retry_after


def line_prefix(prediction_id: str) -> str:
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


def read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:  # inserted and removed meanwhile
        return b""


def _lines(data: bytes) -> list[str]:
    """The lines of a spool file (its unused tail, and any zeroed stretch, are NUL bytes)."""
    data = data.rstrip(b"\0")
    chunks = [c for c in data.split(b"\0") if c] if b"\0" in data else [data]
    return [line for c in chunks for line in c.decode("utf-8", errors="replace").splitlines()]


def valid_lines(data: bytes, path: Path) -> list[str]:
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


def insert_in_chunks(insert: Insert, lines: list[str], values: list[tuple] | None = None,
                     chunk: int = CHUNK_ROWS) -> None:
    """Hand `lines` to `insert` at most `chunk` rows at a time, each chunk its own transaction."""
    for start in range(0, len(lines), chunk):
        insert(lines[start:start + chunk], None if values is None else values[start:start + chunk])


def claim(path: Path) -> int | None:
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


def replay(insert: Insert, path: Path, fd: int) -> int:
    """Insert a dead writer's spool file (claimed as fd) in chunks and remove it; return its
    row count. When a chunk fails the file stays whole: a later replay inserts it again
    (idempotently)."""
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    lines = valid_lines(b"".join(chunks), path)
    insert_in_chunks(insert, lines)
    os.unlink(path)  # only now: every chunk above committed
    if lines:
        log.info("replayed %d spooled predictions from %s", len(lines), path.name)
    return len(lines)


class Segment:
    """One spool file: created locked (flock), given its full size up front, and mapped.

    A line is appended by copying it into the shared mapping: no system call (so no
    release of the GIL, no thread hand-off), yet the bytes are in the kernel's page cache
    from that moment and outlive the process however it dies. The space is allocated when
    the file is made (a full disk fails then, not later); unused space reads as NUL bytes.

    Bytes before `done` are in the database; `done..size` is the segment's backlog.
    `release` and `discard` may be called any number of times: only the first one acts, so
    a descriptor number is never closed twice (it may belong to another file by then).
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
        self.fd: int | None = fd
        self.capacity = capacity
        self.size = 0
        self.done = 0

    @property
    def backlog(self) -> int:
        return self.size - self.done

    def fits(self, n: int) -> bool:
        return self.size + n <= self.capacity

    def write(self, data: bytes, sync: bool) -> None:
        start, end = self.size, self.size + len(data)
        self.map[start:end] = data
        if sync:
            aligned = start - start % mmap.PAGESIZE
            self.map.flush(aligned, end - aligned)
        self.size = end

    def read(self, start: int, end: int) -> bytes:
        return self.map[start:end]

    def truncate(self) -> None:
        """Forget every line (all of them are in the database)."""
        self.map[:self.size] = bytes(self.size)
        self.size = self.done = 0

    def release(self) -> None:
        fd, self.fd = self.fd, None
        if fd is None:
            return
        try:
            self.map.close()
        finally:
            os.close(fd)

    def discard(self) -> None:
        """Remove the file (every row in it is in the database) and release it."""
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            self.release()
