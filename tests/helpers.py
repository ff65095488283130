"""Helpers the test modules share (conftest holds fixtures; import helpers from here)."""

from __future__ import annotations

import contextlib
import json
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import requests
from flask import Flask

from abfleet import api, data, migrations, procs, router
from abfleet.model import FastPredictor
from abfleet.pgserver import family
from abfleet.procs import free_port
from abfleet.serving import ModelHolder
from abfleet.settings import Settings
from abfleet.store import Store
from inference.backend.app import create_app
from inference.backend.parts import stop_background

__all__ = ["ROOT", "OUTPUT_DIR", "free_port", "wait_for", "fleet_settings", "migrate", "app_serving", "start_model_server",
           "health", "answering", "router_in_front", "trained_stack", "FixedSamples", "Load", "family"]

ROOT = Path(__file__).resolve().parents[1]
OUTPUT_DIR = ROOT / "test-output"


def wait_for(predicate, timeout: float = 60.0, interval: float = 0.25, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def fleet_settings(run_dir: Path, **overrides) -> Settings:
    ports = {name: free_port() for name in
             ("router_port", "production_port", "candidate_port", "mlflow_port", "prometheus_port",
              "alertmanager_port", "airflow_port")}
    # The tests drive many users' traffic from one address: the router's limits are for people.
    defaults = {"reload_interval": 2.0, "admin_token": "test-token", **router.ONE_ADDRESS_LIMITS}
    return Settings(run_dir=run_dir, **{**defaults, **ports, **overrides})


def migrate(settings: Settings) -> Settings:
    """Create the store's tables as `abfleet db upgrade` does before servers start (a server
    never creates them); returns the settings, for use in an expression."""
    migrations.upgrade(settings.db_url)
    return settings


@contextlib.contextmanager
def app_serving(settings: Settings, predictor: FastPredictor, version: str) -> Iterator[Flask]:
    """The model server's Flask app holding `predictor` as `version`, over the settings' store
    (migrated first), its first background database check done; its background threads
    stopped and its spool flushed afterwards."""
    store = Store(migrate(settings).db_url)
    app = create_app(settings, holder=ModelHolder.fixed(settings, predictor, version), store=store)
    app.extensions["abfleet"]["database"].check()
    yield app
    stop_background(app.extensions["abfleet"])
    store.stop_spool()


def start_model_server(settings: Settings, variant: str = "production", *, log: Path, metrics_dir: Path,
                       abfleet: str | Path | None = None, cwd: Path | None = None,
                       inherit_pythonpath: bool = True) -> subprocess.Popen:
    """`abfleet serve` for one variant with these settings, as the stack starts it, in its own
    session; stop it with `procs.stop_child(proc)`. `abfleet` picks another installation's
    command (a venv of its own, started without our PYTHONPATH when inherit_pythonpath is False)."""
    settings = settings.replace(variant=variant, prometheus_multiproc_dir=str(metrics_dir))
    env = procs.child_env(settings)
    if not inherit_pythonpath:
        env.pop("PYTHONPATH", None)
    command = [str(abfleet or procs.venv_bin("abfleet")), "serve", "--variant", variant]
    return procs.start(command, env, log, cwd=cwd)


def health(url: str) -> dict:
    """A server's health document (api.HEALTH), or {} while it does not answer."""
    try:
        return requests.get(f"{url}{api.HEALTH}", timeout=3).json()
    except (requests.RequestException, ValueError):
        return {}


@contextlib.contextmanager
def answering(status: int, body: dict | None = None) -> Iterator[tuple[str, list[dict]]]:
    """A loopback HTTP server answering every GET and POST with `status` (and `body` as JSON),
    keeping connections alive as nginx expects; yields its URL and the requests it got
    ({"method", "path", "authorization", "x_forwarded_for", "json"}) in order."""
    seen: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def answer(self):
            length = int(self.headers.get("Content-Length") or 0)
            sent = self.rfile.read(length) if length else b""
            seen.append({"method": self.command, "path": self.path, "authorization": self.headers.get("Authorization"),
                         "x_forwarded_for": self.headers.get("X-Forwarded-For"),
                         "json": json.loads(sent) if sent else None})
            payload = json.dumps(body).encode() if body is not None else b""
            self.send_response(status)
            if payload:
                self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST = answer  # http.server's names

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", seen
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def router_in_front(run_dir: Path, **settings) -> Iterator[tuple[str, list[dict]]]:
    """nginx rendered from Settings(**settings), both variants on one recording upstream
    (`answering` 200); yields the router's URL and the upstream's record."""
    s = Settings(run_dir=run_dir, router_port=free_port(), **settings)
    with answering(200, {"ok": True}) as (upstream, seen):
        address = upstream.removeprefix("http://")
        config = router.write_config(s, production_servers=[address], candidate_servers=[address])
        log = run_dir / "logs" / "router.log"
        proc = procs.start(router.nginx_command(s, config), {}, log)
        try:
            procs.wait_ready(proc, lambda: procs.answers_http(f"{s.router_url}/router/health"), name="nginx", log=log,
                             timeout=30)
            yield s.router_url, seen
        finally:
            procs.stop_child(proc)


@contextlib.contextmanager
def trained_stack(folder: Path, seed: int, params) -> Iterator[tuple[Settings, dict[str, str], Path]]:
    """A local stack of its own under `folder` (reload_interval 1 s), with a production and a
    candidate model fitted with `params` on 2,000 synthetic rows (`seed`), both servers serving
    them; yields the settings, the versions by variant and the rows' CSV. Stopped afterwards."""
    from abfleet import stack, train

    settings = fleet_settings(folder / "run", reload_interval=1.0)
    stack.up(settings, say=lambda _m: None)
    try:
        csv = folder / "rows.csv"
        data.write_raw(data.synth(2000, seed=seed), csv)
        versions = {"production": train.train(settings, csv, alias="production", params=params)["version"],
                    "candidate": train.train(settings, csv, alias="candidate", params=params, seed=1)["version"]}
        # /api/health answers from one worker: wait until every worker of both servers holds its
        # model, or an early request may meet a worker still on production's fallback.
        wait_for(lambda: all(workers_serving(settings, v, versions[v]) == settings.workers for v in versions),
                 60, what="every worker of both servers to load its model")
        yield settings, versions, csv
    finally:
        stack.down(settings, say=lambda _m: None)


def workers_serving(settings: Settings, variant: str, version: str) -> int:
    """How many workers of `variant`'s server hold `version` as its own model (not a fallback),
    from abfleet_model_info on its /metrics (one series per live worker)."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = requests.get(f"{settings.server_url(variant)}{api.METRICS}", timeout=5).text
    except requests.RequestException:
        return 0
    return sum(1 for family in text_string_to_metric_families(text) if family.name == "abfleet_model_info"
               for sample in family.samples if sample.value == 1 and sample.labels.get("model_version") == version
               and sample.labels.get("fallback") == "false")


class FixedSamples:
    """Prometheus's raw samples API over fixed series: {selector: {labels: [(t, v), ...]}}."""

    def __init__(self, series: dict):
        self.series = series

    def samples(self, selector, seconds, at):
        return {key: [p for p in points if at - seconds < p[0] <= at]
                for key, points in self.series[selector].items()
                if any(at - seconds < p[0] <= at for p in points)}


class Load:
    """Continuous predictions through the router (`router_url`) on a thread, a new user each
    time; counts every failure, and which (variant, model version) answered."""

    def __init__(self, router_url: str, rows: list[dict]):
        self.url = f"{router_url}{api.PREDICT}"
        self.rows = rows
        self.stop = threading.Event()
        self.sent = self.failed = 0
        self.failures: list[str] = []
        self.versions: set[tuple[str, str]] = set()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        session = requests.Session()
        while not self.stop.is_set():
            try:
                # Realistic, varied flats: one repeated input would make the arms' inputs
                # look different to the arms check by chance.
                row = self.rows[self.sent % len(self.rows)]
                r = session.post(self.url, json={k: row[k] for k in data.FEATURES},
                                 # A new user each time, like real traffic: a few heavy users
                                 # would skew the split and trip the SRM check.
                                 headers={"X-User-Id": f"load-{uuid.uuid4().hex[:12]}"}, timeout=20)
                self.versions.add((r.headers.get("X-Variant"), r.json().get("model_version")))
                ok = r.status_code == 200
            except Exception as exc:  # noqa: BLE001 - any failure counts
                ok, r = False, exc
            self.sent += 1
            if not ok:
                self.failed += 1
                self.failures.append(str(getattr(r, "text", r))[:200])

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(30)
