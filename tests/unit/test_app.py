"""The model server's Flask app over a tiny model and a temporary SQLite store."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from abfleet import data
from abfleet.api import FEEDBACK, FLAT, HEALTH, LOCATIONS, METRICS, PREDICT, RELOAD
from abfleet.serving import ModelHolder
from abfleet.settings import Settings
from abfleet.store import Store
from inference.backend.app import create_app


@pytest.fixture
def predictor(tiny_predictor):
    return tiny_predictor


@pytest.fixture
def app(tmp_path, predictor):
    settings = Settings(run_dir=tmp_path, variant="candidate", admin_token="secret")
    store = Store(settings.db_url)
    app = create_app(settings, holder=ModelHolder.fixed(settings, predictor, "7"), store=store)
    yield app
    store.stop_spool()


@pytest.fixture
def client(app):
    return app.test_client()


def store_of(app) -> Store:
    return app.extensions["abfleet"]["store"]


def samples(client, name):
    text = client.get(METRICS).get_data(as_text=True)
    return [s for f in text_string_to_metric_families(text) for s in f.samples if s.name == name]


def test_predict_is_stored_with_variant_version_and_user(app, client):
    r = client.post(PREDICT, json=FLAT, headers={"X-User-Id": "u-1"})
    assert r.status_code == 200
    body = r.get_json()
    assert r.headers["X-Variant"] == "candidate" and r.headers["X-Model-Version"] == "7"
    row = store_of(app).get_prediction(body["prediction_id"])
    assert row["variant"] == "candidate" and row["model_version"] == "7" and row["user_id"] == "u-1"
    assert row["estimated_price"] == body["estimated_price"] > 0
    assert (row["location"], row["total_sqft"], row["bhk"], row["bath"]) == ("Indira Nagar", 1200.0, 2, 2)
    assert row["latency_ms"] >= 0


def test_feedback_semantics(app, client):
    pid = client.post(PREDICT, json=FLAT).get_json()["prediction_id"]
    ok = client.post(FEEDBACK, json={"prediction_id": pid, "feedback_type": "rating", "feedback_value": 4})
    assert ok.status_code == 201
    again = client.post(FEEDBACK, json={"prediction_id": pid, "feedback_type": "rating", "feedback_value": 5})
    assert again.status_code == 409 and again.get_json()["field"] == "feedback_type"
    quick = client.post(FEEDBACK, json={"prediction_id": pid, "feedback_type": "too_high"})
    assert quick.status_code == 201
    actual = client.post(FEEDBACK, json={"prediction_id": pid, "feedback_type": "actual_price", "feedback_value": 50})
    assert actual.status_code == 201 and actual.get_json()["ape"] >= 0
    unknown = client.post(FEEDBACK, json={"prediction_id": "ab" * 16, "feedback_type": "rating", "feedback_value": 3})
    assert unknown.status_code == 404 and unknown.get_json()["field"] == "prediction_id"
    kinds = sorted(f["kind"] for f in store_of(app).feedback_for(pid))
    assert kinds == ["actual_price", "quick", "rating"]
    # Counters moved once each, not for the refused ones.
    ratings = samples(client, "abfleet_ratings_total")
    assert [(s.labels["stars"], s.value) for s in ratings if s.value] == [("4", 1.0)]
    assert [s.value for s in samples(client, "abfleet_ape_observations_total") if s.value] == [1.0]
    # The model's series exist from the start (at zero), so increase() counts the first event.
    assert sorted(s.labels["stars"] for s in ratings) == ["1", "2", "3", "4", "5"]


@pytest.mark.parametrize("body,field", [
    ({"prediction_id": "abc", "feedback_type": "rating", "feedback_value": 6}, "feedback_value"),
    ({"prediction_id": "abc", "feedback_type": "rating", "feedback_value": 3.5}, "feedback_value"),
    ({"prediction_id": "abc", "feedback_type": "stars", "feedback_value": 3}, "feedback_type"),
    ({"prediction_id": "abc", "feedback_type": "actual_price", "feedback_value": -1}, "feedback_value"),
    ({"prediction_id": "abc", "feedback_type": "actual_price"}, "feedback_value"),
    ({"prediction_id": "<script>", "feedback_type": "accurate"}, "prediction_id"),
    ({"feedback_type": "accurate"}, "prediction_id"),
])
def test_bad_feedback_names_the_field(client, body, field):
    r = client.post(FEEDBACK, json=body)
    assert r.status_code == 422 and r.get_json()["field"] == field, r.get_json()


def test_health_reports_model_and_store(client):
    body = client.get(HEALTH).get_json()
    assert body["status"] == "ok" and body["model_version"] == "7" and body["store_reachable"] is True


def test_store_failure_refuses_the_answer_instead_of_losing_it(app, client):
    store_of(app).engine.dispose()
    store_of(app).record_prediction = lambda row: (_ for _ in ()).throw(OSError("disk gone"))
    r = client.post(PREDICT, json=FLAT)
    assert r.status_code == 503 and "store" in r.get_json()["error"]


def test_reload_needs_the_token(client):
    assert client.post(RELOAD).status_code == 401
    assert client.post(RELOAD, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.post(RELOAD, headers={"Authorization": "Bearer secret"}).status_code == 200


def test_unknown_route_and_method_are_json(client):
    assert client.get("/api/nope").get_json()["error"]
    r = client.get(PREDICT)
    assert r.status_code == 405 and r.get_json()["error"]


def test_a_known_location_the_model_never_saw_is_priced_as_other(client, predictor):
    unseen = sorted(data.known_locations() - set(predictor.locations))
    assert unseen, "the tiny model should miss some rare locations"
    r = client.post(PREDICT, json={**FLAT, "location": unseen[0]})
    assert r.status_code == 200
    other = client.post(PREDICT, json={**FLAT, "location": "other"}).get_json()["estimated_price"]
    assert r.get_json()["estimated_price"] == other
    names = client.get(LOCATIONS).get_json()["locations"]
    assert unseen[0] in names and names[-1] == "other"
