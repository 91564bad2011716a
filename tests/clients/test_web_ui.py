"""The web page at `/`: served by the API without a build step, and used end to end in headless
Debian chromium (Playwright drives the system browser; it never downloads one). The screenshot
lands in artifacts/ui.png."""
from __future__ import annotations

import io
import os
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from app.jobs.rq_adapter import queue_name
from app.jobs.workers import WorkerEntry, publish_worker

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# Each text the status line shows, in order (the page's own text, read by a MutationObserver).
RECORD_STATUS = """
window.__statusLog = [];
new MutationObserver((changes) => {
  for (const change of changes) {
    const el = change.target.nodeType === 3 ? change.target.parentElement : change.target;
    if (el && el.classList && el.classList.contains("status-text")) window.__statusLog.push(el.textContent);
  }
}).observe(document, {subtree: true, childList: true, characterData: true});
"""


def test_the_page_and_its_files_are_served_next_to_the_api(stack):
    client = stack.client
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for text in ('<label for="prompt">Prompt</label>', '<label for="negative_prompt">', '<label for="seed">',
                 '<label for="guidance_scale">', '<label for="size">', '<label for="n">', '<label for="sampler">',
                 "/static/app.js"):
        assert text in page.text
    assert "javascript" in client.get("/static/app.js").headers["content-type"]
    assert client.get("/static/style.css").headers["content-type"].startswith("text/css")
    assert client.get("/static/missing.js").status_code == 404
    assert client.get("/docs").status_code == 200 and client.get("/healthz").json() == {"status": "ok"}
    assert "/v1/images/generations" in client.get("/openapi.json").json()["paths"]


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless chromium with a fresh profile, launched once for this module's tests."""
    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing: CI must install Debian's chromium (.ci/run does)")
        pytest.skip(f"no {CHROMIUM} (apt-get install chromium) for the browser test")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if os.environ.get("CI"):
            raise
        pytest.skip("playwright is not installed (pip install -e '.[dev]')")
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=str(CHROMIUM), headless=True,
            args=FLAGS, viewport={"width": 1200, "height": 1000})
        yield context
        context.close()


@pytest.fixture
def browser_page(browser):
    """A new tab that records console errors and uncaught exceptions in `page.problems`."""
    page = browser.new_page()
    page.add_init_script(RECORD_STATUS)
    problems: list[str] = []
    page.on("console", lambda message: message.type == "error" and problems.append(message.text))
    page.on("pageerror", lambda exc: problems.append(str(exc)))
    page.problems = problems
    yield page
    page.close()


def pixels(url: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(httpx.get(url).content)))


def test_type_a_prompt_submit_and_see_the_image(stack, browser_page):
    page = browser_page
    page.goto(stack.url)
    page.get_by_label("Size").select_option("256")          # filled from GET /models
    page.get_by_label("Prompt", exact=True).fill("a red fox in snow, watercolor")
    page.get_by_label("Negative prompt").fill("blurry")
    page.get_by_label("Seed").fill("42")
    page.get_by_label("Guidance").fill("3.5")
    # tiny has no sampler head: "head" is not offered, "auto" would run plain; ask for plain outright
    assert page.locator("#sampler option[value=head]").is_disabled()
    page.get_by_label("Sampler").select_option("plain")
    page.get_by_role("button", name="Generate").click()

    first = page.locator(".job").first
    image = first.locator(".result img")
    image.wait_for(timeout=30_000)
    page.wait_for_function("img => img.complete && img.naturalWidth === 256", arg=image.element_handle())
    assert image.get_attribute("alt") == "a red fox in snow, watercolor (seed 42)"
    assert first.locator(".param-seed").inner_text() == "42"
    assert first.locator(".param-negative").inner_text() == "blurry"
    assert first.locator(".param-guidance").inner_text() == "3.5"
    assert first.locator(".param-sampler").inner_text() == "plain"
    assert first.locator(".status-text").inner_text().startswith("Done in")
    statuses = page.evaluate("window.__statusLog")
    assert any(text.startswith("Running: scale") for text in statuses), statuses
    download = first.locator("a.download")
    assert download.inner_text() == "Download" and download.get_attribute("download") == "star-42.png"
    url = download.get_attribute("href")

    # the user moves on: another prompt and seed in the form, then "Same seed again" on the first image
    page.get_by_label("Prompt", exact=True).fill("a blue whale")
    page.get_by_label("Negative prompt").fill("")
    page.get_by_label("Seed").fill("7")
    page.get_by_label("Guidance").fill("9")
    first.get_by_role("button", name="Same seed again").click()   # a new job, on top of the gallery
    page.wait_for_function("document.querySelectorAll('.job .result img').length === 2", timeout=30_000)
    # the form shows what was submitted again: the image's prompt and parameters, with its seed
    assert page.get_by_label("Prompt", exact=True).input_value() == "a red fox in snow, watercolor"
    assert page.get_by_label("Negative prompt").input_value() == "blurry"
    assert page.get_by_label("Seed").input_value() == "42"
    assert page.get_by_label("Guidance").input_value() == "3.5"
    assert page.get_by_label("Images").input_value() == "1"
    again = page.locator(".job").first
    assert again.locator(".job-prompt").inner_text() == "a red fox in snow, watercolor"
    again_image = again.locator(".result img")
    page.wait_for_function("img => img.complete && img.naturalWidth === 256", arg=again_image.element_handle())
    assert again.locator(".param-seed").inner_text() == "42"
    assert np.array_equal(pixels(again.locator("a.download").get_attribute("href")), pixels(url))

    (ROOT / "artifacts").mkdir(exist_ok=True)
    page.screenshot(path=str(ROOT / "artifacts" / "ui.png"), full_page=True)
    assert page.problems == []


def test_a_rejected_request_shows_the_servers_message(stack, browser_page):
    page = browser_page
    page.goto(stack.url)
    page.get_by_label("Prompt", exact=True).fill("a fox")
    page.get_by_label("Seed").fill("-1")
    page.get_by_role("button", name="Generate").click()
    alert = page.get_by_role("alert")
    alert.wait_for()
    assert "from 0 to 4294967295" in alert.inner_text()
    assert alert.locator("code").first.inner_text() == "seed" and "`" not in alert.inner_text()  # no raw backticks
    assert page.locator(".job").count() == 0


def test_the_models_example_prompts_are_offered(idle_api, browser_page):
    """GET /models carries each model's example prompts (its config.json, published by its worker);
    the page offers them: the first as the placeholder, each as a button that fills the prompt box."""
    examples = ["a red circle on a blue background", "a green ring on a white background"]
    publish_worker(idle_api.conn, WorkerEntry(name="idle", model="tiny", state="ready", size=256,
                                              queue=queue_name("tiny"), example_prompts=examples), ttl_s=60)
    page = browser_page
    page.goto(idle_api.url)
    buttons = page.locator("#examples button")
    buttons.first.wait_for()
    assert buttons.all_inner_texts() == examples
    prompt = page.get_by_label("Prompt", exact=True)
    assert prompt.get_attribute("placeholder") == examples[0]
    buttons.nth(1).click()
    assert prompt.input_value() == examples[1]
    assert page.problems == []


def test_without_the_event_stream_the_page_polls(stack, browser_page):
    page = browser_page
    page.route("**/jobs/*/events", lambda route: route.abort())   # e.g. a proxy that drops SSE
    page.goto(stack.url)
    page.get_by_label("Prompt", exact=True).fill("a harbor at night")
    page.get_by_label("Images").select_option("2")
    page.get_by_role("button", name="Generate").click()
    images = page.locator(".job .result img")
    page.wait_for_function("document.querySelectorAll('.job .result img').length === 2", timeout=30_000)
    seeds = page.locator(".job .param-seed").all_inner_texts()
    assert int(seeds[1]) == int(seeds[0]) + 1 and images.first.get_attribute("alt").startswith("a harbor at night")
    # guidance left empty: the model's default, as the job reports it once run (tiny: the global 4.0)
    assert page.locator(".job .param-guidance").all_inner_texts() == ["4", "4"]
    assert page.locator(".job .param-sampler").all_inner_texts() == ["plain", "plain"]   # auto, on tiny
    assert all("ERR_FAILED" in problem for problem in page.problems), page.problems   # only the aborted stream
