"""The OpenAPI document: generated from the models in abfleet.api, loadable as OpenAPI 3.1,
covering every public route of the server, and matched by what the server really answers
(status declared, body valid against the declared schema)."""

from __future__ import annotations

import jsonschema
import pytest
import schemathesis

from abfleet import api, openapi
from abfleet.settings import Settings
from tests.helpers import app_serving

DOC = openapi.document()
INTERNAL = {api.LIVE, api.READY, api.RELOAD, api.METRICS}  # the servers' own checks: the router answers 404


@pytest.fixture
def app(tmp_path, tiny_predictor):
    with app_serving(Settings(run_dir=tmp_path, variant="production"), tiny_predictor, "2") as app:
        yield app


def test_it_is_openapi_3_1_that_schemathesis_loads():
    assert DOC["openapi"] == "3.1.0"
    for schema in DOC["components"]["schemas"].values():
        jsonschema.Draft202012Validator.check_schema(schema)
    loaded = schemathesis.openapi.from_dict(DOC)
    operations = [op.ok() for op in loaded.get_all_operations()]
    assert {(o.method.upper(), o.path) for o in operations} == {
        (m.upper(), p) for p, item in DOC["paths"].items() for m in item}


@pytest.mark.parametrize("model", [api.PredictRequest, api.FeedbackRequest, api.MetricsQuery, api.PredictResponse,
                                   api.HealthResponse, api.MetricsSummary, api.ErrorBody])
def test_schemas_are_the_models_own(model):
    mode = "validation" if model in (api.PredictRequest, api.FeedbackRequest, api.MetricsQuery) else "serialization"
    generated = model.model_json_schema(ref_template=openapi.REF, mode=mode)
    generated.pop("$defs", None)
    assert DOC["components"]["schemas"][model.__name__] == generated


def test_every_public_route_is_documented_and_nothing_else(app):
    routes = {(m.lower(), r.rule) for r in app.url_map.iter_rules() for m in r.methods - {"HEAD", "OPTIONS"}
              if r.endpoint != "static" and r.rule not in INTERNAL}
    documented = {(m, p) for p, item in DOC["paths"].items() for m in item if p != api.DOCS}
    assert routes == documented


def test_every_ref_resolves():
    def refs(node):
        if isinstance(node, dict):
            if "$ref" in node:
                yield node["$ref"]
            for value in node.values():
                yield from refs(value)
        elif isinstance(node, list):
            for value in node:
                yield from refs(value)

    for ref in set(refs(DOC)):
        target = DOC
        for part in ref.removeprefix("#/").split("/"):
            target = target[part]
        assert target, ref


def check(path: str, method: str, response) -> None:
    """`response` has a status the document declares for the operation, and a body its schema accepts."""
    declared = DOC["paths"][path][method]["responses"]
    assert str(response.status_code) in declared, (path, method, response.status_code, response.get_data(as_text=True))
    schema = declared[str(response.status_code)]["content"]["application/json"]["schema"]
    validator = jsonschema.Draft202012Validator({**schema, "components": DOC["components"]})
    validator.validate(response.get_json())


def test_real_answers_conform(app):
    client = app.test_client()
    user = {"X-User-Id": "doc-user"}
    predicted = client.post(api.PREDICT, json=api.FLAT, headers=user)
    check(api.PREDICT, "post", predicted)
    for body in ({**api.FLAT, "bhk": 0}, {**api.FLAT, "location": "nowhere at all"}):
        check(api.PREDICT, "post", client.post(api.PREDICT, json=body))
    check(api.PREDICT, "post", client.post(api.PREDICT, data="[1]", content_type="application/json"))
    check(api.PREDICT, "post", client.post(api.PREDICT, data={k: str(v) for k, v in api.FLAT.items()}))
    pid = predicted.get_json()["prediction_id"]
    for body, status in (({"prediction_id": pid, "feedback_type": "rating", "feedback_value": 5}, 201),
                         ({"prediction_id": pid, "feedback_type": "rating", "feedback_value": 4}, 409),
                         ({"prediction_id": pid, "feedback_type": "comment", "feedback_text": "ok"}, 201),
                         ({"prediction_id": "ab" * 16, "feedback_type": "accurate"}, 404),
                         ({"prediction_id": pid, "feedback_type": "rating", "feedback_value": 9}, 422)):
        r = client.post(api.FEEDBACK, json=body, headers=user)
        assert r.status_code == status
        check(api.FEEDBACK, "post", r)
    r = client.post(api.FEEDBACK, json={"prediction_id": pid, "feedback_type": "too_low"}, headers={"X-User-Id": "other"})
    assert r.status_code == 403
    check(api.FEEDBACK, "post", r)
    for path in (api.HEALTH, api.LOCATIONS, api.DRIFT_REPORT, api.PING, api.METRICS_SUMMARY, f"{api.METRICS_SUMMARY}?hours=0"):
        check(path.split("?")[0], "get", client.get(path))
    check(api.PING, "get", client.post(api.PING))  # 405, declared, JSON
    app.extensions["abfleet"]["holder"].current = None
    unhealthy = client.get(api.HEALTH)
    assert unhealthy.status_code == 503
    check(api.HEALTH, "get", unhealthy)
    check(api.PREDICT, "post", client.post(api.PREDICT, json=api.FLAT))
    check(api.LOCATIONS, "get", client.get(api.LOCATIONS))


def test_the_server_serves_the_document(app):
    r = app.test_client().get(api.OPENAPI)
    assert r.status_code == 200 and r.get_json() == DOC
