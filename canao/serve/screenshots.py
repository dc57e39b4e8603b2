"""Regenerate docs/screenshots/qa.png and generate.png: the demo page driven by a real headless Chromium.

    python -m canao.serve.screenshots --qa-model teacher=../shared/models/minilm-l6-h384-squad \
        --lm-model smollm2 --out docs/screenshots

Loads the models, serves the app on 127.0.0.1 (free port) in a background thread,
asks the example questions, streams one generation, and saves a picture of each
panel. Needs the `playwright` Python package and the system Chromium (Debian
`chromium`); Playwright's own browser downloads are not used.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def chromium_path() -> str | None:
    """The system Chromium: $CANAO_CHROMIUM, else /usr/bin/chromium (Debian), else one on PATH."""
    for candidate in (os.environ.get("CANAO_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser")):
        if candidate and Path(candidate).exists():
            return candidate
    return None


def launch_chromium(playwright):
    path = chromium_path()
    if path is None:
        raise RuntimeError("no system Chromium found: apt-get install chromium (or set CANAO_CHROMIUM)")
    return playwright.chromium.launch(executable_path=path, args=CHROMIUM_ARGS, headless=True)


def take(url: str, out: Path, max_new_tokens: int = 40, prompt: str | None = None) -> list[Path]:
    from playwright.sync_api import sync_playwright

    out.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = launch_chromium(pw)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 860}, device_scale_factor=1)
            page.goto(url + "/")
            page.wait_for_selector("body[data-ready='1']")
            # A few questions, on every QA model, so the latency chart has something to show.
            labels = page.locator("#qa-models label")
            for m in range(labels.count()):
                labels.nth(m).click()
                for name in ("Transformers", "Amazon", "Eiffel Tower"):
                    page.get_by_role("button", name=name).click()
                    page.click("#qa-ask")
                    page.wait_for_function("() => document.querySelector('#qa-status').textContent.startsWith('Answered')")
                    page.evaluate("() => { document.querySelector('#qa-status').textContent = ''; }")
            labels.first.click()
            page.click("#qa-ask")
            page.wait_for_selector("#qa-mark")
            page.wait_for_function("() => document.querySelector('#qa-status').textContent.startsWith('Answered')")
            if page.locator("#qa-compare").is_visible():
                page.click("#qa-compare")
                page.wait_for_function("() => !document.querySelector('#qa-compare').disabled")
            qa_png = out / "qa.png"
            page.screenshot(path=str(qa_png), full_page=True)

            page.click("#tab-gen")
            if prompt:
                page.fill("#gen-prompt", prompt)
            page.fill("#gen-max", str(max_new_tokens))
            page.click("#gen-start")
            page.wait_for_selector("#gen-output[data-done='1']", timeout=300_000)
            gen_png = out / "generate.png"
            page.screenshot(path=str(gen_png), full_page=True)
        finally:
            browser.close()
    return [qa_png, gen_png]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m canao.serve.screenshots", description=__doc__.splitlines()[0])
    ap.add_argument("--qa-model", action="append", default=[], metavar="M")
    ap.add_argument("--lm-model", action="append", default=[], metavar="M")
    ap.add_argument("--out", default="docs/screenshots")
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if not args.qa_model:
        args.qa_model = [str(Path(__file__).resolve().parents[2].parent / "shared" / "models" / "minilm-l6-h384-squad")]
    if not args.lm_model:
        args.lm_model = ["smollm2"]
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    from .app import create_app
    from .command import load_models
    from .live import BackgroundServer

    qa, lm = load_models(args.qa_model, args.lm_model, threads=args.threads)
    with BackgroundServer(create_app(qa, lm)) as url:
        paths = take(url, Path(args.out), args.max_new_tokens)
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
