"""The router against hostile clients: real nginx, rendered by abfleet.router, in front of a
loopback HTTP server that records what reaches it (and, for the admin endpoint, the live fleet).

Rate limits per client address answer JSON 429s with Retry-After; X-Forwarded-For names the
client only when a trusted proxy sends it; /api/admin is never routed; the uid cookie and the
page carry their security flags and headers."""

from __future__ import annotations

import http.client
import json
import time

import pytest
import requests

from abfleet import api, router
from abfleet import fleet as fleet_actions
from tests.helpers import router_in_front

pytestmark = pytest.mark.slow

FLAT = {"location": "Whitefield", "total_sqft": 1200, "bhk": 2, "bath": 2}
RATING = {"prediction_id": "p-1", "feedback_type": "rating", "feedback_value": 4}


def refusal(r: requests.Response) -> None:
    """Assert `r` is the router's JSON 429 with a Retry-After header."""
    assert r.status_code == 429, (r.status_code, r.text)
    assert int(r.headers["Retry-After"]) >= 1
    assert r.headers["Content-Type"].startswith("application/json")
    body = r.json()
    assert body["error"].startswith("too many requests: ") and body["field"] is None, body


def test_a_feedback_burst_is_refused_with_429_while_predictions_at_a_human_rate_pass(tmp_path):
    # One feedback a minute with a burst of 5: exactly six get through however slow the machine.
    with router_in_front(tmp_path, router_feedback_rate=1 / 60, router_feedback_burst=5) as (url, seen):
        answers = [requests.post(f"{url}{api.FEEDBACK}", json=RATING, timeout=10) for _ in range(20)]
        assert [r.status_code for r in answers] == [200] * 6 + [429] * 14
        for r in answers[6:]:
            refusal(r)
        assert answers[-1].headers["Retry-After"] == "60"
        assert sum(1 for s in seen if s["path"] == api.FEEDBACK) == 6, "a refused request reached a server"
        # The same address asking an estimate every 200 ms is never refused (10/s, burst 20 by default).
        for _ in range(30):
            r = requests.post(f"{url}{api.PREDICT}", json=FLAT, timeout=10)
            assert r.status_code == 200, (r.status_code, r.text)
            time.sleep(0.2)


def test_a_prediction_flood_from_one_address_is_refused(tmp_path):
    with router_in_front(tmp_path, router_predict_rate=1 / 60, router_predict_burst=3) as (url, seen):
        codes = [requests.post(f"{url}{api.PREDICT}", json=FLAT, timeout=10).status_code for _ in range(10)]
        assert codes == [200] * 4 + [429] * 6
        # The rest of the API shares the prediction zone.
        refusal(requests.get(f"{url}{api.LOCATIONS}", timeout=10))
        assert len(seen) == 4


def test_an_untrusted_peer_cannot_choose_its_address_with_x_forwarded_for(tmp_path):
    limits = {"router_feedback_rate": 1 / 60, "router_feedback_burst": 0, "router_trusted_proxies": "10.0.0.0/8"}
    with router_in_front(tmp_path, **limits) as (url, seen):
        first = requests.post(f"{url}{api.FEEDBACK}", json=RATING, headers={"X-Forwarded-For": "203.0.113.1"}, timeout=10)
        assert first.status_code == 200
        refusal(requests.post(f"{url}{api.FEEDBACK}", json=RATING, headers={"X-Forwarded-For": "203.0.113.2"}, timeout=10))
        # The servers are told the address the router believes, not the client's list.
        assert [s["x_forwarded_for"] for s in seen] == ["127.0.0.1"]


def test_a_trusted_proxy_names_the_client(tmp_path):
    limits = {"router_feedback_rate": 1 / 60, "router_feedback_burst": 0, "router_trusted_proxies": "127.0.0.1"}
    with router_in_front(tmp_path, **limits) as (url, seen):
        def send(forwarded_for: str) -> requests.Response:
            return requests.post(f"{url}{api.FEEDBACK}", json=RATING, headers={"X-Forwarded-For": forwarded_for}, timeout=10)

        assert send("203.0.113.1").status_code == 200
        assert send("203.0.113.2").status_code == 200, "two clients behind the proxy share one limit"
        refusal(send("203.0.113.1"))
        # A client that writes its own X-Forwarded-For before the proxy's entry is still itself.
        refusal(send("198.51.100.7, 203.0.113.2"))
        assert [s["x_forwarded_for"] for s in seen] == ["203.0.113.1", "203.0.113.2"]


@pytest.mark.parametrize("path", [api.RELOAD, "/api/%61dmin/reload", "/api//admin/reload", "/api/admin"])
def test_the_admin_endpoint_is_not_routed(tmp_path, path):
    with router_in_front(tmp_path) as (url, seen):
        # http.client sends the path as written (requests would undo the %61).
        conn = http.client.HTTPConnection(url.removeprefix("http://"), timeout=10)
        try:
            conn.request("POST", path, body=b"{}", headers={"Authorization": "Bearer anything",
                                                             "Content-Type": "application/json"})
            r = conn.getresponse()
            status, headers, body = r.status, r.headers, json.loads(r.read())
        finally:
            conn.close()
        assert status == 404 and body == {"error": "not found", "field": None}
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert seen == [], "the admin request reached a server"


def reload_count(metrics_text: str) -> float:
    """The server's answered-request counter for the reload endpoint (every status)."""
    from prometheus_client.parser import text_string_to_metric_families

    return sum(s.value for family in text_string_to_metric_families(metrics_text) for s in family.samples
               if s.name == "abfleet_requests_total" and "reload" in s.labels.get("endpoint", ""))


def test_the_live_router_refuses_admin_while_the_server_itself_answers_the_token(fleet):
    before = {v: reload_count(fleet.metrics_text(v)) for v in ("production", "candidate")}
    token = fleet_actions.admin_token(fleet.settings)
    r = requests.post(f"{fleet.router_url}{api.RELOAD}", headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert r.status_code == 404 and r.json() == {"error": "not found", "field": None}
    assert {v: reload_count(fleet.metrics_text(v)) for v in before} == before, "the router passed it to a server"
    direct = requests.post(f"{fleet.server_url('production')}{api.RELOAD}",
                           headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert direct.status_code == 200, direct.text
    assert reload_count(fleet.metrics_text("production")) == before["production"] + 1


def test_the_cookie_and_the_page_carry_their_security_flags(tmp_path):
    limits = {"router_trusted_proxies": "127.0.0.1"}
    with router_in_front(tmp_path, **limits) as (url, _seen):
        page = requests.get(f"{url}/", timeout=10)
        assert page.status_code == 200 and "<html" in page.text
        cookie = page.headers["Set-Cookie"]
        assert cookie.startswith(f"{router.COOKIE}=") and "; HttpOnly" in cookie and "; SameSite=Lax" in cookie
        assert "Secure" not in cookie, "plain HTTP from the client: a Secure cookie would never come back"
        csp = page.headers["Content-Security-Policy"]
        for directive in ("default-src 'self'", "script-src 'self'", "style-src 'self'", "frame-ancestors 'none'"):
            assert directive in csp, csp
        assert "unsafe-inline" not in csp
        assert page.headers["X-Frame-Options"] == "DENY"
        assert page.headers["Referrer-Policy"] == "no-referrer"
        for asset in ("/", "/app.js", "/style.css"):
            r = requests.get(f"{url}{asset}", timeout=10)
            assert r.headers["X-Content-Type-Options"] == "nosniff" and "Content-Security-Policy" in r.headers, asset
        answer = requests.post(f"{url}{api.PREDICT}", json=FLAT, timeout=10)
        assert answer.headers["X-Content-Type-Options"] == "nosniff"
        assert "HttpOnly" in answer.headers["Set-Cookie"]
        # TLS ended at the trusted proxy: the cookie is for HTTPS only.
        behind_tls = requests.get(f"{url}/", headers={"X-Forwarded-Proto": "https"}, timeout=10)
        assert "; Secure" in behind_tls.headers["Set-Cookie"]
    with router_in_front(tmp_path / "direct") as (url, _seen):
        # Anyone else saying so is not believed.
        claimed = requests.get(f"{url}/", headers={"X-Forwarded-Proto": "https"}, timeout=10)
        assert "Secure" not in claimed.headers["Set-Cookie"]
