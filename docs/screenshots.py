"""Regenerate docs/app_generate.png and docs/app_edit.png: `rar app --demo DEMO_OUT` driven by
headless Chromium (Playwright with the system Chromium: apt-get install chromium).

    python docs/screenshots.py --demo demo_out
"""
from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from PIL import Image

DOCS = Path(__file__).parent


def shrink(path: Path, width: int = 900) -> None:
    img = Image.open(path).convert("RGB")
    img = img.resize((width, round(img.height * width / img.width)), Image.LANCZOS)
    img.quantize(colors=128).save(path, optimize=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--demo", required=True)
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "rar", "app", "--demo", args.demo, "--port", str(port)])
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=shutil.which("chromium"), headless=True, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1200, "height": 1000})
            page.goto(url)
            page.locator("#gen-class input").fill("7")
            page.keyboard.press("Enter")
            page.locator("#gen-num input[type=number]").fill("8")
            page.locator("#gen-run").click()
            page.wait_for_function("() => { const i = document.querySelector('#gen-grid img'); return i && i.naturalWidth > 0; }",
                                   timeout=120_000)
            page.screenshot(path=str(DOCS / "app_generate.png"))
            page.get_by_role("tab", name="Edit").click()
            page.locator("#edit-take").click()
            page.locator("#edit-region").get_by_text("top half").click()
            page.locator("#edit-class input").fill("9")
            page.keyboard.press("Enter")
            page.locator("#edit-method").get_by_text("both", exact=True).click()
            page.locator("#edit-run").click()
            page.wait_for_function("() => { const i = document.querySelector('#edit-grid img'); return i && i.naturalWidth > 0; }",
                                   timeout=120_000)
            page.screenshot(path=str(DOCS / "app_edit.png"), full_page=True)
            browser.close()
    finally:
        proc.terminate()
    for name in ("app_generate.png", "app_edit.png"):
        shrink(DOCS / name)


if __name__ == "__main__":
    main()
