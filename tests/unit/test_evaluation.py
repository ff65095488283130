"""The I/O around the decision: what happens with nothing to judge, and the webhook."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

from abfleet import evaluation, fleet
from abfleet.settings import Settings
from tests.conftest import free_port


def test_nothing_to_judge_is_a_continue_that_says_why():
    outcome = evaluation.judge({"stats": None, "problems": ["no @candidate in the registry: nothing to evaluate"]})
    assert outcome["decision"] == "continue" and "no @candidate" in outcome["reasons"][0]


def test_a_problem_never_ends_in_a_promotion():
    strong = {"model_version": "1", "requests": 5000, "errors": 0, "latency_p95_ms": 10, "latency_mean_ms": 5,
              "ratings": {"1": 0, "2": 0, "3": 0, "4": 0, "5": 0}, "quick": {}, "ape": {"count": 0, "sum": 0, "sum_sq": 0}}
    prod = {**strong, "ratings": {"1": 400, "2": 400, "3": 200, "4": 0, "5": 0}, "requests": 8000}
    cand = {**strong, "model_version": "2", "ratings": {"1": 0, "2": 0, "3": 20, "4": 100, "5": 130}, "requests": 2000}
    stats = {"window_hours": 48, "weights": {"production": 0.8, "candidate": 0.2}, "variants": {"production": prod, "candidate": cand}}
    assert evaluation.judge({"stats": stats, "problems": []})["decision"] == "promote"
    held = evaluation.judge({"stats": stats, "problems": ["the two arms receive different inputs"]})
    assert held["decision"] == "continue" and "different inputs" in held["reasons"][0]


def test_webhook_receives_the_decision_and_a_dead_one_is_not_fatal():
    received = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        settings = Settings(webhook_url=f"http://127.0.0.1:{server.server_port}/hook")
        assert fleet.notify(settings, {"decision": "rollback", "reasons": ["worse"]}) == "204"
        assert received == [{"source": "abfleet", "decision": "rollback", "reasons": ["worse"]}]
    finally:
        server.shutdown()
    dead = Settings(webhook_url=f"http://127.0.0.1:{free_port()}/hook")
    assert fleet.notify(dead, {"decision": "promote"}).startswith("failed")
    assert fleet.notify(Settings(), {"decision": "promote"}) is None


def test_arms_check_flags_arms_that_receive_different_inputs(tmp_path):
    import datetime as dt
    import uuid

    from abfleet import data
    from abfleet.store import Store

    settings = Settings(run_dir=tmp_path, arms_min_rows=200)
    store = Store(settings.db_url)
    store.init_schema()
    since = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=1)
    frame = data.clean(data.synth(3000, seed=50)).frame.sample(frac=1, random_state=1)  # synth rows come in blocks

    def log(rows, variant):
        store.record_predictions([{"id": uuid.uuid4().hex, "variant": variant, "model_version": "1", "location": r.location,
                                   "total_sqft": float(r.total_sqft), "bhk": int(r.bhk), "bath": int(r.bath),
                                   "estimated_price": 50.0, "latency_ms": 1.0, "user_id": None} for r in rows.itertuples()])

    log(frame.iloc[:1200], "production")
    log(frame.iloc[1200:1500], "candidate")
    assert evaluation.arms_check(settings, since)["drift_detected"] is False
    big = frame.iloc[1500:].copy()
    big = big[big.bhk >= 3]  # a broken split: only large flats reach the candidate
    log(big.head(400), "candidate")
    verdict = evaluation.arms_check(settings, since)
    assert verdict["drift_detected"] is True and "bhk" in verdict["drifted_columns"]


def test_reload_goes_to_the_configured_server_urls_with_the_token(tmp_path):
    calls = []

    class Server(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            calls.append((self.path, self.headers.get("Authorization")))
            body = json.dumps({"swapped": True, "model_version": "9"}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Server)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = {"ABFLEET_PRODUCTION_URL": f"http://127.0.0.1:{server.server_port}/",
               "ABFLEET_CANDIDATE_URL": f"http://127.0.0.1:{free_port()}", "ABFLEET_ADMIN_TOKEN": "s3cret"}
        settings = Settings.from_env(env, run_dir=tmp_path, reload_interval=7)
        out = fleet.reload_servers(settings)
    finally:
        server.shutdown()
    assert calls == [("/api/admin/reload", "Bearer s3cret")]
    assert out["production"] == "200 9"
    assert out["candidate"].startswith("not reached") and "within 7s" in out["candidate"]
    assert Settings(production_port=6101).server_url("production") == "http://127.0.0.1:6101"
