"""The one home of configuration: a typed settings object read from the environment.

Every default is the local stack's value, so `Settings()` with an empty environment
describes the fleet that `abfleet up` starts on loopback. Each field is read from
`ABFLEET_<FIELD>` (upper case), except the few that follow a wider convention
(`DATABASE_URL`, `MLFLOW_TRACKING_URI`, `VARIANT`).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from abfleet.decision import DecisionPolicy

VARIANTS = ("production", "candidate")
DRIFT_VERDICTS = ("features", "share")


def default_run_dir() -> Path:
    """Where the fleet keeps its state unless told otherwise (ABFLEET_RUN_DIR)."""
    # In a checkout the run directory sits beside the code (and is git-ignored);
    # an installed package keeps its state in the user's home.
    root = Path(__file__).resolve().parents[1]
    if (root / "pyproject.toml").exists():
        return root / ".run"
    return Path.home() / ".abfleet"


def project_root() -> Path:
    """The folder holding `router/`, `monitoring/`, `dags/` and `inference/`."""
    return Path(__file__).resolve().parents[1]


# Environment names that do not follow the ABFLEET_ prefix.
_ALIASES = {
    "database_url": "DATABASE_URL",
    "mlflow_tracking_uri": "MLFLOW_TRACKING_URI",
    "variant": "VARIANT",
    "prometheus_multiproc_dir": "PROMETHEUS_MULTIPROC_DIR",
}



def with_driver(url: str) -> str:
    """`url` naming the PostgreSQL driver that is installed (psycopg2) where it names none:
    SQLAlchemy 2.1 reads a plain `postgresql://` as psycopg 3. Other URLs are returned as given."""
    for plain in ("postgresql://", "postgres://"):
        if url.startswith(plain):
            return "postgresql+psycopg2://" + url[len(plain):]
    return url

@dataclass(frozen=True)
class Settings:
    run_dir: Path = field(default_factory=default_run_dir)
    model_name: str = "bengaluru-home-price"
    variant: str = "production"

    host: str = "127.0.0.1"
    router_port: int = 7000
    production_port: int = 6001
    candidate_port: int = 6002
    mlflow_port: int = 5000
    prometheus_port: int = 9090
    alertmanager_port: int = 9093
    airflow_port: int = 8080

    # Candidate share of users, in percent; production gets the rest. The fleet's weight
    # is the store's `candidate_weight` row when one is written (the local stack writes it);
    # this value is the fallback, and the router of compose and AWS renders it at start.
    candidate_weight: int = 20

    # Empty means "the local stack's default", filled in by the properties below.
    database_url: str = ""
    mlflow_tracking_uri: str = ""
    # Object store: a local directory unless a bucket is named.
    s3_bucket: str = ""
    s3_endpoint_url: str = ""
    s3_prefix: str = "abfleet"
    # Empty means the local stack's Prometheus on prometheus_port.
    prometheus_url: str = ""
    # Called with the decision on every promote and rollback (optional). The local stack's
    # Alertmanager sends its alerts here too, to the `page` and `ticket` receivers
    # (Alertmanager's webhook JSON: `receiver`, `alerts`, `status`).
    webhook_url: str = ""
    # The local Alertmanager's `deadmans-switch` receiver: the always-firing Watchdog alert,
    # re-sent every minute, for a service that alarms when it stops arriving (optional).
    watchdog_url: str = ""
    # Where the pipeline reaches each model server (for the reload call after a decision);
    # empty means the local stack's loopback port. Compose: http://infer-prod:8000.
    production_url: str = ""
    candidate_url: str = ""
    # Every replica of a variant, comma-separated (compose, AWS: each replica's own address);
    # empty means production_url / candidate_url alone, else the local stack's replica ports.
    production_urls: str = ""
    candidate_urls: str = ""

    # Model servers per variant in the local stack (`abfleet up --replicas N`); more than one
    # needs PostgreSQL. Servers export it as the count their variant should have (compose: set
    # it to the --scale used). Replica i (from 0) listens on the i-th of production_ports /
    # candidate_ports (comma-separated), else on the variant's port + 2 i.
    replicas: int = 1
    production_ports: str = ""
    candidate_ports: str = ""

    # A retrained model becomes @candidate only if its held-out median APE is at most this
    # much (relative) worse than production's on the same rows.
    offline_margin: float = 0.05

    # Drift: traffic of the last drift_days days against production's training data; fewer
    # than drift_min_rows predictions give "insufficient data" (Evidently's tests raise false
    # alarms below a few hundred rows).
    drift_days: float = 7.0
    drift_min_rows: int = 500
    # The hourly check that both arms get the same inputs needs this many rows in each arm:
    # Evidently's drift thresholds flag same-distribution samples of a few hundred rows.
    arms_min_rows: int = 1000
    # The most predictions a job reads for one side of a comparison (the drift job's current
    # window, each arm of the hourly check): a deterministic sample drawn in the database
    # (abfleet.sampling), whatever the traffic; counts are aggregated there too.
    pipeline_sample_rows: int = 5000
    # The dataset-level drift verdict: "features" (drift when any of the model's inputs
    # drifts; the estimate and the actual price are reported beside it as prediction and
    # target drift), or "share" (Evidently's rule: at least drift_share of all compared
    # columns drifted).
    drift_verdict: str = "features"
    drift_share: float = 0.5
    # A numerical input drifts when its distance to the reference is at least this (see
    # abfleet.drift.DriftPolicy.num_threshold; Evidently's own is 0.1).
    drift_num_threshold: float = 0.15
    # `abfleet bench pipeline`: a PostgreSQL server on which it may create (and drop) a scratch database.
    bench_postgres_url: str = ""

    workers: int = 2
    threads: int = 4
    # Where gunicorn listens; empty means host:port of this variant.
    bind: str = ""
    # Each gunicorn worker writes its metrics here; /metrics sums them (multiprocess mode).
    # Empty means <run_dir>/metrics/<variant>.
    prometheus_multiproc_dir: str = ""

    # The prediction spool (abfleet.spool): where answered predictions wait for the database.
    # Empty means a folder derived from the database URL, the same for every process.
    spool_dir: str = ""
    spool_fsync: bool = False
    spool_linger: float = 0.2
    # Bounds of one worker's backlog while the database is away: beyond either, a prediction
    # is refused (503 with Retry-After) rather than held in memory and disk without end.
    spool_max_rows: int = 200_000
    spool_max_bytes: int = 256 << 20
    # Feedback received while the database faults waits in a small feedback spool in the same
    # folder (abfleet.feedback_spool) and is answered 202; beyond this many pending items per
    # worker it is refused (503 with Retry-After). Pending feedback whose prediction is still
    # unknown this many seconds after it was received is dropped (it never existed, or its
    # spool was lost).
    feedback_spool_max_rows: int = 10_000
    feedback_pending_max_age_s: float = 3600.0

    # A hung database must not hang a server: a connection attempt, a statement, and a wait for
    # a pooled connection each give up after these many seconds (PostgreSQL's connect_timeout
    # and statement_timeout; SQLite's busy timeout). Predictions never wait for the database.
    db_connect_timeout_s: float = 3.0
    db_statement_timeout_s: float = 5.0
    # Commands and the pipeline's jobs (evaluation, drift, training) aggregate over every row of
    # an experiment: a statement of theirs may take this long (a week at 10 requests/s is
    # millions of rows). Below the evaluation task's 10-minute timeout.
    job_statement_timeout_s: float = 300.0
    # How often a server pings the database (for /api/ready and /api/health) and re-reads the
    # fleet state it exports on /metrics, in the background: requests only read the results.
    db_check_interval_s: float = 5.0

    # Re-raise errors in the CLI instead of printing one line.
    debug: bool = False
    # How often a server re-reads its registry alias (seconds).
    reload_interval: float = 15.0
    # Shared secret for POST /api/admin/reload; empty disables the endpoint.
    admin_token: str = ""
    # A file holding that secret when admin_token is empty (a compose or ECS secret);
    # empty means <run_dir>/admin-token, which the local stack creates.
    admin_token_file: str = ""
    max_body_bytes: int = 64 * 1024

    # Feedback: accepted this many days after the estimate, from the user who got it.
    feedback_window_days: float = 7.0
    # Feedback for a prediction this server cannot see yet (still in another replica's spool,
    # inserted within about spool_linger) looks again for up to this long before its 404.
    feedback_settle_s: float = 2.0
    # How long a reload call waits for the server's other workers to re-read the registry.
    reload_wait_s: float = 20.0
    # An actual price (lakhs) outside these bounds, or further than the ratio from the
    # estimate either way, is refused: one absurd price must not move the APE numbers.
    actual_price_min_lakhs: float = 1.0
    actual_price_max_lakhs: float = 100000.0
    actual_price_max_ratio: float = 20.0
    # The router's limits per client address (nginx limit_req / limit_conn), for people:
    # a person asks an estimate every few seconds; 10/s with a burst of 20 leaves room for a
    # household or office behind one NAT address. The rest of /api/ shares this zone.
    router_predict_rate: float = 10.0
    router_predict_burst: int = 20
    # One rating per estimate: 2/s with a burst of 5 is more than any person clicks.
    router_feedback_rate: float = 2.0
    router_feedback_burst: int = 5
    # Requests in flight at once per address: a browser opens 6 per host; 20 covers a small NAT.
    router_connections_per_address: int = 20
    # Comma-separated addresses or CIDRs whose X-Forwarded-For names the client (the load
    # balancer in front of the router); empty: the router is reached directly.
    router_trusted_proxies: str = ""
    # Comma-separated origins (scheme://host[:port]) whose pages may call the API from the
    # browser (CORS, answered by the router); empty: the page's own origin only.
    cors_origins: str = ""

    # ---- derived locations -------------------------------------------------
    @property
    def db_url(self) -> str:
        """The store's SQLAlchemy URL. A plain `postgresql://` (what compose, RDS and most
        tools write) names the driver that is installed: SQLAlchemy 2.1 would pick psycopg 3."""
        return with_driver(self.database_url or f"sqlite:///{self.run_dir / 'store.db'}")

    @property
    def tracking_uri(self) -> str:
        return self.mlflow_tracking_uri or self.local_url(self.mlflow_port)

    def local_url(self, port: int) -> str:
        """The URL of a local-stack process listening on `port` of `host`."""
        return f"http://{self.host}:{port}"

    @property
    def router_url(self) -> str:
        return self.local_url(self.router_port)

    @property
    def prometheus_api(self) -> str:
        """Where Prometheus answers queries: prometheus_url, else the local stack's."""
        return (self.prometheus_url or self.local_url(self.prometheus_port)).rstrip("/")

    @property
    def airflow_url(self) -> str:
        return self.local_url(self.airflow_port)

    @property
    def admin_token_path(self) -> Path:
        return Path(self.admin_token_file) if self.admin_token_file else self.run_dir / "admin-token"

    @property
    def artifact_destination(self) -> str:
        """Where the MLflow server keeps artifacts: S3 when a bucket is set."""
        if self.s3_bucket:
            return f"s3://{self.s3_bucket}/{self.s3_prefix}/mlflow"
        return (self.run_dir / "objects" / "mlflow").as_uri()

    @property
    def weights(self) -> dict[str, float]:
        c = self.candidate_weight / 100.0
        return {"production": round(1.0 - c, 4), "candidate": round(c, 4)}

    def port_of(self, variant: str) -> int:
        return self.production_port if variant == "production" else self.candidate_port

    def server_url(self, variant: str) -> str:
        url = self.production_url if variant == "production" else self.candidate_url
        return (url or self.local_url(self.port_of(variant))).rstrip("/")

    def replica_ports(self, variant: str) -> list[int]:
        """The local stack's port of each replica of `variant` (the first is port_of(variant))."""
        if self.replicas <= 1:
            return [self.port_of(variant)]
        listed = self.production_ports if variant == "production" else self.candidate_ports
        ports = [int(p) for p in listed.split(",") if p.strip()]
        if ports:
            return ports[:self.replicas]
        return [self.port_of(variant) + 2 * i for i in range(self.replicas)]

    def replica_names(self, variant: str) -> list[str]:
        """Each replica's name (pid file, log, folders, Prometheus's `replica` label): the
        variant's name alone with one replica; `production-1`, `production-2`... with several."""
        if self.replicas <= 1:
            return [variant]
        return [f"{variant}-{i + 1}" for i in range(len(self.replica_ports(variant)))]

    def server_urls(self, variant: str) -> list[str]:
        """Where the pipeline reaches every replica of `variant` (for the reload call)."""
        listed = self.production_urls if variant == "production" else self.candidate_urls
        urls = [u.strip().rstrip("/") for u in listed.split(",") if u.strip()]
        if urls:
            return urls
        if self.replicas <= 1 or (self.production_url if variant == "production" else self.candidate_url):
            return [self.server_url(variant)]
        return [self.local_url(port) for port in self.replica_ports(variant)]

    @property
    def bind_address(self) -> str:
        """Where this variant's gunicorn listens."""
        return self.bind or f"{self.host}:{self.port_of(self.variant)}"

    @property
    def metrics_dir(self) -> Path:
        """This variant's prometheus_client multiprocess folder."""
        if self.prometheus_multiproc_dir:
            return Path(self.prometheus_multiproc_dir)
        return self.run_dir / "metrics" / self.variant

    @property
    def trusted_proxies(self) -> list[str]:
        """router_trusted_proxies as a list of networks (addresses become /32 or /128)."""
        return [str(ipaddress.ip_network(item.strip(), strict=False))
                for item in self.router_trusted_proxies.split(",") if item.strip()]

    @property
    def allowed_origins(self) -> list[str]:
        """cors_origins as a list of origins; raises ValueError for anything else."""
        origins = [item.strip().rstrip("/") for item in self.cors_origins.split(",") if item.strip()]
        for origin in origins:
            if not _ORIGIN.fullmatch(origin):
                raise ValueError(f"{origin!r} is not an origin (scheme://host[:port])")
        return origins

    def replace(self, **changes) -> "Settings":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides) -> "Settings":
        """Settings from `environ` (default: os.environ), then explicit overrides."""
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for f in dataclasses.fields(cls):
            name = _ALIASES.get(f.name, f"ABFLEET_{f.name.upper()}")
            raw = env.get(name)
            if raw is None or raw == "":
                continue
            values[f.name] = _convert(f, raw, name)
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"VARIANT must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        if not 0 <= self.candidate_weight <= 100:
            raise ValueError(f"ABFLEET_CANDIDATE_WEIGHT must be 0..100, got {self.candidate_weight}")
        if not self.feedback_window_days > 0:
            raise ValueError(f"ABFLEET_FEEDBACK_WINDOW_DAYS must be > 0, got {self.feedback_window_days}")
        if not 0 < self.actual_price_min_lakhs < self.actual_price_max_lakhs < float("inf"):
            raise ValueError("need 0 < ABFLEET_ACTUAL_PRICE_MIN_LAKHS < ABFLEET_ACTUAL_PRICE_MAX_LAKHS (finite), got "
                             f"{self.actual_price_min_lakhs} and {self.actual_price_max_lakhs}")
        if not 1 <= self.actual_price_max_ratio < float("inf"):
            raise ValueError(f"ABFLEET_ACTUAL_PRICE_MAX_RATIO must be >= 1 and finite, got {self.actual_price_max_ratio}")
        for name in ("router_predict_rate", "router_feedback_rate"):
            # nginx counts in requests per minute at the finest: one a minute is the floor.
            if not getattr(self, name) >= 1 / 60:
                raise ValueError(f"ABFLEET_{name.upper()} must be at least 1/60 (requests per second), got {getattr(self, name)}")
        for name, floor in (("router_predict_burst", 0), ("router_feedback_burst", 0), ("router_connections_per_address", 1)):
            if getattr(self, name) < floor:
                raise ValueError(f"ABFLEET_{name.upper()} must be at least {floor}, got {getattr(self, name)}")
        if self.feedback_spool_max_rows < 0:
            raise ValueError(f"ABFLEET_FEEDBACK_SPOOL_MAX_ROWS must be >= 0, got {self.feedback_spool_max_rows}")
        if self.pipeline_sample_rows < max(self.drift_min_rows, self.arms_min_rows):
            raise ValueError(f"ABFLEET_PIPELINE_SAMPLE_ROWS must be at least ABFLEET_DRIFT_MIN_ROWS and ABFLEET_ARMS_MIN_ROWS "
                             f"(else no verdict is ever possible), got {self.pipeline_sample_rows}")
        if self.drift_verdict not in DRIFT_VERDICTS:
            raise ValueError(f"ABFLEET_DRIFT_VERDICT must be one of {', '.join(DRIFT_VERDICTS)}, got {self.drift_verdict!r}")
        if not 0 < self.drift_share <= 1:
            raise ValueError(f"ABFLEET_DRIFT_SHARE must be in (0, 1], got {self.drift_share}")
        if self.replicas < 1:
            raise ValueError(f"ABFLEET_REPLICAS must be at least 1, got {self.replicas}")
        for variant in VARIANTS:
            listed = getattr(self, f"{variant}_ports")
            try:
                ports = [int(p) for p in listed.split(",") if p.strip()]
            except ValueError:
                raise ValueError(f"ABFLEET_{variant.upper()}_PORTS must be comma-separated ports, got {listed!r}") from None
            if ports and len(ports) < self.replicas:
                raise ValueError(f"ABFLEET_{variant.upper()}_PORTS names {len(ports)} ports for {self.replicas} replicas")
        if not 0 <= self.feedback_settle_s < float("inf"):
            raise ValueError(f"ABFLEET_FEEDBACK_SETTLE_S must be >= 0 seconds, got {self.feedback_settle_s}")
        for name in ("db_connect_timeout_s", "db_statement_timeout_s", "job_statement_timeout_s", "db_check_interval_s",
                     "feedback_pending_max_age_s",
                     "reload_wait_s"):
            if not 0 < getattr(self, name) < float("inf"):
                raise ValueError(f"ABFLEET_{name.upper()} must be a positive number of seconds, got {getattr(self, name)}")
        try:
            _ = self.trusted_proxies
        except ValueError as exc:
            raise ValueError(f"ABFLEET_ROUTER_TRUSTED_PROXIES must be comma-separated addresses or CIDRs: {exc}") from None

        try:
            _ = self.allowed_origins
        except ValueError as exc:
            raise ValueError(f"ABFLEET_CORS_ORIGINS must be comma-separated origins like https://example.org: {exc}") from None

    def env(self) -> dict[str, str]:
        """These settings as environment variables, for child processes."""
        out = {}
        for f in dataclasses.fields(self):
            name = _ALIASES.get(f.name, f"ABFLEET_{f.name.upper()}")
            value = getattr(self, f.name)
            if value != "":
                out[name] = str(value)
        out["DATABASE_URL"] = self.db_url
        out["MLFLOW_TRACKING_URI"] = self.tracking_uri
        if self.s3_endpoint_url:
            out["MLFLOW_S3_ENDPOINT_URL"] = self.s3_endpoint_url
        return out


# An origin as a browser sends it: http(s), a host name or IPv4/[IPv6] address, an optional port.
_ORIGIN = re.compile(r"https?://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(:[0-9]{1,5})?")


def _convert(f: dataclasses.Field, raw: str, name: str) -> object:
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    if kind == "bool":
        if raw.strip().lower() in ("1", "true", "yes", "on"):
            return True
        if raw.strip().lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{name}={raw!r} is not a valid bool (use 1/0, true/false, yes/no)")
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind == "Path":
            return Path(raw).expanduser().resolve()
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a valid {kind}") from None
    return raw


def decision_policy(environ: Mapping[str, str] | None = None) -> DecisionPolicy:
    """The decision thresholds: defaults overridden by ABFLEET_DECISION_<FIELD> (from
    `environ`, default os.environ); raises ValueError on bad values."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for f in dataclasses.fields(DecisionPolicy):
        name = f"ABFLEET_DECISION_{f.name.upper()}"
        raw = env.get(name)
        if raw is None or raw.strip() == "":
            continue
        kind = type(f.default)  # int or float: the default fixes the type
        try:
            values[f.name] = kind(raw.strip())
        except ValueError:
            raise ValueError(f"{name}={raw!r} is not a valid {kind.__name__}") from None
    return DecisionPolicy(**values)


def set_mlflow_client_defaults() -> None:
    """Quick retries and a timeout for MLflow's HTTP client, unless the environment sets them.

    Artifact up/downloads go through the tracking server (proxied), so clients need no
    object-store credentials; quick retries keep a dead server from hanging a command."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


def process_environ(extra: Mapping[str, str] | None = None, *, python_path: Sequence[str | Path] = ()) -> dict[str, str]:
    """This process's environment plus `extra`: what a child process is started with;
    `python_path` folders go first on its PYTHONPATH."""
    env = {**os.environ, **(extra or {})}
    if python_path:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [*map(str, python_path), env.get("PYTHONPATH")]))
    return env


def in_ci(environ: Mapping[str, str] | None = None) -> bool:
    """True under a CI runner (CI set to anything but empty/false): never wait for a person."""
    env = os.environ if environ is None else environ
    return env.get("CI", "").strip().lower() not in ("", "0", "false", "no")
