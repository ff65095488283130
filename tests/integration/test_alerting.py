"""An alert reaches a person: the local stack's Prometheus evaluates the project's alert rules
on a real model server, Alertmanager (Debian's prometheus-alertmanager, started by
`stack.up`) receives the firing alert and POSTs it to ABFLEET_WEBHOOK_URL, here a loopback
receiver run by the test; the always-firing Watchdog goes to ABFLEET_WATCHDOG_URL, another
path of the same receiver.

The alert is AbfleetCandidateNotReady: a candidate server on a fresh fleet whose registry
(MLflow, running) holds no model at all exports `abfleet_ready 0`. The rules are the
project's own, loaded from copies in which only that alert's `for:` is shortened from 5
minutes to a few seconds, with short scrape and evaluation intervals; Alertmanager runs the
config the stack rendered (the webhooks included) with only its grouping waits shortened
to 2s (tests/alerting.py). The receiver's side of the webhook is the one a team would run.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import requests

from abfleet import api, stack
from abfleet.settings import project_root
from tests.alerting import alert_posts, speed_up_alertmanager, speed_up_prometheus
from tests.helpers import answering, family, fleet_settings, health, wait_for
from tests.pg import postgres_server

pytestmark = pytest.mark.slow

ALERT = "AbfleetCandidateNotReady"
SHORT_FOR = "3s"


def test_a_candidate_with_no_model_is_reported_to_the_webhook_by_alertmanager(tmp_path):
    rules_dir = tmp_path / "rules"
    rules_dir.mkdir()
    with answering(200) as (url, seen):
        settings = fleet_settings(tmp_path / "run", webhook_url=f"{url}/alerts", watchdog_url=f"{url}/watchdog")
        try:
            state = stack.up(settings, only=("mlflow", "candidate", "alertmanager", "prometheus"), say=lambda _m: None)
            assert state["processes"]["alertmanager"]["healthy"], state["processes"]
            speed_up_alertmanager(settings)
            speed_up_prometheus(settings, rules_dir, {ALERT: SHORT_FOR})
            # The server is up and scraped, and says it is not ready.
            prom = settings.local_url(settings.prometheus_port)
            wait_for(lambda: requests.get(f"{prom}/api/v1/query", timeout=5, params={
                "query": 'abfleet_ready{fleet_variant="candidate"} == 0'}).json()["data"]["result"],
                30, what="Prometheus to scrape abfleet_ready 0 from the candidate")
            # Firing after `for:`, then Alertmanager's group_wait before it sends.
            posts = wait_for(lambda: alert_posts(seen, ALERT), 90, interval=1.0,
                             what=f"Alertmanager to POST {ALERT} to the webhook")
            pings = wait_for(lambda: alert_posts(seen, "Watchdog", "/watchdog"), 60, interval=1.0,
                             what="Alertmanager to POST the Watchdog to the dead-man's-switch URL")
        finally:
            stack.down(settings, say=lambda _m: None)

    post = posts[0]
    assert post["path"] == "/alerts"
    body = post["json"]
    # A warning: the `ticket` receiver, whose webhook is ABFLEET_WEBHOOK_URL.
    assert body["receiver"] == "ticket" and body["status"] == "firing", body
    (alert,) = [a for a in body["alerts"] if a["labels"]["alertname"] == ALERT]
    assert alert["status"] == "firing"
    assert alert["labels"]["fleet_variant"] == "candidate"
    assert alert["labels"]["instance"] == f"{settings.host}:{settings.candidate_port}"
    assert alert["labels"]["severity"] == "warning"
    assert alert["annotations"]["runbook_url"] == "docs/runbooks/AbfleetCandidateNotReady.md"
    assert (project_root() / alert["annotations"]["runbook_url"]).is_file()
    assert alert["annotations"]["summary"].startswith("candidate (")
    # The Watchdog goes to its own receiver and URL only; people's alerts never go there.
    ping = pings[0]["json"]
    assert ping["receiver"] == "deadmans-switch" and ping["status"] == "firing", ping
    assert [a["labels"]["alertname"] for a in ping["alerts"]] == ["Watchdog"], ping
    assert not alert_posts(seen, "Watchdog", "/alerts"), "the Watchdog reached the people's webhook"
    assert not alert_posts(seen, ALERT, "/watchdog"), f"{ALERT} reached the dead-man's-switch URL"


SPOOL_ALERT = "AbfleetSpoolRefusing"
SPOOL_CAP = 10000  # rows per spool, i.e. per gunicorn worker process
ROW_BUDGET = 512  # bytes of anonymous memory a spooled row may cost a worker (the old spool: ~766 B)


def anonymous_memory(pid: int) -> int:
    """Bytes of anonymous (heap) memory of `pid` and its children: the spool's mmap'd segments
    are file pages, on disk, and not counted."""
    total = 0
    for p in family(pid):
        status = (Path("/proc") / str(p) / "status").read_text()
        total += int(next(line.split()[1] for line in status.splitlines() if line.startswith("RssAnon:"))) * 1024
    return total


def test_a_full_spool_answers_503_and_alertmanager_tells_the_webhook(fleet, tmp_path):
    """The database is down long enough for the spool to reach its row cap: predictions get 503
    with Retry-After, the server's heap grows by less than the cap's budget, and
    AbfleetSpoolRefusing reaches the webhook through Alertmanager. When the database returns,
    the spool drains and predictions are answered again."""
    rules_dir = tmp_path / "rules"
    rules_dir.mkdir()
    with postgres_server() as pg, answering(200) as (url, seen):
        settings = fleet_settings(tmp_path / "run", webhook_url=f"{url}/alerts", database_url=pg.url,
                                  mlflow_port=fleet.settings.mlflow_port, spool_dir=str(tmp_path / "spool"),
                                  spool_max_rows=SPOOL_CAP)
        server = f"http://{settings.host}:{settings.production_port}"
        try:
            stack.up(settings, only=("production", "alertmanager", "prometheus"), say=lambda _m: None)
            speed_up_alertmanager(settings)
            speed_up_prometheus(settings, rules_dir, {SPOOL_ALERT: SHORT_FOR})
            wait_for(lambda: health(server).get("model_loaded"), 90, what="the server to load its model")
            session = requests.Session()
            for i in range(50):  # warm: every worker has answered and flushed
                assert session.post(f"{server}{api.PREDICT}", json=api.FLAT, timeout=30).status_code == 200
            pid = stack.running_pid(settings, next(s for s in stack.services(settings) if s.name == "production"))
            before = anonymous_memory(pid)

            pg.stop("fast")
            statuses: dict[int, int] = {}
            refused = []
            for i in range(SPOOL_CAP + 500):
                r = session.post(f"{server}{api.PREDICT}", json={**api.FLAT, "bhk": 1 + i % 4}, timeout=30)
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                if r.status_code == 503:
                    refused.append(r)
            grown = anonymous_memory(pid) - before
            assert set(statuses) == {200, 503}, statuses
            # One keep-alive connection reaches one worker: its spool takes SPOOL_CAP rows (the
            # warm-up's last ones among them if they were still waiting), then refuses.
            assert statuses[200] >= SPOOL_CAP - 50, statuses
            assert all(r.headers.get("Retry-After", "").isdigit() for r in refused), refused[0].headers
            assert "try again in" in refused[0].json()["error"], refused[0].json()
            budget = SPOOL_CAP * ROW_BUDGET
            assert grown < budget, f"the server's heap grew by {grown} B for a full spool; budget {budget} B"
            print(f"{statuses}; heap grew {grown / 2**20:.1f} MiB for {SPOOL_CAP} spooled rows "
                  f"(budget {budget / 2**20:.1f} MiB)")

            posts = wait_for(lambda: alert_posts(seen, SPOOL_ALERT), 120, interval=1.0,
                             what=f"Alertmanager to POST {SPOOL_ALERT} to the webhook")
            (alert,) = [a for a in posts[0]["json"]["alerts"] if a["labels"]["alertname"] == SPOOL_ALERT]
            assert alert["status"] == "firing" and alert["labels"]["severity"] == "critical", alert
            assert posts[0]["json"]["receiver"] == "page", posts[0]["json"]
            assert alert["labels"]["fleet_variant"] == "production", alert
            assert alert["annotations"]["runbook_url"] == "docs/runbooks/AbfleetSpoolRefusing.md"

            pg.start()
            wait_for(lambda: session.post(f"{server}{api.PREDICT}", json=api.FLAT, timeout=30).status_code == 200,
                     120, what="predictions to be answered again once the spool drains")
        finally:
            stack.down(settings, say=lambda _m: None)
