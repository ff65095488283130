"""The API contract in abfleet.api: the web page asks for what the server accepts, the sample
request is accepted, refusals name the field, and the library needs nothing from the server."""

from __future__ import annotations

import ast
import math
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest

from abfleet import api

ROOT = Path(__file__).resolve().parents[2]


class Inputs(HTMLParser):
    """The attributes of every <input> with an id."""

    def __init__(self):
        super().__init__()
        self.by_id: dict[str, dict[str, str | None]] = {}

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "input" and attrs.get("id"):
            self.by_id[attrs["id"]] = attrs


def test_the_web_page_asks_within_the_api_bounds():
    page = Inputs()
    page.feed((ROOT / "inference" / "frontend" / "index.html").read_text())
    bounds = {name: (float(page.by_id[name]["min"]), float(page.by_id[name]["max"]))
              for name in ("total_sqft", "bhk", "bath")}
    assert bounds == {"total_sqft": (api.MIN_SQFT, api.MAX_SQFT), "bhk": (api.MIN_BHK, api.MAX_BHK),
                      "bath": (api.MIN_BATH, api.MAX_BATH)}
    length = page.by_id["location"].get("maxlength")
    assert length is None or int(length) == api.MAX_LOCATION_LENGTH


def test_the_sample_request_is_accepted():
    req = api.PredictRequest.model_validate(api.FLAT)
    assert req.model_dump() == {**api.FLAT, "total_sqft": float(api.FLAT["total_sqft"])}


def test_endpoint_paths_are_distinct():
    paths = [api.PREDICT, api.FEEDBACK, api.HEALTH, api.LOCATIONS, api.DRIFT_REPORT, api.PING, api.RELOAD, api.METRICS]
    assert len(set(paths)) == len(paths) and all(p.startswith("/") for p in paths)


@pytest.mark.parametrize("body,status,field", [
    (b"[1]", 400, "body"),
    (None, 400, "body"),
    (b"{", 400, "body"),
    (b'{"location": "x", "total_sqft": 1200, "bhk": 2, "bath": 11}', 422, "bath"),
    ({"location": "x", "total_sqft": "1200", "bhk": "2"}, 422, "bath"),
])
def test_parse_refuses_naming_the_field(body, status, field):
    with pytest.raises(api.Refused) as refused:
        api.parse(api.PredictRequest, body)
    assert refused.value.status == status and refused.value.field == field
    assert refused.value.body() == {"error": refused.value.message, "field": field}
    assert refused.value.message.startswith(f"{field}: ")


def test_parse_takes_json_bytes_and_form_fields_alike():
    fields = {k: str(v) for k, v in api.FLAT.items()}
    assert api.parse(api.PredictRequest, fields) == api.parse(api.PredictRequest, b'{"location": "Indira Nagar", '
                                                               b'"total_sqft": 1200, "bhk": 2, "bath": 2}')


def test_acceptable_rows_keep_known_locations_within_the_bounds():
    frame = pd.DataFrame({
        "location": ["Indira Nagar", "Atlantis", "Indira Nagar", "Indira Nagar", "Indira Nagar", "Indira Nagar"],
        "total_sqft": [1200.0, 1200.0, 299.0, 30000.0, 1200.0, 1200.0],
        "bhk": [2, 2, 2, 10, 11, 2],
        "bath": [2, 2, 2, 10, 2, 0],
    })
    kept = api.acceptable_rows(frame, {"Indira Nagar"})
    assert list(kept.index) == [0, 3]


def test_the_library_does_not_import_the_server():
    for path in (ROOT / "abfleet").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n == "inference" or n.startswith("inference.") for n in names), path.name


def test_user_of_is_the_stored_user_id():
    assert api.user_of("u-1") == "u-1" and api.user_of("") is None and api.user_of(None) is None
    assert api.user_of("x" * 500) == "x" * api.MAX_USER_ID_LENGTH


@pytest.mark.parametrize("value", [5e-324, 1e-300, 0.0, -1.0, 0.99, 100000.01, 1e308, math.inf, math.nan])
def test_prices_out_of_the_absolute_bounds_are_refused(value):
    with pytest.raises(api.Refused) as refused:
        api.PriceBounds().ape(value, 100.0)
    assert refused.value.status == 422 and refused.value.field == "feedback_value"


@pytest.mark.parametrize("value", [100.0 * 20.01, 100.0 / 20.01])
def test_prices_beyond_the_ratio_are_refused(value):
    with pytest.raises(api.Refused) as refused:
        api.PriceBounds().ape(value, 100.0)
    assert "factor of 20" in refused.value.message


@pytest.mark.parametrize("value,expected", [(100.0, 0.0), (200.0, 0.5), (50.0, 1.0), (5.0, 19.0), (2000.0, 0.95)])
def test_ape_is_finite_and_within_the_cap(value, expected):
    ape = api.PriceBounds().ape(value, 100.0)
    assert ape == pytest.approx(expected) and math.isfinite(ape) and ape <= api.MAX_APE


def test_bounds_are_configurable():
    bounds = api.PriceBounds(low=10.0, high=500.0, ratio=2.0)
    assert bounds.ape(150.0, 100.0) == pytest.approx(1 / 3)
    for value in (9.0, 501.0, 49.0):
        with pytest.raises(api.Refused):
            bounds.ape(value, 100.0)


@pytest.mark.parametrize("value", [0.0, -3.0, None])
def test_an_actual_price_must_be_a_positive_number(value):
    with pytest.raises(api.Refused) as refused:
        api.parse(api.FeedbackRequest, {"prediction_id": "ab", "feedback_type": "actual_price", "feedback_value": value})
    assert refused.value.field == "feedback_value"
