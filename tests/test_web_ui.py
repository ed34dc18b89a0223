"""The web UI in a real browser (Debian's Chromium through Playwright) against the
real served app: the page at `/` talks only to the public v1 API.

Screenshots of the main states go to test-artifacts/ (git-ignored).
"""

from __future__ import annotations

import io
import os
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pptx import Presentation
from psd_tools import PSDImage

from tests.conftest import deploy_config, tiny_config
from tests.images import flat_design
from tests.test_remove_background_api import png_bytes, red_disc_png

sync_api = pytest.importorskip("playwright.sync_api", reason="the test extra installs playwright")
expect, sync_playwright = sync_api.expect, sync_api.sync_playwright

CHROMIUM = os.environ.get("STRATA_CHROMIUM", "/usr/bin/chromium")
if not Path(CHROMIUM).exists():
    pytest.skip(f"no Chromium at {CHROMIUM} (scripts/install_browser.sh installs Debian's)",
                allow_module_level=True)

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
DESKTOP = {"width": 1360, "height": 900}
PHONE = {"width": 390, "height": 844}
SLOW_MS = 45_000  # a job end or a cutout, on a busy 2-core machine
# Every other wait on the page is an API round trip or two: Playwright's 5 s is short on
# a loaded 2-core machine.
expect.set_options(timeout=15_000)


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"],
        )
        yield browser
        browser.close()


class UI:
    """A page of the app and the errors it logged."""

    def __init__(self, page, base_url: str):
        self.page, self.base_url = page, base_url
        self.errors: list[str] = []
        page.on("console", lambda message: message.type == "error" and self.errors.append(message.text))
        page.on("pageerror", lambda error: self.errors.append(f"pageerror: {error}"))

    def open(self) -> UI:
        self.page.goto(self.base_url + "/")
        expect(self.page.locator("#model")).to_be_enabled(timeout=SLOW_MS)
        return self

    def choose(self, path: Path) -> None:
        self.page.locator("#file-input").set_input_files(str(path))

    def screenshot(self, name: str, full_page: bool = True) -> None:
        ARTIFACTS.mkdir(exist_ok=True)
        # From the top: there the sticky header is where a person sees it.
        self.page.evaluate("window.scrollTo({top: 0, behavior: 'instant'})")
        self.page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=full_page, animations="disabled")

    def decompose(self, path: Path, layers: int = 3) -> None:
        """Choose the image, ask the classic engine for `layers` layers, wait for the result."""
        page = self.page
        self.choose(path)
        expect(page.locator("#file-dims")).not_to_be_empty()
        page.locator("label[for=task-layers]").click()
        page.locator("#model").select_option("classic")
        page.get_by_label("Layers", exact=True).fill(str(layers))
        page.locator("#run").click()
        expect(page.locator("#layers-result")).to_be_visible(timeout=SLOW_MS)
        expect(page.locator("#layer-list > li")).to_have_count(layers)
        for img in page.locator("#stack-preview img").all():
            expect(img).to_have_js_property("complete", True)


def _new_ui(browser, base_url: str, viewport: dict, **options) -> UI:
    context = browser.new_context(viewport=viewport, accept_downloads=True, **options)
    return UI(context.new_page(), base_url)


@pytest.fixture
def ui(browser, strata):
    ui = _new_ui(browser, strata, DESKTOP)
    yield ui.open()
    ui.page.context.close()


@pytest.fixture
def phone(browser, strata):
    ui = _new_ui(browser, strata, PHONE, device_scale_factor=2, is_mobile=True, has_touch=True)
    yield ui.open()
    ui.page.context.close()


@pytest.fixture
def disc_png(tmp_path) -> Path:
    path = tmp_path / "red-disc.png"
    path.write_bytes(red_disc_png(320, 240)[0])
    return path


@pytest.fixture
def design_png(tmp_path) -> Path:
    rgb, _ = flat_design(320, 240, seed=3)
    path = tmp_path / "poster.png"
    path.write_bytes(png_bytes(rgb))
    return path


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


def assert_disc_cut_out(image) -> None:
    """The shown cutout of the red disc keeps the disc and clears the grey around it
    (its pixels read back in the page)."""
    alpha = image.evaluate("""img => {
        const c = document.createElement('canvas'); c.width = img.naturalWidth; c.height = img.naturalHeight;
        const g = c.getContext('2d'); g.drawImage(img, 0, 0);
        return [g.getImageData(160, 120, 1, 1).data[3], g.getImageData(5, 5, 1, 1).data[3]];
    }""")
    assert alpha[0] > 200 and alpha[1] < 50


def test_chosen_image_shows_name_size_and_dimensions(ui, disc_png):
    ui.choose(disc_png)
    expect(ui.page.locator("#file-name")).to_have_text("red-disc.png")
    expect(ui.page.locator("#file-size")).to_have_text(f"{disc_png.stat().st_size / 1024:.1f} KB")
    expect(ui.page.locator("#file-dims")).to_have_text("320 × 240 px")
    expect(ui.page.locator("#run")).to_be_enabled()
    ui.screenshot("desktop-1-image-chosen")


def test_cutout_is_rendered_on_a_checkerboard(ui, disc_png):
    page = ui.page
    ui.choose(disc_png)
    page.locator("#model").select_option("tiny")
    expect(page.locator("#model-info")).to_contain_text("birefnet")
    page.locator("#run").click()
    image = page.locator("#cutout-image")
    expect(image).to_be_visible(timeout=SLOW_MS)
    size = image.evaluate("img => [img.naturalWidth, img.naturalHeight]")
    assert size == [320, 240]
    assert_disc_cut_out(image)
    assert "conic-gradient" in image.evaluate("img => getComputedStyle(img).backgroundImage")
    expect(page.locator("#cutout-meta")).to_contain_text("tiny (birefnet)")
    expect(page.locator("#cutout-download")).to_have_attribute("download", "red-disc-cutout.png")
    ui.screenshot("desktop-2-cutout")


def test_a_models_own_cutout_shows_no_engine_note(ui, disc_png):
    ui.choose(disc_png)
    ui.page.locator("#model").select_option("tiny")
    ui.page.locator("#run").click()
    expect(ui.page.locator("#cutout-image")).to_be_visible(timeout=SLOW_MS)
    expect(ui.page.locator("#cutout-note")).to_be_hidden()


@pytest.fixture
def with_a_fallback(browser, serve_instance, tiny_models_dir, data_dir, tmp_path):
    """The page on configs/test.yaml plus `unserved`, a BiRefNet whose weights are not
    here: it serves the classic engine, saying why. (The next test's `strata` fixture
    deploys test.yaml again.)"""
    config = tiny_config(tiny_models_dir, data_dir)
    app = config["applications"][0]
    app["args"]["segmentation"]["unserved"] = {"engine": "birefnet", "weights": str(tmp_path / "no-such-model"),
                                               "fallback": "classic", "warmup": False}
    app["deployments"].append({"name": "unserved", "num_replicas": 1})
    deploy_config(config)
    ui = _new_ui(browser, serve_instance, DESKTOP)
    yield ui.open()
    ui.page.context.close()


def photo_png(tmp_path) -> Path:
    from skimage.data import astronaut  # a real photo, bundled with scikit-image

    path = tmp_path / "astronaut.png"
    path.write_bytes(png_bytes(astronaut()))
    return path


def test_a_fallback_cutout_shows_a_note_naming_the_engine_why_and_what_it_is_for(with_a_fallback, tmp_path):
    page = with_a_fallback.page
    with_a_fallback.choose(photo_png(tmp_path))
    page.locator("#model").select_option("unserved")
    page.locator("#run").click()
    expect(page.locator("#cutout-image")).to_be_visible(timeout=SLOW_MS)
    note = page.locator("#cutout-note")
    expect(note).to_be_visible()
    expect(note).to_contain_text("Made by the classic engine: the configured model is not serving.")
    expect(note).to_contain_text("no-such-model")  # why: the weights it looked for
    expect(note).to_contain_text("made for product shots on plain or gradient backdrops")
    expect(note.locator(".engine-warning")).to_contain_text("the cutout is likely wrong")
    expect(note).to_contain_text("serve BiRefNet or RMBG-2.0")  # how to get the real models
    expect(note).to_contain_text("scripts/fetch_models.py")
    with_a_fallback.screenshot("desktop-fallback-note")


def test_classic_layers_of_a_photo_show_the_jobs_warning(ui, tmp_path):
    ui.decompose(photo_png(tmp_path), layers=4)
    note = ui.page.locator("#layers-note")
    expect(note).to_be_visible()
    expect(note).to_contain_text("made for flat graphics")
    expect(note.locator(".engine-warning")).to_contain_text("of the 4 layers asked for have content")


def test_the_engine_note_links_to_the_readmes_setup_of_the_real_models(ui, design_png):
    ui.decompose(design_png, layers=3)
    link = ui.page.locator("#layers-note a.setup-link")
    expect(link).to_be_visible()
    with ui.page.context.expect_page() as opened:
        link.click()
    setup = opened.value
    setup.wait_for_load_state()
    text = setup.locator("body").inner_text()
    assert text.startswith("## On a GPU box")  # the README's section, as the README has it
    assert "scripts/fetch_models.py" in text and "HF_TOKEN" in text
    setup.close()


def test_mask_download_is_the_mask(ui, disc_png):
    page = ui.page
    ui.choose(disc_png)
    page.locator("#model").select_option("classic")
    page.get_by_label("Output").select_option("mask")
    page.locator("#run").click()
    expect(page.locator("#cutout-download")).to_have_text("Download mask", timeout=SLOW_MS)
    with page.expect_download() as download:
        page.locator("#cutout-download").click()
    assert download.value.suggested_filename == "red-disc-mask.png"
    mask = Image.open(download.value.path())
    assert mask.mode == "L" and mask.size == (320, 240)


def test_layer_job_progress_reaches_100_percent(ui, design_png):
    page = ui.page
    # Record every percentage the page shows, from the first event on.
    page.evaluate("""() => {
        window.__seen = [];
        new MutationObserver(() => window.__seen.push(document.getElementById('progress-percent').textContent))
            .observe(document.getElementById('progress-percent'), {childList: true, characterData: true, subtree: true});
    }""")
    ui.decompose(design_png, layers=3)
    expect(page.locator("#progress-percent")).to_have_text("100%")
    expect(page.locator("#progress-bar")).to_have_attribute("aria-valuenow", "100")
    expect(page.locator("#result-badge")).to_have_text("Done")
    seen = [int(text.rstrip("%")) for text in page.evaluate("window.__seen")]
    assert seen and seen[-1] == 100 and seen == sorted(seen)
    expect(page.locator("#cancel-job")).to_be_hidden()
    ui.screenshot("desktop-3-layers")


def test_running_job_shows_live_steps_and_can_be_cancelled(ui, tmp_path):
    page = ui.page
    path = tmp_path / "small-disc.png"
    path.write_bytes(red_disc_png(64, 48)[0])
    ui.choose(path)
    expect(page.locator("#file-dims")).to_have_text("64 × 48 px")
    page.locator("label[for=task-layers]").click()
    page.locator("#model").select_option("tiny-qwen")
    page.get_by_label("Layers", exact=True).fill("2")
    page.get_by_label("Steps").fill("100")
    page.get_by_label("Prompt").fill("a red disc on grey")
    page.locator("#run").click()
    expect(page.locator("#progress-step")).to_contain_text(re.compile(r"Step \d+ of 100"), timeout=SLOW_MS)
    expect(page.locator("#result-badge")).to_have_text("Decomposing")
    ui.screenshot("desktop-5-running", full_page=False)
    page.get_by_role("button", name="Cancel job", exact=True).click()
    expect(page.locator("#result-badge")).to_have_text("Cancelled", timeout=SLOW_MS)
    expect(page.locator("#progress-label")).to_have_text("Cancelled")
    expect(page.locator("#cancel-job")).to_be_hidden()
    assert int(page.locator("#progress-percent").inner_text().rstrip("%")) < 100


def test_layer_cards_show_name_bbox_and_download(ui, design_png):
    page = ui.page
    ui.decompose(design_png, layers=3)
    cards = page.locator("#layer-list > li")
    expect(cards.first.locator(".layer-name")).to_have_text("Layer 3")
    expect(cards.last.locator(".layer-name")).to_have_text("Layer 1 (background)")
    expect(cards.first.locator(".layer-bbox")).to_contain_text("bbox ")
    link = cards.first.get_by_role("link", name="Download Layer 3 as PNG")
    with page.expect_download() as download:
        link.click()
    layer = Image.open(download.value.path())
    assert download.value.suggested_filename == "layer_03.png"
    assert layer.mode == "RGBA" and layer.size == (320, 240)


def test_hiding_a_layer_changes_the_stacked_preview(ui, design_png):
    page = ui.page
    ui.decompose(design_png, layers=3)
    preview = page.locator("#stack-preview .stack-inner")

    def shot() -> np.ndarray:
        # The same place on screen each time, clear of the sticky header.
        preview.evaluate("element => element.scrollIntoView({block: 'center'})")
        return _pixels(preview.screenshot(animations="disabled"))

    toggle = page.get_by_label("Show Layer 1 (background)")
    before = shot()
    toggle.uncheck()
    hidden = shot()
    assert np.abs(before - hidden).mean() > 5, "the preview did not change"
    toggle.check()
    assert np.abs(before - shot()).max() <= 2, "showing the layer again did not restore the preview"


def test_zip_download_holds_every_layer(ui, design_png):
    page = ui.page
    ui.decompose(design_png, layers=3)
    with page.expect_download() as download:
        page.get_by_role("link", name="Download all layers as ZIP").click()
    assert download.value.suggested_filename.endswith(".zip")
    with zipfile.ZipFile(download.value.path()) as archive:
        pngs = sorted(name for name in archive.namelist() if name.endswith(".png"))
        assert pngs == ["layer_01.png", "layer_02.png", "layer_03.png"]
        for name in pngs:
            assert Image.open(io.BytesIO(archive.read(name))).size == (320, 240)


def test_psd_download_holds_named_layers(ui, design_png):
    page = ui.page
    ui.decompose(design_png, layers=3)
    with page.expect_download() as download:
        page.get_by_role("link", name="Download as PSD").click()
    assert download.value.suggested_filename.endswith(".psd")
    psd = PSDImage.open(download.value.path())
    assert [layer.name for layer in psd] == ["Layer 1 (background)", "Layer 2", "Layer 3"]


def test_pptx_download_holds_one_picture_per_layer(ui, design_png):
    page = ui.page
    ui.decompose(design_png, layers=3)
    with page.expect_download() as download:
        page.get_by_role("link", name="Download as PowerPoint (PPTX)").click()
    assert download.value.suggested_filename.endswith(".pptx")
    slide = Presentation(download.value.path()).slides[0]
    assert [shape.name for shape in slide.shapes] == ["Layer 1 (background)", "Layer 2", "Layer 3"]


def test_text_file_is_refused_with_the_apis_reason(ui, client, tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("this is not an image\n")
    detail = client.post("/v1/remove-background", files={"image": ("notes.txt", path.read_bytes())}).json()["detail"]
    ui.choose(path)
    error = ui.page.locator("#file-error")
    expect(error).to_be_visible(timeout=SLOW_MS)
    expect(error).to_contain_text("Unsupported image format")
    expect(error).to_contain_text(detail)
    expect(ui.page.locator("#run")).to_be_disabled()
    ui.screenshot("desktop-4-refused")


def test_recent_jobs_reopen_and_delete(ui, design_png):
    page = ui.page
    ui.decompose(design_png, layers=3)
    job_id = page.evaluate("location.hash.slice(5)")
    page.reload()
    item = page.locator(f'#job-list li[data-id="{job_id}"]')
    expect(item).to_be_visible()
    item.get_by_role("button", name="Open job").click()
    expect(page.locator("#layer-list > li")).to_have_count(3)
    expect(item).to_have_class("job-item current")
    item.get_by_role("button", name="Delete job").click()
    expect(item).to_have_count(0)
    expect(page.locator("#result-empty")).to_be_visible()
    assert ui.page.request.get(f"{ui.base_url}/v1/jobs/{job_id}").status == 404


def _tab_to(page, element_id: str, presses: int = 25) -> None:
    for _ in range(presses):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement && document.activeElement.id") == element_id:
            return
    pytest.fail(f"Tab never reached #{element_id}")


def test_keyboard_alone_runs_a_cutout(ui, disc_png):
    page = ui.page
    # Playwright turns file-chooser interception on when a listener is added, without
    # waiting for the browser to confirm; added only with the key press, the chooser can
    # open before it is on and never be reported (puppeteer/puppeteer#6040). Added here,
    # it is on long before the key press: each Tab below is a round trip to the browser.
    page.on("filechooser", lambda chooser: None)
    _tab_to(page, "file-input")
    with page.expect_file_chooser() as chooser:
        page.keyboard.press("Space")
    chooser.value.set_files(str(disc_png))
    expect(page.locator("#file-dims")).to_have_text("320 × 240 px")
    _tab_to(page, "task-remove")
    page.keyboard.press("ArrowRight")
    expect(page.locator("#task-layers")).to_be_checked()
    expect(page.locator("#run")).to_have_text("Decompose into layers")
    page.keyboard.press("ArrowLeft")
    expect(page.locator("#task-remove")).to_be_checked()
    _tab_to(page, "run")
    page.keyboard.press("Enter")
    expect(page.locator("#cutout-image")).to_be_visible(timeout=SLOW_MS)


def test_every_control_has_a_label(ui, design_png):
    ui.decompose(design_png, layers=2)  # the result's controls too
    unlabelled = ui.page.evaluate("""() => [...document.querySelectorAll('input, select, textarea, button, a[href]')]
        .filter(el => !(el.labels && el.labels.length) && !el.getAttribute('aria-label')
                      && !el.getAttribute('aria-labelledby') && !el.textContent.trim())
        .map(el => el.outerHTML.slice(0, 80))""")
    assert unlabelled == []


def test_a_session_logs_no_console_errors(ui, disc_png, design_png):
    page = ui.page
    ui.choose(disc_png)
    page.locator("#run").click()
    expect(page.locator("#cutout-image")).to_be_visible(timeout=SLOW_MS)
    ui.decompose(design_png, layers=2)
    page.locator("#refresh-jobs").click()
    expect(page.locator("#job-list li").first).to_be_visible()
    assert ui.errors == []


def test_phone_shows_the_controls_without_horizontal_scrolling(phone, disc_png):
    page = phone.page
    phone.screenshot("phone-1-start")
    for control in ("label[for=file-input]", "label[for=task-remove]", "label[for=task-layers]", "#model", "#run"):
        box = page.locator(control).bounding_box()
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"], control
    phone.choose(disc_png)
    page.locator("#run").click()
    expect(page.locator("#cutout-image")).to_be_visible(timeout=SLOW_MS)
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    phone.screenshot("phone-2-cutout")


def test_phone_layers_fit_the_screen(phone, design_png):
    phone.decompose(design_png, layers=3)
    assert phone.page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    phone.page.locator("#layers-result").scroll_into_view_if_needed()
    phone.screenshot("phone-3-layers")


def test_dark_system_theme_gives_a_dark_page(browser, strata, design_png):
    ui = _new_ui(browser, strata, DESKTOP, color_scheme="dark").open()
    try:
        ui.decompose(design_png, layers=3)
        background = ui.page.evaluate("getComputedStyle(document.body).backgroundColor")
        red, green, blue = (int(v) for v in re.findall(r"\d+", background)[:3])
        assert max(red, green, blue) < 60, background
        ui.screenshot("desktop-6-dark")
    finally:
        ui.page.context.close()
