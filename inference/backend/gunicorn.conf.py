"""gunicorn settings for a model server; `abfleet serve` and the container both use this file."""

import shutil

from abfleet.settings import Settings

_settings = Settings.from_env()

bind = _settings.bind_address
workers = _settings.workers
threads = _settings.threads
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
# prometheus_client reads PROMETHEUS_MULTIPROC_DIR when a worker imports it: `abfleet serve`
# sets it from the same setting before gunicorn starts. Emptied at start.
_multiproc = _settings.metrics_dir


def on_starting(server):
    shutil.rmtree(_multiproc, ignore_errors=True)
    _multiproc.mkdir(parents=True, exist_ok=True)
    # No database work here: a server never creates or alters tables (`abfleet db upgrade`
    # does, before servers start) and boots without the database (answers wait in the spool).


def child_exit(server, worker):
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
