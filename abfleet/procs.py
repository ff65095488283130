"""Process supervision for the local operations (stack, airflow_local, bench) and the tests.

A started process runs in its own session, so `stop(pid)` ends it with all its children
(gunicorn's workers, nginx's, Airflow's components). Its output goes to a log file, and its
environment is this process's plus the fleet's settings, with this venv's scripts first.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import requests

from abfleet.settings import Settings, process_environ, project_root


class ProcessError(RuntimeError):
    """A process could not be started or did not become ready; the message says what to do."""


@dataclass
class Service:
    """A long-running process of a stack: how to start it, where it answers, how to know it."""

    name: str
    port: int
    command: list[str]
    health_url: str
    marker: str  # a word of the command line that proves a pid is still ours
    env: dict[str, str] = field(default_factory=dict)
    timeout: float = 60.0


def venv_bin(name: str) -> str:
    """The venv's own script `name` if it has one, else the one on PATH (else the bare name)."""
    # The venv's own scripts first: `mlflow server` execs uvicorn from the same bin folder.
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else (shutil.which(name) or name)


def child_env(settings: Settings, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a child process: ours, the settings, `extra`; the venv's bin first on PATH."""
    env = process_environ({**settings.env(), **(extra or {})})
    # Children such as `airflow standalone` run further scripts by name: this venv's first.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def port_taken(host: str, port: int) -> bool:
    """True when something accepts TCP connections on host:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (the OS's choice)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def answers_http(url: str, *, any_answer: bool = False) -> bool:
    """True when the URL answers (any status with any_answer, else a non-5xx one)."""
    try:
        code = requests.get(url, timeout=2).status_code
    except requests.RequestException:
        return False
    return any_answer or code < 500


def start(command: list[str], env: Mapping[str, str], log: Path, *, pid_file: Path | None = None,
          cwd: Path | None = None) -> subprocess.Popen:
    """Start `command` in its own session (from `cwd`, default the project root), output
    appended to `log`; its pid is written to `pid_file` when one is given."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=dict(env), cwd=cwd or project_root(), start_new_session=True)
    if pid_file is not None:
        pid_file.parent.mkdir(parents=True, exist_ok=True)
        pid_file.write_text(f"{proc.pid}\n")
    return proc


def wait_ready(proc: subprocess.Popen, ready: Callable[[], bool], *, name: str, log: Path, timeout: float,
               error: type[Exception] = ProcessError) -> None:
    """Return once `ready()` is true; raise `error` when the process exits first or time runs out.

    `ready` may raise requests' errors or ValueError (a page that is not JSON yet): not ready."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise error(f"{name} exited at start (code {proc.returncode}): see {log}")
        try:
            if ready():
                return
        except (requests.RequestException, ValueError):
            pass
        time.sleep(0.3)
    raise error(f"{name} did not become ready in {timeout:.0f}s: see {log}")


def stop(pid: int, timeout: float = 20.0) -> None:
    """SIGTERM the process group `pid` leads, SIGKILL it after `timeout`; gone already is fine."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        # Reap it if it is our own child (tests start the stack in-process).
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.1)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def stop_child(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """Stop a process this one started (and its session), and reap it."""
    if proc.poll() is None:
        stop(proc.pid)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass


def running_pid(pid_file: Path, marker: str) -> int | None:
    """The pid in `pid_file` if that process still runs a command line holding `marker`;
    else None (and a stale file is removed)."""
    try:
        pid = int(pid_file.read_text().split()[0])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (OSError, ValueError, IndexError):
        pid_file.unlink(missing_ok=True)
        return None
    if marker not in cmdline:
        pid_file.unlink(missing_ok=True)
        return None
    return pid
