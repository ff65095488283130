"""The model server's Flask app over a tiny model and a temporary SQLite store."""

from __future__ import annotations

import datetime as dt

import pytest
from prometheus_client.parser import text_string_to_metric_families

from abfleet import data
from abfleet.api import FEEDBACK, FLAT, HEALTH, LOCATIONS, METRICS, PREDICT, RELOAD
from abfleet.serving import ModelHolder
from abfleet.settings import Settings
from abfleet.store import Store
from inference.backend.app import create_app
from tests.helpers import app_serving, migrate


@pytest.fixture
def predictor(tiny_predictor):
    return tiny_predictor


@pytest.fixture
def app(tmp_path, predictor):
    with app_serving(Settings(run_dir=tmp_path, variant="candidate", admin_token="secret"), predictor, "7") as app:
        yield app


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
    assert body["status"] == "healthy" and body["model_version"] == "7" and body["store_reachable"] is True
    assert body["model_variant"] == "candidate" and dt.datetime.fromisoformat(body["timestamp"]).tzinfo is not None


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


# ---- feedback belongs to the estimate's user, within its window, with sane numbers ----------

def predict(client, user: str | None = "u-1") -> dict:
    r = client.post(PREDICT, json=FLAT, headers={"X-User-Id": user} if user else {})
    assert r.status_code == 200
    return r.get_json()


def rate(client, pid: str, user: str | None = "u-1", kind: str = "rating", value=4, **kw):
    body = {"prediction_id": pid, "feedback_type": kind, "feedback_value": value}
    return client.post(FEEDBACK, json=body, headers={"X-User-Id": user} if user else {}, **kw)


def age(app, pid: str, days: float) -> None:
    """Make a stored prediction `days` old."""
    import datetime as dt

    import sqlalchemy as sa

    from abfleet.store import predictions

    store = store_of(app)
    assert store.get_prediction(pid) is not None  # inserted from the spool if it waited there
    with store.engine.begin() as conn:
        conn.execute(sa.update(predictions).where(predictions.c.id == pid)
                     .values(created_at=dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=days)))


def test_feedback_is_stored_with_its_user(app, client):
    pid = predict(client)["prediction_id"]
    assert rate(client, pid).status_code == 201
    assert [f["user_id"] for f in store_of(app).feedback_for(pid)] == ["u-1"]


def test_feedback_from_another_user_is_forbidden(app, client):
    pid = predict(client)["prediction_id"]
    for stranger in ("u-2", None):
        r = rate(client, pid, user=stranger)
        assert r.status_code == 403 and r.get_json()["field"] == "prediction_id", r.get_json()
        assert "another user" in r.get_json()["error"]
    assert store_of(app).feedback_for(pid) == []
    assert all(s.value == 0 for s in samples(client, "abfleet_ratings_total"))


def test_an_anonymous_estimate_is_rated_only_anonymously(client):
    pid = predict(client, user=None)["prediction_id"]
    assert rate(client, pid, user="u-1").status_code == 403
    assert rate(client, pid, user=None).status_code == 201


def test_feedback_after_the_window_is_gone(app, client):
    pid = predict(client)["prediction_id"]
    age(app, pid, 8)  # the default window is 7 days
    r = rate(client, pid)
    assert r.status_code == 410 and r.get_json()["field"] == "prediction_id"
    assert pid in r.get_json()["error"] and "7 days" in r.get_json()["error"]
    fresh = predict(client)["prediction_id"]
    age(app, fresh, 6.9)
    assert rate(client, fresh).status_code == 201


def test_the_window_is_a_setting(tmp_path, predictor):
    settings = Settings(run_dir=tmp_path, feedback_window_days=0.5)
    store = Store(migrate(settings).db_url)
    app = create_app(settings, holder=ModelHolder.fixed(settings, predictor, "7"), store=store)
    try:
        client = app.test_client()
        pid = predict(client)["prediction_id"]
        age(app, pid, 1)
        assert rate(client, pid).status_code == 410
    finally:
        store.stop_spool()


def test_refusals_come_in_order_unknown_stranger_late_duplicate(app, client):
    assert rate(client, "ab" * 16).status_code == 404
    pid = predict(client)["prediction_id"]
    assert rate(client, pid).status_code == 201
    assert rate(client, pid).status_code == 409  # a duplicate, in time
    age(app, pid, 30)
    assert rate(client, pid, user="u-2").status_code == 403  # a stranger hears nothing of the age
    assert rate(client, pid).status_code == 410  # late comes before duplicate


def test_prediction_store_checks_only_after_the_body_is_valid(client):
    # A bad value for an unknown id is a 422 on the value: the body is judged first.
    r = rate(client, "ab" * 16, kind="actual_price", value=1e308)
    assert r.status_code == 422 and r.get_json()["field"] == "feedback_value"


@pytest.mark.parametrize("value", [5e-324, 1e-300, 1e308, 0, -1, 0.5, 100001, "times25", "over25"])
def test_poison_actual_prices_are_refused_before_anything_moves(app, client, value):
    answer = predict(client)
    estimate = answer["estimated_price"]
    value = {"times25": estimate * 25, "over25": estimate / 25}.get(value, value)
    r = rate(client, answer["prediction_id"], kind="actual_price", value=value)
    assert r.status_code == 422 and r.get_json()["field"] == "feedback_value", (value, r.get_json())
    assert store_of(app).feedback_for(answer["prediction_id"]) == []
    for name in ("abfleet_ape_observations_total", "abfleet_ape_sum_total", "abfleet_ape_sum_squares_total"):
        assert all(s.value == 0 for s in samples(client, name)), name


def test_an_accepted_actual_price_moves_all_three_ape_counters(client):
    answer = predict(client)
    actual = answer["estimated_price"] * 2
    r = rate(client, answer["prediction_id"], kind="actual_price", value=actual)
    assert r.status_code == 201 and r.get_json()["ape"] == pytest.approx(0.5, abs=0.01)
    values = [sum(s.value for s in samples(client, name)) for name in
              ("abfleet_ape_observations_total", "abfleet_ape_sum_total", "abfleet_ape_sum_squares_total")]
    assert values == pytest.approx([1, 0.5, 0.25], abs=0.01)


@pytest.mark.parametrize("value", [2.5, True, 0, 6, 1e400, None, [3]])
def test_a_rating_is_a_whole_number_of_stars(client, value):
    pid = predict(client)["prediction_id"]
    assert rate(client, pid, value=value).status_code == 422


NESTED = b'{"prediction_id": ' + b"[" * 3000 + b"]" * 3000 + b"}"
DEEP = b"[" * 3000 + b"]" * 3000


@pytest.mark.parametrize("content_type", ["application/json", "application/json; charset=utf-8",
                                          "application/merge-patch+json", "application/vnd.api+json"])
@pytest.mark.parametrize("body,status,field", [
    (NESTED, 400, "body"),
    (DEEP, 400, "body"),
    (b'{"prediction_id": "ab", "feedback_type": "actual_price", "feedback_value": ' + b"9" * 400 + b"}", 422, "feedback_value"),
    (b'{"prediction_id": "ab", "feedback_type": "actual_price", "feedback_value": NaN}', 422, "feedback_value"),
    (b'{"prediction_id": "ab", "feedback_type": "actual_price", "feedback_value": -Infinity}', 422, "feedback_value"),
    (b'{"prediction_id": "ab\\u0000\\u001c", "feedback_type": "rating", "feedback_value": 3}', 422, "prediction_id"),
    (b'{"prediction_id": "ab\x01", "feedback_type": "rating", "feedback_value": 3}', 400, "body"),
    (b"\xff\xfe", 400, "body"),
])
def test_hostile_feedback_bodies_are_4xx_on_every_json_type(client, content_type, body, status, field):
    r = client.post(FEEDBACK, data=body, content_type=content_type)
    assert (r.status_code, r.get_json()["field"]) == (status, field), r.get_json()
    errors = [s for s in samples(client, "abfleet_requests_total") if s.labels["status"].startswith("5") and s.value]
    assert errors == []


@pytest.mark.parametrize("form,field", [
    ({"prediction_id": "ab", "feedback_type": "actual_price", "feedback_value": "nan"}, "feedback_value"),
    ({"prediction_id": "ab", "feedback_type": "actual_price", "feedback_value": "9" * 400}, "feedback_value"),
    ({"prediction_id": "ab\x1c", "feedback_type": "rating", "feedback_value": "3"}, "prediction_id"),
    ({"prediction_id": "ab", "feedback_type": "rating", "feedback_value": "3.5"}, "feedback_value"),
])
def test_hostile_feedback_forms_are_4xx(client, form, field):
    r = client.post(FEEDBACK, data=form)
    assert r.status_code == 422 and r.get_json()["field"] == field, r.get_json()


# ---- nothing internal in public bodies --------------------------------------------------------

SECRET = "RegistryError: registry at http://admin:hunter2@mlflow:5000 refused /srv/models"


def test_health_and_503s_say_nothing_internal(tmp_path, caplog):
    settings = Settings(run_dir=tmp_path)
    holder = ModelHolder(settings)

    def broken():
        raise RuntimeError(SECRET)

    holder.wanted = broken
    assert holder.refresh() is False
    assert SECRET in caplog.text  # the detail is in the log
    store = Store(migrate(settings).db_url)
    app = create_app(settings, holder=holder, store=store)
    try:
        client = app.test_client()
        health = client.get(HEALTH)
        assert health.status_code == 503 and health.get_json()["model_loaded"] is False
        assert health.get_json()["last_error"]
        for r in (health, client.get(LOCATIONS), client.post(PREDICT, json=FLAT)):
            assert r.status_code == 503
            text = r.get_data(as_text=True)
            assert "hunter2" not in text and "mlflow" not in text and "/srv" not in text and "RegistryError" not in text
    finally:
        store.stop_spool()


def test_drift_report_says_a_report_exists_not_where(app, client):
    before = client.get("/api/drift_report")
    assert before.status_code == 200 and before.get_json()["status"] == "no_current_data"
    store_of(app).set_state("drift_summary", {"drift_detected": False, "share_drifted": 0.0, "drifted_columns": [],
                                              "columns": {}, "report": "s3://fleet-bucket/abfleet/drift/2026.html"})
    r = client.get("/api/drift_report")
    assert r.status_code == 200 and r.get_json()["report_available"] is True and r.get_json()["status"] == "success"
    assert "fleet-bucket" not in r.get_data(as_text=True) and "report" not in r.get_json()


@pytest.mark.parametrize("env", [{"ABFLEET_FEEDBACK_WINDOW_DAYS": "0"}, {"ABFLEET_ACTUAL_PRICE_MIN_LAKHS": "0"},
                                 {"ABFLEET_ACTUAL_PRICE_MAX_LAKHS": "inf"}, {"ABFLEET_ACTUAL_PRICE_MAX_RATIO": "0.5"},
                                 {"ABFLEET_ACTUAL_PRICE_MIN_LAKHS": "500", "ABFLEET_ACTUAL_PRICE_MAX_LAKHS": "100"}])
def test_feedback_settings_are_checked(env):
    with pytest.raises(ValueError, match="ABFLEET_"):
        Settings.from_env(env)
