"""Locust users of the fleet, as `abfleet load` runs them against the router.

Each simulated person keeps one identity (an X-User-Id header, or the router's cookie for
those who send none, as a browser does), opens the page's location list, asks for estimates
on realistic flats (real rows when the dataset is present, else synthetic ones, within the
API's bounds), rates a share of them by how far the estimate is from the flat's true price,
and sometimes reports the actual price.

Runs in Locust's own process: it must not import MLflow (gevent's monkey-patching and
MLflow's imports do not mix in one process).
"""

from __future__ import annotations

import random
import uuid

from locust import HttpUser, between, constant_throughput, events, task

from abfleet.api import FEEDBACK, LOCATIONS, PREDICT
from abfleet.load import realistic_rows, stars_for

RATE_SHARE = 0.35  # of answered estimates, the share a person rates with stars
ACTUAL_SHARE = 0.10  # ... and the share whose actual price is reported
QUICK_SHARE = 0.10  # ... and the share given a quick verdict (accurate / too high / too low)

ROWS: list[dict] = []


@events.init.add_listener
def _load_rows(environment, **_kwargs) -> None:
    ROWS.extend(realistic_rows(2000, seed=random.randrange(1 << 30)))


class HomeBuyer(HttpUser):
    wait_time = between(0.2, 1.0)

    def on_start(self) -> None:
        self.uses_cookie = random.random() < 0.5
        self.headers = {} if self.uses_cookie else {"X-User-Id": f"locust-{uuid.uuid4().hex[:12]}"}
        self.variant: str | None = None
        with self.client.get(LOCATIONS, headers=self.headers, catch_response=True) as r:
            if r.status_code != 200 or not r.json().get("locations"):
                r.failure(f"location names: {r.status_code} {r.text[:200]}")

    @task
    def estimate_and_maybe_rate(self) -> None:
        row = random.choice(ROWS)
        body = {k: row[k] for k in ("location", "total_sqft", "bhk", "bath")}
        with self.client.post(PREDICT, json=body, headers=self.headers, catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"{r.status_code}: {r.text[:200]}")
                return
            answer = r.json()
            if not answer.get("estimated_price", 0) > 0 or not answer.get("prediction_id"):
                r.failure(f"no estimate in {r.text[:200]}")
                return
            variant = r.headers.get("X-Variant")
            if self.variant is None:
                self.variant = variant
            elif variant != self.variant:
                r.failure(f"user moved from {self.variant} to {variant}: the split must be sticky")
                return
        pid, estimate = answer["prediction_id"], answer["estimated_price"]
        if random.random() < RATE_SHARE:
            self._feedback(pid, "rating", stars_for(estimate, row["price"]))
        if random.random() < QUICK_SHARE:
            ratio = estimate / row["price"]
            self._feedback(pid, "accurate" if 0.9 <= ratio <= 1.1 else ("too_high" if ratio > 1 else "too_low"), None)
        if random.random() < ACTUAL_SHARE:
            self._feedback(pid, "actual_price", row["price"])

    def _feedback(self, pid: str, kind: str, value) -> None:
        body = {"prediction_id": pid, "feedback_type": kind, "feedback_value": value}
        with self.client.post(FEEDBACK, json=body, headers=self.headers, name=f"{FEEDBACK} [{kind}]",
                              catch_response=True) as r:
            if r.status_code != 201:
                r.failure(f"{r.status_code}: {r.text[:200]}")


class SteadyBuyer(HttpUser):
    """One estimate a second per user, nothing else: `abfleet load --find-capacity` offers a
    rate by the number of users."""

    wait_time = constant_throughput(1)

    @task
    def estimate(self) -> None:
        row = random.choice(ROWS)
        body = {k: row[k] for k in ("location", "total_sqft", "bhk", "bath")}
        with self.client.post(PREDICT, json=body, catch_response=True) as r:
            if r.status_code != 200 or not r.json().get("estimated_price", 0) > 0:
                r.failure(f"{r.status_code}: {r.text[:200]}")
