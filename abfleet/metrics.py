"""Metric names, defined once: the servers export them, the evaluation queries them,
and the alert rules and dashboards use the same names (tests check they agree).

Importing this module creates no collector; `ServerMetrics` does, in the server process,
after `PROMETHEUS_MULTIPROC_DIR` is set (gunicorn's config does that before import).
"""

from __future__ import annotations

REQUESTS = "abfleet_requests_total"  # labels: variant, model_version, endpoint, status
LATENCY = "abfleet_request_latency_seconds"  # histogram; labels: variant, endpoint
RATINGS = "abfleet_ratings_total"  # labels: variant, model_version, stars
QUICK_FEEDBACK = "abfleet_quick_feedback_total"  # labels: variant, model_version, kind
APE_COUNT = "abfleet_ape_observations_total"  # labels: variant, model_version
APE_SUM = "abfleet_ape_sum_total"
APE_SUM_SQ = "abfleet_ape_sum_squares_total"
MODEL_INFO = "abfleet_model_info"  # gauge 1; labels: variant, model_version, alias, fallback
MODEL_SWAPS = "abfleet_model_swaps_total"  # labels: variant
# Requests the router meant for `intended` but had to serve from this server (`variant`):
# the intended server refused the connection or timed out. Counted by the server that answered.
FAILOVERS = "abfleet_failover_requests_total"  # labels: intended, variant, endpoint

# Faults: what an operator must hear about before users do (alert rules in monitoring/rules).
SPOOL_BACKLOG_ROWS = "abfleet_spool_backlog_rows"  # gauge (live sum over workers): answered, not yet stored
SPOOL_BACKLOG_BYTES = "abfleet_spool_backlog_bytes"  # gauge (live sum over workers)
SPOOL_REFUSED = "abfleet_spool_refused_total"  # counter: predictions refused (503) because the spool was full
STORE_ERRORS = "abfleet_store_errors_total"  # counter; labels: operation (insert, feedback, read, metrics)
FEEDBACK_FAILURES = "abfleet_feedback_failures_total"  # counter; labels: reason (store, spool)
FEEDBACK_PENDING = "abfleet_feedback_pending"  # gauge (live sum over workers): received while the database faulted, not recorded yet
FEEDBACK_PENDING_RESOLVED = "abfleet_feedback_pending_resolved_total"  # counter; labels: outcome (stored, duplicate, refused, expired)
READY = "abfleet_ready"  # gauge (live min over workers): 1 when the server would pass /api/ready

REPLICAS_EXPECTED = "abfleet_replicas_expected"  # gauge: servers its variant should have (ABFLEET_REPLICAS)

# Saturation (abfleet.saturation): how much of a server's capacity is in use.
REQUESTS_IN_FLIGHT = "abfleet_requests_in_flight"  # gauge (live sum over workers): requests being handled
WORKER_THREADS = "abfleet_worker_threads"  # gauge (live sum over workers): threads that handle requests
PROCESS_CPU = "abfleet_process_cpu_seconds_total"  # counter; labels: role (master, worker), pid
PROCESS_RSS = "abfleet_process_resident_memory_bytes"  # gauge; labels: role, pid
DB_CONNECTIONS_CHECKED_OUT = "abfleet_db_connections_checked_out"  # gauge (live sum): connections in use
DB_POOL_SIZE = "abfleet_db_pool_size"  # gauge (live sum): connections the workers' pools keep open

# Pipeline-side facts (drift, decisions, the experiment, the router's weight): read from the
# store and exported by the one production replica that holds the exporter lease
# (abfleet.fleet_state), so each series exists once per fleet whatever the replicas.
DRIFT_SHARE = "abfleet_drift_share_drifted"
DRIFT_DETECTED = "abfleet_drift_detected"
DRIFT_COLUMN_SCORE = "abfleet_drift_column_score"
DRIFT_CHECKED = "abfleet_drift_checked_timestamp_seconds"
LAST_EVALUATION = "abfleet_last_evaluation_timestamp_seconds"
DECISIONS = "abfleet_decisions_total"  # labels: decision
# 1; labels: decision, source, applied, production_version, candidate_version, reason (the first)
LAST_DECISION_INFO = "abfleet_last_decision_info"
LAST_DECISION_PROBLEMS = "abfleet_last_decision_problems"  # problems the last decision reported
EVALUATION_BLIND = "abfleet_evaluation_blind"  # 1 when the last decision could not read Prometheus
EXPERIMENT_START = "abfleet_experiment_start_timestamp_seconds"  # labels: candidate_version
EXPERIMENT_SAMPLES = "abfleet_experiment_samples"  # labels: variant, measure (requests, ratings)
EXPERIMENT_MIN_SAMPLES = "abfleet_experiment_min_samples"  # labels: measure
SRM_P_VALUE = "abfleet_srm_p_value"  # the split's chi-square test at the last decision
ROUTER_CANDIDATE_WEIGHT = "abfleet_router_candidate_weight"  # percent of users sent to the candidate
REGISTRY_ALIAS = "abfleet_registry_alias_info"  # 1; labels: alias, model_version (what the registry says)

# Whole-request latency buckets: fine where the hot path lives, coarse in the tail.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


def _strip_total(name: str) -> str:
    # prometheus_client appends `_total` to counters itself.
    return name[: -len("_total")] if name.endswith("_total") else name


class ServerMetrics:
    """The collectors a model server updates; one instance per process."""

    def __init__(self, registry=None):
        from prometheus_client import REGISTRY, Counter, Gauge, Histogram

        registry = registry or REGISTRY
        self.registry = registry
        self.requests = Counter(
            _strip_total(REQUESTS), "HTTP requests answered", ["variant", "model_version", "endpoint", "status"],
            registry=registry,
        )
        self.latency = Histogram(
            LATENCY, "Whole-request latency", ["variant", "endpoint"], buckets=LATENCY_BUCKETS, registry=registry
        )
        self.ratings = Counter(
            _strip_total(RATINGS), "Star ratings by stars", ["variant", "model_version", "stars"], registry=registry
        )
        self.quick = Counter(
            _strip_total(QUICK_FEEDBACK), "Quick feedback by kind", ["variant", "model_version", "kind"],
            registry=registry,
        )
        self.ape_count = Counter(
            _strip_total(APE_COUNT), "Reported actual prices", ["variant", "model_version"], registry=registry
        )
        self.ape_sum = Counter(
            _strip_total(APE_SUM), "Sum of absolute percentage errors", ["variant", "model_version"],
            registry=registry,
        )
        self.ape_sum_sq = Counter(
            _strip_total(APE_SUM_SQ), "Sum of squared absolute percentage errors", ["variant", "model_version"],
            registry=registry,
        )
        # 'liveall': one series per live worker; dead workers' values disappear.
        self.model_info = Gauge(
            MODEL_INFO, "The model a server holds", ["variant", "model_version", "alias", "fallback"],
            multiprocess_mode="liveall", registry=registry,
        )
        self.swaps = Counter(_strip_total(MODEL_SWAPS), "In-memory model swaps", ["variant"], registry=registry)
        self.spool_rows = Gauge(SPOOL_BACKLOG_ROWS, "Answered predictions not yet in the database",
                                multiprocess_mode="livesum", registry=registry)
        self.spool_bytes = Gauge(SPOOL_BACKLOG_BYTES, "Bytes of spooled predictions not yet in the database",
                                 multiprocess_mode="livesum", registry=registry)
        self.spool_refused = Counter(_strip_total(SPOOL_REFUSED), "Predictions refused because the spool was full",
                                     registry=registry)
        self.store_errors = Counter(_strip_total(STORE_ERRORS), "Store operations that failed", ["operation"],
                                    registry=registry)
        self.feedback_failures = Counter(_strip_total(FEEDBACK_FAILURES), "Feedback not accepted because of a fault",
                                         ["reason"], registry=registry)
        self.feedback_pending = Gauge(FEEDBACK_PENDING, "Feedback received while the database faulted, not recorded yet",
                                      multiprocess_mode="livesum", registry=registry)
        self.feedback_pending_resolved = Counter(_strip_total(FEEDBACK_PENDING_RESOLVED),
                                                 "Pending feedback that left the feedback spool, by outcome", ["outcome"],
                                                 registry=registry)
        self.ready = Gauge(READY, "1 when the server is ready (model loaded)", multiprocess_mode="livemin",
                           registry=registry)
        self.replicas_expected = Gauge(REPLICAS_EXPECTED, "Servers this server's variant should have",
                                       multiprocess_mode="livemax", registry=registry)
        self.in_flight = Gauge(REQUESTS_IN_FLIGHT, "Requests being handled", multiprocess_mode="livesum",
                               registry=registry)
        self.threads = Gauge(WORKER_THREADS, "Threads that handle requests", multiprocess_mode="livesum", registry=registry)
        self.db_checked_out = Gauge(DB_CONNECTIONS_CHECKED_OUT, "Database connections in use",
                                    multiprocess_mode="livesum", registry=registry)
        self.db_pool_size = Gauge(DB_POOL_SIZE, "Database connections the pools keep open", multiprocess_mode="livesum",
                                  registry=registry)
        self.failovers = Counter(
            _strip_total(FAILOVERS), "Requests meant for the other variant, answered here",
            ["intended", "variant", "endpoint"], registry=registry,
        )

    def count_feedback(self, row: dict) -> None:
        """Count one stored feedback row (store.record_feedback's) into the experiment's counters;
        a comment moves none of them."""
        v, mv = row["variant"], row["model_version"]
        if row["kind"] == "rating":
            self.ratings.labels(v, mv, str(int(row["feedback_value"]))).inc()
        elif row["kind"] == "quick":
            self.quick.labels(v, mv, row["feedback_type"]).inc()
        elif row["kind"] == "actual_price":
            # The APE is finite and capped (api.PriceBounds.ape): the three counters move together.
            ape = row["ape"]
            self.ape_count.labels(v, mv).inc()
            self.ape_sum.labels(v, mv).inc(ape)
            self.ape_sum_sq.labels(v, mv).inc(ape * ape)

    def prime(self, variant: str, version: str, endpoint: str) -> None:
        """Create this version's series at zero, so that Prometheus's increase() over the
        experiment window counts from the first request instead of from the first scrape."""
        for status in ("200", "422", "500", "503"):
            self.requests.labels(variant, version, endpoint, status)
        for stars in "12345":
            self.ratings.labels(variant, version, stars)
        for kind in ("accurate", "too_high", "too_low"):
            self.quick.labels(variant, version, kind)
        for counter in (self.ape_count, self.ape_sum, self.ape_sum_sq):
            counter.labels(variant, version)
        for outcome in ("stored", "duplicate", "refused", "expired"):
            self.feedback_pending_resolved.labels(outcome)
        for other in ("production", "candidate"):
            if other != variant:
                self.failovers.labels(other, variant, endpoint)
