"""gunicorn settings for a model server; `abfleet serve` and the container both use this file."""

import os
import shutil
from pathlib import Path

from abfleet.settings import Settings

_settings = Settings.from_env()

bind = os.environ.get("ABFLEET_BIND", f"{_settings.host}:{_settings.port_of(_settings.variant)}")
workers = _settings.workers
threads = int(os.environ.get("ABFLEET_THREADS", "4"))
worker_class = "gthread"
proc_name = f"abfleet-{_settings.variant}"
timeout = 60
graceful_timeout = 20
keepalive = 30
accesslog = None
errorlog = "-"
wsgi_app = "inference.backend.app:create_app()"
# Two servers on one machine would fight over the default control socket path.
control_socket_disable = True

# Every worker writes its metrics to files here; /metrics sums them (multiprocess mode).
# It must be set before prometheus_client is imported in a worker, and emptied at start.
_multiproc = Path(os.environ.setdefault(
    "PROMETHEUS_MULTIPROC_DIR", str(_settings.run_dir / "metrics" / _settings.variant)))


def on_starting(server):
    shutil.rmtree(_multiproc, ignore_errors=True)
    _multiproc.mkdir(parents=True, exist_ok=True)
    # Create the tables once, in the master: workers racing to CREATE TABLE on PostgreSQL
    # fail with a unique violation, and a worker that fails to boot stops gunicorn.
    from abfleet.store import Store

    store = Store(_settings.db_url)
    store.init_schema()
    store.engine.dispose()


def child_exit(server, worker):
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
