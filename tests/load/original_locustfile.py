"""The original project's load test, as its users run it: on start the location names; then
estimates posted as a form (area 500-3000 sq ft, a listed location, 1-4 bedrooms, 1-3
bathrooms) requiring 200 and a positive price, health requiring 200 and "healthy", the
metrics summary requiring a non-error status, and the location names again.

Runs in Locust's own process (tests/load/test_original_locust.py starts it): it imports
nothing of abfleet but the API's paths.
"""

from __future__ import annotations

import random

from locust import HttpUser, between, task

from abfleet.api import HEALTH, LOCATIONS, METRICS_SUMMARY, PREDICT


class OriginalUser(HttpUser):
    wait_time = between(0.5, 2.0)

    def on_start(self) -> None:
        self.locations = ["Whitefield"]
        with self.client.get(LOCATIONS, catch_response=True) as r:
            if r.status_code == 200 and r.json().get("locations"):
                self.locations = r.json()["locations"]
            else:
                r.failure(f"location names: {r.status_code} {r.text[:200]}")

    @task(6)
    def predict(self) -> None:
        form = {"total_sqft": random.randint(500, 3000), "location": random.choice(self.locations),
                "bhk": random.randint(1, 4), "bath": random.randint(1, 3)}
        with self.client.post(PREDICT, data=form, catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"{r.status_code}: {r.text[:200]}")
            elif not r.json().get("estimated_price", 0) > 0:
                r.failure(f"no positive estimate in {r.text[:200]}")

    @task(2)
    def health(self) -> None:
        with self.client.get(HEALTH, catch_response=True) as r:
            if r.status_code != 200 or r.json().get("status") != "healthy":
                r.failure(f"{r.status_code}: {r.text[:200]}")

    @task(2)
    def metrics(self) -> None:
        with self.client.get(METRICS_SUMMARY, catch_response=True) as r:
            if r.status_code >= 400:
                r.failure(f"{r.status_code}: {r.text[:200]}")

    @task(1)
    def location_names(self) -> None:
        with self.client.get(LOCATIONS, catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"{r.status_code}: {r.text[:200]}")
