"""Reading both arms' counters at one instant (pure logic over raw samples; the live check is
tests/integration/test_control_loop.py)."""

from __future__ import annotations

import pytest

from abfleet.prometheus import common_instant, growth_between, value_at
from tests.helpers import FixedSamples as Samples


def test_value_between_scrapes_is_interpolated_and_zero_before_birth():
    points = [(10.0, 100.0), (15.0, 150.0), (20.0, 150.0)]
    assert value_at(points, 12.0) == pytest.approx(120.0)
    assert value_at(points, 15.0) == 150.0
    assert value_at(points, 25.0) == 150.0
    assert value_at(points, 9.0) == 0.0
    assert value_at([(10.0, 100.0), (15.0, 3.0)], 12.0) == 100.0  # a reset in between: hold


def test_two_arms_scraped_at_different_moments_are_counted_over_the_same_time():
    # Production answers 320 requests/s throughout and is scraped at ...2 and ...7; the
    # candidate is loaded at t=1000 (its series born at zero), answers 80/s and is scraped at
    # ...4 and ...9. Reading each one's latest sample at t=1032 would count production from
    # 997 (its last scrape before the start) to 1032 and the candidate to 1029: 35 s against 29.
    def series(rate, offset, born=0.0):
        times = [t for t in (990 + offset + 5 * i for i in range(9)) if t >= born]
        return {(("status", "200"),): [(float(t), (t - max(born, 0.0)) * rate if born else (t - 900) * rate)
                                       for t in times]}

    prom = Samples({"p": series(320, 2), "c": series(80, 4, born=1000.0)})
    end = common_instant(prom, ["p", "c"], now=1032.0)
    assert end == 1029.0
    p, c = growth_between(prom, "p", 1000.0, end), growth_between(prom, "c", 1000.0, end)
    assert p == pytest.approx(320 * 29) and c == pytest.approx(80 * 29)


def test_a_series_born_after_the_start_counts_from_zero_and_a_missing_arm_gives_no_instant():
    prom = Samples({"new": {(): [(1010.0, 0.0), (1015.0, 50.0), (1020.0, 90.0)]}, "gone": {}})
    assert growth_between(prom, "new", 1000.0, 1020.0) == 90.0
    assert common_instant(prom, ["new", "gone"], now=1021.0) is None


def test_replicas_of_one_arm_are_each_read_between_their_own_scrapes():
    # Two candidate replicas scraped at ...1 and ...3: the common instant is the older one's
    # last scrape, and each replica's counter is read there.
    a = [(float(t), (t - 1000) * 40.0) for t in range(1001, 1032, 5)]
    b = [(float(t), (t - 1000) * 40.0) for t in range(1003, 1034, 5)]
    p = [(float(t), (t - 900) * 320.0) for t in range(992, 1035, 5)]
    prom = Samples({"c": {(("instance", "a"),): a, (("instance", "b"),): b}, "p": {(): p}})
    end = common_instant(prom, ["p", "c"], now=1034.0)
    assert end == 1031.0
    assert growth_between(prom, "c", 1000.0, end) == pytest.approx(2 * 40 * 31)
    assert growth_between(prom, "p", 1000.0, end) == pytest.approx(320 * 31)
