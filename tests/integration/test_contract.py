"""The API as a contract, against the live fleet through its router: what the original
project's clients rely on, the OpenAPI document and its reference page, and Schemathesis
generating a few hundred requests from the document with every check on."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from prometheus_client import CONTENT_TYPE_LATEST

from abfleet import api, openapi
from tests.helpers import OUTPUT_DIR, wait_for

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent
USER = {"X-User-Id": "contract-user"}


def test_the_original_clients_get_what_they_expect(fleet):
    url = fleet.router_url
    health = requests.get(f"{url}{api.HEALTH}", timeout=10)
    body = health.json()
    assert health.status_code == 200 and body["status"] == "healthy", body
    assert body["model_variant"] in ("production", "candidate") and body["timestamp"]
    assert body["model_version"] and "store_reachable" in body  # ours stay

    # The original page posts a form and types the location as it likes.
    form = {"location": "  indira   NAGAR ", "total_sqft": "1200", "bhk": "2", "bath": "2"}
    r = requests.post(f"{url}{api.PREDICT}", data=form, headers=USER, timeout=10)
    assert r.status_code == 200, r.text
    estimate = r.json()
    assert estimate["location"] == "Indira Nagar" and estimate["estimated_price"] > 0 and estimate["response_time_ms"] >= 0
    unknown = requests.post(f"{url}{api.PREDICT}", json={**api.FLAT, "location": "Indiranagar"}, headers=USER, timeout=10)
    assert unknown.status_code == 422 and "'Indira Nagar'" in unknown.json()["error"]

    pid = estimate["prediction_id"]
    comment = {"prediction_id": pid, "feedback_type": "comment", "feedback_text": "looks about right"}
    assert requests.post(f"{url}{api.FEEDBACK}", json=comment, headers=USER, timeout=10).status_code == 201
    rated = {"prediction_id": pid, "feedback_type": "rating", "feedback_value": 5, "feedback_text": "great"}
    assert requests.post(f"{url}{api.FEEDBACK}", json=rated, headers=USER, timeout=10).status_code == 201
    # Where the original was wrong we stay right.
    assert requests.post(f"{url}{api.FEEDBACK}", json=rated, headers=USER, timeout=10).status_code == 409
    assert requests.post(f"{url}{api.FEEDBACK}", json={"prediction_id": pid}, headers=USER, timeout=10).status_code == 422
    assert requests.post(f"{url}{api.FEEDBACK}", json={**rated, "prediction_id": "ab" * 16}, headers=USER,
                         timeout=10).status_code == 404
    stored = {f["kind"]: f["feedback_text"] for f in fleet.store.feedback_for(pid)}
    assert stored == {"comment": "looks about right", "rating": "great"}

    # The summary of the variant that answers this user counts the estimate and the rating.
    def summary() -> dict:
        r = requests.get(f"{url}{api.METRICS_SUMMARY}?hours=1", headers=USER, timeout=10)
        assert r.status_code == 200, r.text
        return r.json()

    seen = wait_for(lambda: (s := summary())["predictions"]["total_count"] >= 1 and s, 30, what="the prediction counted")
    assert seen["variant"] == r.headers["X-Variant"] and seen["time_period_hours"] == 1
    assert seen["feedback"]["total_count"] >= 2 and seen["feedback"]["avg_rating"] is not None
    bad = requests.get(f"{url}{api.METRICS_SUMMARY}?hours=forever", timeout=10)
    assert bad.status_code == 422 and bad.json()["field"] == "hours"

    drift = requests.get(f"{url}{api.DRIFT_REPORT}", timeout=10)
    assert drift.status_code == 200 and drift.json()["status"] in ("success", "no_current_data")
    for variant in ("production", "candidate"):
        metrics = requests.get(f"{fleet.server_url(variant)}{api.METRICS}", timeout=10)
        assert metrics.headers["Content-Type"] == CONTENT_TYPE_LATEST


def test_the_document_and_its_reference_page(fleet):
    url = fleet.router_url
    served = requests.get(f"{url}{api.OPENAPI}", timeout=10)
    assert served.status_code == 200 and served.json() == openapi.document()
    page = requests.get(f"{url}{api.DOCS}", timeout=10)
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]
    scripts = re.findall(r'<script src="([^"]+)"', page.text)
    assert scripts == ["/docs.js"] and "//" not in "".join(re.findall(r'(?:src|href)="([^"]+)"', page.text)), \
        "the page loads nothing from another host"
    script = requests.get(f"{url}{scripts[0]}", timeout=10)
    assert script.status_code == 200 and api.OPENAPI in script.text


def test_schemathesis_finds_nothing(fleet):
    """Every operation, every check, through the router; the report is kept in test-output/."""
    OUTPUT_DIR.mkdir(exist_ok=True)
    report = OUTPUT_DIR / "schemathesis-junit.xml"
    command = [str(Path(sys.executable).parent / "schemathesis"), "--config-file", str(HERE / "schemathesis.toml"),
               "run", f"{fleet.router_url}{api.OPENAPI}", "--checks", "all", "--max-examples", "10",
               "--seed", "10", "--generation-database", "none", "--no-color", "--workers", "2",
               "-H", f"X-User-Id: {USER['X-User-Id']}-fuzz", "--report", "junit", "--report-junit-path", str(report)]
    # Run from test-output/: Schemathesis keeps its cache (.schemathesis/) in the working directory.
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=OUTPUT_DIR)
    out = done.stdout + done.stderr
    (OUTPUT_DIR / "schemathesis.txt").write_text(out)
    assert done.returncode == 0, out[-6000:]
    generated = int(re.search(r"(\d+) generated", out)[1])
    assert generated >= 300, out[-2000:]
    assert "No issues found" in out
    # Every operation was tested, except the document Schemathesis reads the others from.
    tested = set(re.findall(r'testcase[^>]*name="([A-Z]+ /[^"]*)"', report.read_text()))
    expected = {f"{method.upper()} {path}" for path, item in openapi.document()["paths"].items() for method in item}
    assert tested == expected - {f"GET {api.OPENAPI}"}, tested
