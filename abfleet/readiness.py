"""What a server knows about its database without asking it during a request.

A background thread pings the store every few seconds; /api/ready and /api/health read the
latest result. A ping that has not come back within the database timeouts counts as
"unreachable" at once, so a hung database shows while the ping is still stuck on it.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Literal

log = logging.getLogger(__name__)

DatabaseState = Literal["ok", "unreachable", "unknown"]


class DatabaseCheck:
    """The database's state as the last background ping found it: "ok", "unreachable", or
    "unknown" before the first ping came back."""

    def __init__(self, ping: Callable[[], bool], interval: float, deadline: float,
                 clock: Callable[[], float] = time.monotonic):
        self._ping = ping
        self.interval = interval
        self.deadline = deadline  # a ping running longer than this is a failed one
        self._clock = clock
        self._result: DatabaseState = "unknown"
        self._started: float | None = None  # when the ping in flight began; None between pings
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def state(self) -> DatabaseState:
        """The latest result, never waiting for the database."""
        started = self._started
        if started is not None and self._clock() - started > self.deadline:
            return "unreachable"
        return self._result

    def check(self) -> DatabaseState:
        """Ping once, in the calling thread, and keep the result."""
        self._started = self._clock()
        try:
            ok = self._ping()
        except Exception as exc:  # a ping that raises is a failed one, whatever the cause
            log.warning("database ping failed: %s", exc)
            ok = False
        self._result = "ok" if ok else "unreachable"
        self._started = None
        return self._result

    def start(self) -> threading.Thread:
        """Ping now and then every `interval` seconds on a daemon thread, until `stop()`."""
        def loop() -> None:
            while not self._stop.is_set():
                self.check()
                self._stop.wait(self.interval)

        self._thread = threading.Thread(target=loop, name="database-check", daemon=True)
        self._thread.start()
        return self._thread

    def stop(self) -> None:
        self._stop.set()
