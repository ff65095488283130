"""The predict route's two paths: the lean WSGI handler for plainly valid JSON and the Flask
view for everything else must be indistinguishable to a client and to the store."""

from __future__ import annotations

import json

import pytest

from abfleet import data, model
from abfleet.api import FLAT, PREDICT
from abfleet.serving import ModelHolder
from abfleet.settings import Settings
from abfleet.store import Store
from inference.backend import app as app_module
from inference.backend.app import create_app
LEAN = "application/json"
VIEW = "application/json; charset=utf-8"  # not the lean handler's exact type: Flask's view answers


@pytest.fixture(scope="module")
def predictor():
    cleaned = data.clean(data.synth(6000, seed=11))
    return model.FastPredictor(model.fit(cleaned.frame, model.ModelParams(max_iter=30)))


@pytest.fixture
def app(tmp_path, predictor, monkeypatch):
    settings = Settings(run_dir=tmp_path, variant="production")
    app = create_app(settings, holder=ModelHolder.fixed(settings, predictor, "3"), store=Store(settings.db_url))
    validated = []
    original = app_module.PredictRequest.model_validate
    monkeypatch.setattr(app_module.PredictRequest, "model_validate",
                        lambda body: validated.append(body) or original(body))
    app.validated = validated  # bodies that went through the Flask view
    yield app
    app.extensions["abfleet"]["store"].stop_spool()


def post(app, body, content_type):
    raw = body if isinstance(body, str) else json.dumps(body)
    return app.test_client().post(PREDICT, data=raw, content_type=content_type)


def unseen_location(predictor) -> str:
    return sorted(data.known_locations() - set(predictor.locations))[0]


def test_plainly_valid_requests_answer_and_store_the_same_on_both_paths(app, predictor):
    store = app.extensions["abfleet"]["store"]
    bodies = [FLAT, {**FLAT, "total_sqft": 1234.5}, {**FLAT, "location": "  Whitefield "}, {**FLAT, "extra": [1]},
              {**FLAT, "location": unseen_location(predictor)}, {**FLAT, "location": "other", "bhk": 10, "bath": 1}]
    for body in bodies:
        lean = post(app, body, LEAN)
        assert app.validated == [], "a plainly valid body should not reach the Flask view"
        view = post(app, body, VIEW)
        assert app.validated == [body]
        app.validated.clear()
        assert lean.status_code == view.status_code == 200
        for header in ("Content-Type", "X-Variant", "X-Model-Version"):
            assert lean.headers[header] == view.headers[header]
        a, b = lean.get_json(), view.get_json()
        assert a.pop("prediction_id") != b.pop("prediction_id")
        assert a == b and list(a) == list(b)
        stored = [store.get_prediction(r.get_json()["prediction_id"]) for r in (lean, view)]
        for row in stored:
            for volatile in ("id", "created_at", "latency_ms"):
                row.pop(volatile)
        assert stored[0] == stored[1]
        assert lean.get_data().endswith(b"\n") and view.get_data().endswith(b"\n")


@pytest.mark.parametrize("raw,status,field", [
    ({**FLAT, "bhk": "2"}, 200, None),  # pydantic coerces: the view's business
    ({**FLAT, "total_sqft": "1200"}, 200, None),
    ({**FLAT, "bhk": 2.0}, 200, None),
    ({**FLAT, "bhk": True}, 422, "bhk"),
    ({**FLAT, "bath": 0}, 422, "bath"),
    ({**FLAT, "total_sqft": 1e9}, 422, "total_sqft"),
    ('{"location": "Indira Nagar", "total_sqft": NaN, "bhk": 2, "bath": 2}', 422, "total_sqft"),
    ({**FLAT, "location": "   "}, 422, "location"),
    ({**FLAT, "location": "x" * 129}, 422, "location"),
    ({**FLAT, "location": "Atlantis"}, 422, "location"),
    ({k: v for k, v in FLAT.items() if k != "bath"}, 422, "bath"),
    ("[1, 2]", 400, "body"),
    ("{not json", 400, "body"),
])
def test_everything_else_is_answered_by_the_view_with_its_own_wording(app, raw, status, field):
    lean, view = post(app, raw, LEAN), post(app, raw, VIEW)
    assert lean.status_code == view.status_code == status, lean.get_json()
    if status != 200:
        assert lean.get_json() == view.get_json() and lean.get_json()["field"] == field
    if not isinstance(raw, str) or raw.startswith("{\"location\""):
        assert len(app.validated) == 2, "both requests should have been validated by the view"


def test_both_paths_count_requests_and_latency(app):
    post(app, FLAT, LEAN)
    post(app, FLAT, VIEW)
    post(app, {**FLAT, "bath": 0}, LEAN)
    from prometheus_client.parser import text_string_to_metric_families

    text = app.test_client().get("/metrics").get_data(as_text=True)
    samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
    ok = [s.value for s in samples if s.name == "abfleet_requests_total"
          and s.labels["endpoint"] == PREDICT and s.labels["status"] == "200"]
    refused = [s.value for s in samples if s.name == "abfleet_requests_total"
               and s.labels["endpoint"] == PREDICT and s.labels["status"] == "422"]
    observed = [s.value for s in samples if s.name == "abfleet_request_latency_seconds_count"
                and s.labels["endpoint"] == PREDICT]
    assert ok == [2.0] and refused == [1.0] and observed == [3.0]
