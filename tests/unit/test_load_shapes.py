"""The load shapes of `abfleet load --shape`: users over a run, as pure functions of time."""

from __future__ import annotations

import pytest

from abfleet.load_shapes import SHAPES, levels, users_at


def run_of(shape: str, users: int, duration: float) -> list[int | None]:
    return [users_at(shape, t / 10, users, duration) for t in range(int(duration * 10) + 1)]


def distinct(counts: list[int | None]) -> list[int | None]:
    out: list[int | None] = []
    for c in counts:
        if not out or out[-1] != c:
            out.append(c)
    return out


def test_steady_holds_every_user_then_ends():
    assert distinct(run_of("steady", 12, 20)) == [12, None]


def test_step_climbs_a_quarter_at_a_time_to_the_peak():
    assert distinct(run_of("step", 8, 20)) == [2, 4, 6, 8, None]
    assert levels("step", 8) == [2, 4, 6, 8]
    assert users_at("step", 4.99, 8, 20) == 2 and users_at("step", 5.0, 8, 20) == 4


def test_spike_is_all_users_for_the_middle_fifth_only():
    counts = run_of("spike", 10, 50)
    assert distinct(counts) == [2, 10, 2, None] == levels("spike", 10) + [None]
    assert sum(1 for c in counts if c == 10) == 100  # 10 s of the 50 s, in tenths


def test_a_shape_never_runs_zero_users():
    for shape in SHAPES:
        assert min(c for c in run_of(shape, 1, 8) if c is not None) == 1, shape


@pytest.mark.parametrize("args, message", [
    (("zigzag", 0, 10, 10), "--shape must be one of steady, step, spike"),
    (("step", 0, 0, 10), "--users must be at least 1"),
    (("spike", 0, 10, 0), "--duration above 0"),
])
def test_bad_arguments_name_what_is_wrong(args, message):
    with pytest.raises(ValueError, match=message):
        users_at(*args)
