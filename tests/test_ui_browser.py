"""The web UI in a real browser: Playwright driving Debian's chromium (headless), tiny models.

Each state is photographed (``ui-*.png`` in the test's tmp folder; docs/ui.png is one of them).
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest

pytest.importorskip("gradio")
sync_api = pytest.importorskip("playwright.sync_api")

PORTRAIT = Path(__file__).resolve().parents[1] / "src" / "fastface" / "data" / "portrait.jpg"
TIMEOUT_MS = 90_000


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("CI"):
        pytest.fail("no chromium on the CI machine: `make browser` installs Debian's chromium")
    pytest.skip("no chromium (apt-get install chromium)")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ui_url(tiny_dir):
    from fastface.ui import launch

    port = _free_port()
    blocks = launch(host="127.0.0.1", port=port, backbone="tiny", device="cpu", block=False)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        blocks.close()


@pytest.fixture(scope="module")
def page(ui_url):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), headless=True,
                                    args=["--no-sandbox", "--disable-dev-shm-usage"])
        page = browser.new_page(viewport={"width": 1400, "height": 1300})
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(ui_url, wait_until="domcontentloaded")
        yield page
        browser.close()


def _shot(page, tmp_path_factory, name: str) -> Path:
    folder = tmp_path_factory.mktemp("ui-shots", numbered=False) if not hasattr(_shot, "dir") else _shot.dir
    _shot.dir = folder
    path = folder / f"ui-{name}.png"
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000
    return path


def _upload(page, path: Path) -> None:
    page.locator("#ff-photos input[type=file]").set_input_files(str(path))


def test_portrait_generate_compare_and_a_cat(page, tmp_path_factory, tmp_path):
    expect = sync_api.expect
    expect.set_options(timeout=TIMEOUT_MS)
    expect(page.locator("#ff-banner")).to_contain_text("images are noise")
    _shot(page, tmp_path_factory, "1-start")

    _upload(page, PORTRAIT)
    expect(page.locator("#ff-status")).to_contain_text("Identity ready (dlib, 1 photo; portrait.jpg: 1 face)")
    expect(page.locator("#ff-preview img")).to_be_visible()
    _shot(page, tmp_path_factory, "2-identity")

    page.locator("#ff-generate").click()
    gallery = page.locator("#ff-gallery img")
    expect(gallery).to_have_count(2)
    expect(page.locator("#ff-licence")).to_contain_text("licence: backbone: tiny random test weights")
    expect(page.locator("#ff-downloads")).to_contain_text(".json")
    expect(page.locator("#ff-error")).to_have_text("")
    _shot(page, tmp_path_factory, "3-gallery")

    # compare mode: the same seeds with two methods, side by side
    page.get_by_text("Compare (same seeds, side by side)").click()
    page.locator("#ff-compare").get_by_label("none", exact=True).check()
    page.locator("#ff-compare").get_by_label("fastface", exact=True).check()
    page.locator("#ff-generate").click()
    expect(gallery).to_have_count(4)
    captions = page.locator("#ff-gallery").inner_text()
    assert "tiny · none · seed 0" in captions and "tiny · fastface · seed 0" in captions, captions
    assert "tiny · none · seed 1" in captions and "tiny · fastface · seed 1" in captions, captions
    shot = _shot(page, tmp_path_factory, "4-compare")
    if os.environ.get("FASTFACE_UI_SCREENSHOT"):  # refresh the README's screenshot on demand
        shutil.copy(shot, os.environ["FASTFACE_UI_SCREENSHOT"])

    # a backbone whose weights are not here (offline): one line with the command that fetches them
    page.locator("#ff-compare").get_by_label("none", exact=True).uncheck()
    page.locator("#ff-compare").get_by_label("fastface", exact=True).uncheck()
    page.locator("#ff-backbone input").click()
    page.get_by_role("option", name="hyper-4", exact=True).click()
    page.locator("#ff-generate").click()
    error = page.locator("#ff-error")
    expect(error).to_contain_text("Error: missing model weights:")
    expect(error).to_contain_text("fastface download hyper-4 faceid")
    _shot(page, tmp_path_factory, "5-missing-weights")
    page.locator("#ff-backbone input").click()
    page.get_by_role("option", name="tiny", exact=True).click()

    # a photo of a cat: one readable message, no traceback
    skimage_data = pytest.importorskip("skimage.data")
    from PIL import Image

    cat = tmp_path / "cat.jpg"
    Image.fromarray(skimage_data.chelsea()).save(cat)
    page.reload(wait_until="domcontentloaded")  # a new session: the cat is the only photo
    _upload(page, cat)
    status = page.locator("#ff-status")
    expect(status).to_have_text("Error: no face found in cat.jpg; use a photo with a clearly visible face")
    assert "Traceback" not in page.content()
    _shot(page, tmp_path_factory, "6-cat")
