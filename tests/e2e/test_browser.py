"""The Gradio demo in a real headless Chromium: upload a sample RAW file, run the model, and see the
before/after images and the scores appear. The screenshot is kept as a test artefact."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ARTIFACTS = Path(os.environ.get("LOWLIGHT_TEST_ARTIFACTS", "out/test-artifacts"))
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]

pytestmark = pytest.mark.e2e


def test_demo_page_enhances_an_uploaded_raw_file(serve_app, sample_root):
    from playwright.sync_api import expect, sync_playwright

    chromium = shutil.which("chromium")
    assert chromium, "Debian chromium is needed (make test installs it)"
    url, _ = serve_app
    dng = min(sample_root.glob("raw/*/short/*.dng"))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.goto(url + "ui/")
            expect(page.get_by_text("takes RAW files")).to_be_visible(timeout=60_000)
            page.locator("#upload input[type=file]").set_input_files(str(dng))
            expect(page.locator("#upload").get_by_text(dng.name)).to_be_visible(timeout=60_000)
            page.locator("#enhance").click()
            expect(page.locator("#scores").get_by_text("brightness")).to_be_visible(timeout=180_000)
            images = page.locator("#compare img")
            expect(images.first).to_be_visible(timeout=30_000)
            loaded = images.evaluate_all("els => els.map(e => e.complete && e.naturalWidth)")
            assert loaded and all(width and width > 0 for width in loaded), loaded
            expect(page.locator("#download").get_by_text(".png")).to_be_visible(timeout=30_000)
            page.screenshot(path=str(ARTIFACTS / "demo.png"), full_page=True)
        except Exception:
            page.screenshot(path=str(ARTIFACTS / "demo-failure.png"), full_page=True)
            raise
        finally:
            browser.close()
