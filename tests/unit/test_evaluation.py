"""The I/O around the decision: what happens with nothing to judge, and the webhook."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

from abfleet import evaluation
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
        assert evaluation.notify(settings, {"decision": "rollback", "reasons": ["worse"]}) == "204"
        assert received == [{"source": "abfleet", "decision": "rollback", "reasons": ["worse"]}]
    finally:
        server.shutdown()
    dead = Settings(webhook_url=f"http://127.0.0.1:{free_port()}/hook")
    assert evaluation.notify(dead, {"decision": "promote"}).startswith("failed")
    assert evaluation.notify(Settings(), {"decision": "promote"}) is None
