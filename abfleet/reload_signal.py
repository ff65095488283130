"""How a reload call reaches every worker of a server, not just the one that got it.

gunicorn hands the call to one worker. That worker writes a new token to a generation file
in the server's own folder (its metrics folder: one per server, emptied at start); every
worker's model watcher looks at the file a few times a second (one `stat`), and on a new
token re-reads the registry and writes an acknowledgement (`<file>.ack.<pid>`: the token and
the version it now serves). The worker that got the call waits for as many acknowledgements
as the server has workers, so its answer says how many were reached and with which version.

A file, not memory shared at fork: it needs nothing from gunicorn's master, survives a
worker's restart, and can be looked at by hand.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

GENERATION = "reload.generation"
POLL_S = 0.2  # how often a watcher looks at the file


class ReloadSignal:
    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.path = self.folder / GENERATION

    def current(self) -> str:
        """The latest token ("" when no reload was asked since the server started)."""
        try:
            return self.path.read_text().strip()
        except OSError:
            return ""

    def _write(self, path: Path, text: str) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)  # readers see the old text or the new, never half

    def bump(self) -> str:
        """Ask every worker to re-read the registry; return the new token."""
        token = f"{time.time_ns()}-{os.getpid()}"
        self._write(self.path, token)
        return token

    def ack(self, token: str, version: str) -> None:
        """This worker has re-read the registry for `token` and serves `version`."""
        self._write(self.folder / f"{GENERATION}.ack.{os.getpid()}", f"{token} {version}")

    def acks(self, token: str) -> dict[int, str]:
        """pid → version of the live workers that acknowledged `token`."""
        out = {}
        for path in self.folder.glob(f"{GENERATION}.ack.*"):
            try:
                pid = int(path.name.rsplit(".", 1)[1])
                got, _, version = path.read_text().partition(" ")
            except (OSError, ValueError):
                continue
            if got == token and _alive(pid):
                out[pid] = version
        return out

    def wait_acks(self, token: str, expected: int, timeout: float) -> dict[int, str]:
        """The acknowledgements of `token` once `expected` workers gave one, or at `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.acks(token)
            if len(got) >= expected or time.monotonic() >= deadline:
                return got
            time.sleep(POLL_S / 4)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
