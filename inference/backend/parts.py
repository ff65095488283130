"""The server's parts (settings, model holder, store, metrics, the prediction service),
registered with a Flask app by `init_app` the way the Flask tutorial registers its database."""

from __future__ import annotations

import logging
import os
from typing import TypedDict

from flask import Flask, current_app

from abfleet import api, data, registry
from abfleet.feedback import Feedback
from abfleet.feedback_spool import FOLDER, FeedbackSpool
from abfleet.fleet_state import FleetStateCollector
from abfleet.metrics import ServerMetrics
from abfleet.readiness import DatabaseCheck
from abfleet.saturation import ServerProcesses, count_pool
from abfleet.reload_signal import ReloadSignal
from abfleet.serving import Loaded, ModelHolder, Predictions, RequestCounts
from abfleet.settings import Settings
from abfleet.store import Store

log = logging.getLogger(__name__)

EXTENSION = "abfleet"  # the key in app.extensions


class Parts(TypedDict):
    settings: Settings
    holder: ModelHolder
    store: Store
    metrics: ServerMetrics
    counts: RequestCounts
    predictions: Predictions
    feedback: Feedback
    fleet_registry: object  # a prometheus CollectorRegistry of the fleet's state (one production replica exports it)
    process_registry: object  # a prometheus CollectorRegistry of this server's processes (read at each scrape)
    database: DatabaseCheck
    fleet_state: FleetStateCollector
    reload_signal: ReloadSignal | None  # how a reload call reaches this server's other workers


def init_app(app: Flask, settings: Settings, holder: ModelHolder | None = None, store: Store | None = None) -> Parts:
    """Build the parts a server needs and register them with `app`; return them.

    Without a holder, one that follows the registry alias is made and started; without a
    store, one at `settings.db_url` with the settings' database timeouts. The store's
    prediction spool is started either way."""
    from prometheus_client import CollectorRegistry

    metrics = ServerMetrics(CollectorRegistry())
    store = store or Store.from_settings(settings)  # the spool folder readers look in too
    metrics.threads.set(settings.threads)  # summed over the live workers: the server's capacity
    metrics.replicas_expected.set(settings.replicas)  # AbfleetReplicasMissing compares the healthy ones with it
    count_pool(store.engine, metrics.db_checked_out, metrics.db_pool_size)

    def on_backlog(rows: int, nbytes: int) -> None:  # after every flush, from the spool's thread
        metrics.spool_rows.set(rows)
        metrics.spool_bytes.set(nbytes)

    # Answers wait for a line in the spool file, not for the database (see abfleet.spool).
    try:
        store.start_spool(fsync=settings.spool_fsync, linger=settings.spool_linger, max_rows=settings.spool_max_rows,
                          max_bytes=settings.spool_max_bytes, on_backlog=on_backlog)
    except OSError as exc:  # no writable spool folder: every answer waits for its INSERT, as before
        log.warning("prediction spool unavailable (%s): writing predictions straight to the database", exc)

    # Feedback that meets a database fault waits in a small spool of its own and is answered 202.
    try:
        feedback_spool = FeedbackSpool(store.spool_dir / FOLDER, max_rows=settings.feedback_spool_max_rows,
                                       on_change=metrics.feedback_pending.set)
    except OSError as exc:  # no writable spool folder: such feedback gets a 503 with Retry-After, as before
        log.warning("feedback spool unavailable (%s): feedback during a database fault is refused", exc)
        feedback_spool = None

    variant = settings.variant
    metrics.ready.set(0)  # until the first model is swapped in

    def on_swap(old: Loaded | None, new: Loaded) -> None:
        if old is not None:
            # multiprocess mode cannot remove a series: the old one drops to 0 (queries keep > 0)
            metrics.model_info.labels(variant, old.version, old.alias, str(old.fallback).lower()).set(0)
            metrics.swaps.labels(variant).inc()
        metrics.model_info.labels(variant, new.version, new.alias, str(new.fallback).lower()).set(1)
        metrics.prime(variant, new.version, api.PREDICT)
        metrics.ready.set(1)  # a server never unloads its model: ready from the first one on

    reload_signal = None
    if holder is None:
        holder = ModelHolder(settings, on_swap=on_swap)
        holder.refresh()
        # The server's own folder: each server (replica) has its metrics folder.
        reload_signal = ReloadSignal(settings.metrics_dir)
        holder.start_watcher(reload_signal)
    elif holder.current is not None:
        on_swap(None, holder.current)

    # Requests never wait for the database: a background ping says whether it answers (for
    # /api/ready and /api/health) and the fleet state /metrics exports is re-read in the background.
    database = DatabaseCheck(store.ping, settings.db_check_interval_s,
                             deadline=settings.db_connect_timeout_s + settings.db_statement_timeout_s)
    database.start()
    fleet_state = FleetStateCollector(store, fallback_weight=settings.candidate_weight,
                                      errors=metrics.store_errors.labels("metrics"), interval=settings.db_check_interval_s,
                                      aliases=lambda: registry.aliases(settings), aliases_every=settings.reload_interval)
    if variant == "production":  # the production replica that holds the lease exports the fleet's state
        fleet_state.start()
    fleet_registry = CollectorRegistry()
    fleet_registry.register(fleet_state)
    # Under gunicorn (metric files) the server is the master and its workers; else this process.
    process_registry = CollectorRegistry()
    process_registry.register(ServerProcesses(os.getppid() if settings.prometheus_multiproc_dir else os.getpid()))
    parts = Parts(settings=settings, holder=holder, store=store, metrics=metrics,
                  counts=RequestCounts(metrics, variant),
                  predictions=Predictions(holder, store, data.known_locations(), on_refused=metrics.spool_refused.inc),
                  feedback=Feedback(store, settings, feedback_spool, on_store_error=metrics.store_errors.labels("feedback").inc,
                                    on_stored=metrics.count_feedback),
                  fleet_registry=fleet_registry, process_registry=process_registry, database=database, fleet_state=fleet_state,
                  reload_signal=reload_signal)
    if feedback_spool is not None:
        def on_resolved(outcome: str, _item) -> None:
            metrics.feedback_pending_resolved.labels(outcome).inc()

        feedback_spool.start(parts["feedback"].resolve, settings.db_check_interval_s, on_resolved)
    app.extensions[EXTENSION] = parts
    return parts


def stop_background(p: Parts) -> None:
    """Stop the threads `init_app` started that read the database (tests build many apps)."""
    p["database"].stop()
    p["fleet_state"].stop()
    if p["feedback"].spool is not None:
        p["feedback"].spool.close()


def parts() -> Parts:
    """The parts of the app handling the current request."""
    return current_app.extensions[EXTENSION]
