"""`rar app --demo` on tiny models, driven by headless Chromium through Playwright: generate a
grid, take it to the Edit tab, inpaint, and check the result images and their sizes; a bad
request is a message in the page. Needs Chromium (`apt-get install chromium`; `.ci/run` installs it)."""
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium: apt-get install chromium (CI installs it)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    pytest.importorskip("gradio")
    from conftest import save_tiny_pair

    d = tmp_path_factory.mktemp("appdemo")  # laid out as `rar demo` writes it
    save_tiny_pair(d / "rar" / "generator", d / "tokenizer" / "tokenizer", [str(i) for i in range(10)])
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "rar", "app", "--demo", str(d), "--port", str(port),
                             "--device", "cpu"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    for _ in range(240):
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if proc.poll() is not None:
                pytest.fail(f"rar app exited: {proc.stdout.read()[-3000:]}")
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("rar app did not start within 120 s")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def _image_size(page, elem_id: str, timeout: float = 120_000) -> tuple[int, int]:
    img = page.locator(f"#{elem_id} img").first
    img.wait_for(state="visible", timeout=timeout)
    page.wait_for_function(f"() => {{ const i = document.querySelector('#{elem_id} img'); "
                           "return i && i.complete && i.naturalWidth > 0; }", timeout=timeout)
    return tuple(img.evaluate("i => [i.naturalWidth, i.naturalHeight]"))


def test_generate_then_inpaint_in_a_real_browser(server, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 1400})
        page.goto(server)
        page.locator("#gen-run").click()
        # 4 images of 32 px with 2 px padding, shown 4x enlarged (small images are)
        assert _image_size(page, "gen-grid") == (4 * (4 * 34 + 2), 4 * (34 + 2))
        assert "rar.generate(model, torch.tensor([0, 0, 0, 0])" in page.locator("#gen-code").inner_text()
        page.screenshot(path=str(tmp_path / "generate.png"))
        steps = page.locator("#gen-steps input[type=number]")  # parallel decoding: 8 network passes
        steps.fill("8")
        steps.press("Enter")
        page.locator("#gen-run").click()
        page.wait_for_function("() => document.querySelector('#gen-code').innerText.includes('steps=8')",
                               timeout=60_000)

        page.get_by_role("tab", name="Edit").click()
        page.locator("#edit-run").click()  # no image yet: a message, not a traceback
        page.get_by_text("upload an image first").first.wait_for(timeout=30_000)
        page.locator("#edit-take").click()
        page.locator("#edit-region").get_by_text("top half").click()
        page.locator("#edit-method").get_by_text("both", exact=True).click()
        page.locator("#edit-run").click()
        assert _image_size(page, "edit-grid") == (4 * (4 * 34 + 2), 4 * (2 * 34 + 2))  # kept-first row, raster row
        page.screenshot(path=str(tmp_path / "edit.png"))
        browser.close()
