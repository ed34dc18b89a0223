"""The web page on a service that asks for API keys, in a real browser (Debian's
Chromium through Playwright) against the real served app: the page asks for a key
once, keeps it in the sign-in cookie, and everything the browser fetches by itself
(the job's event stream, layer images, downloads) carries it from there."""

from __future__ import annotations

import secrets
import zipfile

import pytest

from tests.conftest import deploy_config, tiny_config
from tests.test_web_ui import (  # noqa: F401 (browser, design_png and disc_png: fixtures)
    DESKTOP, SLOW_MS, UI, _new_ui, assert_disc_cut_out, browser, design_png, disc_png, expect)

# Deploys a config of its own: runs after the modules that share the default app (conftest).
pytestmark = pytest.mark.own_deployment

KEY = f"sk-page-{secrets.token_urlsafe(24)}"


@pytest.fixture(scope="module")
def keyed(serve_instance, tiny_models_dir, data_dir, tmp_path_factory) -> str:
    keys_file = tmp_path_factory.mktemp("keys") / "api-keys"
    keys_file.write_text(f"page:{KEY}\n")
    config = tiny_config(tiny_models_dir, data_dir)
    config["applications"][0]["args"]["auth"] = {"api_keys_file": str(keys_file)}
    deploy_config(config)
    return serve_instance


@pytest.fixture
def page_ui(browser, keyed):  # noqa: F811 (the imported fixture)
    ui = _new_ui(browser, keyed, DESKTOP)
    ui.page.goto(keyed + "/")
    yield ui
    ui.page.context.close()


def sign_in(ui: UI, key: str = KEY) -> None:
    page = ui.page
    expect(page.locator("#key-dialog")).to_be_visible(timeout=SLOW_MS)
    page.get_by_label("API key", exact=True).fill(key)
    page.get_by_role("button", name="Use key").click()


def test_page_asks_for_a_key_before_anything_else(page_ui):
    page = page_ui.page
    expect(page.locator("#key-dialog")).to_be_visible(timeout=SLOW_MS)
    expect(page.get_by_label("API key", exact=True)).to_be_focused()
    expect(page.locator("#service-status")).to_have_text("API key needed")
    page_ui.screenshot("desktop-key-dialog", full_page=False)


def test_a_wrong_key_is_refused_in_the_dialog(page_ui):
    page = page_ui.page
    sign_in(page_ui, "sk-wrong-" + secrets.token_urlsafe(8))
    expect(page.locator("#key-error")).to_contain_text("not valid")
    expect(page.locator("#key-dialog")).to_be_visible()


def test_with_the_key_a_person_removes_a_background(page_ui, disc_png):  # noqa: F811
    page = page_ui.page
    sign_in(page_ui)
    expect(page.locator("#key-dialog")).to_be_hidden()
    expect(page.locator("#key-button")).to_have_text("Forget key")
    expect(page.locator("#model")).to_be_enabled(timeout=SLOW_MS)
    page_ui.choose(disc_png)
    page.locator("#run").click()
    image = page.locator("#cutout-image")
    expect(image).to_be_visible(timeout=SLOW_MS)
    assert_disc_cut_out(image)


def test_a_layer_job_streams_shows_and_downloads_with_the_key(page_ui, design_png):  # noqa: F811
    page = page_ui.page
    sign_in(page_ui)
    expect(page.locator("#model")).to_be_enabled(timeout=SLOW_MS)
    page_ui.decompose(design_png, layers=3)  # waits for the result the event stream announced
    expect(page.locator("#progress-percent")).to_have_text("100%")
    for img in page.locator("#stack-preview img").all():  # <img> requests, sent by the browser alone
        assert img.evaluate("img => img.naturalWidth") == 320
    with page.expect_download() as download:
        page.get_by_role("link", name="Download all layers as ZIP").click()
    with zipfile.ZipFile(download.value.path()) as archive:
        assert sorted(n for n in archive.namelist() if n.endswith(".png")) == [
            "layer_01.png", "layer_02.png", "layer_03.png"]


def test_forget_key_signs_the_page_out(page_ui):
    page = page_ui.page
    sign_in(page_ui)
    expect(page.locator("#key-button")).to_have_text("Forget key")
    page.locator("#key-button").click()
    expect(page.locator("#key-dialog")).to_be_visible()
    expect(page.locator("#jobs-empty")).to_have_text("Could not list jobs: enter an API key to see your jobs")
    assert page.context.cookies() == []
    page.reload()
    expect(page.locator("#key-dialog")).to_be_visible(timeout=SLOW_MS)


def sign_in_and_settle(ui: UI) -> None:
    """Sign in, then wait until the page has loaded what it shows and makes no more calls."""
    sign_in(ui)
    expect(ui.page.locator("#model")).to_be_enabled(timeout=SLOW_MS)
    expect(ui.page.locator("#jobs-empty")).to_contain_text("No layer jobs yet")


def test_forget_key_signs_out_a_key_no_longer_accepted(page_ui, keyed):
    page = page_ui.page
    sign_in_and_settle(page_ui)
    # As if the operator had revoked the key since: the browser holds one the service refuses.
    page.context.add_cookies([{"name": "strata_key", "value": "sk-revoked", "url": keyed}])
    page.locator("#key-button").click()
    expect(page.locator("#key-dialog")).to_be_visible()
    assert page.context.cookies() == []


def test_forget_key_that_does_not_reach_the_service_says_the_key_is_kept(page_ui):
    page = page_ui.page
    sign_in_and_settle(page_ui)
    page.context.set_offline(True)
    page.locator("#key-button").click()
    expect(page.locator("#result-error")).to_contain_text("The key was not forgotten")
    expect(page.locator("#key-button")).to_have_text("Forget key")
    expect(page.locator("#key-dialog")).to_be_hidden()
    page.context.set_offline(False)
    assert [cookie["name"] for cookie in page.context.cookies()] == ["strata_key"]
