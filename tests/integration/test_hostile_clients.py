"""Hostile clients against the live fleet, through the router: every request of the table gets
its 4xx and none a 5xx; afterwards no server's /metrics holds a non-finite number and no
server counted a server error."""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass, field

import pytest
import requests
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families

from abfleet import api
from abfleet.store import predictions

pytestmark = pytest.mark.slow

OWNER, STRANGER = "hostile-owner", "hostile-stranger"
JSON_TYPES = ("application/json", "application/json; charset=utf-8", "application/merge-patch+json",
              "application/vnd.api+json")
DEEP = b"[" * 3000 + b"]" * 3000
BIG = "9" * 400


@dataclass
class Row:
    name: str
    path: str
    expected: set[int]
    method: str = "POST"
    body: bytes | dict | None = None  # a dict is sent as form fields
    content_type: str | None = "application/json"
    headers: dict = field(default_factory=dict)
    field: str | None = None  # the field a JSON refusal must name


def samples(text: str) -> list:
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def server_errors(text: str) -> float:
    return sum(s.value for s in samples(text) if s.name == "abfleet_requests_total" and s.labels["status"].startswith("5"))


def feedback(pid: str, kind: str, value) -> bytes:
    # Written by hand: the value goes in as the raw token (NaN, 400 digits) that json.dumps would not write.
    return f'{{"prediction_id": "{pid}", "feedback_type": "{kind}", "feedback_value": {value}}}'.encode()


def predict(router: str, user: str) -> dict:
    r = requests.post(f"{router}{api.PREDICT}", json=api.FLAT, headers={"X-User-Id": user}, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def table(pid: str, estimate: float, old_pid: str) -> list[Row]:
    mine = {"X-User-Id": OWNER}
    rows: list[Row] = []
    for ct in JSON_TYPES:
        rows.append(Row(f"predict nested {ct}", api.PREDICT, {400}, body=DEEP, content_type=ct, field="body"))
        rows.append(Row(f"feedback nested {ct}", api.FEEDBACK, {400}, body=DEEP, content_type=ct, headers=mine, field="body"))

    def flat(area: str) -> bytes:
        return f'{{"location": "Indira Nagar", "total_sqft": {area}, "bhk": 2, "bath": 2}}'.encode()

    rows += [
        Row("predict nested field", api.PREDICT, {422}, body=b'{"location": ' + b"[" * 50 + b"]" * 50
            + b', "total_sqft": 1200, "bhk": 2, "bath": 2}', field="location"),
        Row("predict 400-digit area", api.PREDICT, {422}, body=flat(BIG), field="total_sqft"),
        Row("predict 400-digit area, charset", api.PREDICT, {422}, body=flat(BIG),
            content_type="application/json; charset=utf-8", field="total_sqft"),
        Row("predict NaN", api.PREDICT, {422}, body=flat("NaN"), field="total_sqft"),
        Row("predict Infinity", api.PREDICT, {422}, body=flat("-Infinity"), field="total_sqft"),
        Row("predict 1e999", api.PREDICT, {422}, body=flat("1e999"), field="total_sqft"),
        Row("predict control characters", api.PREDICT, {422},
            body=b'{"location": "\\u001c\\u0000Indira\\u0007", "total_sqft": 1200, "bhk": 2, "bath": 2}', field="location"),
        Row("predict raw control byte", api.PREDICT, {400},
            body=b'{"location": "Indira\x01", "total_sqft": 1200, "bhk": 2, "bath": 2}', field="body"),
        Row("predict bad utf-8", api.PREDICT, {400}, body=b"\xff\xfe{", field="body"),
        Row("predict text/plain", api.PREDICT, {400}, body=b"location=x", content_type="text/plain", field="body"),
        Row("predict form NaN", api.PREDICT, {422}, body={**api.FLAT, "total_sqft": "nan"}, content_type=None,
            field="total_sqft"),
        Row("predict body over the limit", api.PREDICT, {413}, body=b" " * (70 * 1024), field="body"),
        Row("feedback 400-digit price", api.FEEDBACK, {422}, body=feedback(pid, "actual_price", BIG), headers=mine,
            field="feedback_value"),
        Row("feedback NaN price", api.FEEDBACK, {422}, body=feedback(pid, "actual_price", "NaN"), headers=mine,
            field="feedback_value"),
        Row("feedback Infinity rating", api.FEEDBACK, {422}, body=feedback(pid, "rating", "Infinity"), headers=mine,
            field="feedback_value"),
        Row("feedback control characters in the id", api.FEEDBACK, {422},
            body=feedback(pid[:8] + "\\u0000\\u001c", "rating", 3), headers=mine, field="prediction_id"),
        Row("feedback form NaN", api.FEEDBACK, {422}, content_type=None, headers=mine,
            body={"prediction_id": pid, "feedback_type": "actual_price", "feedback_value": "nan"}, field="feedback_value"),
        Row("feedback half a star", api.FEEDBACK, {422}, body=feedback(pid, "rating", 3.5), headers=mine,
            field="feedback_value"),
    ]
    for price in ("5e-324", "1e-300", "1e308", "0", "-1", repr(estimate * 25), repr(estimate / 25)):
        rows.append(Row(f"poison price {price}", api.FEEDBACK, {422}, body=feedback(pid, "actual_price", price),
                        headers=mine, field="feedback_value"))
    rows += [
        Row("feedback from another user", api.FEEDBACK, {403}, body=feedback(pid, "rating", 1),
            headers={"X-User-Id": STRANGER}, field="prediction_id"),
        Row("feedback from a new visitor", api.FEEDBACK, {403}, body=feedback(pid, "rating", 1), field="prediction_id"),
        Row("feedback after the window", api.FEEDBACK, {410}, body=feedback(old_pid, "rating", 5), headers=mine,
            field="prediction_id"),
        Row("feedback for an unknown id", api.FEEDBACK, {404}, body=feedback("ab" * 16, "rating", 5), headers=mine,
            field="prediction_id"),
        Row("10 KB header", api.PREDICT, {400, 431}, body=b"{}", headers={"X-Junk": "a" * 10240}),
        Row("10 KB cookie", api.FEEDBACK, {400, 431}, body=b"{}", headers={"Cookie": "abfleet_uid=" + "a" * 10240}),
        Row("10 KB user id", api.PREDICT, {400, 431}, body=b"{}", headers={"X-User-Id": "u" * 10240}),
        Row("admin reload without a token", api.RELOAD, {401, 404}, body=b"{}"),
        Row("admin reload with a guessed token", api.RELOAD, {401, 404}, body=b"{}",
            headers={"Authorization": "Bearer guess"}),
        Row("admin path probe", "/api/admin/", {401, 404, 405}, method="GET", content_type=None),
    ]
    return rows


def send(router: str, row: Row) -> requests.Response:
    headers = dict(row.headers)
    if row.content_type:
        headers["Content-Type"] = row.content_type
    kwargs = {"data": row.body} if row.body is not None else {}
    return requests.request(row.method, f"{router}{row.path}", headers=headers, timeout=10, **kwargs)


def test_hostile_requests_get_4xx_and_leave_the_numbers_finite(fleet):
    router = fleet.router_url
    before = {v: server_errors(fleet.metrics_text(v)) for v in ("production", "candidate")}
    answer = predict(router, OWNER)
    pid, estimate = answer["prediction_id"], answer["estimated_price"]
    old_pid = predict(router, OWNER)["prediction_id"]
    assert fleet.store.get_prediction(old_pid) is not None  # out of the spool, into the table
    with fleet.store.engine.begin() as conn:
        conn.execute(sa.update(predictions).where(predictions.c.id == old_pid)
                     .values(created_at=dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=30)))

    rows = table(pid, estimate, old_pid)
    assert len(rows) >= 30
    wrong = []
    for row in rows:
        r = send(router, row)
        named = None
        if row.field is not None and r.headers.get("Content-Type", "").startswith("application/json"):
            named = r.json().get("field")
        if r.status_code not in row.expected or (row.field is not None and named != row.field):
            wrong.append(f"{row.name}: {r.status_code} {r.text[:160]!r}")
    assert wrong == [], "\n".join(wrong)

    # Nothing was stored for the refused ones; the owner's own feedback still works.
    assert fleet.store.feedback_for(pid) == [] and fleet.store.feedback_for(old_pid) == []
    mine = {"X-User-Id": OWNER}
    ok = requests.post(f"{router}{api.FEEDBACK}", data=feedback(pid, "actual_price", estimate * 2),
                       headers={**mine, "Content-Type": "application/json"}, timeout=10)
    assert ok.status_code == 201 and ok.json()["ape"] == pytest.approx(0.5, abs=0.01), ok.text
    rated = requests.post(f"{router}{api.FEEDBACK}", data=feedback(pid, "rating", 4),
                          headers={**mine, "Content-Type": "application/json; charset=utf-8"}, timeout=10)
    assert rated.status_code == 201, rated.text
    again = requests.post(f"{router}{api.FEEDBACK}", data=feedback(pid, "rating", 1),
                          headers={**mine, "Content-Type": "application/json"}, timeout=10)
    assert again.status_code == 409 and again.json()["field"] == "feedback_type", again.text
    assert [f["user_id"] for f in fleet.store.feedback_for(pid)] == [OWNER, OWNER]

    for variant in ("production", "candidate"):
        text = fleet.metrics_text(variant)
        bad = [(s.name, s.labels, s.value) for s in samples(text) if not math.isfinite(s.value)]
        assert bad == [], f"{variant}: {bad}"
        assert server_errors(text) == before[variant], f"{variant} counted a server error"


def test_gunicorn_refuses_an_oversize_header_with_a_4xx(fleet):
    # The servers are not public, but a 10 KB header must not become a 5xx there either.
    r = requests.post(f"{fleet.server_url('production')}{api.PREDICT}", json=api.FLAT,
                      headers={"X-Junk": "a" * 10240}, timeout=10)
    assert 400 <= r.status_code < 500, r.status_code
