"""The model server's API views, in one blueprint; every answer is JSON, every refusal names
the field, and every response carries X-Variant and X-Model-Version."""

from __future__ import annotations

import datetime as dt
import hmac
import logging
import time

from flask import Blueprint, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException

from abfleet import api, fleet, openapi, summary
from abfleet.serving import STORE_FAULTS, no_model_yet, store_fault
from inference.backend.parts import parts

log = logging.getLogger(__name__)

bp = Blueprint("api", __name__)

FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")


def request_body() -> bytes | dict | None:
    """The body as `api.parse` takes it: form fields, the raw bytes of any JSON content type,
    or None for a body of another type."""
    if request.mimetype in FORM_TYPES:
        return request.form.to_dict()
    if request.is_json:
        return request.get_data()
    return None


def refuse(message: str, field: str | None, status: int = 422):
    return jsonify(api.error(message, field)), status


@bp.before_app_request
def _start_clock() -> None:
    g.started = time.perf_counter()


@bp.after_app_request
def _label_and_count(response: Response) -> Response:
    p = parts()
    holder = p["holder"]
    response.headers["X-Variant"] = p["settings"].variant
    response.headers["X-Model-Version"] = holder.version_header()
    endpoint = request.url_rule.rule if request.url_rule else "unmatched"
    if endpoint != api.METRICS:
        held = holder.current
        version = g.get("model_version") or (held.version if held else "none")
        p["counts"].count(version, endpoint, response.status_code, time.perf_counter() - g.get("started", time.perf_counter()),
                          request.headers.get("X-Router-Variant", ""))
    return response


@bp.app_errorhandler(HTTPException)
def _http_error(exc: HTTPException):
    max_body = parts()["settings"].max_body_bytes
    messages = {413: f"request body too large: at most {max_body} bytes"}
    response = jsonify(api.error(messages.get(exc.code, exc.description), None))
    for name, value in exc.get_headers():  # Allow on a 405, for one
        if name.lower() != "content-type":
            response.headers[name] = value
    return response, exc.code


def internal_error(exc: Exception) -> dict:
    """The body of a 500: the kind of failure (its class name), never its message or a
    traceback; those go to the log."""
    log.exception("unexpected error")
    return api.error(f"internal error: {type(exc).__name__}", None)


@bp.app_errorhandler(Exception)
def _unexpected(exc: Exception):
    return jsonify(internal_error(exc)), 500


@bp.post(api.PREDICT)
def predict_home_price():
    answer = parts()["predictions"].answer(request_body(), request.environ.get("HTTP_X_USER_ID", ""))
    g.model_version = answer.version
    return jsonify(answer.body), answer.status, list(answer.headers)


@bp.get(api.OPENAPI)
def openapi_document():
    return jsonify(openapi.document())


@bp.get(api.PING)
def ping():
    return jsonify(status="ok")


@bp.get(api.LOCATIONS)
def get_location_names():
    p = parts()
    held = p["holder"].current
    if held is None:
        return refuse(no_model_yet(p["holder"]), None, 503)
    vocabulary = p["predictions"].vocabulary
    return jsonify(locations=sorted(vocabulary.union(held.predictor.locations) - {"other"}) + ["other"])


@bp.post(api.FEEDBACK)
def record_feedback():
    p = parts()
    status, body, row, failure, retry_after = p["feedback"].record(request_body(), request.environ.get("HTTP_X_USER_ID", ""))
    if failure is not None:
        p["metrics"].feedback_failures.labels(failure).inc()
        if failure == "store":
            p["metrics"].store_errors.labels("feedback").inc()
        response = jsonify(body)
        response.headers["Retry-After"] = str(retry_after)
        return response, status
    if row is not None:
        p["metrics"].count_feedback(row)  # as feedback resolved from the spool is counted
    return jsonify(body), status


@bp.get(api.LIVE)
def live():
    # The process answers: nothing else is asked (no model, no database).
    return jsonify(status="ok")


@bp.get(api.READY)
def ready():
    p = parts()
    held = p["holder"].current
    p["metrics"].ready.set(1 if held is not None else 0)
    body = {
        "status": "ready" if held is not None else "unavailable",
        "model_version": held.version if held else None,
        # The latest background ping: predictions do not wait for the database, so readiness does not depend on it.
        "database": p["database"].state,
    }
    if held is None:
        body["reason"] = no_model_yet(p["holder"])
    return jsonify(body), 200 if held is not None else 503


def health_status(held, store_ok: bool, problem: str | None) -> str:
    """healthy: answering with everything in order; degraded: answering, but the store is
    unreachable, a candidate serves production's model, or a newer version was refused;
    unhealthy: no model, so no answers."""
    if held is None:
        return "unhealthy"
    return "healthy" if store_ok and not held.fallback and not problem else "degraded"


@bp.get(api.HEALTH)
def health():
    p = parts()
    holder = p["holder"]
    held = holder.current
    database = p["database"].state  # the latest background ping: a request never waits for the database
    store_ok = database == "ok"
    body = {
        "status": health_status(held, store_ok, holder.problem),
        "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(),
        "model_variant": p["settings"].variant,
        "variant": p["settings"].variant,
        "model_loaded": held is not None,
        "model_version": held.version if held else None,
        "serving_alias": held.alias if held else None,
        "fallback": bool(held and held.fallback),
        "store_reachable": store_ok,
        "database": database,
        "last_error": holder.problem,  # public wording; the detail is in the log
    }
    if held and held.fallback:
        body["note"] = "no candidate in the registry: serving the production model"
    return jsonify(body), 503 if held is None else 200


def store_unavailable(exc: Exception):
    """The 503 of a read the store could not answer, with Retry-After."""
    p = parts()
    p["metrics"].store_errors.labels("read").inc()
    response = jsonify(api.error(f"store unavailable: {store_fault(exc)}; try again later", None))
    response.headers["Retry-After"] = str(p["feedback"].retry_after)
    return response, 503


@bp.get(api.METRICS_SUMMARY)
def metrics_summary():
    p = parts()
    try:
        query = api.parse(api.MetricsQuery, request.args.to_dict())
    except api.Refused as refused:
        return jsonify(refused.body()), refused.status
    try:
        return jsonify(summary.variant_summary(p["store"].engine, p["settings"].variant, query.hours))
    except STORE_FAULTS as exc:
        log.error("metrics summary not read: %s", exc)
        return store_unavailable(exc)


@bp.get(api.DRIFT_REPORT)
def drift_report():
    # Always 200: the status says whether there is a summary (the original project's contract).
    try:
        summary_ = parts()["store"].get_state("drift_summary")
    except STORE_FAULTS as exc:
        log.error("drift summary not read: %s", exc)
        parts()["metrics"].store_errors.labels("read").inc()
        return jsonify(status="error", message=f"store unavailable: {store_fault(exc)}; try again later")
    if summary_ is None:
        return jsonify(status="no_current_data",
                       message="no drift check has run yet: the daily drift_monitoring DAG or `abfleet drift` makes one")
    # The report's location names the bucket or a local path: say only whether there is one.
    public = {k: v for k, v in summary_.items() if k != "report"}
    public["report_available"] = bool(summary_.get("report"))
    return jsonify({"status": "success", **public})


@bp.post(api.RELOAD)
def reload_model():
    p = parts()
    token = fleet.admin_token(p["settings"])
    given = request.headers.get("Authorization", "").removeprefix("Bearer ")
    if not token or not hmac.compare_digest(given.encode(), token.encode()):
        return refuse("authorization: a valid admin token is required", "authorization", 401)
    holder = p["holder"]
    holder.wake()
    swapped = holder.refresh()
    version = holder.version_header()
    settings, signal = p["settings"], p["reload_signal"]
    if signal is None:  # a server built around a fixed model (tests): this worker is the server
        return jsonify(swapped=swapped, model_version=version, workers={"expected": 1, "reached": 1, "versions": [version]})
    # The other workers re-read the registry too (see abfleet.reload_signal); wait for them.
    token = signal.bump()
    signal.ack(token, version)
    acks = signal.wait_acks(token, settings.workers, settings.reload_wait_s)
    return jsonify(swapped=swapped, model_version=version,
                   workers={"expected": settings.workers, "reached": len(acks), "versions": sorted(set(acks.values()))})


@bp.get(api.METRICS)
def metrics_endpoint():
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
    from prometheus_client import multiprocess

    p = parts()
    settings = p["settings"]
    if settings.prometheus_multiproc_dir:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = p["metrics"].registry
    body = generate_latest(registry) + generate_latest(p["process_registry"])
    if settings.variant == "production":
        body += generate_latest(p["fleet_registry"])
    return Response(body, content_type=CONTENT_TYPE_LATEST)  # as given: mimetype= would add a second charset
