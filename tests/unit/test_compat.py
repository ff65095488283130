"""What the original project's clients expect of a model server, answered by the Flask app
over a tiny model: health words, the /api/metrics summary, comments, response_time_ms, any
spelling of a location, the drift report's status, and /metrics' own content type."""

from __future__ import annotations

import datetime as dt

import pytest
import sqlalchemy as sa
from prometheus_client import CONTENT_TYPE_LATEST

from abfleet import api, router, summary
from abfleet.settings import Settings
from abfleet.store import Store, feedback, predictions
from tests.helpers import app_serving, migrate

USER = {"X-User-Id": "compat-user"}


@pytest.fixture
def app(tmp_path, tiny_predictor):
    with app_serving(Settings(run_dir=tmp_path, variant="production"), tiny_predictor, "5") as app:
        yield app


@pytest.fixture
def client(app):
    return app.test_client()


def predict(client, **changes) -> dict:
    r = client.post(api.PREDICT, json={**api.FLAT, **changes}, headers=USER)
    assert r.status_code == 200, r.get_json()
    return r.get_json()


def test_health_words(app, client):
    r = client.get(api.HEALTH)
    assert r.status_code == 200 and r.get_json()["status"] == "healthy"
    holder = app.extensions["abfleet"]["holder"]
    holder.problem = "version 6 refused: artifact checksum mismatch"
    r = client.get(api.HEALTH)
    assert r.status_code == 200 and r.get_json()["status"] == "degraded"
    holder.problem, holder.current = None, None
    r = client.get(api.HEALTH)
    assert r.status_code == 503 and r.get_json()["status"] == "unhealthy" and r.get_json()["model_variant"] == "production"


def test_predict_answers_its_response_time(client):
    body = predict(client)
    assert isinstance(body["response_time_ms"], float) and body["response_time_ms"] >= 0


@pytest.mark.parametrize("spelling", ["indira nagar", "  INDIRA   NAGAR ", "Indira\tNagar", "iNdIrA nAgAr"])
def test_location_in_any_case_and_spacing(app, client, spelling):
    body = predict(client, location=spelling)
    assert body["location"] == "Indira Nagar"
    assert app.extensions["abfleet"]["store"].get_prediction(body["prediction_id"])["location"] == "Indira Nagar"
    assert body["estimated_price"] == predict(client)["estimated_price"]


def test_unknown_location_names_close_known_ones(client):
    r = client.post(api.PREDICT, json={**api.FLAT, "location": "Indira Nagr"}, headers=USER)
    assert r.status_code == 422 and r.get_json()["field"] == "location"
    assert "'Indira Nagar'" in r.get_json()["error"]
    far = client.post(api.PREDICT, json={**api.FLAT, "location": "Qqqqqqqqq"}, headers=USER).get_json()
    assert far["field"] == "location" and "did you mean" not in far["error"]


def test_close_names_are_at_most_three():
    known = ["Whitefield", "Whitefeild East", "Whitefield West", "Whitefields", "Whitfield"]
    message = api.unknown_location("whitefeld", known).message
    assert sum(name in message for name in (f"'{k}'" for k in known)) == 3


def test_comment_feedback_is_stored_and_needs_text(app, client):
    pid = predict(client)["prediction_id"]
    empty = client.post(api.FEEDBACK, json={"prediction_id": pid, "feedback_type": "comment"}, headers=USER)
    assert empty.status_code == 422 and empty.get_json()["field"] == "feedback_text"
    ok = client.post(api.FEEDBACK, json={"prediction_id": pid, "feedback_type": "comment",
                                         "feedback_text": "nice area, a bit pricey"}, headers=USER)
    assert ok.status_code == 201, ok.get_json()
    (row,) = app.extensions["abfleet"]["store"].feedback_for(pid)
    assert (row["kind"], row["feedback_text"], row["feedback_value"]) == ("comment", "nice area, a bit pricey", None)


def test_feedback_text_beside_any_kind_and_its_length(app, client):
    pid = predict(client)["prediction_id"]
    rated = client.post(api.FEEDBACK, json={"prediction_id": pid, "feedback_type": "rating", "feedback_value": 4,
                                            "feedback_text": "close enough"}, headers=USER)
    assert rated.status_code == 201
    assert app.extensions["abfleet"]["store"].feedback_for(pid)[0]["feedback_text"] == "close enough"
    long = client.post(api.FEEDBACK, json={"prediction_id": pid, "feedback_type": "too_high",
                                           "feedback_text": "x" * (api.MAX_FEEDBACK_TEXT + 1)}, headers=USER)
    assert long.status_code == 422 and long.get_json()["field"] == "feedback_text"
    # A repeat of a kind is still 409, with or without text.
    again = client.post(api.FEEDBACK, json={"prediction_id": pid, "feedback_type": "rating", "feedback_value": 2,
                                            "feedback_text": "changed my mind"}, headers=USER)
    assert again.status_code == 409


def test_a_comment_moves_no_decision_counter(client):
    pid = predict(client)["prediction_id"]
    assert client.post(api.FEEDBACK, json={"prediction_id": pid, "feedback_type": "comment", "feedback_text": "hm"},
                       headers=USER).status_code == 201
    text = client.get(api.METRICS).get_data(as_text=True)
    moved = [line for line in text.splitlines()
             if line.startswith(("abfleet_ape_", "abfleet_ratings_total", "abfleet_quick_feedback"))
             and "_created" not in line and not line.endswith(" 0.0")]
    assert moved == []


def test_metrics_summary_shape_and_numbers(app, client):
    pids = [predict(client)["prediction_id"] for _ in range(5)]
    for pid, stars in zip(pids, (5, 4)):
        client.post(api.FEEDBACK, json={"prediction_id": pid, "feedback_type": "rating", "feedback_value": stars}, headers=USER)
    client.post(api.FEEDBACK, json={"prediction_id": pids[0], "feedback_type": "too_high"}, headers=USER)
    client.post(api.FEEDBACK, json={"prediction_id": pids[1], "feedback_type": "accurate"}, headers=USER)
    app.extensions["abfleet"]["store"].settle()
    r = client.get(f"{api.METRICS_SUMMARY}?hours=2")
    assert r.status_code == 200
    body = r.get_json()
    assert (body["variant"], body["time_period_hours"]) == ("production", 2)
    assert dt.datetime.fromisoformat(body["timestamp"]).tzinfo is not None
    p, f = body["predictions"], body["feedback"]
    assert p["total_count"] == 5
    assert 0 <= p["min_latency_ms"] <= p["avg_latency_ms"] <= p["max_latency_ms"]
    assert p["min_latency_ms"] <= p["p95_latency_ms"] <= p["p99_latency_ms"] <= p["max_latency_ms"]
    assert f == {"total_count": 4, "avg_rating": 4.5, "accurate_count": 1, "too_high_count": 1, "too_low_count": 0}
    assert client.get(api.METRICS_SUMMARY).get_json()["time_period_hours"] == api.DEFAULT_HOURS


@pytest.mark.parametrize("hours", ["0", "-1", "abc", "1.5", "", str(api.MAX_HOURS + 1)])
def test_metrics_hours_is_checked(client, hours):
    r = client.get(f"{api.METRICS_SUMMARY}?hours={hours}")
    assert r.status_code == 422 and r.get_json()["field"] == "hours", r.get_json()


def test_metrics_summary_counts_only_the_window_and_the_variant(tmp_path):
    settings = Settings(run_dir=tmp_path)
    store = Store(migrate(settings).db_url)
    now = dt.datetime.now(dt.timezone.utc)
    rows = [{"id": f"{i:032x}", "created_at": now - dt.timedelta(hours=age), "variant": variant, "model_version": "1",
             "location": "Indira Nagar", "total_sqft": 1000.0, "bhk": 2, "bath": 2, "estimated_price": 50.0,
             "latency_ms": latency, "user_id": None}
            for i, (age, variant, latency) in enumerate([(0.5, "production", 1.0), (0.5, "production", 3.0),
                                                         (0.5, "candidate", 9.0), (5, "production", 500.0)])]
    with store.engine.begin() as conn:
        conn.execute(predictions.insert(), rows)
        conn.execute(feedback.insert(), [{"prediction_id": rows[0]["id"], "created_at": now, "kind": "quick",
                                          "feedback_type": "too_low", "variant": "production", "model_version": "1"}])
    one = summary.variant_summary(store.engine, "production", 1)
    assert one["predictions"]["total_count"] == 2 and one["predictions"]["avg_latency_ms"] == 2.0
    assert (one["predictions"]["min_latency_ms"], one["predictions"]["max_latency_ms"]) == (1.0, 3.0)
    assert one["feedback"]["too_low_count"] == 1 and one["feedback"]["avg_rating"] is None
    six = summary.variant_summary(store.engine, "production", 6)
    assert six["predictions"]["total_count"] == 3 and six["predictions"]["max_latency_ms"] == 500.0
    assert six["predictions"]["p99_latency_ms"] == 500.0  # the slow one: the 99th percentile of three
    assert summary.variant_summary(store.engine, "candidate", 1)["predictions"]["total_count"] == 1
    empty = summary.variant_summary(store.engine, "nobody", 1)
    assert empty["predictions"]["total_count"] == 0 and empty["predictions"]["p95_latency_ms"] == 0.0
    store.close()


def test_the_summary_is_one_statement(tmp_path):
    settings = Settings(run_dir=tmp_path)
    store = Store(migrate(settings).db_url)
    seen = []
    sa.event.listen(store.engine, "before_cursor_execute", lambda *args: seen.append(args[2]))
    summary.variant_summary(store.engine, "production", 24)
    assert len([s for s in seen if s.lstrip().upper().startswith("SELECT")]) == 1
    store.close()


def test_percentiles_from_buckets():
    # 100 values: 1..99 in the fine buckets, one at 250 ms in a coarse one.
    buckets = sorted((summary.COARSE_BASE + 250, 1) if v == 100 else (v * summary.FINE_STEPS // 10, 1)
                     for v in range(1, 101))
    assert summary.percentile(buckets, 100, 0.95) == pytest.approx(9.505)
    assert summary.percentile(buckets, 100, 1.0) == 250.5
    assert summary.bucket_range(summary.COARSE_BASE + 7) == (7.0, 8.0)


def test_drift_report_always_200_with_a_status(app, client):
    first = client.get(api.DRIFT_REPORT)
    assert first.status_code == 200 and first.get_json()["status"] == "no_current_data"
    app.extensions["abfleet"]["store"].set_state("drift_summary", {"drift_detected": True, "report": None})
    done = client.get(api.DRIFT_REPORT).get_json()
    assert done["status"] == "success" and done["drift_detected"] is True and done["report_available"] is False


def test_metrics_content_type_is_prometheus_clients_own(client):
    assert client.get(api.METRICS).headers["Content-Type"] == CONTENT_TYPE_LATEST


def test_cors_origins_are_origins():
    s = Settings.from_env({"ABFLEET_CORS_ORIGINS": "http://127.0.0.1:8123, https://app.example.org/,http://[::1]:9"})
    assert s.allowed_origins == ["http://127.0.0.1:8123", "https://app.example.org", "http://[::1]:9"]
    assert Settings().allowed_origins == []
    for bad in ("app.example.org", "http://x.org/path", 'http://x.org"; return 200', "ftp://x.org", "http://x.org:port"):
        with pytest.raises(ValueError, match="ABFLEET_CORS_ORIGINS"):
            Settings.from_env({"ABFLEET_CORS_ORIGINS": bad})


def test_the_router_lists_exactly_the_allowed_origins(tmp_path):
    text = router.render(Settings(run_dir=tmp_path, cors_origins="http://127.0.0.1:8123"))
    origins = text.split("map $http_origin $abfleet_cors_origin {")[1].split("}")[0]
    assert [line.split()[0] for line in origins.strip().splitlines()] == ["default", '"http://127.0.0.1:8123"']
    closed = router.render(Settings(run_dir=tmp_path)).split("map $http_origin $abfleet_cors_origin {")[1].split("}")[0]
    assert closed.split() == ["default", '"";']
