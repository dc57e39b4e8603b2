"""End to end in a real headless Chromium (the system browser, driven by Playwright).

Loads the page from uvicorn on 127.0.0.1, asks a question and checks the answer is
highlighted in the passage, switches model, and starts a generation and watches
its tokens arrive one by one. The page's Content-Security-Policy stays on: any
inline script or style it blocked would show up as a console error here.
"""

from __future__ import annotations

import pytest
from serve_helpers import CONTEXT, GEN_TOKENS, PROMPT, QUESTION

from playwright import sync_api

from canao.serve.screenshots import chromium_path, launch_chromium  # noqa: E402

if chromium_path() is None:
    pytest.skip("no system Chromium (apt-get install chromium)", allow_module_level=True)


@pytest.fixture(scope="module")
def page(live_url):
    with sync_api.sync_playwright() as pw:
        browser = launch_chromium(pw)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(60_000)
            page.problems = []
            page.on("console", lambda m: m.type == "error" and page.problems.append(m.text))
            page.on("pageerror", lambda e: page.problems.append(str(e)))
            page.goto(live_url + "/")
            page.wait_for_selector("body[data-ready='1']")
            yield page
        finally:
            browser.close()


def test_question_answer_highlighted(page, qa_reference):
    labels = page.locator("#qa-models label")
    assert labels.all_inner_texts() == ["teacher", "student-4x"]
    assert "fp32" in page.inner_text("#qa-model-card") and "MB" in page.inner_text("#qa-model-card")
    page.fill("#qa-context", CONTEXT)
    page.fill("#qa-question", QUESTION)
    page.click("#qa-ask")
    mark = page.wait_for_selector("#qa-passage mark#qa-mark")
    assert mark.inner_text() == qa_reference["answer"] == "Gustave Eiffel"
    assert page.inner_text("#qa-answer") == "Gustave Eiffel"
    # the highlight sits exactly on the answer span of the passage
    assert page.inner_text("#qa-passage") == CONTEXT
    before = page.evaluate("() => document.querySelector('#qa-mark').previousSibling.textContent")
    assert before == CONTEXT[: qa_reference["start_char"]]
    for cell in ("#t-tokenize", "#t-model", "#t-decode", "#t-total"):
        assert page.inner_text(cell).endswith("ms"), cell
    assert page.locator("#qa-bar span").count() == 3

    # switch to the second model: the answer now comes from it
    labels.nth(1).click()
    page.fill("#qa-question", "When was the tower built?")
    page.click("#qa-ask")
    page.wait_for_function("() => document.querySelector('#qa-status').textContent.startsWith('Answered by student-4x')")
    assert page.inner_text("#qa-mark") == "1887 to 1889"
    card = page.inner_text("#qa-model-card")  # the shipped student, compiled: canao's own runtime
    assert "canao" in card and "int8" in card
    assert "median" in page.inner_text("#c-qa-last")  # the latency chart's caption follows the requests
    assert page.evaluate("() => document.querySelector('#chart-qa').toDataURL().length") > 2000  # drawn


def test_error_from_the_api_is_shown(page):
    page.fill("#qa-question", "")
    page.click("#qa-ask")
    assert "question" in page.inner_text("#qa-status").lower()
    # the server's own 4xx message, shown as is
    page.fill("#qa-question", "x" * 600)
    page.click("#qa-ask")
    page.wait_for_function("() => document.querySelector('#qa-status').classList.contains('error')")
    page.wait_for_function("() => document.querySelector('#qa-status').textContent.includes('limit is 500')")


def test_generation_streams_tokens(page, gen_reference):
    page.click("#tab-gen")
    assert page.is_visible("#panel-gen") and not page.is_visible("#panel-qa")
    assert "smollm2" in page.inner_text("#gen-models")
    card = page.inner_text("#gen-model-card")  # SmolLM2 compiled from its Q4_1 GGUF
    assert "canao" in card and "q4_1" in card
    # record when each token reaches the page, and the page's state when the first one does (the
    # compiled model streams a token every few ms: asking afterwards would race the end)
    page.evaluate("""() => {
        window.__tokenTimes = [];
        new MutationObserver((records) => {
            for (const r of records) for (const n of r.addedNodes)
                if (n.classList && n.classList.contains('tok')) {
                    if (!window.__tokenTimes.length) window.__atFirst = {
                        done: document.querySelector('#gen-output').getAttribute('data-done'),
                        stop: !document.querySelector('#gen-stop').disabled};
                    window.__tokenTimes.push(performance.now());
                }
        }).observe(document.querySelector('#gen-output'), {childList: true});
    }""")
    page.fill("#gen-prompt", PROMPT)
    page.fill("#gen-max", str(GEN_TOKENS))
    page.click("#gen-start")
    page.wait_for_selector("#gen-output[data-done='1']", timeout=120_000)
    at_first = page.evaluate("() => window.__atFirst")
    assert at_first == {"done": None, "stop": True}  # a token is shown before the end, Stop enabled meanwhile

    assert page.inner_text("#gen-output") == gen_reference["text"]
    times = page.evaluate("() => window.__tokenTimes")
    assert len(times) == page.locator("#gen-output .tok").count() >= 2
    assert times[-1] - times[0] > 5  # arrived over time, not in one piece
    assert page.inner_text("#g-count") == str(gen_reference["generated_tokens"])
    assert page.inner_text("#g-ttft").endswith(("ms", "s"))
    assert float(page.inner_text("#g-rate")) > 0
    assert page.is_enabled("#gen-start") and not page.is_enabled("#gen-stop")


def test_no_console_errors(page):
    # the 4xx answers of the error test are expected; nothing else (CSP violations, JS errors) is
    unexpected = [p for p in page.problems if "status of 400" not in p and "status of 413" not in p]
    assert unexpected == []
