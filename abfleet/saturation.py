"""Saturation of a model server: its processes' CPU and memory, the requests in flight against
its threads, and the database connections its workers hold.

prometheus_client's own process collector does not work in multiprocess mode: /metrics is
answered by one gunicorn worker from the metric files every worker writes, and a process
collector there would describe that one worker alone (and only if the registry had it, which
the multiprocess registry has not). `ServerProcesses` reads /proc at scrape time for the whole
server instead: the gunicorn master (the scraped worker's parent) and every child of it, each
a series of its own labelled with its role and pid (a restarted worker is a new series, so
its CPU counter never seems to go backwards). Without gunicorn it describes the calling
process alone.

The in-flight requests, the threads and the connection pool are gauges that every worker
keeps in its metric files (`livesum`: the sum over the live workers); `count_in_flight` and
`count_pool` update them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path

from abfleet.metrics import PROCESS_CPU, PROCESS_RSS

WSGIApp = Callable[[dict, Callable], Iterable[bytes]]


def _stat(proc: Path, pid: int) -> tuple[int, float, int] | None:
    """(parent pid, CPU seconds, resident bytes) of `pid` from /proc, or None once it is gone."""
    try:
        raw = (proc / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: the fields after it count from its last ')'.
    fields = raw[raw.rindex(")") + 2:].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / ticks, int(fields[21]) * os.sysconf("SC_PAGE_SIZE")


class ServerProcesses:
    """A collector of the CPU seconds and resident memory of a server's processes: `root` (the
    gunicorn master) and its children, read from `proc` at each scrape."""

    def __init__(self, root: int, proc: str | Path = "/proc"):
        self.root = root
        self.proc = Path(proc)

    def processes(self) -> dict[int, tuple[str, float, int]]:
        """pid → (role, CPU seconds, resident bytes) of the root and its children."""
        out = {}
        root = _stat(self.proc, self.root)
        if root is not None:
            out[self.root] = ("master", root[1], root[2])
        for pid in self._children():
            stat = _stat(self.proc, pid)
            if stat is not None and stat[0] == self.root:
                out[pid] = ("worker", stat[1], stat[2])
        return out

    def _children(self) -> list[int]:
        # gunicorn forks its workers from its main thread, whose children the kernel lists;
        # a kernel without that file: every process, by its parent.
        try:
            return [int(pid) for pid in (self.proc / str(self.root) / "task" / str(self.root) / "children").read_text().split()]
        except OSError:
            return [int(e.name) for e in self.proc.iterdir() if e.name.isdigit() and int(e.name) != self.root]

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        cpu = CounterMetricFamily(PROCESS_CPU.removesuffix("_total"), "CPU seconds (user and system) of each of the "
                                  "server's processes", labels=["role", "pid"])
        rss = GaugeMetricFamily(PROCESS_RSS, "Resident memory of each of the server's processes", labels=["role", "pid"])
        for pid, (role, seconds, resident) in sorted(self.processes().items()):
            cpu.add_metric([role, str(pid)], seconds)
            rss.add_metric([role, str(pid)], float(resident))
        yield cpu
        yield rss


def count_in_flight(app: WSGIApp, gauge) -> WSGIApp:
    """`app` with every request counted in `gauge` while the app handles it (up to the moment it
    hands its response to gunicorn, which writes it out)."""
    inc, dec = gauge.inc, gauge.dec

    def counted(environ: dict, start_response: Callable) -> Iterable[bytes]:
        inc()
        try:
            return app(environ, start_response)
        finally:
            dec()

    return counted


def count_pool(engine, checked_out, size) -> None:
    """Keep `checked_out` (a gauge) at the connections this process's pool of `engine` has handed
    out, and `size` at the pool's size (connections kept open; a busy pool may open a few more)."""
    import sqlalchemy as sa

    size.set(engine.pool.size() if hasattr(engine.pool, "size") else 0)
    sa.event.listen(engine, "checkout", lambda *_: checked_out.inc())
    sa.event.listen(engine, "checkin", lambda *_: checked_out.dec())
