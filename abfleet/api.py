"""The model server's HTTP contract, in one place: endpoint paths, input bounds, the sample
request and the request models that refuse bad input with a sentence naming the field.

The server, the web page's tests, `load`, `demo`, `bench` and the tests read it from here.
"""

from __future__ import annotations

import csv
import difflib
import functools
import math
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# ---- endpoint paths -----------------------------------------------------------------------
PREDICT = "/api/predict_home_price"
FEEDBACK = "/api/feedback"
HEALTH = "/api/health"
LIVE = "/api/live"  # 200 while the process runs: the container's liveness check
READY = "/api/ready"  # 200 once a model is loaded: the orchestrator's readiness check
LOCATIONS = "/api/get_location_names"
DRIFT_REPORT = "/api/drift_report"
PING = "/api/ping"  # the cheapest JSON answer: the benchmark's yardstick for the predict path
RELOAD = "/api/admin/reload"
METRICS = "/metrics"  # Prometheus text format; not routed publicly
METRICS_SUMMARY = "/api/metrics"  # the original project's JSON summary of one variant
OPENAPI = "/api/openapi.json"  # this contract as OpenAPI 3.1 (abfleet.openapi)
DOCS = "/api/docs"  # a reference page rendering OPENAPI, served by the router

# ---- input bounds: a real Bengaluru flat stays within them; the web page uses the same ones ----
MIN_SQFT, MAX_SQFT = 300.0, 30000.0
MIN_BHK, MAX_BHK = 1, 10
MIN_BATH, MAX_BATH = 1, 10
MAX_LOCATION_LENGTH = 128
MAX_USER_ID_LENGTH = 128
MAX_FEEDBACK_TEXT = 2000  # characters of a comment (or of the text beside any feedback)
# The window of /api/metrics, in hours: a day by default, at most 30 days.
DEFAULT_HOURS, MIN_HOURS, MAX_HOURS = 24, 1, 720
# Actual prices: the defaults of the server's bounds (Settings.actual_price_*), and the cap on
# one APE, which the ratio already keeps below (ratio - 1) but a counter must never exceed.
MIN_ACTUAL_PRICE_LAKHS, MAX_ACTUAL_PRICE_LAKHS = 1.0, 100000.0
MAX_PRICE_RATIO = 20.0
MAX_APE = 20.0

# The sample request: a flat every model prices.
FLAT = {"location": "Indira Nagar", "total_sqft": 1200, "bhk": 2, "bath": 2}


def _no_bool(value):
    # JSON true/false would otherwise pass as 1/0.
    if isinstance(value, bool):
        raise ValueError("must be a number, not a boolean")
    return value


LOCATIONS_CSV = Path(__file__).with_name("locations.csv")


@functools.lru_cache(maxsize=1)
def location_names() -> tuple[str, ...]:
    """The fleet's known locations as the packaged table names them ('other' included), sorted;
    read with the csv module so that the contract needs no pandas."""
    with LOCATIONS_CSV.open(newline="") as f:
        return tuple(sorted({row["location"] for row in csv.DictReader(f)}))


def _location_enum(schema: dict) -> None:
    # The schema lists the names as the fleet spells them; any case and run of blanks is accepted too.
    schema["properties"]["location"]["enum"] = list(location_names())


# Feedback fields that depend on the kind, in the request's JSON Schema (the validator below
# enforces the same): one branch per kind.
_BLANK_ONLY = "[^ \t\n\r\f\v]"  # a comment needs one character that is not a blank


def _feedback_branches(schema: dict) -> None:
    def kind(*names: str, **props) -> dict:
        branch = {"properties": {"feedback_type": {"enum": list(names)}, **props}}
        required = [name for name, prop in props.items() if prop.pop("required", False)]
        if required:
            branch["required"] = required
        return branch

    schema["oneOf"] = [
        kind("rating", feedback_value={"type": "integer", "minimum": 1, "maximum": 5, "required": True}),
        kind("actual_price", feedback_value={"type": "number", "minimum": MIN_ACTUAL_PRICE_LAKHS,
                                             "maximum": MAX_ACTUAL_PRICE_LAKHS, "required": True}),
        kind("accurate", "too_high", "too_low"),
        kind("comment", feedback_text={"type": "string", "pattern": _BLANK_ONLY, "required": True}),
    ]


class PredictRequest(BaseModel):
    model_config = ConfigDict(str_strip_whitespace=True, json_schema_extra=_location_enum)
    NOT_AN_OBJECT: ClassVar[str] = "body: send a JSON object (or form fields) with location, total_sqft, bhk, bath"

    location: str = Field(min_length=1, max_length=MAX_LOCATION_LENGTH)
    total_sqft: float = Field(ge=MIN_SQFT, le=MAX_SQFT, allow_inf_nan=False)
    bhk: int = Field(ge=MIN_BHK, le=MAX_BHK)
    bath: int = Field(ge=MIN_BATH, le=MAX_BATH)

    _numbers_not_bools = field_validator("total_sqft", "bhk", "bath", mode="before")(_no_bool)


FeedbackType = Literal["rating", "accurate", "too_high", "too_low", "actual_price", "comment"]


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(json_schema_extra=_feedback_branches)
    NOT_AN_OBJECT: ClassVar[str] = "body: send a JSON object with prediction_id, feedback_type, feedback_value"

    prediction_id: str = Field(min_length=1, max_length=64, pattern=r"^[0-9a-fA-F-]+$")
    feedback_type: FeedbackType
    feedback_value: float | None = Field(default=None, allow_inf_nan=False)
    # Free text, stored beside any kind and never part of a decision; a comment is text alone.
    feedback_text: str | None = Field(default=None, max_length=MAX_FEEDBACK_TEXT)

    _number_not_bool = field_validator("feedback_value", mode="before")(_no_bool)

    @model_validator(mode="after")
    def _value_fits_type(self) -> "FeedbackRequest":
        value = self.feedback_value
        if self.feedback_type == "rating":
            if value is None or value != math.floor(value) or not 1 <= value <= 5:
                raise ValueError("feedback_value: a rating must be a whole number of stars from 1 to 5")
        elif self.feedback_type == "actual_price":
            if value is None or not value > 0:
                raise ValueError("feedback_value: an actual price must be a positive number of lakhs")
        elif self.feedback_type == "comment":
            if not re.search(_BLANK_ONLY, self.feedback_text or ""):
                raise ValueError("feedback_text: a comment needs some text")
            self.feedback_value = None
        else:
            self.feedback_value = None  # quick verdicts carry no number
        return self


class MetricsQuery(BaseModel):
    """The query of /api/metrics: the window in whole hours."""

    NOT_AN_OBJECT: ClassVar[str] = "hours: send the window as ?hours=N"

    hours: int = Field(default=DEFAULT_HOURS, ge=MIN_HOURS, le=MAX_HOURS)


# ---- what the server answers: the OpenAPI document (abfleet.openapi) is generated from these ----
class ErrorBody(BaseModel):
    """Every refusal and fault: a sentence, and the field it is about (null when none)."""

    error: str
    field: str | None


class PredictResponse(BaseModel):
    estimated_price: float = Field(description="the estimate, in lakhs of rupees")
    prediction_id: str = Field(description="32 hex digits: the id feedback refers to")
    model_version: str
    unit: Literal["lakh INR"]
    location: str = Field(description="the location as the fleet spells it")
    total_sqft: float
    bhk: int
    bath: int
    response_time_ms: float = Field(ge=0, description="the server's time to answer, in milliseconds")


class LocationsResponse(BaseModel):
    locations: list[str] = Field(description="every location a prediction accepts, sorted, 'other' last")


class FeedbackResponse(BaseModel):
    status: Literal["recorded"]
    prediction_id: str
    feedback_type: FeedbackType
    variant: str = Field(description="the variant that made the prediction")
    model_version: str
    ape: float | None = Field(description="an actual price's absolute percentage error; null for other kinds")


class HealthResponse(BaseModel):
    status: Literal["healthy", "degraded", "unhealthy"] = Field(description=(
        "healthy: answering, all in order; degraded (200): answering, but the store is unreachable, a candidate "
        "serves production's model or a newer version was refused; unhealthy (503): no model, no answers"))
    timestamp: str = Field(description="ISO 8601, UTC")
    model_variant: str = Field(description="the variant this server is (the same as variant)")
    variant: str
    model_loaded: bool
    model_version: str | None
    serving_alias: str | None
    fallback: bool
    store_reachable: bool
    database: str = Field(description="the latest background check of the database")
    last_error: str | None
    note: str | None = None


class PredictionStats(BaseModel):
    total_count: int = Field(ge=0)
    avg_latency_ms: float
    p95_latency_ms: float
    p99_latency_ms: float
    min_latency_ms: float
    max_latency_ms: float


class FeedbackStats(BaseModel):
    total_count: int = Field(ge=0)
    avg_rating: float | None = Field(description="mean stars; null without ratings")
    accurate_count: int = Field(ge=0)
    too_high_count: int = Field(ge=0)
    too_low_count: int = Field(ge=0)


class MetricsSummary(BaseModel):
    """One variant (the server that answered) over the last `hours`, from the store."""

    variant: str
    time_period_hours: int
    timestamp: str
    predictions: PredictionStats
    feedback: FeedbackStats


class DriftReport(BaseModel):
    """The latest drift summary; its own fields follow `status` when it is success."""

    model_config = ConfigDict(extra="allow")

    status: Literal["success", "no_current_data", "error"]
    message: str | None = None
    report_available: bool | None = None


class Ping(BaseModel):
    status: Literal["ok"]


# Spaces, tabs and line breaks; not the ASCII separators \x1c-\x1f, which str.split() also takes.
_BLANKS = re.compile(r"[ \t\n\r\f\v]+")


def location_key(name: str) -> str:
    """What two spellings of one location share: case and runs of blanks do not count."""
    return _BLANKS.sub(" ", name).strip(" ").casefold()


def unknown_location(given: str, known: Collection[str]) -> Refused:
    """The 422 for a location nobody knows, naming up to three known names close to it."""
    by_key = {location_key(k): k for k in known}
    close = [by_key[k] for k in difflib.get_close_matches(location_key(given), list(by_key), n=3, cutoff=0.6)]
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return Refused(422, f"location: unknown location {given!r}{hint} (see {LOCATIONS})", "location")


def user_of(header: str | None) -> str | None:
    """The user id a request speaks for, as predictions store it: the X-User-Id header (the
    router sets it from its cookie or the client's header), None when there is none."""
    return (header or "")[:MAX_USER_ID_LENGTH] or None


@dataclass(frozen=True)
class PriceBounds:
    """What an actual price may be, in lakhs: within [low, high], and within a factor of
    `ratio` of the estimate either way."""

    low: float = MIN_ACTUAL_PRICE_LAKHS
    high: float = MAX_ACTUAL_PRICE_LAKHS
    ratio: float = MAX_PRICE_RATIO

    def check(self, value: float) -> None:
        """Raises `Refused` (422, feedback_value) unless `value` is within [low, high]."""
        if not (math.isfinite(value) and self.low <= value <= self.high):
            raise Refused(422, f"feedback_value: an actual price must be between {self.low:g} and {self.high:g} lakhs",
                          "feedback_value")

    def ape(self, value: float, estimate: float) -> float:
        """The absolute percentage error of `estimate` against the actual price `value`: finite,
        at most MAX_APE. Raises `Refused` (422, feedback_value) for a price out of bounds."""
        self.check(value)
        if not (math.isfinite(estimate) and estimate > 0 and estimate / self.ratio <= value <= estimate * self.ratio):
            raise Refused(422, f"feedback_value: an actual price must be within a factor of {self.ratio:g} "
                               f"of the estimate ({estimate:g} lakhs)", "feedback_value")
        ape = abs(estimate - value) / value
        return min(ape, MAX_APE) if math.isfinite(ape) else MAX_APE


def error(message: str, field: str | None) -> dict:
    """The JSON body of every refusal: the sentence, then the field it is about (or None)."""
    return {"error": message, "field": field}


class Refused(Exception):
    """A request answered with a 4xx JSON error that names the field."""

    def __init__(self, status: int, message: str, field: str | None):
        super().__init__(message)
        self.status, self.message, self.field = status, message, field

    def body(self) -> dict:
        return error(self.message, self.field)


def describe(exc: ValidationError) -> tuple[str, str | None]:
    """(one readable sentence, the field it is about) for the first problem found."""
    first = exc.errors(include_url=False)[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "__root__"]
    message = first.get("msg", "invalid").removeprefix("Value error, ")
    if loc:
        field = loc[0]
        if first.get("type") == "missing":
            return f"{field}: this field is required", field
        return f"{field}: {message}", field
    field = message.split(":", 1)[0] if ":" in message else None
    return message, field


Request = TypeVar("Request", bound=BaseModel)

# What pydantic reports when the body is not a JSON object at all (bad JSON, nesting past its
# limit, a list, a number, null): the client gets the same 400 "body" refusal for each.
_NOT_AN_OBJECT = frozenset({"json_invalid", "json_type", "model_type", "model_attributes_type", "dict_type"})


def parse(model: type[Request], body: bytes | Mapping | None) -> Request:
    """`body` as a `model`: raw JSON bytes (parsed by pydantic itself, which refuses bad JSON,
    excessive nesting and oversized numbers), form fields, or None for a body of another type.

    Raises `Refused`: 400 naming "body" when the body is not a JSON object, else 422 naming
    the first field at fault."""
    try:
        if isinstance(body, bytes):
            return model.model_validate_json(body)
        if body is not None:
            return model.model_validate(body)
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_context=False, include_input=False)[0]
        if not first.get("loc") and first.get("type") in _NOT_AN_OBJECT:
            raise Refused(400, model.NOT_AN_OBJECT, "body") from None
        raise Refused(422, *describe(exc)) from None
    raise Refused(400, model.NOT_AN_OBJECT, "body")


def acceptable_rows(frame, locations: Collection[str]):
    """The rows of a cleaned frame (`data.clean(...).frame`) a predict request accepts: a
    location in `locations`, every number within the bounds above."""
    return frame[frame["location"].isin(locations)
                 & frame["total_sqft"].between(MIN_SQFT, MAX_SQFT)
                 & frame["bhk"].between(MIN_BHK, MAX_BHK)
                 & frame["bath"].between(MIN_BATH, MAX_BATH)]
