"""The web app in a real browser: Debian's headless Chromium driven by Playwright.

The tests start `animeddim serve` (conftest `web_server`), use the page as a person would,
and keep screenshots: under pytest's tmp dir and in test-artifacts/web/ (gitignored).
"""

from __future__ import annotations

import contextlib
import shutil
import time
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update"]  # fmt: skip
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "web"

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="Playwright for Python is not installed: pip install playwright"
)
if not CHROMIUM.is_file():
    pytest.skip(
        "Debian's chromium is not at /usr/bin/chromium (apt-get install chromium)",
        allow_module_level=True,
    )


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    out = tmp_path_factory.mktemp("screenshots")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)

    def take(page, name: str) -> Path:
        path = out / f"{name}.png"
        page.screenshot(path=str(path), full_page=True)
        shutil.copy(path, ARTIFACTS / path.name)
        return path

    return take


@pytest.fixture(scope="module")
def page(browser, web_server):
    ctx = browser.new_context(viewport={"width": 1200, "height": 900})
    pg = ctx.new_page()
    outside = []
    pg.on("request", lambda r: outside.append(r.url) if not r.url.startswith(
        (web_server, "data:")) else None)  # fmt: skip
    t = time.perf_counter()
    pg.goto(web_server + "/")
    pg.wait_for_selector("body[data-ready='1']", timeout=30_000)
    print(f"first page load, ready: {time.perf_counter() - t:.2f}s")
    pg.outside_requests = outside
    yield pg
    ctx.close()


def _tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def _invert_a_red_face(page, cond_data: Path) -> None:
    """Invert (20 steps) one red face of `cond_data` in the Invert tab, whose model is set,
    until the Edit panel shows."""
    import csv

    rows = csv.DictReader(open(cond_data / "labels.csv"))
    red = next(r["file"] for r in rows if r["colour"] == "red")
    page.set_input_files("#v-face", str(cond_data / red))
    page.fill("#v-steps", "20")
    page.click("#v-go")
    page.wait_for_selector("#e-panel:visible", timeout=60_000)


def test_first_load_asks_nothing_from_outside(page, shots):
    assert page.outside_requests == []
    assert page.locator("#g-model option").all_inner_texts() == [
        "avatars-64 (shipped)",
        "avatars-64-cond (shipped)",
        "colours (run)",
        "labelled (run)",
        "tiny (run)",
    ]
    assert page.locator("#g-attrs select").count() == 0  # an unconditional model: no controls
    shots(page, "01-first-load")


def test_generate_shows_images_downloads_and_the_command(page, shots):
    page.select_option("#g-model", "run:tiny")
    page.fill("#g-n", "12")
    page.fill("#g-steps", "4")
    page.click("#g-go")
    page.wait_for_selector("#g-gallery img >> nth=11", timeout=60_000)
    assert page.locator("#g-gallery a").count() == 12
    assert page.locator("#g-gallery a").first.get_attribute("download") == "seed0-000000.png"
    assert page.locator("#g-gallery img").first.evaluate("i => i.naturalWidth") == 16
    assert page.locator("#g-cmd").inner_text().startswith("animeddim sample --run ")
    assert "done in" in page.inner_text("#g-status")
    shots(page, "02-generate-tiny")


def test_generate_with_the_shipped_model(page, shots):
    page.select_option("#g-model", "avatars-64")
    page.fill("#g-n", "16")
    page.fill("#g-steps", "10")
    page.click("#g-go")
    page.wait_for_function(
        "document.querySelector('#g-gallery img') && "
        "document.querySelector('#g-gallery img').naturalWidth === 64",
        timeout=60_000,
    )
    assert page.locator("#g-gallery img").count() == 16
    assert "--model avatars-64" in page.inner_text("#g-cmd")
    shots(page, "03-generate-avatars-64")


def test_attribute_controls_only_for_a_model_with_a_vocabulary(page):
    page.select_option("#g-model", "run:labelled")
    assert page.locator("#g-attrs select").count() == 2
    assert page.locator("#g-attrs select[data-attr='glasses'] option").all_inner_texts() == [
        "any",
        "no",
        "yes",
    ]
    page.select_option("#g-attrs select[data-attr='glasses']", "yes")
    page.click("#g-go")
    page.wait_for_selector("#g-status .error")
    # Its config names attributes but its weights are unconditional: the model says so.
    assert "the model is unconditional" in page.inner_text("#g-status")
    page.select_option("#g-model", "avatars-64")
    assert page.locator("#g-attrs select").count() == 0


def test_the_training_mix_of_a_conditional_model(page, shots):
    """ "The rest as in the training data": each image gets one training image's attributes,
    the chosen band set in all, and the command says so."""
    page.select_option("#g-model", "run:colours")
    page.fill("#g-n", "6")
    page.fill("#g-steps", "3")
    page.select_option("#g-attrs select[data-attr='band']", "top")
    page.check("#g-mix")
    page.fill("#g-attr-guidance", "band=3")  # the band pushed harder than the colour
    page.click("#g-go")
    page.wait_for_selector("#g-gallery img >> nth=5", timeout=60_000)
    assert "--attrs-from training --attr band=top" in page.inner_text("#g-cmd")
    assert "--guidance 1 --attr-guidance band=3" in page.inner_text("#g-cmd")
    shots(page, "04-generate-training-mix")


def test_the_guidance_and_sampling_fields_start_at_the_models_recommendation(page):
    """The shipped conditional model recommends a weight, the noise levels it applies at, a
    sampler and a step count (its export); a run recommends nothing: plain conditional, no
    interval shown, the page's own sampler and steps."""
    from animeddim.checkpoint import recommended_attribute_guidance
    from animeddim.pipelines import default_guidance, default_sampling, load_for_sampling

    loaded = load_for_sampling(None, "avatars-64-cond", "cpu")[0]
    sampler, steps = default_sampling(loaded)
    page.select_option("#g-model", "avatars-64-cond")
    page.wait_for_selector("#g-interval")
    assert float(page.input_value("#g-guidance")) == default_guidance(loaded) > 1
    assert "noise levels sigma in (1, inf]" in page.inner_text("#g-interval")
    own = recommended_attribute_guidance(loaded.meta)  # the file's per-attribute weights
    assert page.locator("#g-attr-weights").count() == (1 if own else 0)
    for name, w in own.items():
        assert f"{name.replace('_', ' ')} at {w:g}" in page.inner_text("#g-attr-weights")
    assert page.input_value("#g-attr-guidance") == ",".join(f"{a}={w:g}" for a, w in own.items())
    assert (page.input_value("#g-sampler"), page.input_value("#g-steps")) == (sampler, str(steps))
    assert page.inner_text("#g-sampling-note") == "as the model recommends"
    page.select_option("#g-model", "run:colours")
    page.wait_for_selector("#g-attrs select")
    assert page.input_value("#g-guidance") == "1"
    assert page.locator("#g-interval").count() == 0
    assert page.locator("#g-attr-weights").count() == 0
    assert page.input_value("#g-attr-guidance") == ""
    assert (page.input_value("#g-sampler"), page.input_value("#g-steps")) == ("dpmpp-2m", "10")
    assert page.inner_text("#g-sampling-note") == ""


def test_bad_numbers_are_refused_with_the_reason(page, shots):
    page.fill("#g-steps", "0")
    page.click("#g-go")
    page.wait_for_selector("#g-status .error")
    assert "steps must be an integer from 1 to 250, got '0'" in page.inner_text("#g-status")
    page.fill("#g-steps", "10")
    page.fill("#g-n", "10000")
    page.click("#g-go")
    page.wait_for_selector("#g-status .error:has-text('images (n) must be')")
    shots(page, "04-bad-number")
    page.fill("#g-n", "16")


def test_interpolate_two_seeds(page, shots):
    _tab(page, "Interpolate")
    page.select_option("#i-model", "avatars-64")
    page.fill("#i-frames", "8")
    page.fill("#i-steps", "10")
    page.click("#i-go")
    page.wait_for_function("document.querySelector('#i-gif').naturalWidth > 0", timeout=60_000)
    assert page.locator("#i-strip").evaluate("i => i.naturalWidth") == 8 * 64
    assert page.locator("#i-gif-dl").get_attribute("href").startswith("data:image/gif")
    shots(page, "05-interpolate")


def test_invert_an_upload_and_refuse_a_non_image(page, shots, tmp_path):
    _tab(page, "Invert")
    page.select_option("#v-model", "avatars-64")
    from animeddim.datasets import generate_avatars

    face = sorted(
        generate_avatars(tmp_path / "faces", n=1, size=80, seed=5, workers=1).glob("*.png")
    )
    page.set_input_files("#v-face", str(face[0]))
    page.fill("#v-steps", "20")
    page.click("#v-go")
    page.wait_for_selector("#v-psnr:has-text('PSNR')", timeout=60_000)
    assert "after 20 steps: PSNR" in page.inner_text("#v-psnr")
    assert "resized from 80x80 to the model's 64x64" in page.inner_text("#v-status")
    assert page.locator("#e-panel").is_hidden()  # an unconditional model: nothing to edit
    shots(page, "06-invert")
    text = tmp_path / "notes.png"
    text.write_text("this is not a picture")
    page.set_input_files("#v-face", str(text))
    page.click("#v-go")
    page.wait_for_selector("#v-status .error", timeout=60_000)
    assert "not an image" in page.inner_text("#v-status")
    shots(page, "07-invert-non-image")


def _data_url_pixels(url: str):
    import base64
    import io

    import numpy as np
    from PIL import Image

    head, data = url.split(",", 1)
    assert head == "data:image/png;base64"
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"), float)


def test_edit_an_uploaded_face_of_a_conditional_model(page, shots, cond_data):
    _tab(page, "Invert")
    page.select_option("#v-model", "run:colours")
    assert page.locator("#v-result").is_hidden()  # another model's inversion is put away
    _invert_a_red_face(page, cond_data)
    # one control per attribute of the model's vocabulary, each "keep" until changed
    assert page.locator("#e-attrs select").count() == 2
    assert page.locator("#e-attrs select[data-attr='colour'] option").all_inner_texts() == [
        "keep", "blue", "red",
    ]  # fmt: skip
    assert page.eval_on_selector_all("#e-attrs select", "ss => ss.map(s => s.value)") == [
        "keep", "keep",
    ]  # fmt: skip
    page.fill("#e-guidance", "-1")
    page.click("#e-go")
    page.wait_for_selector("#e-status .error")
    assert "guidance must be a number from 0 to 20, got '-1'" in page.inner_text("#e-status")
    page.fill("#e-guidance", "1")
    page.click("#e-go")
    page.wait_for_selector("#e-status .error:has-text('all are')")  # nothing changed yet
    page.select_option("#e-attrs select[data-attr='colour']", "blue")
    page.click("#e-go")
    page.wait_for_function(
        "document.querySelector('#e-edited').naturalWidth === 16 && "
        "!document.querySelector('#e-result').hidden",
        timeout=60_000,
    )
    assert "edited: colour = blue" in page.inner_text("#e-what")
    assert "done in" in page.inner_text("#e-status")
    recon = _data_url_pixels(page.get_attribute("#e-recon", "src"))
    edited = _data_url_pixels(page.get_attribute("#e-edited", "src"))
    original = _data_url_pixels(page.get_attribute("#e-orig", "src"))
    assert recon.shape == edited.shape == original.shape == (16, 16, 3)
    assert np_abs_mean(edited - recon) > 20  # the edit is another image ...
    assert edited[..., 2].mean() > edited[..., 0].mean() + 40  # ... and it is blue
    assert recon[..., 0].mean() > recon[..., 2].mean() + 40  # the reconstruction stays red
    shots(page, "09-edit")


def np_abs_mean(x) -> float:
    return float(abs(x).mean())


def test_watch_a_run(page, shots):
    _tab(page, "Watch a run")
    page.select_option("#w-run", "run:tiny")
    # The tab opens on the first run in the list (the 8-epoch 'colours'): wait for tiny's own
    # last grid (its 2 epochs) rather than for any curve and image.
    page.wait_for_function(
        "document.querySelector('#w-sample-title').textContent.includes('epoch-0002.png')",
        timeout=30_000,
    )
    assert page.locator("#w-loss polyline").count() == 2  # train and validation
    # trained without --eval-every: the third chart says how to get its curve
    assert "train --eval-every N measures it" in page.text_content("#w-std-kid")
    page.wait_for_function("document.querySelector('#w-sample').naturalWidth > 0")
    assert page.input_value("#w-run") == "run:tiny"
    shots(page, "08-watch")


def test_watch_a_run_shows_a_server_error_as_such(page):
    """An answer that is not JSON (a 500 in plain text) was shown as "the server cannot be
    reached"; the page now says what the server answered, and the run's own reason when
    the server gives one (a damaged metrics.csv: tests/test_web.py)."""

    def fail(route):
        route.fulfill(status=500, body="Internal Server Error", content_type="text/plain")

    _tab(page, "Watch a run")
    page.route("**/api/run?*", fail)
    try:
        page.select_option("#w-run", "run:colours")
        page.wait_for_selector("#w-status .error", timeout=30_000)
        text = page.inner_text("#w-status")
        assert "the server answered 500 Internal Server Error" in text, text
        assert "cannot be reached" not in text
    finally:
        page.unroute("**/api/run?*", fail)
    page.select_option("#w-run", "run:tiny")
    page.wait_for_function("!document.querySelector('#w-status .error')", timeout=30_000)


def test_text_that_is_not_a_number_is_named_in_the_page(page, shots):
    """A number field holding "1e" or "--" reads as "" in the browser, so the server's
    refusal said "seed must be an integer ..., got ''" under a field showing "1e". The page
    now names the field itself and sends nothing."""
    _tab(page, "Generate")
    sent = []
    page.on("request", lambda r: sent.append(r.url) if "/api/generate" in r.url else None)
    for field, typed, reason in [
        ("#g-seed", "1e", "Seed: what is typed there is not a number (give one from 0 to "
                          "2147483647)"),
        ("#g-steps", "--", "Steps: what is typed there is not a number (give one from 1 to 250)"),
    ]:  # fmt: skip
        page.click(field)
        page.keyboard.press("Control+A")
        page.keyboard.type(typed)
        page.click("#g-go")
        page.wait_for_selector(f"#g-status .error:has-text('{reason[:12]}')")
        assert page.inner_text("#g-status") == reason
        page.fill(field, "1")
    shots(page, "10-not-a-number")
    _tab(page, "Invert")  # Edit reads the Invert tab's Steps
    page.click("#v-steps")
    page.keyboard.press("Control+A")
    page.keyboard.type("5e")
    page.click("#v-go")
    page.wait_for_selector("#v-status .error:has-text('Steps: what is typed')")
    page.fill("#v-steps", "20")
    assert sent == []


def test_the_other_tabs_say_why_their_button_is_disabled_while_a_job_runs(page, shots):
    """One job runs at a time, so every tab's button is disabled while one runs; on the
    other tabs the button was grey with no word of why. They now say which job runs where."""
    _tab(page, "Generate")
    page.select_option("#g-model", "avatars-64")
    page.fill("#g-n", "64")
    page.fill("#g-steps", "250")
    page.click("#g-go")
    page.wait_for_selector("#g-status:has-text('denoising step')", timeout=60_000)
    assert page.locator("#busy").is_hidden()  # the job's own tab shows its progress
    _tab(page, "Interpolate")
    assert page.is_disabled("#i-go")
    assert page.inner_text("#busy") == (
        "Busy with Generate on the Generate tab (one job runs at a time): "
        "wait for it, or press Stop there."
    )
    shots(page, "11-busy-on-another-tab")
    _tab(page, "Generate")
    assert page.locator("#busy").is_hidden()
    _tab(page, "Watch a run")
    assert page.locator("#busy").is_visible()
    _tab(page, "Generate")
    page.click("#tab-generate .stop")
    page.wait_for_selector("#g-status:has-text('stopped')")
    _tab(page, "Interpolate")
    assert page.locator("#busy").is_hidden() and not page.is_disabled("#i-go")
    _tab(page, "Generate")
    page.fill("#g-n", "16")
    page.fill("#g-steps", "10")


def _post_generate(web_server: str, body: dict):
    """A job posted by another client (as curl would): (connection, response, job id)."""
    import http.client
    import json
    from urllib.parse import urlsplit

    u = urlsplit(web_server)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    conn.request("POST", "/api/generate", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    return conn, resp, json.loads(resp.readline())["job"]


def _stop(web_server: str, job_id: str) -> None:
    import json
    from urllib.request import Request, urlopen

    body = json.dumps({"job": job_id}).encode()
    urlopen(Request(web_server + "/api/stop", body, {"Content-Type": "application/json"})).close()


# records the highest value the Generate tab's progress bar shows from now on
RECORD_BAR = """() => {
  window.barSeen = 0;
  new MutationObserver((records) => {
    for (const r of records) {
      const v = r.target.tagName === "PROGRESS" ? r.target.value : 0;
      window.barSeen = Math.max(window.barSeen, v);
    }
  }).observe(document.getElementById("g-status"), {subtree: true, attributes: true});
}"""


def test_a_reload_mid_job_follows_the_job_to_its_result(page, web_server, shots):
    """A reload (or the tab closed and reopened) mid-job stopped the job and lost it. The tab
    now keeps the job's id and follows it again: its tab with the progress bar and Stop, then
    the result as a run without a reload shows it. A long job of another client ahead keeps
    this one waiting for as long as the test needs."""
    _tab(page, "Generate")
    blocker = {"model": "avatars-64", "n": 64, "steps": 250, "sampler": "ddim"}
    conn, _, blocker_id = _post_generate(web_server, blocker)
    try:
        page.select_option("#g-model", "run:tiny")
        page.fill("#g-seed", "3")
        page.fill("#g-n", "6")
        page.fill("#g-steps", "10")
        page.click("#g-go")
        page.wait_for_selector("#g-status:has-text('waiting for 1 job ahead')")
        saved = page.evaluate("JSON.parse(sessionStorage.getItem('animeddim.job'))")
        assert (saved["prefix"], saved["model"]) == ("g", "run:tiny")
        page.reload()
        page.wait_for_selector("body[data-ready='1']", timeout=30_000)
        page.wait_for_selector("#g-status:has-text('waiting for 1 job ahead')")
        assert page.get_attribute("nav button[data-tab='generate']", "aria-selected") == "true"
        assert page.locator("#g-status progress").count() == 1
        assert page.locator("#tab-generate .controls .stop").is_visible()
        assert page.is_disabled("#g-go")
        assert page.input_value("#g-model") == "run:tiny"
        page.evaluate(RECORD_BAR)
        shots(page, "12-reloaded-mid-job")
    finally:
        _stop(web_server, blocker_id)  # the page's job runs now
        conn.close()
    page.wait_for_selector("#g-gallery img >> nth=5", timeout=60_000)
    assert page.locator("#g-gallery img").count() == 6
    assert page.locator("#g-gallery a").first.get_attribute("download") == "seed3-000000.png"
    assert page.evaluate("window.barSeen") == 10  # each of its 10 steps shown on the bar
    assert "done in" in page.inner_text("#g-status")
    assert page.locator("#tab-generate .controls .stop").is_hidden()
    assert not page.is_disabled("#g-go")
    assert page.evaluate("sessionStorage.getItem('animeddim.job')") is None
    shots(page, "13-reloaded-job-done")


def test_a_reload_after_the_job_is_gone_says_so_and_forgets_it(page):
    """A tab reopened after its job was stopped or its result taken elsewhere (or after a
    server restart): a short note, the id forgotten, the buttons free."""
    page.evaluate("""sessionStorage.setItem('animeddim.job', JSON.stringify(
        {id: '0123456789abcdef', prefix: 'g', model: 'run:tiny', t0: Date.now()}))""")
    page.reload()
    page.wait_for_selector("body[data-ready='1']", timeout=30_000)
    page.wait_for_selector(
        "#g-status .note:has-text('the job started before the reload has ended')"
    )
    assert page.evaluate("sessionStorage.getItem('animeddim.job')") is None
    assert (
        not page.is_disabled("#g-go") and page.locator("#tab-generate .controls .stop").is_hidden()
    )


def _server_status(web_server: str) -> dict:
    import json
    from urllib.request import urlopen

    with urlopen(web_server + "/api/status", timeout=30) as r:
        return json.loads(r.read())


def _until(cond, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _idle_server(web_server: str) -> dict:
    """The server's counts once no job runs or waits: an earlier test's job may still be
    running out its grace on this shared server, and the counts a test compares are its own
    once that has ended."""
    from animeddim.apps.web.jobs import JOB_GRACE_S

    _until(lambda: not (s := _server_status(web_server))["running"] and not s["waiting"],
           timeout=JOB_GRACE_S + 30)  # fmt: skip
    return _server_status(web_server)


@contextlib.contextmanager
def _reloaded_while_queued(page, web_server: str, go: str, status: str):
    """Press `go` while a long job of another client runs, reload the page while the page's
    job waits behind it, and yield once the reloaded page follows that job again; the job
    ahead is stopped on leaving, so the page's job runs then."""
    blocker = {"model": "avatars-64", "n": 64, "steps": 250, "sampler": "ddim"}
    conn, _, blocker_id = _post_generate(web_server, blocker)
    try:
        page.click(go)
        page.wait_for_selector(f"{status}:has-text('waiting for 1 job ahead')")
        page.reload()
        page.wait_for_selector("body[data-ready='1']", timeout=30_000)
        page.wait_for_selector(f"{status}:has-text('waiting for 1 job ahead')")
        yield
    finally:
        _stop(web_server, blocker_id)
        conn.close()


def test_a_reload_mid_edit_shows_the_inversion_and_the_asked_edit_again(
    page, web_server, shots, cond_data
):
    """An Edit shows under the inversion it edits. Reattached after a reload, its result came
    alone, without the face it was made from (the inversion's images had gone with the old
    page) and with the controls back at "keep". The tab keeps them with the job, so the
    reloaded page shows what the page showed before, then the edit's result of that face."""
    _tab(page, "Invert")
    page.select_option("#v-model", "run:colours")
    _invert_a_red_face(page, cond_data)
    shown = {k: page.get_attribute(k, "src") for k in ("#v-orig", "#v-recon")}
    texts = {k: page.inner_text(k) for k in ("#v-psnr", "#v-status")}
    assert "PSNR" in texts["#v-psnr"] and "done in" in texts["#v-status"]
    page.select_option("#e-attrs select[data-attr='colour']", "blue")
    page.fill("#e-guidance", "2")
    with _reloaded_while_queued(page, web_server, "#e-go", "#e-status"):
        assert page.get_attribute("nav button[data-tab='invert']", "aria-selected") == "true"
        assert page.locator("#v-pair").is_visible()
        assert {k: page.get_attribute(k, "src") for k in shown} == shown
        assert {k: page.inner_text(k) for k in texts} == texts
        assert page.input_value("#e-attrs select[data-attr='colour']") == "blue"
        assert page.input_value("#e-attrs select[data-attr='band']") == "keep"
        assert (page.input_value("#e-guidance"), page.input_value("#v-steps")) == ("2", "20")
        assert page.locator("#tab-invert #e-panel .stop").is_visible()
        shots(page, "14-reloaded-mid-edit")
    page.wait_for_function(
        "document.querySelector('#e-edited').naturalWidth === 16 && "
        "!document.querySelector('#e-result').hidden",
        timeout=60_000,
    )
    assert page.inner_text("#e-what") == "edited: colour = blue (guidance 2)"
    assert page.get_attribute("#e-orig", "src") == shown["#v-orig"]  # the face it was made from
    assert page.locator("#v-pair").is_visible()
    assert page.evaluate("sessionStorage.getItem('animeddim.job')") is None
    edited = _data_url_pixels(page.get_attribute("#e-edited", "src"))
    assert edited[..., 2].mean() > edited[..., 0].mean() + 40  # blue, as asked before the reload
    shots(page, "15-reloaded-edit-done")


# Hands the page its /api/generate answer with its lines held back until window.release():
# the job runs on the server while its id is still on its way to the page.
HOLD_THE_ID = """() => {
  const real = window.fetch;
  const held = new Promise((r) => { window.release = r; });
  window.fetch = async (url, opts) => {
    if (!url.startsWith("/api/generate")) return real(url, opts);
    window.fetch = real;
    const res = await real(url, opts);
    const body = res.body.pipeThrough(new TransformStream(
      {async transform(chunk, out) { await held; out.enqueue(chunk); }}));
    window.answered = true;
    const {status, statusText, headers} = res;
    return new Response(body, {status, statusText, headers});
  };
}"""


def test_stop_before_the_jobs_id_came_stops_the_job_at_once(page, web_server):
    """Stop pressed in the milliseconds before the job's id reached the page only stopped
    listening: the server, told nothing, ran the job on for its grace (JOB_GRACE_S, 20 s,
    for a reload to reattach). The page now names its job before sending it, so Stop names
    it at once; a job whose request the server never got is refused should it come."""
    from animeddim.apps.web.jobs import JOB_GRACE_S

    _tab(page, "Generate")
    page.select_option("#g-model", "avatars-64")
    page.fill("#g-n", "64")
    page.fill("#g-steps", "250")
    before = _idle_server(web_server)
    stops = []

    def record(r) -> None:
        if r.url.endswith("/api/stop"):
            stops.append(r.post_data_json)

    page.on("request", record)
    try:
        page.evaluate(HOLD_THE_ID)
        page.click("#g-go")
        page.wait_for_function("window.answered === true", timeout=30_000)
        _until(lambda: _server_status(web_server)["running"], timeout=30)  # the job runs
        saved = page.evaluate("JSON.parse(sessionStorage.getItem('animeddim.job'))")
        assert saved["answered"] is False  # its stream's first line has not come
        page.click("#tab-generate .stop")
        page.evaluate("window.release()")
        page.wait_for_selector("#g-status:has-text('stopped')")
        # stopped by the page's word, not after the grace
        _until(lambda: _server_status(web_server)["stopped"] == before["stopped"] + 1,
               timeout=JOB_GRACE_S / 2)  # fmt: skip
        assert stops == [{"job": saved["id"]}], stops
        assert page.evaluate("sessionStorage.getItem('animeddim.job')") is None
        assert not page.is_disabled("#g-go")
        assert page.locator("#tab-generate .controls .stop").is_hidden()

        held = []  # a request the server never answers: Stop still frees the page
        page.route("**/api/generate?*", lambda route: held.append(route))
        try:
            page.click("#g-go")
            _until(lambda: held, timeout=30)
            page.click("#tab-generate .stop")
            page.wait_for_selector("#g-status:has-text('stopped')", timeout=30_000)
            # its stop names it too: the server, which never got it, would refuse it
            assert not page.is_disabled("#g-go") and len(stops) == 2
            assert held[0].request.url.endswith("?job=" + stops[1]["job"])
        finally:
            page.unroute("**/api/generate?*")
    finally:
        page.remove_listener("request", record)
    after = _server_status(web_server)
    assert after == {**before, "stopped": before["stopped"] + 1}  # the held one never ran
    page.fill("#g-n", "16")
    page.fill("#g-steps", "10")


def test_a_reload_before_the_jobs_id_came_follows_the_job(page, web_server, shots):
    """A reload in the milliseconds before the job's id reached the page left the job
    running unfollowed for its grace (JOB_GRACE_S, 20 s), holding the one worker: the
    reloaded page could not know its id. The page now names its job and keeps the id before
    sending the request, so the reloaded tab follows the job (and Stop stops it at once). A
    second tab opened meanwhile has no job of its own and takes none."""
    from animeddim.apps.web.jobs import JOB_GRACE_S

    _tab(page, "Generate")
    page.select_option("#g-model", "avatars-64")
    page.fill("#g-n", "64")
    page.fill("#g-steps", "250")
    before = _idle_server(web_server)
    page.evaluate(HOLD_THE_ID)
    page.click("#g-go")
    page.wait_for_function("window.answered === true", timeout=30_000)
    _until(lambda: _server_status(web_server)["running"], timeout=30)  # the job runs
    saved = page.evaluate("JSON.parse(sessionStorage.getItem('animeddim.job'))")
    assert saved["answered"] is False  # its stream's first line has not reached the page
    page.reload()
    page.wait_for_selector("body[data-ready='1']", timeout=30_000)
    page.wait_for_selector("#g-status:has-text('denoising step')", timeout=30_000)
    now = page.evaluate("JSON.parse(sessionStorage.getItem('animeddim.job'))")
    assert now == {**saved, "answered": True}  # the server's first line came to this page
    assert page.is_disabled("#g-go") and page.locator("#tab-generate .controls .stop").is_visible()
    shots(page, "16-reloaded-before-the-id-came")
    other = page.context.new_page()  # a second tab: nothing of this tab's job
    try:
        other.goto(web_server + "/")
        other.wait_for_selector("body[data-ready='1']", timeout=30_000)
        assert other.evaluate("sessionStorage.getItem('animeddim.job')") is None
        assert not other.is_disabled("#g-go")
        assert other.locator("#tab-generate .controls .stop").is_hidden()
    finally:
        other.close()
    shown = page.evaluate("document.querySelector('#g-status progress').value")
    page.wait_for_function(  # still followed here
        f"document.querySelector('#g-status progress').value > {shown}", timeout=30_000
    )
    page.click("#tab-generate .stop")
    page.wait_for_selector("#g-status:has-text('stopped')")
    _until(lambda: _server_status(web_server)["stopped"] == before["stopped"] + 1,
           timeout=JOB_GRACE_S / 2)  # fmt: skip
    assert _server_status(web_server) == {**before, "stopped": before["stopped"] + 1}
    page.fill("#g-n", "16")
    page.fill("#g-steps", "10")


def test_a_reload_mid_edit_keeps_the_face_to_edit_again_without_the_file(
    page, web_server, shots, cond_data
):
    """Reattached after a reload, an Edit showed the inversion it edits and then its result,
    but the file picker was empty: another edit (another attribute, another strength) was
    refused with "choose an image file to edit" until the face was chosen again. The page
    keeps the face it shows (as the model saw it, the pixels the server edits) and says so
    by the picker; Invert and Edit use it until another file is chosen."""
    import csv

    import numpy as np

    _tab(page, "Invert")
    page.select_option("#v-model", "run:colours")
    _invert_a_red_face(page, cond_data)
    assert page.locator("#v-kept").is_hidden()  # the chosen file is used
    face = _data_url_pixels(page.get_attribute("#v-orig", "src"))
    page.select_option("#e-attrs select[data-attr='colour']", "blue")
    with _reloaded_while_queued(page, web_server, "#e-go", "#e-status"):
        assert page.evaluate("document.querySelector('#v-face').files.length") == 0
        assert page.locator("#v-kept").is_visible()
    page.wait_for_selector("#e-status:has-text('done in')", timeout=60_000)
    assert page.inner_text("#v-kept").strip() == (
        "the face from before the reload (as the model saw it); choose a file for another"
    )
    assert np.array_equal(_data_url_pixels(page.get_attribute("#v-kept-img", "src")), face)
    shots(page, "17-reloaded-edit-keeps-the-face")
    # another edit of that face: another attribute, another strength, no file chosen
    page.select_option("#e-attrs select[data-attr='colour']", "keep")
    page.select_option("#e-attrs select[data-attr='band']", "top")
    page.fill("#e-guidance", "3")
    page.click("#e-go")
    page.wait_for_selector("#e-what:has-text('band = top')", timeout=60_000)
    assert page.inner_text("#e-what") == "edited: band = top (guidance 3)"
    assert "done in" in page.inner_text("#e-status")
    assert np.array_equal(_data_url_pixels(page.get_attribute("#e-orig", "src")), face)
    page.click("#v-go")  # and inverted again
    page.wait_for_selector("#v-status:has-text('done in')", timeout=60_000)
    assert page.inner_text("#v-psnr").startswith("reconstruction after 20 steps: PSNR")
    assert np.array_equal(_data_url_pixels(page.get_attribute("#v-orig", "src")), face)
    assert page.locator("#v-kept").is_visible()
    rows = csv.DictReader(open(cond_data / "labels.csv"))
    page.set_input_files("#v-face", str(cond_data / next(
        r["file"] for r in rows if r["colour"] == "blue")))  # fmt: skip
    assert page.locator("#v-kept").is_hidden()  # another file chosen: that face from now on
    page.click("#v-go")
    page.wait_for_selector("#v-status:has-text('done in')", timeout=60_000)
    blue = _data_url_pixels(page.get_attribute("#v-orig", "src"))
    assert blue[..., 2].mean() > blue[..., 0].mean() + 40


def test_one_image_and_one_step_are_said_in_the_singular(page, tmp_path):
    """Generate of one image said "done in 0.4 s (1 images)"; Invert of one step said
    "reconstruction after 1 steps"."""
    from animeddim.datasets import generate_avatars

    _tab(page, "Generate")
    page.select_option("#g-model", "run:tiny")
    page.fill("#g-n", "1")
    page.fill("#g-steps", "2")
    page.click("#g-go")
    page.wait_for_selector("#g-status:has-text('done in')", timeout=60_000)
    assert page.inner_text("#g-status").endswith(" s (1 image)"), page.inner_text("#g-status")
    assert page.locator("#g-gallery img").count() == 1
    _tab(page, "Invert")
    page.select_option("#v-model", "run:tiny")
    face = sorted(generate_avatars(tmp_path, n=1, size=16, seed=5, workers=1).glob("*.png"))
    page.set_input_files("#v-face", str(face[0]))
    page.fill("#v-steps", "1")
    page.click("#v-go")
    page.wait_for_selector("#v-psnr:has-text('PSNR')", timeout=60_000)
    assert page.inner_text("#v-psnr").startswith("reconstruction after 1 step: PSNR ")
    page.fill("#v-steps", "20")
    _tab(page, "Generate")
    page.fill("#g-n", "16")
    page.fill("#g-steps", "10")
