"""In a real headless Chromium: the Gradio demo (upload a sample RAW file, run the model, see the
before/after images and the scores) and the evaluation report (its table and image grid, opened from
the file without a server). Screenshots are kept as test artefacts."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ARTIFACTS = Path(os.environ.get("LOWLIGHT_TEST_ARTIFACTS", "out/test-artifacts"))
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]

pytestmark = pytest.mark.e2e


def chromium() -> str:
    path = shutil.which("chromium")
    assert path, "Debian chromium is needed (make test installs it)"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return path


def test_demo_page_enhances_an_uploaded_raw_file(serve_app, sample_root):
    from playwright.sync_api import expect, sync_playwright

    url, _ = serve_app
    dng = min(sample_root.glob("raw/*/short/*.dng"))
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=CHROMIUM_ARGS)
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


def test_evaluation_report_renders_with_its_table_and_image_grid(evaluated):
    from playwright.sync_api import expect, sync_playwright

    out, _, _ = evaluated
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto((out / "report.html").resolve().as_uri())
            expect(page.locator("#scores tbody tr")).to_have_count(2)
            expect(page.locator("#scores")).to_contain_text("exposure_diffusion")
            images = page.locator("#grid img")
            expect(images.first).to_be_visible()
            widths = images.evaluate_all("els => els.map(e => e.complete && e.naturalWidth)")
            # 2 rows x (input, 2 methods, ground truth) x (image, zoom)
            assert len(widths) == 16 and all(w and w > 0 for w in widths), widths
            page.screenshot(path=str(ARTIFACTS / "report.png"), full_page=True)
        finally:
            browser.close()
