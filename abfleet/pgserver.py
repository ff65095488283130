"""A PostgreSQL server of one's own, for fault injection (`abfleet soak`, the tests): Debian's
PostgreSQL 15 binaries, a fresh data folder in a temporary directory, a free loopback port,
run as the `postgres` system user when started by root (initdb refuses root). It may be
stopped, frozen and restarted; no other PostgreSQL (the machine's own on 5432) is touched."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from abfleet.procs import free_port

BIN = Path("/usr/lib/postgresql/15/bin")
USER = "postgres"  # the Debian package's system user


class PostgresMissing(RuntimeError):
    """Debian's PostgreSQL 15 binaries are not installed; the message says what to do."""


def as_user() -> list[str]:
    """The prefix that runs a command as the `postgres` user when we are root."""
    return ["runuser", "-u", USER, "--"] if os.geteuid() == 0 else []


def family(pid: int) -> list[int]:
    """`pid` and its direct children (a PostgreSQL server: the postmaster and its backends;
    a gunicorn server: the master and its workers)."""
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    children.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return [pid, *children]


@dataclass
class PostgresServer:
    data_dir: Path
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"postgresql+psycopg2://{USER}@127.0.0.1:{self.port}/postgres"

    def _ctl(self, *args: str) -> None:
        subprocess.run([*as_user(), str(BIN / "pg_ctl"), "-D", str(self.data_dir), *args],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, timeout=120)

    def start(self) -> None:
        self._ctl("-l", str(self.log), "-w", "-o", f"-p {self.port} -k {self.data_dir} -c listen_addresses=127.0.0.1", "start")

    def stop(self, mode: str = "fast") -> None:
        self._ctl("-m", mode, "-w", "stop")

    def running(self) -> bool:
        return (self.data_dir / "postmaster.pid").exists()

    @property
    def postmaster_pid(self) -> int:
        return int((self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])

    def freeze(self) -> list[int]:
        """SIGSTOP the postmaster and every backend (a hung server: no new connection, and no
        answer on the pooled ones); returns the pids for `thaw`."""
        frozen = family(self.postmaster_pid)
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        return frozen

    @staticmethod
    def thaw(pids: list[int]) -> None:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """The postmaster alone stopped by SIGSTOP for the block (it accepts no connection), then SIGCONT."""
        pid = self.postmaster_pid
        os.kill(pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(pid, signal.SIGCONT)


@contextlib.contextmanager
def postgres_server(prefix: str = "abfleet-pg-") -> Iterator[PostgresServer]:
    """A fresh, empty PostgreSQL 15 on a free port, stopped and removed afterwards."""
    if not (BIN / "initdb").exists():
        raise PostgresMissing(f"PostgreSQL 15 is not installed ({BIN / 'initdb'} is missing): "
                              "run `apt-get install -y postgresql-15`")
    root = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        if os.geteuid() == 0:
            shutil.chown(root, USER)
        server = PostgresServer(root / "data", free_port(), root / "postgres.log")
        subprocess.run([*as_user(), str(BIN / "initdb"), "-D", str(server.data_dir), "-U", USER, "-A", "trust",
                        "--no-sync", "-E", "UTF8"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                       timeout=120)
        server.start()
        try:
            yield server
        finally:
            if server.running():
                with contextlib.suppress(OSError, ValueError):
                    server.thaw(family(server.postmaster_pid))  # never leave it frozen
                server.stop("immediate")
    finally:
        shutil.rmtree(root, ignore_errors=True)
