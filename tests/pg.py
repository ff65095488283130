"""A PostgreSQL server of the test's own: Debian's PostgreSQL 15 binaries, a fresh data folder in
a temporary directory, a free loopback port, run as the `postgres` system user (initdb refuses
root). The test may stop, freeze and restart it; the shared server is never touched."""

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

from tests.helpers import free_port

BIN = Path("/usr/lib/postgresql/15/bin")
USER = "postgres"  # the Debian package's system user


def _as_user() -> list[str]:
    return ["runuser", "-u", USER, "--"] if os.geteuid() == 0 else []


@dataclass
class PostgresServer:
    data_dir: Path
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"postgresql+psycopg2://{USER}@127.0.0.1:{self.port}/postgres"

    def _ctl(self, *args: str) -> None:
        subprocess.run([*_as_user(), str(BIN / "pg_ctl"), "-D", str(self.data_dir), *args],
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

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """The postmaster stopped by SIGSTOP for the block (it accepts no connection), then SIGCONT."""
        pid = self.postmaster_pid
        os.kill(pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(pid, signal.SIGCONT)


def create_schema(url: str) -> None:
    """The store's tables in a fresh database (the one place the tests create them)."""
    from abfleet.store import Store

    store = Store(url)
    try:
        store.init_schema()
    finally:
        store.close()


@contextlib.contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    """A fresh PostgreSQL 15 with the store's schema, stopped and removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix="abfleet-pg-"))
    try:
        shutil.chown(root, USER) if os.geteuid() == 0 else None
        server = PostgresServer(root / "data", free_port(), root / "postgres.log")
        subprocess.run([*_as_user(), str(BIN / "initdb"), "-D", str(server.data_dir), "-U", USER, "-A", "trust",
                        "--no-sync", "-E", "UTF8"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                       timeout=120)
        server.start()
        try:
            create_schema(server.url)
            yield server
        finally:
            if server.running():
                with contextlib.suppress(OSError):
                    os.kill(server.postmaster_pid, signal.SIGCONT)  # never leave it frozen
                server.stop("immediate")
    finally:
        shutil.rmtree(root, ignore_errors=True)
