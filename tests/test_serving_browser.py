"""The web assistant in a real browser: Debian's chromium driven by Playwright (no `playwright install`)."""

from __future__ import annotations

from pathlib import Path

import pytest
from serving_fixtures import KEY, run_config, served_rag, served_run, uvicorn_thread  # noqa: F401

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-quic"]

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium (apt-get install chromium)"
)


@pytest.fixture
def page(served_rag, served_run, monkeypatch):
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs the playwright package (dev extra)")
    from bsharedrag.serving import create_app

    monkeypatch.delenv("BSHAREDRAG_API_KEY", raising=False)
    app = create_app(served_rag, run_config(served_run, f"serve.api_key={KEY}"))
    with uvicorn_thread(app) as url, sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        page = browser.new_page()
        page.set_default_timeout(30_000)
        errors = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(url)
        yield page
        browser.close()
        assert not errors, f"JavaScript errors: {errors}"


def test_asking_streams_an_answer_with_its_passages(page):
    from playwright.sync_api import expect

    expect(page.locator("#health")).to_contain_text("documents")
    page.fill("#question", "how long does the kettle take to boil?")
    page.fill("#product", "p1")
    page.click("#ask")
    expect(page.locator("#passages li")).to_have_count(3)
    expect(page.locator("#ask")).to_be_enabled()
    assert page.locator("#answer").inner_text().strip()
    assert not page.locator("#ask-status.error").count()
    ids = [page.locator("#passages li").nth(i).get_attribute("data-doc-id") for i in range(3)]
    assert sorted(ids) == ["p1-d0", "p1-d1", "p1-d2"]


def test_admin_view_adds_finds_and_removes_a_document(page):
    from playwright.sync_api import expect

    page.click("#tab-admin")
    page.fill("#doc-id", "web-1")
    page.fill("#doc-title", "Glow Night Light")
    page.fill("#doc-text", "a soft orange glow for the hallway")
    page.fill("#doc-product", "p-web")
    page.click("#add")
    expect(page.locator("#admin-status")).to_contain_text("need an API key")  # no key entered yet

    page.fill("#api-key", KEY)
    page.click("#add")
    expect(page.locator("#admin-status")).to_contain_text("Saved web-1")
    page.fill("#find-id", "web-1")
    page.click("#find")
    expect(page.locator("#doc-view")).to_contain_text("soft orange glow")

    page.click("#tab-qa")
    page.fill("#question", "night light colour?")
    page.fill("#product", "p-web")
    page.click("#ask")
    expect(page.locator("#passages li")).to_have_count(1)
    expect(page.locator("#passages li").first).to_contain_text("Glow Night Light")

    page.click("#tab-admin")
    page.click("#remove")
    expect(page.locator("#admin-status")).to_contain_text("Removed web-1")
    page.click("#find")
    expect(page.locator("#admin-status")).to_contain_text("no document with id 'web-1'")


def test_at_phone_width_every_field_keeps_a_usable_width_and_nothing_scrolls_sideways(page):
    page.set_viewport_size({"width": 390, "height": 844})
    for field in ("#question", "#product", "#ask"):
        box = page.locator(field).bounding_box()
        assert box["x"] >= 0 and box["x"] + box["width"] <= 390, field
    assert page.locator("#product").bounding_box()["width"] >= 250
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    assert page.locator("#disclaimer").is_visible()


def test_a_product_filter_that_matches_nothing_shows_no_invented_answer(page):
    from playwright.sync_api import expect

    page.fill("#question", "Is it waterproof?")
    page.fill("#product", "NOPE-1")
    page.click("#ask")
    expect(page.locator("#ask-status")).to_contain_text("No passage matched")
    expect(page.locator("#answer")).to_contain_text("no passage")
    assert page.locator("#passages li").count() == 0 and page.locator("#answer .cite").count() == 0
