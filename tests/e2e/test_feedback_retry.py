"""The page's feedback under a store fault, in Debian's Chromium: a 202 (pending) is shown as
saved, a 503 is sent again after its Retry-After a bounded number of times, saying so. The page
is served from inference/frontend by a plain HTTP server; the API answers are the browser's own
routes, so each answer the page meets is the one the test chose."""

from __future__ import annotations

import json

import pytest

from abfleet.api import FEEDBACK, LOCATIONS, PREDICT
from tests.e2e.chromium import FRONTEND, static_site

PID = "ab" * 16


@pytest.fixture(scope="module")
def site():
    with static_site(FRONTEND) as origin:
        yield origin


def open_with_feedback_answers(browser, site: str, answers: list[tuple[int, dict, dict]]):
    """A page with an estimate on screen whose feedback requests get `answers` in turn (status,
    body, headers; the last one repeats); returns the page and the feedback bodies it sent."""
    context = browser.new_context()
    page = context.new_page()
    sent: list[dict] = []

    def api(route):
        url = route.request.url
        if url.endswith(LOCATIONS):
            return route.fulfill(status=200, json={"locations": ["Indira Nagar", "other"]})
        if url.endswith(PREDICT):
            return route.fulfill(status=200, json={"estimated_price": 62.5, "prediction_id": PID, "model_version": "3"})
        if url.endswith(FEEDBACK):
            sent.append(json.loads(route.request.post_data))
            status, body, headers = answers[min(len(sent), len(answers)) - 1]
            return route.fulfill(status=status, json=body, headers=headers)
        return route.abort()

    page.route("**/api/**", api)
    page.goto(site + "/index.html")
    page.wait_for_function("document.querySelectorAll('#location-list option').length > 0")
    page.fill("#location", "Indira Nagar")
    page.fill("#total_sqft", "1200")
    page.fill("#bhk", "2")
    page.fill("#bath", "2")
    page.click("#submit")
    page.wait_for_selector("#feedback", state="visible")
    return context, page, sent


UNAVAILABLE = (503, {"error": "store unavailable: the database is unreachable; the feedback was not recorded, try again later",
                     "field": None}, {"Retry-After": "1"})
PENDING = (202, {"status": "pending", "prediction_id": PID, "feedback_type": "rating"}, {})


@pytest.mark.e2e
def test_a_503_is_retried_after_retry_after_and_a_202_is_shown_as_saved(browser, site):
    from playwright.sync_api import expect

    context, page, sent = open_with_feedback_answers(browser, site, [UNAVAILABLE, PENDING])
    try:
        page.click("label[for=star-4]")
        page.click("#rating-submit")
        expect(page.locator("#feedback-error")).to_contain_text("Trying again in 1 s (try 2 of 4)")
        expect(page.locator("#feedback-ok")).to_have_text(
            "Thanks — your rating (4 of 5 stars) was saved and will be recorded shortly.", timeout=10_000)
        expect(page.locator("#feedback-error")).to_have_text("")
        expect(page.locator("#rating-submit")).to_be_disabled()  # accepted: no second rating
        assert sent == [{"prediction_id": PID, "feedback_type": "rating", "feedback_value": 4}] * 2
    finally:
        context.close()


@pytest.mark.e2e
def test_retries_are_bounded_and_the_failure_is_shown(browser, site):
    from playwright.sync_api import expect

    context, page, sent = open_with_feedback_answers(browser, site, [UNAVAILABLE])
    try:
        page.click("#quick-accurate")
        expect(page.locator("#feedback-error")).to_contain_text("try 4 of 4", timeout=10_000)
        expect(page.locator("#feedback-error")).to_have_text(UNAVAILABLE[1]["error"], timeout=10_000)
        expect(page.locator("#quick-accurate")).to_be_enabled()  # the person may try again later
        page.wait_for_timeout(1500)  # no fifth try comes
        assert len(sent) == 4
        expect(page.locator("#feedback-ok")).to_have_text("")
    finally:
        context.close()
