"""The report of `abfleet soak`: built from the per-request log and the store, and shown as a table."""

from __future__ import annotations

from collections import Counter


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)


def build(answers: list[dict], rows: dict[str, int], phases: list, memory_start: dict, memory_end: dict,
          context: dict) -> dict:
    """answers: one dict per request ({"t", "status", "ms", "id"}); rows: prediction id → rows
    stored; phases: objects with name, start and end (wall-clock seconds)."""
    answered = {a["id"] for a in answers if a["status"] == 200 and a.get("id")}
    by_status = Counter(str(a["status"]) for a in answers)
    report_phases = []
    for phase in phases:
        inside = [a for a in answers if phase.start <= a["t"] < phase.end]
        report_phases.append({
            "name": phase.name, "seconds": round(phase.end - phase.start, 1), "requests": len(inside),
            "non_200": sum(1 for a in inside if a["status"] != 200),
            "p50_ms": percentile([a["ms"] for a in inside], 0.50),
            "p99_ms": percentile([a["ms"] for a in inside], 0.99),
        })
    return {
        **context,
        "requests": {"total": len(answers), "by_status": dict(sorted(by_status.items()))},
        "rows": {"answered": len(answered), "stored": sum(rows.values()), "lost": len(answered - rows.keys()),
                 "stored_twice": sum(1 for n in rows.values() if n > 1),
                 "stored_not_answered": len(rows.keys() - answered)},
        "phases": report_phases,
        "memory_mb": {variant: {"start": memory_start.get(variant), "end": memory_end.get(variant)}
                      for variant in sorted({*memory_start, *memory_end})},
    }


def table(report: dict) -> str:
    """The report as the README shows it."""
    req, rows = report["requests"], report["rows"]
    statuses = ", ".join(f"{n} × {s}" for s, n in req["by_status"].items())
    lines = [
        f"soak: {report['minutes']:g} min at {report['rate']:g} predictions/s",
        f"requests answered   {req['total']} ({statuses})",
        f"rows stored         {rows['stored']} (answered 200: {rows['answered']}, stored twice: {rows['stored_twice']}, "
        f"stored but not answered: {rows['stored_not_answered']})",
        f"rows lost           {rows['lost']}",
        "",
        f"{'phase':<36} {'seconds':>7} {'requests':>8} {'non-200':>7} {'p50 ms':>8} {'p99 ms':>8}",
    ]
    for p in report["phases"]:
        lines.append(f"{p['name']:<36} {p['seconds']:>7.0f} {p['requests']:>8} {p['non_200']:>7} "
                     f"{_ms(p['p50_ms']):>8} {_ms(p['p99_ms']):>8}")
    lines.append("")
    lines.append(f"{'server memory (RSS, master + workers)':<36} {'start MB':>9} {'end MB':>9}")
    for variant, mem in report["memory_mb"].items():
        note = "  (killed and restarted during the run)" if variant in report.get("restarted", ()) else ""
        lines.append(f"{variant:<36} {_ms(mem['start']):>9} {_ms(mem['end']):>9}{note}")
    return "\n".join(lines)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"
