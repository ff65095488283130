"""The serving benchmark (`abfleet bench`): our predict path against two yardsticks.

In one run, on this machine, behind the same nginx, with the same load generator (wrk) at
the same fixed concurrency and duration, it measures
  (a) trivial: `GET /api/ping` of our own Flask/gunicorn server (same app, same config);
  (b) model:   `POST /api/predict_home_price` of that same server with the @production model;
  (c) mlflow:  `POST /invocations` of `mlflow models serve` of the same registered version,
               with the same number of workers;
and reports requests/s, p50 and p99 for each, and the ratios b/a and b/c.

It starts and stops everything it needs itself, on free ports, in a run directory of its
own (<run_dir>/bench/<timestamp>/); it needs only a registry with a @production model.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import requests

from abfleet import api, procs, registry, router
from abfleet.procs import child_env, free_port, port_taken, venv_bin
from abfleet.settings import Settings

CONNECTIONS = 32
DURATION_S = 10.0
WORKERS = 2
WARMUP_S = 2.0
SIDES = ("trivial", "model", "mlflow")

NGINX_CONF = """# abfleet bench: one nginx in front of the server under test (rendered by abfleet.bench).
{user}worker_processes 1;
pid {run}/nginx.pid;
error_log {run}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    server_tokens off;
    client_body_temp_path {run}/nginx/body;
    proxy_temp_path {run}/nginx/proxy;
    fastcgi_temp_path {run}/nginx/fastcgi;
    uwsgi_temp_path {run}/nginx/uwsgi;
    scgi_temp_path {run}/nginx/scgi;
    client_max_body_size 64k;
{servers}}}
"""

NGINX_SERVER = """    upstream {name} {{ server {backend}; keepalive 64; keepalive_timeout 10s; }}
    server {{
        listen {listen};
        location / {{
            proxy_pass http://{name};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_connect_timeout 1s;
            proxy_read_timeout 30s;
        }}
    }}
"""

# Requests are formatted once per wrk thread and sent in turn; `done` prints one JSON line.
WRK_SCRIPT = """local bodies = {bodies}
local method, path = "{method}", "{path}"
local requests_, n = {{}}, 0
function init(args)
  for i, b in ipairs(bodies) do
    local headers = {{["Content-Type"] = "application/json", ["X-User-Id"] = "bench-" .. (i % 97)}}
    if b == "" then requests_[i] = wrk.format(method, path, headers)
    else requests_[i] = wrk.format(method, path, headers, b) end
  end
end
function request()
  n = n % #requests_ + 1
  return requests_[n]
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('WRKJSON {{"requests": %d, "duration_us": %d, "connect": %d, "read": %d, "write": %d, ' ..
    '"status": %d, "timeout": %d, "p50_us": %.1f, "p90_us": %.1f, "p99_us": %.1f, "max_us": %.1f, "mean_us": %.1f}}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
"""


class BenchError(RuntimeError):
    """The benchmark could not run; the message says what to do."""


def machine() -> dict:
    model = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "cpu_model": model, "python": platform.python_version(), "kernel": platform.release()}


def wrk_binary() -> str:
    path = shutil.which("wrk")
    if path is None:
        raise BenchError("wrk is not installed: run `apt-get install -y wrk` (or `bash scripts/install-system.sh wrk`)")
    return path


def sample_rows(n: int = 64) -> list[dict]:
    from abfleet.load import realistic_rows

    return realistic_rows(n, seed=7)


# ---- processes ------------------------------------------------------------------------

class Proc:
    """A process of the benchmark, in its own session, with its log in the run directory."""

    def __init__(self, name: str, argv: list[str], env: dict, log: Path):
        self.name, self.log = name, log
        self.popen = procs.start(argv, env, log)

    def wait_ready(self, check: Callable[[], bool], timeout: float) -> None:
        procs.wait_ready(self.popen, check, name=self.name, log=self.log, timeout=timeout, error=BenchError)

    def stop(self) -> None:
        procs.stop_child(self.popen)


# ---- measuring ------------------------------------------------------------------------

def wrk_run(url: str, method: str, path: str, bodies: list[str], duration: float, connections: int,
            script: Path, threads: int = 2) -> dict:
    """One wrk run; returns its numbers (latencies in microseconds)."""
    lua_bodies = "{" + ", ".join(_lua_string(b) for b in bodies) + "}"
    script.write_text(WRK_SCRIPT.format(bodies=lua_bodies, method=method, path=path))
    argv = [wrk_binary(), "-t", str(threads), "-c", str(connections), "-d", f"{max(1, round(duration))}s",
            "--timeout", "5s", "-s", str(script), url]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("WRKJSON ")), None)
    if line is None:
        raise BenchError(f"wrk gave no result (exit {out.returncode}): {(out.stderr or out.stdout).strip()[-300:]}")
    return json.loads(line.removeprefix("WRKJSON "))


def _lua_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def side(numbers: dict, endpoint: str) -> dict:
    errors = sum(numbers[k] for k in ("connect", "read", "write", "status", "timeout"))
    seconds = numbers["duration_us"] / 1e6
    return {
        "rps": round(numbers["requests"] / seconds, 1),
        "p50_ms": round(numbers["p50_us"] / 1000, 3),
        "p99_ms": round(numbers["p99_us"] / 1000, 3),
        "errors": int(errors),
        "requests": int(numbers["requests"]),
        "p90_ms": round(numbers["p90_us"] / 1000, 3),
        "max_ms": round(numbers["max_us"] / 1000, 3),
        "endpoint": endpoint,
    }


def run(settings: Settings, *, duration: float = DURATION_S, connections: int = CONNECTIONS,
        warmup: float = WARMUP_S, say: Callable[[str], None] = print) -> dict:
    """Run the three measurements; return the result document (see the module docstring)."""
    wrk_binary()
    nginx = router.nginx_binary()
    if nginx is None:
        raise BenchError("nginx is not installed: run `apt-get install -y nginx` (or `make install-system`)")
    try:
        version = registry.version_for(settings, "production")
    except registry.RegistryError as exc:
        raise BenchError(f"{exc}\n(the benchmark reads the @production model from the registry: "
                         "`abfleet up` starts the local stack's)") from None
    if version is None:
        raise BenchError(f"no @production model in the registry at {settings.tracking_uri}: train one first")

    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = settings.run_dir / "bench" / stamp
    for sub in ("logs", "nginx/body", "nginx/proxy", "nginx/fastcgi", "nginx/uwsgi", "nginx/scgi"):
        (run_dir / sub).mkdir(parents=True, exist_ok=True)
    host = settings.host
    ports = {name: free_port(host) for name in ("app", "mlflow", "nginx_app", "nginx_mlflow")}
    rows = sample_rows()
    features = ["location", "total_sqft", "bhk", "bath"]
    ours = [json.dumps({k: r[k] for k in features}) for r in rows]
    theirs = [json.dumps({"dataframe_split": {"columns": features,
                                              "data": [[r["location"], r["total_sqft"], float(r["bhk"]), float(r["bath"])]]}})
              for r in rows]

    conf = run_dir / "nginx.conf"
    servers = "".join(NGINX_SERVER.format(name=name, backend=f"{host}:{ports[name]}", listen=f"{host}:{ports['nginx_' + name]}")
                      for name in ("app", "mlflow"))
    conf.write_text(NGINX_CONF.format(user="user root;\n" if os.geteuid() == 0 else "", run=run_dir, servers=servers))
    front = {name: settings.local_url(ports["nginx_" + name]) for name in ("app", "mlflow")}

    result: dict = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "machine": machine()}
    running: list[Proc] = []
    try:
        say(f"bench: model {settings.model_name} v{version}; {connections} connections, {duration:g}s each; in {run_dir}")
        running.append(Proc("nginx", [nginx, "-p", str(run_dir), "-c", str(conf), "-e", str(run_dir / "nginx-error.log"),
                                    "-g", "daemon off;"], child_env(settings), run_dir / "logs" / "nginx.log"))
        running[-1].wait_ready(lambda: port_taken(host, ports["nginx_app"]), 20)

        # (a) and (b): our server, as `abfleet serve` runs it, with a store of its own.
        app_settings = settings.replace(run_dir=run_dir / "server", workers=WORKERS,
                                        database_url=f"sqlite:///{run_dir / 'store.db'}")
        app = Proc("model server", [venv_bin("abfleet"), "serve", "--variant", "production",
                                    "--port", str(ports["app"])],
                   child_env(app_settings, {"VARIANT": "production", "PROMETHEUS_MULTIPROC_DIR": str(run_dir / "metrics")}),
                   run_dir / "logs" / "server.log")
        running.append(app)
        app.wait_ready(lambda: requests.get(f"{front['app']}{api.HEALTH}", timeout=2).json().get("model_version") == version, 120)
        probe = requests.post(f"{front['app']}{api.PREDICT}", data=ours[0],
                              headers={"Content-Type": "application/json"}, timeout=10)
        if probe.status_code != 200:
            raise BenchError(f"the model server refused a sample request: {probe.status_code} {probe.text[:200]}")
        ours_estimate = probe.json()["estimated_price"]

        for name, method, path, bodies in (("trivial", "GET", api.PING, [""]),
                                           ("model", "POST", api.PREDICT, ours)):
            say(f"  {name}: {method} {path}")
            if warmup > 0:
                wrk_run(front["app"], method, path, bodies, warmup, connections, run_dir / f"{name}.lua")
            result[name] = side(wrk_run(front["app"], method, path, bodies, duration, connections, run_dir / f"{name}.lua"),
                                f"{method} {path}")
            say(f"    {_fmt(result[name])}")
        app.stop()
        running.remove(app)

        # (c): MLflow's own server for the same registered version.
        mlflow = Proc("mlflow models serve",
                      [venv_bin("mlflow"), "models", "serve", "-m",
                       f"models:/{settings.model_name}/{version}", "--env-manager", "local", "-w", str(WORKERS),
                       "-h", host, "-p", str(ports["mlflow"])],
                      child_env(settings), run_dir / "logs" / "mlflow-serve.log")
        running.append(mlflow)
        mlflow.wait_ready(lambda: requests.get(f"{front['mlflow']}/ping", timeout=2).status_code == 200, 180)
        probe = requests.post(f"{front['mlflow']}/invocations", data=theirs[0],
                              headers={"Content-Type": "application/json"}, timeout=30)
        if probe.status_code != 200:
            raise BenchError(f"mlflow models serve refused a sample request: {probe.status_code} {probe.text[:200]}")
        theirs_estimate = float(probe.json()["predictions"][0])
        say("  mlflow: POST /invocations")
        if warmup > 0:
            wrk_run(front["mlflow"], "POST", "/invocations", theirs, warmup, connections, run_dir / "mlflow.lua")
        result["mlflow"] = side(wrk_run(front["mlflow"], "POST", "/invocations", theirs, duration, connections,
                                        run_dir / "mlflow.lua"), "POST /invocations")
        say(f"    {_fmt(result['mlflow'])}")
    finally:
        for proc in reversed(running):
            proc.stop()

    result["ratios"] = {
        "model_over_trivial": round(result["model"]["rps"] / result["trivial"]["rps"], 4) if result["trivial"]["rps"] else 0.0,
        "model_over_mlflow": round(result["model"]["rps"] / result["mlflow"]["rps"], 4) if result["mlflow"]["rps"] else 0.0,
    }
    result["config"] = {
        "duration_s": duration, "warmup_s": warmup, "connections": connections, "workers": WORKERS,
        "threads_per_worker": settings.threads, "load_generator": "wrk -t2",
        "model": f"models:/{settings.model_name}/{version}", "sample_rows": len(rows), "proxy": "nginx (1 worker)",
    }
    # The same flat priced by both servers: ours rounds to 0.01 lakh.
    result["agreement"] = {"model": ours_estimate, "mlflow": round(theirs_estimate, 2),
                           "same": abs(ours_estimate - theirs_estimate) <= 0.005 + 1e-9 * abs(theirs_estimate)}
    result["run_dir"] = str(run_dir)
    (run_dir / "result.json").write_text(json.dumps(result, indent=2))
    return result


def _fmt(s: dict) -> str:
    return f"{s['rps']:>9.1f} req/s  p50 {s['p50_ms']:>7.2f} ms  p99 {s['p99_ms']:>7.2f} ms  errors {s['errors']}"


def text(result: dict) -> str:
    m = result["machine"]
    lines = [f"{result['date']}  {m['nproc']} CPUs, {m['cpu_model']}  ({result['config']['connections']} connections, "
             f"{result['config']['duration_s']:g}s each, {result['config']['model']})",
             f"  {'':<8} {'req/s':>9}  {'p50 ms':>7}  {'p99 ms':>7}  errors"]
    for name in SIDES:
        s = result[name]
        lines.append(f"  {name:<8} {s['rps']:>9.1f}  {s['p50_ms']:>7.2f}  {s['p99_ms']:>7.2f}  {s['errors']}")
    r = result["ratios"]
    lines.append(f"  model/trivial {r['model_over_trivial']:.3f}   model/mlflow {r['model_over_mlflow']:.1f}")
    lines.append(f"  same estimate from both servers: {result['agreement']['same']}  ({result['run_dir']})")
    return "\n".join(lines)


def cmd_bench(args: argparse.Namespace, settings: Settings) -> int:
    """`abfleet bench`: exit 1 when a measurement had errors."""
    result = run(settings, duration=args.duration, connections=args.connections,
                 say=lambda m: print(m, file=sys.stderr, flush=True))
    print(json.dumps(result, indent=2) if args.json else text(result))
    bad = [name for name in SIDES if result[name]["errors"]]
    if bad:
        print(f"abfleet bench: requests failed during {', '.join(bad)}: see {result['run_dir']}", file=sys.stderr)
        return 1
    return 0


def add_bench_parser(sub, *subcommands: Callable) -> argparse.ArgumentParser:
    """`abfleet bench`; each of `subcommands` adds its parser to bench's (`abfleet bench pipeline`, `abfleet bench dags`)."""
    p = sub.add_parser("bench", help="the serving benchmark: trivial endpoint vs our predict vs mlflow models serve")
    p.add_argument("--duration", type=float, default=DURATION_S, help=f"seconds per measurement (default {DURATION_S:g})")
    p.add_argument("--connections", type=int, default=CONNECTIONS, help=f"concurrent connections (default {CONNECTIONS})")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(func=cmd_bench)
    if subcommands:
        kinds = p.add_subparsers(dest="bench_kind", metavar="{pipeline,dags}")
        for add in subcommands:
            add(kinds)
    return p
