"""The predict route's two paths: the lean WSGI handler (a body sent as exactly
`application/json`) and the Flask view (every other content type, form posts) call the same
prediction service, so a client and the store cannot tell them apart, whatever the body."""

from __future__ import annotations

import json
import re
from urllib.parse import urlencode

import pytest
from flask import request_started
from prometheus_client.parser import text_string_to_metric_families

from abfleet import data
from abfleet.api import FLAT, PREDICT
from abfleet.serving import ModelHolder
from abfleet.settings import Settings
from abfleet.store import Store
from inference.backend.app import create_app
from tests.helpers import migrate

LEAN = "application/json"
VIEW = "application/json; charset=utf-8"  # not the lean handler's exact type: Flask's view answers
FORM = "application/x-www-form-urlencoded"
BIG = "9" * 400  # a 400-digit integer


@pytest.fixture
def predictor(tiny_predictor):
    return tiny_predictor


def make_app(tmp_path, holder_of):
    """An app whose requests say which path answered them (`app.paths`) and how many times
    the prediction service was asked (`app.answers`)."""
    settings = Settings(run_dir=tmp_path, variant="production")
    app = create_app(settings, holder=holder_of(settings), store=Store(migrate(settings).db_url))
    app.flask_requests, app.answers = [], []

    def flask_saw(sender, **_extra) -> None:
        app.flask_requests.append(sender)

    app.flask_saw = flask_saw  # the signal keeps a weak reference only
    request_started.connect(flask_saw, app)
    predictions = app.extensions["abfleet"]["predictions"]
    answer = predictions.answer
    predictions.answer = lambda *args: app.answers.append(args) or answer(*args)
    return app


@pytest.fixture
def app(tmp_path, predictor):
    app = make_app(tmp_path, lambda settings: ModelHolder.fixed(settings, predictor, "3"))
    yield app
    app.extensions["abfleet"]["store"].stop_spool()


def send(app, raw: bytes | str | dict, content_type: str | None):
    """(response, the path that answered it: "lean" or "view")."""
    before, asked = len(app.flask_requests), len(app.answers)
    raw = json.dumps(raw) if isinstance(raw, dict) and content_type in (LEAN, VIEW) else raw
    # A client sends "Content-Length: 0" with an empty body; werkzeug's test client sends none.
    length = {"CONTENT_LENGTH": "0"} if raw in ("", b"") else {}
    response = app.test_client().post(PREDICT, data=raw, content_type=content_type, environ_overrides=length)
    assert len(app.answers) == asked + 1, "every request asks the prediction service exactly once"
    return response, ("view" if len(app.flask_requests) > before else "lean")


def untimed(raw: bytes) -> bytes:
    """A response's bytes without its response_time_ms value (each answer times itself)."""
    return re.sub(rb'"response_time_ms":\s*[0-9.e-]+', b'"response_time_ms":0', raw)


def post(app, body, content_type):
    return send(app, body, content_type)[0]


def unseen_location(predictor) -> str:
    return sorted(data.known_locations() - set(predictor.locations))[0]


def nested(depth: int, opening: str, closing: str, inner: str = "1") -> str:
    return opening * depth + inner + closing * depth


def flat_with(location: str) -> str:
    return json.dumps({**FLAT, "location": location})


def as_strings(fields: dict) -> dict:
    return {k: str(v) for k, v in fields.items()}


WITHOUT_BATH = {k: v for k, v in FLAT.items() if k != "bath"}
WITHOUT_SQFT = {k: v for k, v in FLAT.items() if k != "total_sqft"}

# (name, the lean request's body, the view's request as (body, content type) or None for the
# same body as VIEW, expected status, expected field). Every lean request is `application/json`.
CASES = [
    # valid
    ("sample", FLAT, None, 200, None),
    ("fractional area", {**FLAT, "total_sqft": 1234.5}, None, 200, None),
    ("padded location", {**FLAT, "location": "  Whitefield "}, None, 200, None),
    ("unicode spaces around location", {**FLAT, "location": "\u00a0Indira Nagar\u2003"}, None, 200, None),
    ("extra field", {**FLAT, "extra": [1]}, None, 200, None),
    ("other at the bounds", {**FLAT, "location": "other", "bhk": 10, "bath": 1}, None, 200, None),
    ("smallest area", {**FLAT, "total_sqft": 300}, None, 200, None),
    ("largest area", {**FLAT, "total_sqft": 30000}, None, 200, None),
    ("whitespace around the JSON", " \n" + json.dumps(FLAT) + "\n ", None, 200, None),
    ("a repeated key: the last wins", json.dumps(FLAT)[:-1] + ', "bhk": 3}', None, 200, None),
    # coercible
    ("bhk as a string", {**FLAT, "bhk": "2"}, None, 200, None),
    ("area as a string", {**FLAT, "total_sqft": "1200"}, None, 200, None),
    ("padded numbers as strings", {**FLAT, "total_sqft": " 1200 ", "bath": " 2 "}, None, 200, None),
    ("every field a string", as_strings(FLAT), None, 200, None),
    ("bhk as a float", {**FLAT, "bhk": 2.0}, None, 200, None),
    ("area in exponent form", '{"location": "Indira Nagar", "total_sqft": 1.2e3, "bhk": 2, "bath": 2}', None, 200, None),
    ("bhk in exponent form", '{"location": "Indira Nagar", "total_sqft": 1200, "bhk": 1e1, "bath": 2}', None, 200, None),
    # every bad input the other tests send
    ("bool as number", {**FLAT, "bhk": True}, None, 422, "bhk"),
    ("bath 0", {**FLAT, "bath": 0}, None, 422, "bath"),
    ("area 1e9", {**FLAT, "total_sqft": 1e9}, None, 422, "total_sqft"),
    ("absurd area", {**FLAT, "total_sqft": 1e12}, None, 422, "total_sqft"),
    ("zero area", {**FLAT, "total_sqft": 0}, None, 422, "total_sqft"),
    ("negative area", {**FLAT, "total_sqft": -500}, None, 422, "total_sqft"),
    ("wrong type", {**FLAT, "total_sqft": "large"}, None, 422, "total_sqft"),
    ("bhk 0", {**FLAT, "bhk": 0}, None, 422, "bhk"),
    ("bhk 100", {**FLAT, "bhk": 100}, None, 422, "bhk"),
    ("fractional bhk", {**FLAT, "bhk": 2.5}, None, 422, "bhk"),
    ("blank location", {**FLAT, "location": "   "}, None, 422, "location"),
    ("location too long", {**FLAT, "location": "x" * 129}, None, 422, "location"),
    ("unknown location", {**FLAT, "location": "Atlantis"}, None, 422, "location"),
    ("location a number", {**FLAT, "location": 5}, None, 422, "location"),
    ("location null", {**FLAT, "location": None}, None, 422, "location"),
    ("missing bath", WITHOUT_BATH, None, 422, "bath"),
    ("missing area", WITHOUT_SQFT, None, 422, "total_sqft"),
    ("empty object", {}, None, 422, "location"),
    # non-finite and oversized numbers
    ("NaN", '{"location": "Indira Nagar", "total_sqft": NaN, "bhk": 2, "bath": 2}', None, 422, "total_sqft"),
    ("Infinity", '{"location": "Indira Nagar", "total_sqft": Infinity, "bhk": 2, "bath": 2}', None, 422, "total_sqft"),
    ("-Infinity", '{"location": "Indira Nagar", "total_sqft": 1200, "bhk": 2, "bath": -Infinity}', None, 422, "bath"),
    ("1e400", '{"location": "Indira Nagar", "total_sqft": 1e400, "bhk": 2, "bath": 2}', None, 422, "total_sqft"),
    ("400-digit bhk", '{"location": "Indira Nagar", "total_sqft": 1200, "bhk": %s, "bath": 2}' % BIG, None, 422, "bhk"),
    ("400-digit area", '{"location": "Indira Nagar", "total_sqft": %s, "bhk": 2, "bath": 2}' % BIG, None, 422, "total_sqft"),
    ("minus 400-digit bath", '{"location": "Indira Nagar", "total_sqft": 1200, "bhk": 2, "bath": -%s}' % BIG, None, 422, "bath"),
    # control characters around and inside the location
    ("NUL before", flat_with("\x00Indira Nagar"), None, 422, "location"),
    ("NUL after", flat_with("Indira Nagar\x00"), None, 422, "location"),
    ("NUL inside", flat_with("Indira\x00Nagar"), None, 422, "location"),
    ("\\x1c before", flat_with("\x1cIndira Nagar"), None, 422, "location"),
    ("\\x1d after", flat_with("Indira Nagar\x1d"), None, 422, "location"),
    ("\\x1e around", flat_with("\x1eIndira Nagar\x1e"), None, 422, "location"),
    ("\\x1f inside", flat_with("Indira\x1fNagar"), None, 422, "location"),
    ("\\x1c-\\x1f only", flat_with("\x1c\x1d\x1e\x1f"), None, 422, "location"),
    ("raw control character in the JSON", '{"location": "Indira\x01Nagar", "total_sqft": 1200, "bhk": 2, "bath": 2}',
     None, 400, "body"),
    # nesting
    ("2 KB of [", nested(2048, "[", "]"), None, 400, "body"),
    ("2 KB of {\"a\":", nested(400, '{"a":', "}"), None, 400, "body"),
    ("deep nesting in an extra field", json.dumps(FLAT)[:-1] + ', "x": ' + nested(300, "[", "]") + "}", None, 400, "body"),
    # not a JSON object
    ("JSON list", "[1, 2]", None, 400, "body"),
    ("JSON string", '"Indira Nagar"', None, 400, "body"),
    ("JSON number", "42", None, 400, "body"),
    ("JSON null", "null", None, 400, "body"),
    ("not JSON", "{not json", None, 400, "body"),
    ("plain text", "this is not json", None, 400, "body"),
    ("trailing garbage", json.dumps(FLAT) + " x", None, 400, "body"),
    ("empty body", "", None, 400, "body"),
    ("not UTF-8", b"\xff\xfe{}", None, 400, "body"),
    # other JSON content types reach the view
    ("vnd.api+json", FLAT, (json.dumps(FLAT), "application/vnd.api+json"), 200, None),
    ("merge-patch+json", FLAT, (json.dumps(FLAT), "application/merge-patch+json"), 200, None),
    ("+json refused", {**FLAT, "bath": 0}, (json.dumps({**FLAT, "bath": 0}), "application/vnd.api+json"), 422, "bath"),
    # form posts: the same fields as JSON strings on the lean path
    ("form", as_strings(FLAT), (as_strings(FLAT), FORM), 200, None),
    ("form, padded", as_strings({**FLAT, "location": " Whitefield "}),
     (as_strings({**FLAT, "location": " Whitefield "}), FORM), 200, None),
    ("form, bhk 0", as_strings({**FLAT, "bhk": 0}), (as_strings({**FLAT, "bhk": 0}), FORM), 422, "bhk"),
    ("form, missing bath", as_strings(WITHOUT_BATH), (as_strings(WITHOUT_BATH), FORM), 422, "bath"),
    ("form, \\x1c in location", as_strings({**FLAT, "location": "\x1cIndira Nagar"}),
     (urlencode(as_strings({**FLAT, "location": "\x1cIndira Nagar"})), FORM), 422, "location"),
    ("multipart form", as_strings(FLAT), (as_strings(FLAT), "multipart/form-data"), 200, None),
    # a body that is not JSON by its type is refused as JSON that is not an object is
    ("missing content type", "null", (json.dumps(FLAT), None), 400, "body"),
    ("text/plain", "null", (json.dumps(FLAT), "text/plain"), 400, "body"),
]


def stored_row(store: Store, prediction_id: str) -> dict:
    row = store.get_prediction(prediction_id)
    for volatile in ("id", "created_at", "latency_ms"):
        row.pop(volatile)
    return row


@pytest.mark.parametrize("lean_body,view_request,status,field", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_both_paths_answer_every_body_alike(app, lean_body, view_request, status, field):
    store = app.extensions["abfleet"]["store"]
    before = store.count_predictions()
    view_body, view_type = view_request or (lean_body, VIEW)
    lean, lean_path = send(app, lean_body, LEAN)
    view, view_path = send(app, view_body, view_type)
    assert (lean_path, view_path) == ("lean", "view")
    assert lean.status_code == view.status_code == status, (lean.get_json(), view.get_json())
    assert lean.status == view.status
    for header in ("Content-Type", "X-Variant", "X-Model-Version"):
        assert lean.headers[header] == view.headers[header]
    a, b = lean.get_json(), view.get_json()
    assert list(a) == list(b)
    if status == 200:
        pids = a.pop("prediction_id"), b.pop("prediction_id")
        assert pids[0] != pids[1]
        assert a.pop("response_time_ms") >= 0 and b.pop("response_time_ms") >= 0  # each its own clock
        assert a == b
        assert untimed(lean.get_data()).replace(pids[0].encode(), b"") == untimed(view.get_data()).replace(pids[1].encode(), b"")
        assert stored_row(store, pids[0]) == stored_row(store, pids[1])
        assert store.count_predictions() == before + 2
    else:
        assert lean.get_data() == view.get_data()
        assert a["field"] == field and a["error"].startswith(field), a
        assert store.count_predictions() == before
    assert lean.get_data().endswith(b"\n")


def test_the_table_covers_enough_bodies():
    assert len(CASES) >= 40


def test_plainly_valid_requests_answer_and_store_the_same_on_both_paths(app, predictor):
    store = app.extensions["abfleet"]["store"]
    bodies = [FLAT, {**FLAT, "total_sqft": 1234.5}, {**FLAT, "location": "  Whitefield "}, {**FLAT, "extra": [1]},
              {**FLAT, "location": unseen_location(predictor)}, {**FLAT, "location": "other", "bhk": 10, "bath": 1}]
    for body in bodies:
        lean, lean_path = send(app, body, LEAN)
        assert lean_path == "lean", "a plainly valid body should not reach the Flask view"
        view, view_path = send(app, body, VIEW)
        assert view_path == "view"
        assert lean.status_code == view.status_code == 200
        for header in ("Content-Type", "X-Variant", "X-Model-Version"):
            assert lean.headers[header] == view.headers[header]
        a, b = lean.get_json(), view.get_json()
        assert a.pop("prediction_id") != b.pop("prediction_id")
        assert a.pop("response_time_ms") >= 0 and b.pop("response_time_ms") >= 0
        assert a == b and list(a) == list(b)
        stored = [stored_row(store, r.get_json()["prediction_id"]) for r in (lean, view)]
        assert stored[0] == stored[1]
        assert lean.get_data().endswith(b"\n") and view.get_data().endswith(b"\n")


def test_without_a_model_both_paths_say_so_alike(tmp_path):
    app = make_app(tmp_path, lambda settings: ModelHolder(settings))
    try:
        (lean, lean_path), (view, view_path) = send(app, FLAT, LEAN), send(app, FLAT, VIEW)
        assert (lean_path, view_path) == ("lean", "view")
        assert lean.status_code == view.status_code == 503 and lean.get_data() == view.get_data()
        assert lean.headers["X-Model-Version"] == view.headers["X-Model-Version"] == "none"
    finally:
        app.extensions["abfleet"]["store"].stop_spool()


def test_a_store_failure_is_the_same_503_on_both_paths(app):
    store = app.extensions["abfleet"]["store"]
    store.record_prediction = lambda row: (_ for _ in ()).throw(OSError("disk gone"))
    (lean, lean_path), (view, view_path) = send(app, FLAT, LEAN), send(app, FLAT, VIEW)
    assert (lean_path, view_path) == ("lean", "view")
    assert lean.status_code == view.status_code == 503 and lean.get_data() == view.get_data()
    assert lean.get_json()["error"].startswith("store unavailable")


def test_a_failure_inside_the_service_is_the_same_json_500_on_both_paths(app, predictor, monkeypatch):
    monkeypatch.setattr(predictor, "predict_one", lambda *args: 1 / 0)
    (lean, lean_path), (view, view_path) = send(app, FLAT, LEAN), send(app, FLAT, VIEW)
    assert (lean_path, view_path) == ("lean", "view")
    assert lean.status_code == view.status_code == 500 and lean.status == view.status
    assert lean.get_data() == view.get_data() == b'{"error":"internal error: ZeroDivisionError","field":null}\n'
    assert lean.headers["X-Model-Version"] == view.headers["X-Model-Version"] == "3"


def test_a_body_shorter_than_announced_goes_to_the_view(app):
    environ = {"CONTENT_LENGTH": "500"}
    r = app.test_client().post(PREDICT, data=json.dumps(FLAT), content_type=LEAN, environ_overrides=environ)
    assert 400 <= r.status_code < 500 and r.get_json()["error"]
    assert len(app.flask_requests) == 1


def test_both_paths_count_requests_and_latency(app):
    post(app, FLAT, LEAN)
    post(app, FLAT, VIEW)
    post(app, {**FLAT, "bath": 0}, LEAN)
    text = app.test_client().get("/metrics").get_data(as_text=True)
    samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
    ok = [s.value for s in samples if s.name == "abfleet_requests_total"
          and s.labels["endpoint"] == PREDICT and s.labels["status"] == "200"]
    refused = [s.value for s in samples if s.name == "abfleet_requests_total"
               and s.labels["endpoint"] == PREDICT and s.labels["status"] == "422"]
    observed = [s.value for s in samples if s.name == "abfleet_request_latency_seconds_count"
                and s.labels["endpoint"] == PREDICT]
    assert ok == [2.0] and refused == [1.0] and observed == [3.0]
