"""Request validation for the model server's API: every refusal names the field."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# Bounds a real Bengaluru flat stays within; the web page uses the same ones.
MIN_SQFT, MAX_SQFT = 300.0, 30000.0
MAX_BHK = 10
MAX_BATH = 10
MAX_ACTUAL_PRICE_LAKHS = 100000.0


def _no_bool(value):
    # JSON true/false would otherwise pass as 1/0.
    if isinstance(value, bool):
        raise ValueError("must be a number, not a boolean")
    return value


class PredictRequest(BaseModel):
    model_config = ConfigDict(str_strip_whitespace=True)

    location: str = Field(min_length=1, max_length=128)
    total_sqft: float = Field(ge=MIN_SQFT, le=MAX_SQFT, allow_inf_nan=False)
    bhk: int = Field(ge=1, le=MAX_BHK)
    bath: int = Field(ge=1, le=MAX_BATH)

    _numbers_not_bools = field_validator("total_sqft", "bhk", "bath", mode="before")(_no_bool)


FeedbackType = Literal["rating", "accurate", "too_high", "too_low", "actual_price"]


class FeedbackRequest(BaseModel):
    prediction_id: str = Field(min_length=1, max_length=64, pattern=r"^[0-9a-fA-F-]+$")
    feedback_type: FeedbackType
    feedback_value: float | None = Field(default=None, allow_inf_nan=False)

    _number_not_bool = field_validator("feedback_value", mode="before")(_no_bool)

    @model_validator(mode="after")
    def _value_fits_type(self) -> "FeedbackRequest":
        value = self.feedback_value
        if self.feedback_type == "rating":
            if value is None or value != math.floor(value) or not 1 <= value <= 5:
                raise ValueError("feedback_value: a rating must be a whole number of stars from 1 to 5")
        elif self.feedback_type == "actual_price":
            if value is None or not 0 < value <= MAX_ACTUAL_PRICE_LAKHS:
                raise ValueError(
                    f"feedback_value: an actual price must be in lakhs, above 0 and at most {MAX_ACTUAL_PRICE_LAKHS:g}"
                )
        else:
            self.feedback_value = None  # quick verdicts carry no number
        return self


def describe(error: ValidationError) -> tuple[str, str | None]:
    """(one readable sentence, the field it is about) for the first problem found."""
    first = error.errors(include_url=False)[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "__root__"]
    message = first.get("msg", "invalid").removeprefix("Value error, ")
    if loc:
        field = loc[0]
        if first.get("type") == "missing":
            return f"{field}: this field is required", field
        return f"{field}: {message}", field
    field = message.split(":", 1)[0] if ":" in message else None
    return message, field
