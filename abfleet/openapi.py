"""The public API as an OpenAPI 3.1 document, generated from the pydantic models in abfleet.api
that validate requests and describe answers: nothing here restates a field by hand.

The model servers serve it at api.OPENAPI; the router's reference page (api.DOCS) renders it.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from abfleet import api

REF = "#/components/schemas/{model}"

# What each refusal status means, whichever operation answers it.
STATUS_TEXT = {
    400: "the body is not a JSON object (or form fields): field is \"body\"",
    403: "the estimate was given to another user: only they can rate it",
    404: "no prediction with that id",
    405: "the method is not allowed on this path",
    409: "feedback of that kind was already recorded for the prediction",
    410: "the feedback window of the estimate has closed",
    413: "the body is larger than the servers accept",
    422: "a field is missing or out of bounds: the sentence and field name it",
    429: "this address is over the router's limit: retry after Retry-After seconds",
    503: "no model yet, the store is unavailable or the spool is full: retry later (Retry-After when known)",
}


@dataclass(frozen=True)
class Operation:
    path: str
    method: str
    operation_id: str
    summary: str
    answers: dict[int, type[BaseModel]]  # success statuses → body model
    refusals: tuple[int, ...]  # statuses answered with api.ErrorBody
    body: type[BaseModel] | None = None
    form: bool = False  # the body may also be sent as form fields
    query: type[BaseModel] | None = None
    description: str = ""
    tags: tuple[str, ...] = field(default=("model server",))
    links: dict = field(default_factory=dict)  # OpenAPI links of the first success answer: name → link


# An estimate's id is what feedback names: the link lets a client (and Schemathesis' stateful
# phase) follow an answer with feedback on it.
RATE_IT = {"operationId": "recordFeedback", "requestBody": {"prediction_id": "$response.body#/prediction_id"},
           "description": "feedback on this estimate (from the same user)"}


COMMON = (405, 429, 503)  # the router's rate limit and its "no server answers"; a wrong method

OPERATIONS = (
    Operation(api.PREDICT, "post", "predictHomePrice", "Estimate a flat's price", {200: api.PredictResponse},
              (400, 413, 422, *COMMON), body=api.PredictRequest, form=True, description=(
                  "The location is matched ignoring case and runs of blanks; an unknown one is 422 naming up to "
                  "three close known names. The answer is recorded before it is given."),
              links={"FeedbackOnIt": RATE_IT}),
    Operation(api.LOCATIONS, "get", "getLocationNames", "Every location a prediction accepts",
              {200: api.LocationsResponse}, COMMON),
    Operation(api.FEEDBACK, "post", "recordFeedback", "Rate an estimate, judge it, give the actual price or a comment",
              {201: api.FeedbackResponse}, (400, 403, 404, 409, 410, 413, 422, *COMMON), body=api.FeedbackRequest,
              description=(
                  "rating: feedback_value 1 to 5 whole stars; actual_price: feedback_value in lakhs, within the "
                  "server's bounds and a factor of the estimate; accurate, too_high, too_low: no value; comment: "
                  "feedback_text. feedback_text may accompany any kind. One of each kind per prediction, from the "
                  "user who got the estimate, within the feedback window. Checked in the order 404, 403, 410, 409.")),
    Operation(api.HEALTH, "get", "getHealth", "Whether this server can answer, and what it serves",
              {200: api.HealthResponse, 503: api.HealthResponse}, (405, 429)),
    Operation(api.METRICS_SUMMARY, "get", "getMetricsSummary", "Predictions and feedback of the answering variant",
              {200: api.MetricsSummary}, (422, *COMMON), query=api.MetricsQuery, description=(
                  "Over the last `hours` (default 24, at most 720), from one aggregate query on the store. "
                  "Percentiles are within 5 microseconds below 100 ms (1 ms above).")),
    Operation(api.DRIFT_REPORT, "get", "getDriftReport", "The latest drift summary",
              {200: api.DriftReport}, COMMON),
    Operation(api.PING, "get", "ping", "A trivial answer", {200: api.Ping}, COMMON),
)


def _error_response(status: int) -> dict:
    response = {"description": STATUS_TEXT[status],
                "content": {"application/json": {"schema": {"$ref": REF.format(model="ErrorBody")}}}}
    if status in (429, 503):
        response["headers"] = {"Retry-After": {"$ref": "#/components/headers/Retry-After"}}
    return response


def _query_parameters(model: type[BaseModel], schemas: dict) -> list[dict]:
    schema = schemas[model.__name__]
    required = set(schema.get("required", ()))
    return [{"name": name, "in": "query", "required": name in required, "schema": prop}
            for name, prop in schema["properties"].items()]


def _operation(op: Operation, schemas: dict) -> dict:
    out: dict = {"operationId": op.operation_id, "summary": op.summary, "tags": list(op.tags)}
    if op.description:
        out["description"] = op.description
    if op.query is not None:
        out["parameters"] = _query_parameters(op.query, schemas)
    if op.body is not None:
        ref = {"$ref": REF.format(model=op.body.__name__)}
        content = {"application/json": {"schema": ref}}
        if op.form:
            content["application/x-www-form-urlencoded"] = {"schema": ref}
        out["requestBody"] = {"required": True, "content": content}
    responses: dict = {}
    for status, model in op.answers.items():
        responses[str(status)] = {
            "description": (model.__doc__ or model.__name__).strip().splitlines()[0],
            "headers": {"X-Variant": {"$ref": "#/components/headers/X-Variant"},
                        "X-Model-Version": {"$ref": "#/components/headers/X-Model-Version"}},
            "content": {"application/json": {"schema": {"$ref": REF.format(model=model.__name__)}}},
        }
        if op.links and status == min(op.answers):
            responses[str(status)]["links"] = copy.deepcopy(op.links)
    for status in op.refusals:
        responses.setdefault(str(status), _error_response(status))
    out["responses"] = dict(sorted(responses.items()))
    return out


def _schemas() -> dict:
    models: list[type[BaseModel]] = [api.ErrorBody]
    for op in OPERATIONS:
        models += [m for m in (op.body, op.query, *op.answers.values()) if m is not None]
    unique = list(dict.fromkeys(models))
    modes = [(m, "validation" if m in (api.PredictRequest, api.FeedbackRequest, api.MetricsQuery) else "serialization")
             for m in unique]
    _, top = models_json_schema(modes, ref_template=REF)
    return top["$defs"]


@functools.lru_cache(maxsize=1)
def _document() -> dict:
    schemas = _schemas()
    paths: dict = {}
    for op in OPERATIONS:
        paths.setdefault(op.path, {})[op.method] = _operation(op, schemas)
    paths[api.OPENAPI] = {"get": {
        "operationId": "getOpenAPI", "summary": "This document", "tags": ["reference"],
        "responses": {"200": {"description": "the OpenAPI 3.1 document",
                              "content": {"application/json": {"schema": {"type": "object"}}}},
                      **{str(s): _error_response(s) for s in COMMON}}}}
    paths[api.DOCS] = {"get": {
        "operationId": "getDocs", "summary": "A reference page rendering this document (served by the router)",
        "tags": ["reference"],
        "responses": {"200": {"description": "an HTML page", "content": {"text/html": {"schema": {"type": "string"}}}}}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "abfleet", "version": "1", "description": (
            "The Bengaluru home-price estimator behind the router. Every answer is JSON; every refusal is "
            "{\"error\", \"field\"} naming the field. The router splits users between a production and a candidate "
            "server (sticky per user: cookie abfleet_uid or X-User-Id); every server answer carries X-Variant and "
            "X-Model-Version.")},
        "paths": paths,
        "components": {
            "schemas": schemas,
            "headers": {
                "Retry-After": {"description": "seconds to wait before trying again", "schema": {"type": "string"}},
                "X-Variant": {"description": "the variant that answered", "schema": {"type": "string"}},
                "X-Model-Version": {"description": "the model version it serves", "schema": {"type": "string"}},
            },
        },
    }


def document() -> dict:
    """The OpenAPI 3.1 document of the public API (a fresh copy)."""
    return copy.deepcopy(_document())
