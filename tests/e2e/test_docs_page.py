"""The API reference page (/api/docs) in Debian's Chromium, served by the live router: it
renders every operation of the OpenAPI document the servers generate, loads nothing from
another host, and breaks no rule of the router's Content-Security-Policy."""

from __future__ import annotations

from urllib.parse import urlparse

from abfleet import api, openapi


def test_the_reference_page_renders_every_operation(fleet, browser):
    base = fleet.router_url.rstrip("/")
    context = browser.new_context()
    page = context.new_page()
    problems: list[str] = []
    hosts: set[str] = set()
    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    page.on("console", lambda msg: problems.append(f"console {msg.type}: {msg.text}") if msg.type == "error" else None)
    page.on("request", lambda request: hosts.add(urlparse(request.url).netloc))
    try:
        page.goto(f"{base}{api.DOCS}")
        page.wait_for_selector("body[data-rendered]", timeout=30_000)
        document = openapi.document()
        operations = [(method, path) for path, item in document["paths"].items() for method in item]
        assert int(page.get_attribute("body", "data-rendered")) == len(operations)
        assert page.locator("section.op").count() == len(operations)
        headings = page.locator("section.op h2").all_inner_texts()
        for method, path in operations:
            assert any(method.upper() in h.upper() and path in h for h in headings), (method, path, headings)
        assert f"OpenAPI {document['openapi']}" in page.inner_text("#title")
        assert page.locator("#toc li a").count() == len(operations)
        # The predict operation documents its request body's fields with their bounds.
        predict = page.locator(f"section.op:has(h2 code:text-is('{api.PREDICT}'))")
        assert "total_sqft" in predict.inner_text() and "≥" in predict.inner_text()
    finally:
        context.close()
    assert not problems, problems
    assert hosts == {urlparse(base).netloc}, f"the page reached other hosts: {hosts}"
