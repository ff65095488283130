"""The soak's report: counts by status, rows lost and stored twice, p99 per phase."""

from __future__ import annotations

from abfleet import soak_report
from abfleet.soak import Phase


def test_the_report_counts_losses_duplicates_and_phases():
    answers = [{"t": 10.0 + i, "status": 200, "ms": float(i), "id": f"p{i}"} for i in range(10)]
    answers.append({"t": 15.5, "status": 502, "ms": 3.0, "id": None})
    rows = {f"p{i}": 1 for i in range(9)} | {"p0": 2, "extra": 1}  # p9 lost, p0 twice, one not answered
    phases = [Phase("baseline", 10.0, 15.0), Phase("database stopped", 15.0, 20.0)]
    report = soak_report.build(answers, rows, phases, {"production": 600.0}, {"production": 610.0},
                               {"minutes": 0.2, "rate": 1.0, "restarted": ["production"]})
    assert report["requests"] == {"total": 11, "by_status": {"200": 10, "502": 1}}
    assert report["rows"] == {"answered": 10, "stored": 11, "lost": 1, "stored_twice": 1, "stored_not_answered": 1}
    baseline, stopped = report["phases"]
    assert (baseline["requests"], baseline["non_200"], baseline["p99_ms"]) == (5, 0, 4.0)
    assert (stopped["requests"], stopped["non_200"], stopped["p99_ms"]) == (6, 1, 9.0)
    text = soak_report.table(report)
    assert "rows lost           1" in text and "killed and restarted" in text and "database stopped" in text


def test_a_phase_without_answers_has_no_percentile():
    report = soak_report.build([], {}, [Phase("baseline", 0.0, 1.0)], {}, {}, {"minutes": 1, "rate": 1})
    assert report["phases"][0]["p99_ms"] is None and report["rows"]["lost"] == 0
    assert "-" in soak_report.table(report)
