"""The browser fixture of the end-to-end tests: one headless Chromium a module."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.chromium import CHROMIUM, LAUNCH_ARGS


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip("chromium missing: run `apt-get install -y chromium` (make test does it when root)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=LAUNCH_ARGS)
        yield b
        b.close()
