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


def _launch(models, queue_size: int):
    """The app as `rar app` runs it, in this process: Gradio's threads, and the decode runner on
    a thread of its own (the main thread in `rar app`); `_close` stops both."""
    import threading

    from rar.apps.app import RUNNER, build_app

    app = build_app(models, queue_size=queue_size)
    port = _free_port()
    app.launch(prevent_thread_lock=True, server_port=port, ssr_mode=False, quiet=True)
    runner = threading.Thread(target=RUNNER.run, daemon=True)
    runner.start()
    while RUNNER.jobs is None:
        time.sleep(0.01)
    return app, f"http://127.0.0.1:{port}/"


def _close(app) -> None:
    from rar.apps.app import RUNNER

    RUNNER.shutdown()
    app.close()


def _pixels(paths) -> list:
    import numpy as np
    from PIL import Image

    return [np.asarray(Image.open(p)) for p in paths]


def test_concurrent_api_requests_are_batched_and_get_their_lone_images(tmp_path, monkeypatch):
    """/generate under 6 concurrent clients and /edit under 4: every request answered, each with
    exactly the images of a lone request of its seed (they were decoded in shared batches)."""
    pytest.importorskip("gradio")
    client_mod = pytest.importorskip("gradio_client")
    import threading

    import numpy as np
    from PIL import Image

    from conftest import save_tiny_pair
    from rar.apps import app as appmod
    from rar.apps import app_requests as reqmod

    save_tiny_pair(tmp_path / "g", tmp_path / "t", [str(i) for i in range(10)], perturb=0.05)
    models = appmod.load_models(tmp_path / "g", tmp_path / "t")
    batches = {"generate": [], "edit": []}
    for name, fn in (("generate", "generate_requests"), ("edit", "edit_requests")):
        real = getattr(reqmod, fn)
        monkeypatch.setattr(reqmod, fn, lambda m, reqs, real=real, name=name: batches[name].append(len(reqs)) or real(m, reqs))
    res = models.tokenizer.config.resolution
    picture = (np.arange(res * res * 3).reshape(res, res, 3) * 7 % 255).astype(np.uint8)
    Image.fromarray(picture).save(tmp_path / "in.png")
    # (region, class, task, amount, decoding, results, seed): two inpaintings share a batch, two outpaintings another
    edits = [("top half", "3: 3", "inpaint", 1, "both", 2, 5), ("centre", "none", "inpaint", 1, "both", 3, 6),
             ("top half", "1: 1", "outpaint", 2, "kept-first", 2, 7), ("top half", "2: 2", "outpaint", 2, "kept-first", 1, 8)]
    lone_edits = [reqmod.edit_images(models, {"background": picture}, r, c, m, "right", a, meth, n, sd, 64)[1]
                  for r, c, m, a, meth, n, sd in edits]
    lone = [reqmod.generate_images(models, "3: 3", 2, 3.0, 0.5, 1.0, seed, 64)[1] for seed in range(6)]
    batches["generate"].clear(), batches["edit"].clear()
    app, url = _launch(models, queue_size=16)
    try:
        assert set(client_mod.Client(url, verbose=False).view_api(return_format="dict")["named_endpoints"]) == \
            {"/generate", "/edit"}
        got, got_edits = [None] * 6, [None] * len(edits)

        def request(k):
            got[k] = client_mod.Client(url, verbose=False).predict("3: 3", 2, 3.0, 0.5, 1.0, k, 64, api_name="/generate")

        def edit_request(k):
            r, c, m, a, meth, n, sd = edits[k]
            value = {"background": client_mod.handle_file(str(tmp_path / "in.png")), "layers": [], "composite": None}
            got_edits[k] = client_mod.Client(url, verbose=False).predict(value, r, c, m, "right", a, meth, n, sd, 64,
                                                                          api_name="/edit")

        threads = [threading.Thread(target=request, args=(k,)) for k in range(6)]
        threads += [threading.Thread(target=edit_request, args=(k,)) for k in range(len(edits))]
        [t.start() for t in threads]
        [t.join(timeout=180) for t in threads]
        assert all(g is not None for g in got + got_edits)  # every request answered
        for k in range(6):
            assert all((a == b).all() for a, b in zip(_pixels(got[k][1]), _pixels(lone[k]))), k
        for k in range(len(edits)):
            assert len(got_edits[k][1]) == len(lone_edits[k])
            assert all((a == b).all() for a, b in zip(_pixels(got_edits[k][1]), _pixels(lone_edits[k]))), k
        assert max(batches["generate"]) > 1 and max(batches["edit"]) > 1  # requests shared a decode
        _run_readme_client_snippet(url, tmp_path, monkeypatch)
    finally:
        _close(app)


def test_a_full_queue_says_busy_at_once(tmp_path, monkeypatch):
    """Past the queue's bound a request is refused at once with "try again", never left hanging;
    the accepted ones are all answered."""
    pytest.importorskip("gradio")
    client_mod = pytest.importorskip("gradio_client")
    import threading

    from conftest import save_tiny_pair
    from rar.apps import app as appmod

    save_tiny_pair(tmp_path / "g", tmp_path / "t", [str(i) for i in range(10)])
    models = appmod.load_models(tmp_path / "g", tmp_path / "t")
    from rar.apps import app_requests as reqmod

    real = reqmod.generate_requests
    monkeypatch.setattr(reqmod, "generate_requests", lambda m, reqs: time.sleep(3) or real(m, reqs))  # a busy app
    app, url = _launch(models, queue_size=2)
    try:
        outcome = [None] * 16  # 8 wait in the runner, 2 in Gradio's queue, the others are refused

        def request(k):
            try:
                client_mod.Client(url, verbose=False).predict("1: 1", 1, 1.0, 0.0, 1.0, k, 64, api_name="/generate")
                outcome[k] = "answered"
            except Exception as err:  # noqa: BLE001 - gradio_client's QueueError
                outcome[k] = str(err)

        threads = [threading.Thread(target=request, args=(k,)) for k in range(16)]
        [t.start() for t in threads]
        [t.join(timeout=120) for t in threads]
        busy = [o for o in outcome if o != "answered"]
        assert None not in outcome  # nobody left waiting
        assert busy and all("try again" in o.lower() for o in busy), outcome
        assert outcome.count("answered") >= 1
    finally:
        _close(app)


def _run_readme_client_snippet(url: str, tmp_path, monkeypatch) -> None:
    """The README's gradio_client example, as written, against this app (its URL swapped in)."""
    import re

    import numpy as np
    from PIL import Image

    code = next(c for c in re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
                if "gradio_client" in c)
    Image.fromarray((np.arange(32 * 32 * 3).reshape(32, 32, 3) % 255).astype(np.uint8)).save(tmp_path / "digit.png")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code.replace("http://127.0.0.1:7860/", url), "README.md", "exec"), namespace)  # noqa: S102
    assert len(namespace["pngs"]) == 4 and "rar.generate" not in str(namespace["pngs"])


def test_runner_batches_each_kind_apart_and_keeps_arrival_order():
    """The decode runner: jobs of two kinds arriving interleaved are served in batches of one kind
    each, the set-aside kind batched together too, every caller getting its own result; other
    calls run in between, one at a time."""
    import threading

    from rar.apps.app_runner import DecodeRunner

    runner, seen = DecodeRunner(max_requests=8, window=0.5), []

    def kind(name):
        return lambda reqs: seen.append((name, list(reqs))) or [f"{name}{r}" for r in reqs]

    many = {"a": kind("a"), "b": kind("b")}
    loop = threading.Thread(target=runner.run, daemon=True)
    loop.start()
    while runner.jobs is None:
        time.sleep(0.01)
    got = {}
    plan = [("a", 0), ("b", 1), ("a", 2), ("b", 3), ("call", 4), ("a", 5)]

    def submit(k, r):
        got[r] = runner.call(lambda x: f"c{x}", r) if k == "call" else runner.batch(many[k], r)

    threads = []
    for k, r in plan:
        threads.append(threading.Thread(target=submit, args=(k, r)))
        threads[-1].start()
        time.sleep(0.02)  # arrival order as planned
    [t.join(timeout=30) for t in threads]
    runner.shutdown()
    loop.join(timeout=30)
    assert got == {0: "a0", 1: "b1", 2: "a2", 3: "b3", 4: "c4", 5: "a5"}
    assert seen == [("a", [0, 2, 5]), ("b", [1, 3])]
