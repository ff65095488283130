"""Load shapes for `abfleet load --shape`: how many Locust users run at each moment.

- steady: `users` from start to end (Locust's own --users/--run-time; no shape class).
- step: four equal steps, a quarter of `users` more each (25, 50, 75, 100%), to find where
  latency bends as the load climbs.
- spike: a fifth of `users` (at least one), then all of them for the middle fifth of the run,
  then the fifth again: does the fleet absorb a burst, and does it recover after it?

Pure functions of time, so they are tested without Locust; `tests/load/shape.py` is the
Locust shape class that follows them (loaded only for a shape other than steady).
"""

from __future__ import annotations

SHAPES = ("steady", "step", "spike")
STEPS = 4
SPIKE_FROM, SPIKE_TO = 0.4, 0.6  # the spike's share of the run
SPIKE_BASE = 0.2  # the users outside the spike, as a share of `users`


def users_at(shape: str, seconds: float, users: int, duration: float) -> int | None:
    """The users that should be running `seconds` into a run of `duration` seconds that peaks
    at `users`; None once the run is over."""
    if shape not in SHAPES:
        raise ValueError(f"--shape must be one of {', '.join(SHAPES)}, got {shape!r}")
    if users < 1 or duration <= 0:
        raise ValueError("--users must be at least 1 and --duration above 0")
    if seconds >= duration:
        return None
    share = seconds / duration
    if shape == "step":
        step = min(STEPS - 1, int(share * STEPS))
        return max(1, round(users * (step + 1) / STEPS))
    if shape == "spike":
        return users if SPIKE_FROM <= share < SPIKE_TO else max(1, round(users * SPIKE_BASE))
    return users


def levels(shape: str, users: int) -> list[int]:
    """The distinct user counts a run of `shape` goes through, in order."""
    if shape == "step":
        return [max(1, round(users * (s + 1) / STEPS)) for s in range(STEPS)]
    if shape == "spike":
        base = max(1, round(users * SPIKE_BASE))
        return [base, users, base]
    return [users]
