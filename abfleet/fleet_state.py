"""The fleet's state as metrics, exported by exactly one model server whatever the replicas.

What the pipeline knows lives in the store (the decisions, the latest drift summary, the
router's weight), and the registry says which version each alias points at; a production
server exports both on /metrics (`FleetStateCollector`). With
several production replicas, each would export the same series and every panel and alert
would count a decision N times. So the replicas elect one exporter through a lease in the
store (the `fleet_state` row `metrics_exporter`: {"owner", "until"}):

- Every production worker tries to take or renew the lease at each refresh (every
  `db_check_interval_s`); a lease is free when nobody holds it or its `until` has passed.
  Taking it is a compare-and-set on the row, so two replicas never both win.
- The owner is a replica (its host and gunicorn master), not a worker: a scrape reaches any
  worker of a replica, and all of them renew the same lease and serve the same values.
- A lease lasts `LEASE_INTERVALS` refreshes. When its replica dies, another takes over once
  it expires: the series move to the new instance after a gap of about that long. Alert
  rules read them through `max(max_over_time(...[2m]))`, and decisions are counted from a
  recorded `fleet:abfleet_decisions_total:max` that has no instance label, so neither a
  handover nor a short overlap (servers' clocks apart) counts anything twice.
- A server that cannot reach the store keeps exporting what it read last while its own
  lease runs, then stops: past that, another replica may hold it.

The servers' clocks must agree to well within a lease (NTP does).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import socket
import threading
import time
from typing import Callable

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from abfleet import metrics as m
from abfleet.decision import ARMS, OUTCOMES
from abfleet.store import Store, fleet_state

log = logging.getLogger(__name__)

LEASE_KEY = "metrics_exporter"
LEASE_INTERVALS = 3  # a lease outlives this many missed refreshes
REASON_CHARS = 120  # the first reason of the last decision, cut to this, as a label


def replica_id() -> str:
    """This replica's name in the lease: its host and the gunicorn master all its workers share."""
    return f"{socket.gethostname()}/{os.getppid()}"


def claim_lease(store: Store, owner: str, ttl_s: float, now: float | None = None) -> dict:
    """Take or renew the exporter lease for `owner` when it is free, expired or theirs already;
    return the lease as the store holds it afterwards ({"owner", "until"})."""
    now = time.time() if now is None else now
    wanted = json.dumps({"owner": owner, "until": now + ttl_s})
    row = {"key": LEASE_KEY, "value": wanted, "updated_at": dt.datetime.now(dt.timezone.utc)}
    select = sa.select(fleet_state.c.value).where(fleet_state.c.key == LEASE_KEY)
    try:
        with store.engine.begin() as conn:
            raw = conn.execute(select).scalar_one_or_none()
            held = json.loads(raw) if raw else None
            if held is None:
                conn.execute(fleet_state.insert(), [row])
                return json.loads(wanted)
            if held.get("owner") != owner and float(held.get("until", 0)) >= now:
                return held  # another replica's, and running
            # Compare-and-set: only if nobody changed the row since it was read.
            done = conn.execute(sa.update(fleet_state).where(fleet_state.c.key == LEASE_KEY, fleet_state.c.value == raw)
                                .values(value=wanted, updated_at=row["updated_at"])).rowcount
            if done == 1:
                return json.loads(wanted)
    except (IntegrityError, sa.exc.OperationalError):
        # Lost a race: another replica inserted the row first, or (SQLite) wrote it since this
        # transaction read it. A store that is down fails the read below as well.
        pass
    with store.engine.connect() as conn:  # whoever won holds it (a sibling worker, maybe)
        raw = conn.execute(select).scalar_one_or_none()
    return json.loads(raw) if raw else {"owner": None, "until": 0.0}


class FleetStateCollector:
    """Pipeline-side facts read from the store, exported by the lease's owner only (see the
    module's docstring): the router's weight, the decisions and the last one, the experiment's
    start and progress, the SRM p-value, whether the evaluation was blind, the drift check.
    Where no weight was recorded in the store (compose, AWS), the weight is `fallback_weight`:
    the ABFLEET_CANDIDATE_WEIGHT the router was started with.

    A scrape never waits for the database: `start()` re-reads the store on a background thread
    every `interval` seconds and `collect()` serves the latest values read. A failed read counts
    in `errors` (store_errors{operation="metrics"}) and keeps the values read before it for as
    long as this replica's lease runs."""

    def __init__(self, store, fallback_weight: int | None = None, errors=None, *, owner: str | None = None,
                 interval: float = 5.0, aliases: Callable[[], dict] | None = None, aliases_every: float = 15.0):
        self.store = store
        self.fallback_weight = fallback_weight
        self.errors = errors  # a counter child to .inc() on each failed read, or None
        self.owner = owner or replica_id()
        self.interval = interval
        # The registry's alias → version (registry.aliases), read by the owner every `aliases_every`
        # seconds on a thread of its own: a registry that hangs never holds up the lease.
        self.aliases, self.aliases_every = aliases, aliases_every
        self._aliases: dict | None = None  # None: not read, or the registry did not answer
        self._families: list | None = None  # None until the first read succeeded
        self._until = 0.0  # when this replica's lease ends, as last renewed (0: not the owner)
        self._stop = threading.Event()

    def refresh(self) -> bool:
        """Renew the lease and, as its owner, read the store once, in the calling thread; True
        when the store answered (whoever owns the lease)."""
        try:
            lease = claim_lease(self.store, self.owner, LEASE_INTERVALS * self.interval)
            if lease.get("owner") != self.owner:
                self._until, self._families = 0.0, None
                return True
            counts, _ = self.store.decision_counts()
            latest = self.store.decision_history(limit=1)
            weight = self.store.get_state("candidate_weight", self.fallback_weight)
            drift = self.store.get_state("drift_summary")
        except Exception as exc:  # a store outage must not break the servers' own metrics
            log.warning("fleet state not refreshed: %s", exc)
            if self.errors is not None:
                self.errors.inc()
            return False
        try:
            self._families = list(fleet_families(counts, latest[0] if latest else None, weight, drift, self._aliases))
        except Exception:  # a row this code cannot read: keep the last values, and the thread alive
            log.exception("fleet state not exported")
        self._until = float(lease["until"])
        return True

    def refresh_aliases(self) -> None:
        """Read the registry's aliases once (exported from the next `refresh` on)."""
        if self.aliases is None:
            return
        try:
            self._aliases = self.aliases()
        except Exception as exc:  # the registry down: what it says is unknown, not what it said before
            log.warning("registry aliases not read: %s", exc)
            self._aliases = None

    def owns(self) -> bool:
        return self._until >= time.time()

    def start(self) -> None:
        """Refresh now and then every `interval` seconds on a daemon thread, and (as the owner)
        read the registry's aliases every `aliases_every` seconds on another, until `stop()`."""
        def loop() -> None:
            while not self._stop.is_set():
                self.refresh()
                self._stop.wait(self.interval)

        def aliases_loop() -> None:
            while not self._stop.is_set():
                if self.owns():
                    self.refresh_aliases()
                self._stop.wait(self.aliases_every if self._aliases is not None else min(self.interval, self.aliases_every))

        threading.Thread(target=loop, name="fleet-state", daemon=True).start()
        if self.aliases is not None:
            threading.Thread(target=aliases_loop, name="fleet-aliases", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def collect(self):
        if not self.owns():  # not the owner, or a lease it could not renew
            return iter(())
        return iter(self._families or ())


def _timestamp(iso: str | None) -> float | None:
    try:
        return dt.datetime.fromisoformat(iso).timestamp() if iso else None
    except (TypeError, ValueError):
        return None


def fleet_families(counts: dict, latest: dict | None, weight, drift, aliases: dict | None = None):
    """The metric families of the fleet's state: `counts` of decisions by kind, the `latest`
    decision row (Store.decision_history's), the router's `weight`, the `drift` summary, the
    registry's `aliases` (alias → version or None)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    if weight is not None:
        yield GaugeMetricFamily(m.ROUTER_CANDIDATE_WEIGHT, "Percent of users the router sends to the candidate", value=float(weight))
    if aliases is not None:
        info = GaugeMetricFamily(m.REGISTRY_ALIAS, "The version each registry alias points at (1)",
                                 labels=["alias", "model_version"])
        for alias, version in sorted(aliases.items()):
            if version:
                info.add_metric([alias, str(version)], 1.0)
        yield info
    decisions = CounterMetricFamily(m.DECISIONS.removesuffix("_total"), "Evaluation decisions", labels=["decision"])
    for decision in OUTCOMES:
        decisions.add_metric([decision], float(counts.get(decision, 0)))
    yield decisions
    if latest is not None:
        yield from _decision_families(latest)
    if drift and drift.get("drift_detected") is not None:
        yield GaugeMetricFamily(m.DRIFT_DETECTED, "1 when the latest drift check found drift", value=float(drift["drift_detected"]))
        if drift.get("share_drifted") is not None:
            yield GaugeMetricFamily(m.DRIFT_SHARE, "Share of drifted columns", value=float(drift["share_drifted"]))
        scores = GaugeMetricFamily(m.DRIFT_COLUMN_SCORE, "Drift score per column", labels=["column"])
        for column, info in (drift.get("columns") or {}).items():
            if info.get("score") is not None:
                scores.add_metric([column], float(info["score"]))
        yield scores
    checked = _timestamp((drift or {}).get("checked_at"))
    if checked is not None:
        yield GaugeMetricFamily(m.DRIFT_CHECKED, "Time of the latest drift check", value=checked)


def _decision_families(latest: dict):
    from prometheus_client.core import GaugeMetricFamily

    made = latest["created_at"]
    made = made.replace(tzinfo=dt.timezone.utc) if made.tzinfo is None else made  # SQLite hands back naive UTC
    yield GaugeMetricFamily(m.LAST_EVALUATION, "Time of the latest evaluation decision", value=made.timestamp())
    reasons = latest.get("reasons") or []
    info = GaugeMetricFamily(m.LAST_DECISION_INFO, "The latest decision (1), its outcome, source and versions as labels",
                             labels=["decision", "source", "applied", "production_version", "candidate_version", "reason"])
    info.add_metric([latest["decision"], latest["source"], str(bool(latest["applied"])).lower(),
                     latest.get("production_version") or "", latest.get("candidate_version") or "",
                     str(reasons[0])[:REASON_CHARS] if reasons else ""], 1.0)
    yield info
    details = latest.get("details") or {}
    yield GaugeMetricFamily(m.LAST_DECISION_PROBLEMS, "Problems the latest decision reported (missing data, unreachable parts)",
                            value=float(len(details.get("problems") or [])))
    yield GaugeMetricFamily(m.EVALUATION_BLIND, "1 when the latest decision could not read Prometheus",
                            value=1.0 if details.get("blind") else 0.0)
    since = _timestamp(details.get("since"))
    if since is not None:
        start = GaugeMetricFamily(m.EXPERIMENT_START, "When the candidate of the latest decision became @candidate",
                                  labels=["candidate_version"])
        start.add_metric([latest.get("candidate_version") or ""], since)
        yield start
    checks = details.get("checks") or {}
    minimums = checks.get("min_samples") or {}
    samples = GaugeMetricFamily(m.EXPERIMENT_SAMPLES, "Each arm's samples at the latest decision", labels=["variant", "measure"])
    needed = GaugeMetricFamily(m.EXPERIMENT_MIN_SAMPLES, "Samples each arm needs before a comparison", labels=["measure"])
    for measure in ("requests", "ratings"):
        for arm in ARMS:
            count = (minimums.get(measure) or {}).get(arm)
            if count is not None:
                samples.add_metric([arm, measure], float(count))
        if minimums.get(f"min_{measure}") is not None:
            needed.add_metric([measure], float(minimums[f"min_{measure}"]))
    yield samples
    yield needed
    p_value = (checks.get("srm") or {}).get("p_value")
    if p_value is not None:
        yield GaugeMetricFamily(m.SRM_P_VALUE, "Sample-ratio mismatch test's p-value at the latest decision", value=float(p_value))
