"""The fleet's facts and control actions, the same in the local stack, compose and AWS.

- The router's candidate weight has one home: the store's `candidate_weight` row (the local
  stack writes it whenever it renders the router's config; one production replica exports it
  as `abfleet_router_candidate_weight`). Where nothing writes the row (compose, AWS), the
  weight is `Settings.candidate_weight`, which the router's container renders at start from
  the same ABFLEET_CANDIDATE_WEIGHT the servers and the pipeline are given.
- The admin token is ABFLEET_ADMIN_TOKEN, else the file ABFLEET_ADMIN_TOKEN_FILE names
  (default <run_dir>/admin-token, which the local stack creates). Without one, a reload is
  reported as skipped: the servers re-read their alias by themselves within reload_interval.
"""

from __future__ import annotations

import logging

import requests

from abfleet.api import RELOAD
from abfleet.settings import VARIANTS, Settings
from abfleet.store import open_store

log = logging.getLogger(__name__)

WEIGHT_KEY = "candidate_weight"  # the store's fleet_state row


def candidate_weight(settings: Settings) -> int:
    """Percent of users the router sends to the candidate: the store's row, else settings."""
    with open_store(settings) as store:
        weight = store.get_state(WEIGHT_KEY)
    return settings.candidate_weight if weight is None else int(weight)


def set_candidate_weight(settings: Settings, weight: int) -> None:
    """Record the weight the router was just configured with."""
    with open_store(settings) as store:
        store.set_state(WEIGHT_KEY, weight)


def weights(candidate_percent: float) -> dict[str, float]:
    """Each arm's share of users (fractions adding up to 1) for a candidate percent."""
    candidate = round(candidate_percent / 100.0, 4)
    return {"production": round(1.0 - candidate, 4), "candidate": candidate}


def admin_token(settings: Settings) -> str | None:
    """The servers' reload token: from settings, else from the token file; None when neither."""
    if settings.admin_token:
        return settings.admin_token
    try:
        return settings.admin_token_path.read_text().strip() or None
    except OSError:
        return None


def reload_servers(settings: Settings) -> dict[str, str]:
    """Ask every replica of both variants to re-read its alias now (they also notice by
    themselves). Each variant's line says what its servers answered: the status, the version
    and how many of its gunicorn workers re-read the registry; with several replicas, how many
    were reached, then each one's answer."""
    later = f"it will notice within {settings.reload_interval:.0f}s"
    token = admin_token(settings)
    if token is None:
        return {variant: f"skipped (no admin token: set ABFLEET_ADMIN_TOKEN or ABFLEET_ADMIN_TOKEN_FILE); {later}"
                for variant in VARIANTS}
    out = {}
    for variant in VARIANTS:
        urls = settings.server_urls(variant)
        answers = [reload_one(url, token, settings, later) for url in urls]
        if len(urls) == 1:
            out[variant] = answers[0][1]
        else:
            reached = sum(ok for ok, _ in answers)
            out[variant] = f"{reached}/{len(urls)} replicas reached: " + "; ".join(
                f"{url} {text}" for url, (_, text) in zip(urls, answers))
    return out


def reload_one(url: str, token: str, settings: Settings, later: str) -> tuple[bool, str]:
    """One server's reload: (reached, what it answered)."""
    try:
        r = requests.post(f"{url}{RELOAD}", headers={"Authorization": f"Bearer {token}"},
                          timeout=settings.reload_wait_s + 10)
        body = r.json()
    except (requests.RequestException, ValueError) as exc:
        return False, f"not reached ({type(exc).__name__}); {later}"
    text = f"{r.status_code} {body.get('model_version', '')}".strip()
    workers = body.get("workers")
    if isinstance(workers, dict):
        text += f" ({workers.get('reached')}/{workers.get('expected')} workers)"
    return r.ok, text


def notify(settings: Settings, record: dict) -> str | None:
    """POST an event (a decision, a drift verdict) to the configured webhook; a failure is
    reported, never fatal."""
    if not settings.webhook_url:
        return None
    try:
        r = requests.post(settings.webhook_url, json={"source": "abfleet", **record}, timeout=10)
        return f"{r.status_code}"
    except requests.RequestException as exc:
        log.warning("webhook %s failed: %s", settings.webhook_url, exc)
        return f"failed: {type(exc).__name__}"
