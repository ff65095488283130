"""Saturation of a server: its processes' CPU and memory read from /proc (the whole gunicorn
tree, which prometheus_client's process collector cannot see in multiprocess mode), requests
in flight against threads, and the database connections the pool has handed out."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from prometheus_client import CollectorRegistry, Gauge

from abfleet.metrics import PROCESS_CPU, PROCESS_RSS
from abfleet.saturation import ServerProcesses, count_in_flight, count_pool
from abfleet.store import Store

TICKS, PAGE = os.sysconf("SC_CLK_TCK"), os.sysconf("SC_PAGE_SIZE")


def fake_stat(proc, pid: int, ppid: int, utime: int, stime: int, rss_pages: int, comm: str = "gunicorn: worker") -> None:
    # /proc/<pid>/stat: pid (comm) state ppid ... utime(14) stime(15) ... rss(24) ...
    fields = ["S", str(ppid)] + ["0"] * 9 + [str(utime), str(stime)] + ["0"] * 8 + [str(rss_pages)] + ["0"] * 20
    (proc / str(pid)).mkdir(parents=True)
    (proc / str(pid) / "stat").write_text(f"{pid} ({comm}) " + " ".join(fields) + "\n")


def families(collector) -> dict:
    return {f.name: {(s.labels["role"], s.labels["pid"]): s.value for s in f.samples} for f in collector.collect()}


@pytest.mark.parametrize("children_file", [True, False], ids=["children-file", "scan"])
def test_the_master_and_its_workers_are_read_from_proc(tmp_path, children_file):
    proc = tmp_path / "proc"
    fake_stat(proc, 100, 1, 2 * TICKS, 1 * TICKS, 1000, comm="gunicorn: master [abfleet (x)]")
    fake_stat(proc, 101, 100, 30 * TICKS, 5 * TICKS, 50_000)
    fake_stat(proc, 102, 100, 10 * TICKS, 0, 40_000)
    fake_stat(proc, 200, 1, 99 * TICKS, 0, 9)  # another server's process
    if children_file:
        (proc / "100" / "task" / "100").mkdir(parents=True)
        (proc / "100" / "task" / "100" / "children").write_text("101 102 ")
    got = families(ServerProcesses(100, proc))
    assert got[PROCESS_CPU.removesuffix("_total")] == {("master", "100"): 3.0, ("worker", "101"): 35.0,
                                                        ("worker", "102"): 10.0}
    assert got[PROCESS_RSS] == {("master", "100"): 1000.0 * PAGE, ("worker", "101"): 50_000.0 * PAGE,
                                ("worker", "102"): 40_000.0 * PAGE}


def test_a_real_process_tree(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", "import time; print('up', flush=True); time.sleep(30)"],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "up\n"  # running its own program, not half through exec
        got = families(ServerProcesses(os.getpid()))
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
    rss = got[PROCESS_RSS]
    assert rss[("master", str(os.getpid()))] > 10 * 2**20  # this interpreter, with pytest loaded
    assert rss[("worker", str(child.pid))] > 0
    assert got[PROCESS_CPU.removesuffix("_total")][("master", str(os.getpid()))] > 0


def test_requests_are_counted_in_flight_while_the_app_handles_them():
    gauge = Gauge("in_flight", "test", registry=CollectorRegistry())
    seen = []

    def app(environ, start_response):
        seen.append(gauge._value.get())
        if environ.get("fail"):
            raise RuntimeError("boom")
        return [b"ok"]

    counted = count_in_flight(app, gauge)
    assert counted({}, None) == [b"ok"]
    with pytest.raises(RuntimeError):
        counted({"fail": True}, None)
    assert seen == [1.0, 1.0] and gauge._value.get() == 0.0


def test_the_pool_gauge_follows_the_connections_handed_out(tmp_path):
    registry = CollectorRegistry()
    checked_out, size = Gauge("out", "test", registry=registry), Gauge("size", "test", registry=registry)
    store = Store(f"sqlite:///{tmp_path / 'store.db'}")
    try:
        count_pool(store.engine, checked_out, size)
        assert size._value.get() == store.engine.pool.size() > 0
        with store.engine.connect(), store.engine.connect():
            assert checked_out._value.get() == 2.0
        assert checked_out._value.get() == 0.0
        store.ping()
        assert checked_out._value.get() == 0.0
    finally:
        store.close()

