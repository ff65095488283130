"""The model server: a Flask app factory. gunicorn runs `create_app()` in each worker."""

from __future__ import annotations

import gc
import hmac
import io
import json
import math
import logging
import os
import threading
import time

from flask import Flask, Response, g, jsonify, request
from pydantic import ValidationError
from werkzeug.exceptions import HTTPException

from abfleet import data
from abfleet.api import MAX_BATH, MAX_BHK, MAX_SQFT, MIN_SQFT, PREDICT, FeedbackRequest, PredictRequest, describe
from abfleet.metrics import FleetStateCollector, ServerMetrics
from abfleet.serving import ModelHolder
from abfleet.settings import Settings
from abfleet.store import Duplicate, NotFound, Store

log = logging.getLogger(__name__)


class PredictionIds:
    """Unguessable prediction ids (32 hex digits, like uuid4().hex) without a getrandom()
    call per request: random bytes from the OS are read 4 KiB at a time."""

    def __init__(self, batch: int = 4096):
        self._batch = batch
        self._lock = threading.Lock()
        self._reset()
        os.register_at_fork(after_in_child=self._reset)  # a forked child must not repeat its parent's ids

    def _reset(self) -> None:
        self._buffer, self._at = b"", 0
        self._lock = threading.Lock()

    def new(self) -> str:
        with self._lock:
            if self._at + 16 > len(self._buffer):
                self._buffer, self._at = os.urandom(self._batch), 0
            start = self._at
            self._at = start + 16
        return self._buffer[start:start + 16].hex()


new_prediction_id = PredictionIds().new


def create_app(settings: Settings | None = None, holder: ModelHolder | None = None, store: Store | None = None) -> Flask:
    """Build a model server. Defaults come from the environment; tests pass their own parts."""
    settings = settings or Settings.from_env()
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.json.sort_keys = False

    from prometheus_client import CollectorRegistry

    metrics = ServerMetrics(CollectorRegistry())
    store = store or Store(settings.db_url)
    store.init_schema()
    # Answers wait for a line in the spool file, not for the database (see abfleet.store).
    try:
        store.start_spool(fsync=settings.spool_fsync, linger=settings.spool_linger)
    except OSError as exc:  # no writable spool folder: every answer waits for its INSERT, as before
        log.warning("prediction spool unavailable (%s): writing predictions straight to the database", exc)

    def on_swap(old, new) -> None:
        if old is not None:
            # multiprocess mode cannot remove a series: the old one drops to 0 (queries keep > 0)
            metrics.model_info.labels(settings.variant, old.version, old.alias, str(old.fallback).lower()).set(0)
            metrics.swaps.labels(settings.variant).inc()
        metrics.model_info.labels(settings.variant, new.version, new.alias, str(new.fallback).lower()).set(1)
        metrics.prime(settings.variant, new.version, PREDICT)

    own_holder = holder is None
    if own_holder:
        holder = ModelHolder(settings, on_swap=on_swap)
        holder.refresh()
        holder.start_watcher()
    elif holder.current is not None:
        on_swap(None, holder.current)

    # The fleet's vocabulary, so both variants accept the same locations whatever their data.
    vocabulary = data.known_locations()
    fleet_registry = CollectorRegistry()
    fleet_registry.register(FleetStateCollector(store))
    app.extensions["abfleet"] = {"settings": settings, "holder": holder, "store": store, "metrics": metrics}
    variant = settings.variant

    def version_header() -> str:
        held = holder.current
        if held is None:
            return "none"
        return f"{held.version} (fallback: production)" if held.fallback else held.version

    @app.before_request
    def _start_clock() -> None:
        g.started = time.perf_counter()

    @app.after_request
    def _label_and_count(response: Response) -> Response:
        response.headers["X-Variant"] = variant
        response.headers["X-Model-Version"] = version_header()
        endpoint = request.url_rule.rule if request.url_rule else "unmatched"
        if endpoint != "/metrics":
            held = holder.current
            version = g.get("model_version") or (held.version if held else "none")
            metrics.requests.labels(variant, version, endpoint, str(response.status_code)).inc()
            metrics.latency.labels(variant, endpoint).observe(time.perf_counter() - g.get("started", time.perf_counter()))
        return response

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        messages = {413: f"request body too large: at most {settings.max_body_bytes} bytes"}
        return jsonify(error=messages.get(exc.code, exc.description), field=None), exc.code

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        log.exception("unexpected error")
        return jsonify(error=f"internal error: {type(exc).__name__}", field=None), 500

    max_body = settings.max_body_bytes

    def payload() -> dict | None:
        if request.mimetype in ("application/x-www-form-urlencoded", "multipart/form-data"):
            return request.form.to_dict()
        data = request.get_json(silent=True)
        return data if isinstance(data, dict) else None

    def refuse(message: str, field: str | None, status: int = 422):
        return jsonify(error=message, field=field), status

    @app.post(PREDICT)
    def predict_home_price():
        body = payload()
        if body is None:
            return refuse("body: send a JSON object (or form fields) with location, total_sqft, bhk, bath", "body", 400)
        try:
            req = PredictRequest.model_validate(body)
        except ValidationError as exc:
            return refuse(*describe(exc))
        held = holder.current
        if held is None:
            return refuse(f"no model loaded yet: {holder.last_error or 'loading'}", None, 503)
        location = held.predictor.model_location(req.location, vocabulary)
        if location is None:
            return refuse(f"location: unknown location {req.location!r}; see /api/get_location_names", "location")
        t0 = time.perf_counter()
        price = held.predictor.predict_one(location, req.total_sqft, req.bhk, req.bath)
        latency_ms = (time.perf_counter() - t0) * 1000.0
        g.model_version = held.version
        prediction_id = new_prediction_id()
        row = {
            "id": prediction_id, "variant": variant, "model_version": held.version,
            "location": req.location, "total_sqft": req.total_sqft, "bhk": req.bhk, "bath": req.bath,
            "estimated_price": round(price, 2), "latency_ms": latency_ms,
            "user_id": request.environ.get("HTTP_X_USER_ID", "")[:128] or None,
        }
        try:
            store.record_prediction(row)
        except Exception as exc:  # an answer we could not store is not given: nothing is lost silently
            log.error("prediction not stored: %s", exc)
            return refuse("store unavailable: the prediction could not be recorded, try again", None, 503)
        return jsonify(
            estimated_price=row["estimated_price"], prediction_id=prediction_id, model_version=held.version,
            unit="lakh INR", location=req.location, total_sqft=req.total_sqft, bhk=req.bhk, bath=req.bath,
        )

    # ---- the predict route's common case, without Flask's request machinery ----------
    # A JSON request whose fields are plainly valid (the right JSON types, within bounds) is
    # answered here: the same prediction, the same stored row, the same metrics, headers and
    # body as the Flask view above. Everything else (a field pydantic would coerce or refuse,
    # an unknown location, no model yet, a store error, chunked or oversized bodies) goes on
    # to that view unchanged, so every refusal keeps its one wording. Flask's dispatch costs
    # more than the model itself; see the README's serving-speed table.
    counters_of_version = {}  # version -> its (requests, latency) label children, looked up once

    def plainly_valid(body) -> tuple[str, float, int, int] | None:
        if type(body) is not dict:
            return None
        location, sqft, bhk, bath = (body.get("location"), body.get("total_sqft"), body.get("bhk"), body.get("bath"))
        if type(location) is not str or type(bhk) is not int or type(bath) is not int:
            return None
        location = location.strip()
        if not (0 < len(location) <= 128 and 1 <= bhk <= MAX_BHK and 1 <= bath <= MAX_BATH):
            return None
        if type(sqft) is int:
            sqft = float(sqft)
        elif type(sqft) is not float or not math.isfinite(sqft):
            return None
        if not MIN_SQFT <= sqft <= MAX_SQFT:
            return None
        return location, sqft, bhk, bath

    def fast_predict(environ) -> tuple[str, list, bytes] | None:
        """(status, headers, body) of a plainly valid prediction, else None (Flask answers)."""
        started = time.perf_counter()
        length = environ.get("CONTENT_LENGTH", "")
        if environ.get("CONTENT_TYPE") != "application/json" or not length.isdigit() or int(length) > max_body:
            return None
        raw = environ["wsgi.input"].read(int(length))
        environ["wsgi.input"] = io.BytesIO(raw)  # Flask can still read it if we pass
        try:
            fields = plainly_valid(json.loads(raw))
        except ValueError:
            return None
        held = holder.current
        if fields is None or held is None:
            return None
        location, sqft, bhk, bath = fields
        model_location = held.predictor.model_location(location, vocabulary)
        if model_location is None:
            return None
        t0 = time.perf_counter()
        price = held.predictor.predict_one(model_location, sqft, bhk, bath)
        latency_ms = (time.perf_counter() - t0) * 1000.0
        prediction_id = new_prediction_id()
        estimate = round(price, 2)
        try:
            store.record_prediction({
                "id": prediction_id, "variant": variant, "model_version": held.version,
                "location": location, "total_sqft": sqft, "bhk": bhk, "bath": bath,
                "estimated_price": estimate, "latency_ms": latency_ms,
                "user_id": environ.get("HTTP_X_USER_ID", "")[:128] or None,
            })
        except Exception:  # not stored, not answered: the view tries again and refuses with 503
            return None
        body = json.dumps({
            "estimated_price": estimate, "prediction_id": prediction_id, "model_version": held.version,
            "unit": "lakh INR", "location": location, "total_sqft": sqft, "bhk": bhk, "bath": bath,
        }, separators=(",", ":")).encode() + b"\n"
        headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                   ("X-Variant", variant), ("X-Model-Version", version_header())]
        counted = counters_of_version.get(held.version)
        if counted is None:
            counted = counters_of_version[held.version] = (metrics.requests.labels(variant, held.version, PREDICT, "200"),
                                                      metrics.latency.labels(variant, PREDICT))
        counted[0].inc()
        counted[1].observe(time.perf_counter() - started)
        return "200 OK", headers, body

    flask_wsgi = app.wsgi_app

    def wsgi_app(environ, start_response):
        if environ.get("PATH_INFO") == PREDICT and environ.get("REQUEST_METHOD") == "POST":
            answer = fast_predict(environ)
            if answer is not None:
                status, headers, body = answer
                start_response(status, headers)
                return [body]
        return flask_wsgi(environ, start_response)

    app.wsgi_app = wsgi_app

    @app.get("/api/ping")
    def ping():
        # The cheapest JSON answer this app gives: the benchmark's yardstick for the predict path.
        return jsonify(status="ok")

    @app.get("/api/get_location_names")
    def get_location_names():
        held = holder.current
        if held is None:
            return refuse(f"no model loaded yet: {holder.last_error or 'loading'}", None, 503)
        return jsonify(locations=sorted(vocabulary.union(held.predictor.locations) - {"other"}) + ["other"])

    @app.post("/api/feedback")
    def record_feedback():
        body = payload()
        if body is None:
            return refuse("body: send a JSON object with prediction_id, feedback_type, feedback_value", "body", 400)
        try:
            req = FeedbackRequest.model_validate(body)
        except ValidationError as exc:
            return refuse(*describe(exc))
        try:
            row = store.record_feedback(req.prediction_id, req.feedback_type, req.feedback_value, received_by=variant)
        except NotFound:
            return refuse(f"prediction_id: no prediction {req.prediction_id!r}", "prediction_id", 404)
        except Duplicate as exc:
            return refuse(f"feedback_type: {exc}", "feedback_type", 409)
        v, mv = row["variant"], row["model_version"]
        if row["kind"] == "rating":
            metrics.ratings.labels(v, mv, str(int(req.feedback_value))).inc()
        elif row["kind"] == "quick":
            metrics.quick.labels(v, mv, req.feedback_type).inc()
        else:
            metrics.ape_count.labels(v, mv).inc()
            metrics.ape_sum.labels(v, mv).inc(row["ape"])
            metrics.ape_sum_sq.labels(v, mv).inc(row["ape"] ** 2)
        return jsonify(status="recorded", prediction_id=req.prediction_id, feedback_type=req.feedback_type,
                       variant=v, model_version=mv, ape=row["ape"]), 201

    @app.get("/api/health")
    def health():
        held = holder.current
        store_ok = store.ping()
        body = {
            "status": "ok" if held and store_ok else "unavailable",
            "variant": variant,
            "model_loaded": held is not None,
            "model_version": held.version if held else None,
            "serving_alias": held.alias if held else None,
            "fallback": bool(held and held.fallback),
            "store_reachable": store_ok,
            "last_error": holder.last_error,
        }
        if held and held.fallback:
            body["note"] = "no candidate in the registry: serving the production model"
        return jsonify(body), 200 if body["status"] == "ok" else 503

    @app.get("/api/drift_report")
    def drift_report():
        summary = store.get_state("drift_summary")
        if summary is None:
            return refuse("no drift check has run yet: the daily drift_monitoring DAG or `abfleet drift` makes one", None, 404)
        return jsonify(summary)

    @app.post("/api/admin/reload")
    def reload_model():
        token = settings.admin_token
        given = request.headers.get("Authorization", "").removeprefix("Bearer ")
        if not token or not hmac.compare_digest(given.encode(), token.encode()):
            return refuse("authorization: a valid admin token is required", "authorization", 401)
        holder.wake()
        swapped = holder.refresh()
        return jsonify(swapped=swapped, model_version=version_header())

    @app.get("/metrics")
    def metrics_endpoint():
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
        from prometheus_client import multiprocess

        if settings.prometheus_multiproc_dir:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
        else:
            registry = metrics.registry
        body = generate_latest(registry)
        if variant == "production":
            body += generate_latest(fleet_registry)
        return Response(body, mimetype=CONTENT_TYPE_LATEST)

    if own_holder:
        # A real server: everything loaded so far (libraries, the model) lives as long as the
        # process. Out of the cyclic collector's sight, a full collection no longer walks it
        # in the middle of a request (tens of milliseconds at the latency tail).
        gc.freeze()
    return app
