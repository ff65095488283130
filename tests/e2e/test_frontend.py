"""End-to-end tests of the end-user page (inference/frontend/) in Debian's Chromium, against the live local
stack from the `fleet` fixture (tests/conftest.py): router at fleet.router_url serving the page at `/` and
the API at `/api/`, fleet.store, fleet.metrics_text(variant), fleet.output_dir."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from abfleet.api import FEEDBACK, LOCATIONS, PREDICT
from tests.e2e.chromium import FRONTEND

APP_JS = FRONTEND / "app.js"


# ---------------------------------------------------------------- helpers

def indian_rupees(lakhs: float) -> str:
    """Reference formatting: lakhs -> '₹ 62,50,000' (rounded half up like JS Math.round)."""
    digits = str(int(math.floor(lakhs * 100000 + 0.5)))
    head, tail = digits[:-3], digits[-3:]
    groups = []
    while len(head) > 2:
        groups.insert(0, head[-2:])
        head = head[:-2]
    if head:
        groups.insert(0, head)
    return "₹ " + ",".join([*groups, tail])


def ratings_count(metrics_text: str, variant: str, stars: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families
    total = 0.0
    for family in text_string_to_metric_families(metrics_text):
        if family.name != "abfleet_ratings":
            continue
        for s in family.samples:
            if s.name == "abfleet_ratings_total" and s.labels.get("variant") == variant \
                    and s.labels.get("stars") == stars:
                total += s.value
    return total


def base(fleet) -> str:
    return fleet.router_url.rstrip("/")


def open_page(context, url: str):
    """New page at `url`, waiting for the location list; returns (page, page_errors, api_responses).
    A script, style or request the router's Content-Security-Policy blocks counts as a page error."""
    page = context.new_page()
    errors: list[str] = []
    api: list = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if "Content Security Policy" in m.text else None)
    page.on("response", lambda r: api.append(r) if "/api/" in r.url else None)
    with page.expect_response(lambda r: r.url.endswith(LOCATIONS)) as info:
        page.goto(url + "/")
    assert info.value.ok, f"location list: HTTP {info.value.status}"
    page.wait_for_function("document.querySelectorAll('#location-list option').length > 0")
    return page, errors, api


def reload_page(page):
    with page.expect_response(lambda r: r.url.endswith(LOCATIONS)) as info:
        page.reload()
    assert info.value.ok
    page.wait_for_function("document.querySelectorAll('#location-list option').length > 0")


def first_location(page) -> str:
    names = page.eval_on_selector_all("#location-list option", "os => os.map(o => o.value)")
    real = [n for n in names if n != "other"]
    assert real, f"no real locations in the list: {names[:5]}"
    return real[0]


def fill_form(page, location, sqft="1200", bhk="2", bath="2"):
    page.fill("#location", location)
    page.fill("#total_sqft", str(sqft))
    page.fill("#bhk", str(bhk))
    page.fill("#bath", str(bath))


def submit_expecting_response(page):
    with page.expect_response(lambda r: r.url.endswith(PREDICT) and r.request.method == "POST") as info:
        page.click("#submit")
    return info.value


def estimate(page, sqft="1200", bhk="2", bath="2"):
    """Fill the form with the first listed location, submit, check the shown estimate. Returns (body, variant)."""
    from playwright.sync_api import expect
    fill_form(page, first_location(page), sqft, bhk, bath)
    resp = submit_expecting_response(page)
    assert resp.status == 200, f"predict: HTTP {resp.status} {resp.text()[:300]}"
    body = resp.json()
    variant = resp.headers.get("x-variant")
    assert body.get("prediction_id"), body
    assert variant, "router did not send X-Variant"
    expect(page.locator("#result-card")).to_be_visible()
    expect(page.locator("#price-rupees")).to_have_text(indian_rupees(float(body["estimated_price"])))
    expect(page.locator("#price-lakhs")).to_contain_text("lakh")
    if body.get("model_version") is not None:
        mv = str(body["model_version"])
        expect(page.locator("#model-version")).to_have_text("model " + (mv if mv.lower().startswith("v") else "v" + mv))
    expect(page.locator("#feedback")).to_be_visible()
    assert "variant" not in page.inner_text("body").lower(), "the page must not reveal the variant"
    return body, variant


def page_fetch(page, path: str, payload: dict) -> dict:
    return page.evaluate(
        """async ([path, payload]) => {
             const r = await fetch(path, {method: "POST", headers: {"Content-Type": "application/json"},
                                          body: JSON.stringify(payload)});
             let body = null, text = await r.text();
             try { body = JSON.parse(text); } catch (e) {}
             return {status: r.status, body, text};
           }""", [path, payload])


def wait_for(fn, timeout=5.0):
    end = time.monotonic() + timeout
    while True:
        value = fn()
        if value or time.monotonic() > end:
            return value
        time.sleep(0.1)


# ---------------------------------------------------------------- fixtures

@pytest.fixture
def context(browser):
    ctx = browser.new_context(viewport={"width": 1280, "height": 800})
    yield ctx
    ctx.close()


# ---------------------------------------------------------------- tests

@pytest.mark.e2e
def test_estimate_and_rate_four_stars(fleet, context):
    from playwright.sync_api import expect
    page, errors, _ = open_page(context, base(fleet))
    body, variant = estimate(page)
    pid = body["prediction_id"]
    pred = fleet.store.get_prediction(pid)
    assert pred is not None and pred["variant"] == variant

    before = ratings_count(fleet.metrics_text(variant), variant, "4")
    page.click("label[for=star-4]")
    expect(page.locator("input[name=stars][value='4']")).to_be_checked()
    with page.expect_response(lambda r: r.url.endswith(FEEDBACK)) as info:
        page.click("#rating-submit")
    assert info.value.status in (200, 201), info.value.text()
    expect(page.locator("#feedback-status")).to_contain_text("Thanks — your rating was recorded")
    for n in range(1, 6):
        expect(page.locator(f"input[name=stars][value='{n}']")).to_be_disabled()

    ratings = wait_for(lambda: [f for f in fleet.store.feedback_for(pid) if f["feedback_type"] == "rating"])
    assert len(ratings) == 1, ratings
    assert float(ratings[0]["feedback_value"]) == 4
    assert ratings[0]["variant"] == pred["variant"] == variant
    wait_for(lambda: ratings_count(fleet.metrics_text(variant), variant, "4") >= before + 1)
    after = ratings_count(fleet.metrics_text(variant), variant, "4")
    assert after == before + 1, (before, after)
    assert not errors, errors


@pytest.mark.e2e
def test_bad_input_shows_error_and_no_estimate(fleet, context):
    from playwright.sync_api import expect
    page, errors, _ = open_page(context, base(fleet))
    predict_calls = []
    page.on("request", lambda r: predict_calls.append(r) if r.url.endswith(PREDICT) else None)
    location = first_location(page)

    # 1. client-side check: 10 sq ft never reaches the server
    fill_form(page, location, sqft="10")
    page.click("#submit")
    expect(page.locator("#error")).to_contain_text("300")
    expect(page.locator("#total_sqft")).to_have_attribute("aria-invalid", "true")
    expect(page.locator("#result-card")).to_be_hidden()
    expect(page.locator("#price-rupees")).to_have_text("")
    page.wait_for_timeout(200)
    assert predict_calls == []

    # 2. bypass the client-side bound: the server refuses area 0 and its text is shown
    page.eval_on_selector("#total_sqft", "el => el.removeAttribute('min')")
    fill_form(page, location, sqft="0")
    resp = submit_expecting_response(page)
    assert 400 <= resp.status < 500, resp.status
    err = resp.json()
    assert isinstance(err.get("error"), str) and err["error"].strip()
    expect(page.locator("#error")).to_contain_text(err["error"].strip())
    if err.get("field") == "total_sqft":
        expect(page.locator("#total_sqft")).to_have_attribute("aria-invalid", "true")
    expect(page.locator("#result-card")).to_be_hidden()
    expect(page.locator("#price-rupees")).to_have_text("")

    # 3. a location the server does not know, typed in
    fill_form(page, "Atlantis Zzyzx Layout")
    resp = submit_expecting_response(page)
    assert 400 <= resp.status < 500, resp.status
    err = resp.json()
    expect(page.locator("#error")).to_contain_text(err["error"].strip())
    expect(page.locator("#result-card")).to_be_hidden()

    # 4. a good request afterwards clears the error
    estimate(page)
    expect(page.locator("#error")).to_have_text("")
    assert not errors, errors


@pytest.mark.e2e
def test_reload_keeps_variant_and_new_person_gets_cookie(fleet, browser):
    url = base(fleet)
    ctx1 = browser.new_context()
    ctx2 = browser.new_context()
    try:
        page, errors, api = open_page(ctx1, url)
        cookies1 = {c["name"]: c["value"] for c in ctx1.cookies(url)}
        assert cookies1, "the router set no cookie on first visit"
        [uid] = [c for c in ctx1.cookies(url) if c["name"] == "abfleet_uid"]
        assert uid["httpOnly"] and uid["sameSite"] == "Lax", uid
        variants = []
        for i in range(3):
            if i:
                reload_page(page)
            variants.append(estimate(page)[1])
        seen = {r.headers.get("x-variant") for r in api if r.headers.get("x-variant")}
        assert len(set(variants)) == 1 and seen <= set(variants), (variants, seen)
        assert {c["name"]: c["value"] for c in ctx1.cookies(url)} == cookies1, "the user cookie changed on reload"
        assert not errors, errors

        page2, errors2, _ = open_page(ctx2, url)
        cookies2 = {c["name"]: c["value"] for c in ctx2.cookies(url)}
        assert cookies2, "a new person got no cookie"
        common = set(cookies1) & set(cookies2)
        assert any(cookies1[n] != cookies2[n] for n in common), (cookies1, cookies2)
        estimate(page2)
        assert not errors2, errors2
    finally:
        ctx1.close()
        ctx2.close()


@pytest.mark.e2e
def test_screenshots_desktop_and_phone(fleet, browser):
    out = Path(fleet.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, viewport in [("desktop", {"width": 1280, "height": 800}), ("phone", {"width": 375, "height": 740})]:
        ctx = browser.new_context(viewport=viewport, device_scale_factor=2 if name == "phone" else 1)
        try:
            page, errors, _ = open_page(ctx, base(fleet))
            estimate(page)
            if name == "phone":
                widths = page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
                assert widths[0] <= widths[1], f"horizontal scroll at 375 px: {widths}"
            path = out / f"frontend-{name}.png"
            page.screenshot(path=str(path), full_page=True)
            assert path.stat().st_size > 1000
            assert not errors, errors
        finally:
            ctx.close()


@pytest.mark.e2e
def test_second_rating_impossible(fleet, context):
    from playwright.sync_api import expect
    page, errors, _ = open_page(context, base(fleet))
    body, variant = estimate(page)
    pid = body["prediction_id"]

    # rate with the keyboard only: arrows move between stars, Tab to the button, Enter sends
    page.focus("input[name=stars][value='1']")
    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowRight")
    expect(page.locator("input[name=stars][value='3']")).to_be_checked()
    page.keyboard.press("Tab")
    expect(page.locator("#rating-submit")).to_be_focused()
    with page.expect_response(lambda r: r.url.endswith(FEEDBACK)) as info:
        page.keyboard.press("Enter")
    assert info.value.status in (200, 201), info.value.text()
    expect(page.locator("#feedback-status")).to_contain_text("Thanks — your rating was recorded")

    # no second rating through the UI
    for n in range(1, 6):
        expect(page.locator(f"input[name=stars][value='{n}']")).to_be_disabled()
    expect(page.locator("#rating-submit")).to_be_disabled()
    page.click("label[for=star-5]", force=True)
    expect(page.locator("input[name=stars][value='5']")).not_to_be_checked()

    # a repeat posted directly is refused with 409 and readable text
    r = page_fetch(page, FEEDBACK, {"prediction_id": pid, "feedback_type": "rating", "feedback_value": 5})
    assert r["status"] == 409, r
    assert isinstance(r["body"], dict) and isinstance(r["body"].get("error"), str), r
    assert r["body"]["error"].strip() and not r["body"]["error"].lstrip().startswith("<"), r
    ratings = [f for f in fleet.store.feedback_for(pid) if f["feedback_type"] == "rating"]
    assert len(ratings) == 1 and float(ratings[0]["feedback_value"]) == 3, ratings

    # a refusal is shown to the person: quick feedback already sent elsewhere -> UI shows the 409 text
    r = page_fetch(page, FEEDBACK, {"prediction_id": pid, "feedback_type": "accurate"})
    assert r["status"] in (200, 201), r
    with page.expect_response(lambda r: r.url.endswith(FEEDBACK)) as info:
        page.click("#quick-accurate")
    assert info.value.status == 409
    expect(page.locator("#feedback-error")).to_have_attribute("role", "alert")
    expect(page.locator("#feedback-error")).to_have_text(info.value.json()["error"].strip())

    # the actual price goes through; a new estimate resets the panel
    page.fill("#actual-price", "71.5")
    with page.expect_response(lambda r: r.url.endswith(FEEDBACK)) as info:
        page.click("#actual-submit")
    assert info.value.status in (200, 201), info.value.text()
    actual = wait_for(lambda: [f for f in fleet.store.feedback_for(pid) if f["feedback_type"] == "actual_price"])
    assert actual and float(actual[0]["feedback_value"]) == 71.5
    estimate(page)
    expect(page.locator("input[name=stars][value='1']")).to_be_enabled()
    expect(page.locator("#feedback-status")).to_have_text("")
    assert not errors, errors


@pytest.mark.e2e
def test_format_rupees_in_node():
    node = shutil.which("node")
    if not node:
        pytest.skip("node missing: formatRupees is only tested through node")
    script = ("const m = require(%s); console.log(JSON.stringify([62.5, 150, 0.5, 1].map(m.formatRupees)));"
              % json.dumps(str(APP_JS)))
    out = subprocess.run([node, "-e", script], capture_output=True, text=True, timeout=30, check=True).stdout
    assert json.loads(out) == ["₹ 62,50,000", "₹ 1,50,00,000", "₹ 50,000", "₹ 1,00,000"]
    assert indian_rupees(62.5) == "₹ 62,50,000" and indian_rupees(150) == "₹ 1,50,00,000"
