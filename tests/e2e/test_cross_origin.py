"""The page served from another origin, in Debian's Chromium, against the live fleet's router
with that origin in its CORS allow-list (ABFLEET_CORS_ORIGINS): an estimate, a rating and an
actual price all succeed. From an origin not in the list the browser blocks the same calls.

The copy of the page differs from ours in one thing only: its calls name the router's origin
and send the user's cookie along (`credentials: "include"`), as a page on another origin must."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from abfleet import api, stack
from tests.e2e.chromium import FRONTEND, static_site
from tests.e2e.test_frontend import estimate, wait_for
from tests.helpers import wait_for as wait_until

sync_api = pytest.importorskip("playwright.sync_api")
expect = sync_api.expect

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def copy_page(into: Path, router_url: str) -> Path:
    """The page's files in `into`, its script calling `router_url` with credentials."""
    shutil.copytree(FRONTEND, into)
    script = (into / "app.js").read_text()
    for old, new in (('credentials: "same-origin"', 'credentials: "include"'),
                     ("fetch(path, opts)", f"fetch({router_url!r} + path, opts)")):
        assert script.count(old) == 1, f"app.js changed: {old!r} is not there once; update this test's copy"
        script = script.replace(old, new)
    (into / "app.js").write_text(script)
    return into


@contextlib.contextmanager
def router_allowing(fleet, origin: str) -> Iterator[None]:
    """The fleet's router with `origin` in its allow-list for the block; as it was afterwards."""
    def answers_preflight() -> bool:
        r = requests.options(f"{fleet.router_url}{api.FEEDBACK}", timeout=5, headers={
            "Origin": origin, "Access-Control-Request-Method": "POST"})
        return r.status_code == 204

    stack.up(fleet.settings.replace(cors_origins=origin), only=("router",), say=lambda _m: None)
    try:
        wait_until(answers_preflight, 30, what="the router to allow the page's origin")
        yield
    finally:
        stack.up(fleet.settings, only=("router",), say=lambda _m: None)
        wait_until(lambda: not answers_preflight(), 30, what="the router's allow-list to be restored")


def open_copy(browser, origin: str):
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    console: list[str] = []
    page.on("console", lambda m: console.append(m.text))
    page.on("pageerror", lambda e: console.append(str(e)))
    return context, page, console


def browser_fetch(page, url: str, payload: dict | None) -> str:
    """What a script's fetch of `url` (POST JSON when `payload`) gets: the status, or the error."""
    return page.evaluate(
        """async ([url, payload]) => {
             const opts = {credentials: "include", headers: {Accept: "application/json"}};
             if (payload) { opts.method = "POST"; opts.headers["Content-Type"] = "application/json";
                            opts.body = JSON.stringify(payload); }
             try { const r = await fetch(url, opts); return String(r.status); }
             catch (e) { return "blocked: " + e.message; }
           }""", [url, payload])


def test_the_page_from_an_allowed_origin_works_and_another_is_blocked(fleet, browser, tmp_path):
    page_dir = copy_page(tmp_path / "page", fleet.router_url)
    with static_site(page_dir) as allowed, static_site(page_dir) as other, router_allowing(fleet, allowed):
        context, page, console = open_copy(browser, allowed)
        try:
            with page.expect_response(lambda r: r.url.endswith(api.LOCATIONS)) as listed:
                page.goto(allowed + "/")
            assert listed.value.status == 200 and listed.value.url.startswith(fleet.router_url)
            page.wait_for_function("document.querySelectorAll('#location-list option').length > 0")
            body, _variant = estimate(page)
            pid = body["prediction_id"]

            page.click("label[for=star-4]")
            with page.expect_response(lambda r: r.url.endswith(api.FEEDBACK)) as rated:
                page.click("#rating-submit")
            assert rated.value.status == 201, rated.value.text()
            expect(page.locator("#feedback-status")).to_contain_text("your rating was recorded")
            page.fill("#actual-price", str(round(body["estimated_price"] * 1.1, 2)))
            with page.expect_response(lambda r: r.url.endswith(api.FEEDBACK)) as priced:
                page.click("#actual-submit")
            assert priced.value.status == 201, priced.value.text()
            kinds = wait_for(lambda: sorted(f["kind"] for f in fleet.store.feedback_for(pid)))
            assert kinds == ["actual_price", "rating"], kinds
            assert not [m for m in console if "CORS" in m], console
        finally:
            context.close()

        context, page, console = open_copy(browser, other)
        try:
            page.goto(other + "/")
            wait_for(lambda: any("CORS" in m for m in console), timeout=15)
            assert page.locator("#location-list option").count() == 0
            for url, payload in ((f"{fleet.router_url}{api.LOCATIONS}", None),
                                 (f"{fleet.router_url}{api.PREDICT}", api.FLAT),
                                 (f"{fleet.router_url}{api.FEEDBACK}",
                                  {"prediction_id": pid, "feedback_type": "too_high"})):
                assert browser_fetch(page, url, payload).startswith("blocked"), url
            assert sorted(f["kind"] for f in fleet.store.feedback_for(pid)) == ["actual_price", "rating"]
            assert any("blocked by CORS policy" in m for m in console), console
        finally:
            context.close()
