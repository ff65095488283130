"""Locust users of `abfleet soak` (its locustfile; `abfleet.soak` runs Locust on it).

Each simulated person keeps one identity and asks for estimates of realistic flats at a
steady pace; every answer is written as one JSON line to the file `--soak-log` names (sent
at, status, milliseconds, prediction id, variant, model version), from which the soak counts
what was answered in each phase and checks the store holds every answered prediction.

Runs in Locust's own process only: Locust patches the standard library with gevent when it
is imported, which breaks a process that has imported MLflow. Nothing imports this module.
"""

from __future__ import annotations

import json
import time
import uuid

from locust import HttpUser, constant_throughput, events, task

from abfleet.api import PREDICT
from abfleet.data import FEATURES
from abfleet.load import realistic_rows

ROWS: list[dict] = []
OUT: dict = {}


@events.init_command_line_parser.add_listener
def _options(parser) -> None:
    parser.add_argument("--soak-log", default="soak-requests.jsonl", help="one JSON line per prediction goes here")
    parser.add_argument("--soak-user-rate", type=float, default=1.0, help="predictions per second of each user")


@events.init.add_listener
def _open(environment, **_kwargs) -> None:
    ROWS.extend(realistic_rows(1000, seed=7))
    OUT["file"] = open(environment.parsed_options.soak_log, "a", buffering=1)  # noqa: SIM115 - closed at quit


@events.quitting.add_listener
def _close(environment, **_kwargs) -> None:
    if "file" in OUT:
        OUT["file"].close()


class Asker(HttpUser):
    def wait_time(self) -> float:
        return constant_throughput(self.environment.parsed_options.soak_user_rate)(self)

    def on_start(self) -> None:
        self.headers = {"X-User-Id": f"soak-{uuid.uuid4().hex[:12]}"}
        self.n = 0

    @task
    def estimate(self) -> None:
        row = ROWS[(hash(self.headers["X-User-Id"]) + self.n) % len(ROWS)]
        self.n += 1
        sent, t0 = time.time(), time.perf_counter()
        pid = None
        with self.client.post(PREDICT, json={k: row[k] for k in FEATURES}, headers=self.headers, timeout=30,
                              catch_response=True) as r:
            ms = (time.perf_counter() - t0) * 1000.0
            if r.status_code == 200:
                try:
                    pid = r.json()["prediction_id"]
                except (ValueError, KeyError):
                    r.failure(f"no prediction id in {r.text[:200]}")
            else:
                r.failure(f"{r.status_code}: {(r.text or '')[:200]}")
        OUT["file"].write(json.dumps({"t": sent, "status": r.status_code, "ms": round(ms, 2), "id": pid,
                                      "variant": r.headers.get("X-Variant"),
                                      "version": r.headers.get("X-Model-Version")}) + "\n")
