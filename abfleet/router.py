"""The nginx router's configuration, rendered from `router/nginx.conf.j2`.

The local stack renders it before it starts nginx; the router container renders it at every
start (`python -m abfleet.router`), from the same ABFLEET_ settings the servers and the
pipeline are given, so the split the router applies is the one the evaluation checks.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import sys
from pathlib import Path

from abfleet.settings import Settings, project_root

COOKIE = "abfleet_uid"
# api.PREDICT, api.FEEDBACK and the prefix of api.RELOAD (a test holds them equal): the router
# image has Python and Jinja2 only, not pydantic, so it cannot import abfleet.api.
PREDICT_PATH = "/api/predict_home_price"
FEEDBACK_PATH = "/api/feedback"
ADMIN_PREFIX = "/api/admin"
DOCS_PATH = "/api/docs"  # api.DOCS: the reference page the router serves itself
OPENAPI_PATH = "/api/openapi.json"  # api.OPENAPI: what the page renders, answered by the servers

# Limits for traffic generated from one address (the demo, `abfleet load`, the tests): the
# defaults are for people, and a load generator is many people behind one address.
ONE_ADDRESS_LIMITS = {"router_predict_rate": 100_000.0, "router_predict_burst": 100_000,
                      "router_feedback_rate": 100_000.0, "router_feedback_burst": 100_000,
                      "router_connections_per_address": 4096}


def nginx_rate(per_second: float) -> str:
    """A rate for limit_req_zone: whole requests per second, else per minute (nginx's finest)."""
    if float(per_second).is_integer():
        return f"{int(per_second)}r/s"
    return f"{max(1, round(per_second * 60))}r/m"


def retry_after(per_second: float) -> int:
    """Seconds until a refused client may send one more request (at least 1)."""
    return max(1, math.ceil(1 / per_second))


def parse_weights(text: str) -> int:
    """'80/20' (production/candidate) → candidate percent 20."""
    match = re.fullmatch(r"\s*(\d{1,3})\s*/\s*(\d{1,3})\s*", text)
    if not match or int(match[1]) + int(match[2]) != 100:
        raise ValueError(f"--weights must look like 80/20 (production/candidate, adding up to 100), got {text!r}")
    return int(match[2])


def render(settings: Settings, *, candidate_weight: int | None = None, access_log: bool = True,
           production_servers: list[str] | None = None, candidate_servers: list[str] | None = None) -> str:
    """The nginx.conf text for these settings."""
    import jinja2

    template = (project_root() / "router" / "nginx.conf.j2").read_text()
    run_dir = settings.run_dir
    return jinja2.Template(template, undefined=jinja2.StrictUndefined, keep_trailing_newline=True).render(
        run_as_root=hasattr(os, "geteuid") and os.geteuid() == 0,
        worker_processes=1,
        run_dir=run_dir,
        log_dir=run_dir / "logs",
        access_log=access_log,
        max_body_bytes=settings.max_body_bytes,
        cookie=COOKIE,
        trusted_proxies=settings.trusted_proxies,
        cors_origins=settings.allowed_origins,
        docs_path=DOCS_PATH,
        docs_source=OPENAPI_PATH,
        feedback_path=FEEDBACK_PATH,
        predict_path=PREDICT_PATH,
        admin_prefix=ADMIN_PREFIX,
        predict_rate=nginx_rate(settings.router_predict_rate),
        predict_burst=settings.router_predict_burst,
        predict_retry_after=retry_after(settings.router_predict_rate),
        feedback_rate=nginx_rate(settings.router_feedback_rate),
        feedback_burst=settings.router_feedback_burst,
        feedback_retry_after=retry_after(settings.router_feedback_rate),
        connections_per_address=settings.router_connections_per_address,
        candidate_weight=settings.candidate_weight if candidate_weight is None else candidate_weight,
        production_servers=production_servers or [f"{settings.host}:{settings.production_port}"],
        candidate_servers=candidate_servers or [f"{settings.host}:{settings.candidate_port}"],
        listen=f"{settings.host}:{settings.router_port}",
        frontend_dir=project_root() / "inference" / "frontend",
    )


def write_config(settings: Settings, **kwargs) -> Path:
    """Render into the run directory and create the folders nginx writes to."""
    run_dir = settings.run_dir
    for sub in ("logs", "nginx/body", "nginx/proxy", "nginx/fastcgi", "nginx/uwsgi", "nginx/scgi"):
        (run_dir / sub).mkdir(parents=True, exist_ok=True)
    path = run_dir / "nginx.conf"
    path.write_text(render(settings, **kwargs))
    return path


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
    )


def nginx_command(settings: Settings, config: Path) -> list[str]:
    binary = nginx_binary()
    if binary is None:
        raise FileNotFoundError("nginx is not installed: run `sudo apt-get install -y nginx` (or `make install-system`)")
    return [binary, "-p", str(settings.run_dir), "-c", str(config), "-e", str(settings.run_dir / "logs" / "nginx-error.log"),
            "-g", "daemon off;"]


def main(argv: list[str] | None = None) -> int:
    """The router container's start: render nginx.conf from the environment's settings, then
    become nginx (or, with --check, test the rendered config and exit with nginx's verdict)."""
    parser = argparse.ArgumentParser(prog="python -m abfleet.router", description=main.__doc__)
    parser.add_argument("--production-servers", default="infer-prod:8000", help="comma-separated host:port list")
    parser.add_argument("--candidate-servers", default="infer-cand:8000", help="comma-separated host:port list")
    parser.add_argument("--check", action="store_true", help="run `nginx -t` on the rendered config instead of nginx")
    args = parser.parse_args(argv)
    settings = Settings.from_env()
    config = write_config(settings, production_servers=args.production_servers.split(","),
                          candidate_servers=args.candidate_servers.split(","))
    command = nginx_command(settings, config)
    if args.check:
        command = [*command[:-2], "-t"]
    print(f"abfleet.router: {config} with candidate weight {settings.candidate_weight}%", file=sys.stderr, flush=True)
    os.execv(command[0], command)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
