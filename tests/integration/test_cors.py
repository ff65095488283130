"""CORS answered by the router (real nginx rendered by abfleet.router, a recording upstream):
a listed origin gets its own name back on answers, refusals included, and its preflights are
answered 204 without reaching a server; any other origin, and every origin by default, gets
no CORS header at all."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import requests

from abfleet import api
from abfleet import router as routing
from tests.helpers import router_in_front

pytestmark = pytest.mark.slow

ALLOWED = "http://127.0.0.1:18765"
OTHER = "http://127.0.0.1:18766"
CORS = ("Access-Control-Allow-Origin", "Access-Control-Allow-Credentials", "Access-Control-Allow-Methods",
        "Access-Control-Allow-Headers", "Access-Control-Expose-Headers", "Access-Control-Max-Age")


def router(run_dir: Path, **settings) -> contextlib.AbstractContextManager[tuple[str, list[dict]]]:
    """nginx rendered from these settings (one-address limits unless given), both variants on a
    recording upstream; yields the router's URL and what reached the upstream."""
    return router_in_front(run_dir, **{**routing.ONE_ADDRESS_LIMITS, **settings})


def preflight(url: str, path: str, origin: str) -> requests.Response:
    return requests.options(f"{url}{path}", timeout=10, headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type"})


def test_a_listed_origin_is_answered_and_its_preflight_never_reaches_a_server(tmp_path):
    with router(tmp_path, cors_origins=f"{ALLOWED},https://app.example.org") as (url, seen):
        for path in (api.FEEDBACK, api.PREDICT, api.HEALTH):
            r = preflight(url, path, ALLOWED)
            assert r.status_code == 204, (path, r.status_code, r.text)
            assert r.headers["Access-Control-Allow-Origin"] == ALLOWED
            assert r.headers["Access-Control-Allow-Credentials"] == "true"
            assert "POST" in r.headers["Access-Control-Allow-Methods"]
            assert "content-type" in r.headers["Access-Control-Allow-Headers"].lower()
            assert "Origin" in r.headers["Vary"]
        assert seen == [], "a preflight reached a server"
        answer = requests.post(f"{url}{api.FEEDBACK}", json={"x": 1}, headers={"Origin": ALLOWED}, timeout=10)
        assert answer.status_code == 200 and answer.headers["Access-Control-Allow-Origin"] == ALLOWED
        assert "X-Variant" in answer.headers["Access-Control-Expose-Headers"]
        assert "Access-Control-Allow-Methods" not in answer.headers  # preflight only
        get = requests.get(f"{url}{api.LOCATIONS}", headers={"Origin": "https://app.example.org"}, timeout=10)
        assert get.headers["Access-Control-Allow-Origin"] == "https://app.example.org"


def test_another_origin_gets_no_cors_header(tmp_path):
    with router(tmp_path, cors_origins=ALLOWED) as (url, seen):
        r = preflight(url, api.FEEDBACK, OTHER)
        assert r.status_code != 204 and not any(h in r.headers for h in CORS), dict(r.headers)
        answer = requests.post(f"{url}{api.PREDICT}", json=api.FLAT, headers={"Origin": OTHER}, timeout=10)
        assert answer.status_code == 200 and not any(h in answer.headers for h in CORS)
        # A prefix or a longer name of an allowed origin is another origin.
        for near in (ALLOWED + "0", "http://127.0.0.1:1876", ALLOWED.replace("http", "https")):
            assert "Access-Control-Allow-Origin" not in requests.get(
                f"{url}{api.HEALTH}", headers={"Origin": near}, timeout=10).headers


def test_by_default_no_origin_is_allowed(tmp_path):
    with router(tmp_path) as (url, _seen):
        for r in (preflight(url, api.FEEDBACK, ALLOWED),
                  requests.get(f"{url}{api.HEALTH}", headers={"Origin": ALLOWED}, timeout=10)):
            assert not any(h in r.headers for h in CORS), dict(r.headers)


def test_refusals_carry_the_origin_too(tmp_path):
    # A refused request must be readable by the page: a 429 names its Retry-After to it.
    with router(tmp_path, cors_origins=ALLOWED, router_feedback_rate=1 / 60, router_feedback_burst=0) as (url, _seen):
        codes = []
        for _ in range(3):
            r = requests.post(f"{url}{api.FEEDBACK}", json={}, headers={"Origin": ALLOWED}, timeout=10)
            codes.append(r.status_code)
            assert r.headers.get("Access-Control-Allow-Origin") == ALLOWED, (r.status_code, dict(r.headers))
        assert 429 in codes


def test_the_routers_own_405_is_json_and_names_what_is_allowed(tmp_path):
    with router(tmp_path) as (url, seen):
        for method, path, allowed in (("TRACE", api.HEALTH, "GET, HEAD"), ("TRACE", api.PREDICT, "POST"),
                                      ("POST", "/index.html", "GET, HEAD")):
            r = requests.request(method, f"{url}{path}", timeout=10)
            assert r.status_code == 405 and r.headers["Allow"] == allowed, (method, path, r.status_code, dict(r.headers))
            assert r.headers["Content-Type"].startswith("application/json") and r.json()["field"] is None
        assert seen == []
