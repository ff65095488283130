"""`abfleet load --find-capacity`: the steps' rates and verdicts, and a short search on the
live fleet that reports a rate with every step's CSV and HTML report as evidence."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from abfleet import capacity, cli


def step(requests=100, failures=0, rps=10.0, p99=20.0) -> dict:
    return {"total": {"requests": requests, "failures": failures, "rps": rps, "p99_ms": p99}}


def test_rates_step_up_by_half():
    assert capacity.rates(20, 100) == [20, 30, 45, 68]
    assert capacity.rates(1, 3) == [1, 2, 3]
    with pytest.raises(ValueError):
        capacity.rates(10, 5)


def test_a_step_holds_only_when_fast_complete_and_kept_up():
    assert capacity.verdict(step(), 10, 50) is None
    assert "failed" in capacity.verdict(step(failures=1), 10, 50)
    assert "over 50" in capacity.verdict(step(p99=51), 10, 50)
    assert "achieved" in capacity.verdict(step(rps=8.0), 10, 50)
    assert "no request" in capacity.verdict(step(requests=0), 10, 50)


@pytest.mark.slow
def test_find_capacity_on_the_live_fleet(fleet, capsys):
    args = cli.build_parser().parse_args(["load", "--find-capacity", "--p99-ms", "50", "--start-rate", "5", "--max-rate", "12",
                              "--step-seconds", "5", "--json"])
    code = args.func(args, fleet.settings)
    out = capsys.readouterr()
    result = json.loads(out.out)
    assert [s["offered_rps"] for s in result["steps"]][:1] == [5], result
    for s in result["steps"]:
        assert Path(s["stats_csv"]).exists() and Path(s["report"]).stat().st_size > 0, s
        assert s["held"] == (s["why_not"] is None)
    held = [s for s in result["steps"] if s["held"]]
    if held:  # the answer is the last step that held, and the search stopped at the first that did not
        assert code == 0 and result["rate"] == held[-1]["achieved_rps"] and result["p99_ms"] <= 50
        assert all(s["held"] for s in result["steps"][:len(held)])
    else:
        assert code == 1 and result["rate"] is None
    assert Path(result["out_dir"], "capacity.json").exists()
