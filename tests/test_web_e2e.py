"""The web page end to end: headless Chromium against a real ``imagegenx serve --model
random:tiny-sdxl`` (its own port, data folders and an API key made with ``imagegenx keys create``).

Generate, watch progress over SSE, cancel, find the image in the gallery, download one image and a
ZIP, inpaint with a painted mask, run a tiny portrait, see API errors; a screenshot of each view
(one on a phone) lands in ``test-artifacts/web/``. Random weights: the images are noise.
"""

from __future__ import annotations

import io
import re
import subprocess
import sys
import threading
import zipfile

import httpx
import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import expect, sync_playwright
from skimage import data

from support.browser import DESKTOP, PHONE, PageErrors, launch, screenshot
from support.server import Server

MODEL = "random:tiny-sdxl"
TIMEOUT_MS = 60_000
BLOB = re.compile("^blob:")


def write_lora(folder) -> None:
    """A real (random) kohya LoRA for the tiny SDXL UNet, named "grain"."""
    from imagegenx.config import ModelSettings
    from imagegenx.models.cache import ModelCache
    from imagegenx.models.lora_files import write_kohya_lora

    cache = ModelCache(ModelSettings(model_dir=folder / "m", lora_dir=folder, device="cpu"))
    components = cache.get(MODEL).pipe.components
    write_kohya_lora(folder / "grain.safetensors", components, text_prefixes={}, seed=3, scale=0.3)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tiny = {"IMAGEGENX_MODELS__TINY_DECODERS": '{"sdxl": "random"}'}  # the "Fast decode" option
    server = Server(tmp_path_factory.mktemp("web"), model=MODEL, env=tiny)
    lora = threading.Thread(target=write_lora, args=(server.root / "loras",))
    lora.start()  # while the server warms up
    server.start()
    lora.join()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def key(server) -> str:
    """A paid key, made the way an operator makes one."""
    cmd = [sys.executable, "-m", "imagegenx.cli", "keys", "create", "web", "--tier", "paid", "-q"]
    done = subprocess.run(cmd, env=server.env, capture_output=True, text=True, check=True)
    return done.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as playwright:
        browser = launch(playwright)
        expect.set_options(timeout=TIMEOUT_MS)
        yield browser
        browser.close()


def open_page(browser, server, key: str | None, device: dict = DESKTOP):
    context = browser.new_context(accept_downloads=True, **device)
    context.set_default_timeout(TIMEOUT_MS)
    if key:
        context.add_init_script(f"localStorage.setItem('imagegenx.apiKey', {key!r})")
    page = context.new_page()
    errors = PageErrors(page)
    page.goto(server.url + "/")
    return page, errors


@pytest.fixture
def page(browser, server, key):
    page, errors = open_page(browser, server, key)
    expect(page.locator("#g-style option")).not_to_have_count(1)  # styles loaded with the key
    yield page
    errors.check()
    page.context.close()


def fill_generate(page, prompt: str, size: int = 64, steps: int = 4, seed: int | None = None) -> None:
    page.fill("#g-prompt", prompt)
    page.fill("#g-width", str(size))
    page.fill("#g-height", str(size))
    page.fill("#g-steps", str(steps))
    if seed is not None:
        page.fill("#g-seed", str(seed))


def submit(page) -> str:
    """Submit the Generate form; the new task's id (from the Queue view's list)."""
    before = page.locator("#q-list .task").count()
    page.click("#g-submit")
    expect(page.locator("#g-status")).to_contain_text("Queued task")
    expect(page.locator("#q-list .task")).to_have_count(before + 1)
    return page.locator("#q-list .task").first.get_attribute("data-task")


def tab(page, view: str) -> None:
    page.click(f"nav [data-view={view}]")
    expect(page.locator(f"#view-{view}")).to_be_visible()


def test_the_page_needs_no_key_and_asks_for_one(browser, server, key):
    home = httpx.get(server.url + "/")
    assert home.status_code == 200 and "text/html" in home.headers["content-type"]
    assert "script-src 'self'" in home.headers["content-security-policy"]
    assert httpx.get(server.url + "/web/app.js").status_code == 200
    assert httpx.get(server.url + "/api/v1/styles").status_code == 401

    page, errors = open_page(browser, server, None)
    expect(page.locator("#key-dialog")).to_be_visible()
    expect(page.locator("#error-text")).to_contain_text("API key is required")
    screenshot(page, "api-key", full_page=False)
    page.fill("#key-input", "igx_nope_wrong")
    page.click("#key-save")
    expect(page.locator("#error-text")).to_contain_text("unknown or revoked API key")
    page.fill("#key-input", key)
    page.click("#key-save")
    expect(page.locator("#g-style option[value=anime]")).to_have_count(1)
    expect(page.locator("#error")).to_be_hidden()
    assert page.evaluate("localStorage.getItem('imagegenx.apiKey')") == key
    errors.check()
    page.context.close()


def test_generate_find_in_gallery_and_download(page, server, key, tmp_path):
    page.select_option("#g-style", "anime")
    fill_generate(page, "a red fox", seed=7)
    screenshot(page, "generate")
    task_id = submit(page)
    tab(page, "queue")
    item = page.locator(f'#q-list [data-task="{task_id}"]')
    expect(item).to_have_attribute("data-status", "succeeded")
    expect(item.locator("progress")).to_have_attribute("value", "100")
    expect(item.locator("img.thumb")).to_have_attribute("src", BLOB)

    # The gallery, filtered the way a person would look for it.
    tab(page, "gallery")
    page.select_option("#h-status", "succeeded")
    page.select_option("#h-style", "anime")
    page.fill("#h-resolution", "64x64")
    page.select_option("#h-since", "3600")
    page.click("#h-filters button[type=submit]")
    card = page.locator(f'#h-grid [data-task="{task_id}"]')
    expect(card.locator("img")).to_have_attribute("src", BLOB)
    screenshot(page, "gallery")
    page.select_option("#h-style", "cyberpunk")
    page.click("#h-filters button[type=submit]")
    expect(page.locator("#h-empty")).to_be_visible()
    page.select_option("#h-style", "anime")
    page.click("#h-filters button[type=submit]")

    # Detail: every parameter and the QC scores; one image downloaded.
    card.locator(".open").click()
    expect(page.locator("#detail")).to_be_visible()
    expect(page.locator("#d-params")).to_contain_text("anime artwork of a red fox")
    expect(page.locator("#d-params tr", has_text="seed")).to_contain_text("7")
    expect(page.locator("#d-qc")).to_contain_text("sharpness")
    expect(page.locator("#d-image")).to_have_attribute("src", BLOB)
    screenshot(page, "detail", full_page=False)
    with page.expect_download() as info:
        page.click("#d-downloads button:text('Download original')")
    assert info.value.suggested_filename == f"{task_id}-original.webp"
    assert Image.open(info.value.path()).size == (64, 64)

    # "Use these settings again": the recorded (styled) prompt, no style on top, same seed.
    page.click("#d-reuse")
    expect(page.locator("#view-generate")).to_be_visible()
    expect(page.locator("#g-prompt")).to_have_value(re.compile("anime artwork of a red fox"))
    expect(page.locator("#g-seed")).to_have_value("7")
    assert page.input_value("#g-style") == "" and page.input_value("#g-width") == "64"

    # ZIP of the selected tasks: each image with its metadata.
    tab(page, "gallery")
    card.locator(".pick").check()
    with page.expect_download() as info:
        page.click("#h-zip")
    archive = zipfile.ZipFile(info.value.path())
    assert sorted(archive.namelist()) == [f"{task_id}.json", f"{task_id}.webp"]
    assert Image.open(io.BytesIO(archive.read(f"{task_id}.webp"))).size == (64, 64)
    assert '"seed": 7' in archive.read(f"{task_id}.json").decode()


def test_fast_decode_uses_the_servers_tiny_decoder(page, server, key):
    expect(page.locator("#g-tiny-label")).to_be_visible()  # the server names one for SDXL
    fill_generate(page, "a quick fox", seed=3)
    page.select_option("#g-model", MODEL)
    expect(page.locator("#g-tiny")).to_be_enabled()
    page.check("#g-tiny")
    task_id = submit(page)
    tab(page, "queue")
    expect(page.locator(f'#q-list [data-task="{task_id}"]')).to_have_attribute("data-status", "succeeded")
    with server.client(key) as client:
        view = client.get(f"/api/v1/image/task/{task_id}").json()["data"]
        models = {m["name"]: m["tiny_decoder"] for m in client.get("/api/v1/models").json()["data"]}
    assert view["params"]["decoder"] == "tiny" and view["metadata"]["decoder"] == "tiny"
    assert models[MODEL] and not models["random:tiny-sd15"]
    tab(page, "generate")
    page.select_option("#g-model", "random:tiny-sd15")  # no tiny decoder for SD 1.5 here
    expect(page.locator("#g-tiny")).to_be_disabled()


def test_live_progress_and_cancel(page):
    fill_generate(page, "a slow one", size=128, steps=150)
    task_id = submit(page)
    tab(page, "queue")
    item = page.locator(f'#q-list [data-task="{task_id}"]')
    # Progress arrives over SSE while the task runs (the database hears only every 5%).
    expect(item).to_have_attribute("data-status", "processing")
    page.wait_for_function(
        "id => document.querySelector(`[data-task='${id}'] progress`)?.value >= 1",
        arg=task_id,
    )
    # Step previews: the latents as RGB (a data: JPEG) in the thumbnail while it runs.
    expect(item.locator("img.thumb")).to_have_attribute("src", re.compile("^data:image/jpeg;base64,"))
    screenshot(page, "queue")
    item.locator("button.cancel").click()
    expect(item).to_have_attribute("data-status", "canceled")
    expect(item.locator("button.cancel")).to_be_disabled()


def test_inpaint_with_a_painted_mask(page, server, tmp_path):
    photo = tmp_path / "photo.png"
    Image.fromarray(data.astronaut()[::8, ::8]).save(photo)  # 64x64
    page.check("input[name=mode][value=inpaint]")
    page.set_input_files("#g-image", str(photo))
    expect(page.locator("#g-width")).to_have_value("64")
    fill_generate(page, "a helmet", size=64, steps=4)
    page.click("#g-submit")  # nothing painted yet: the page says so, nothing is sent
    expect(page.locator("#error-text")).to_contain_text("Paint the area")
    box = page.locator("#g-mask").bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.3)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.7, box["y"] + box["height"] * 0.6, steps=5)
    page.mouse.up()
    screenshot(page, "inpaint")
    task_id = submit(page)
    tab(page, "queue")
    item = page.locator(f'#q-list [data-task="{task_id}"]')
    expect(item).to_have_attribute("data-status", "succeeded")
    expect(item).to_contain_text("inpaint 64×64")
    # The mask the server got: white along the stroke, black elsewhere, the photo's size.
    mask = Image.open(server.root / "blobs" / "inputs" / task_id / "mask").convert("L")
    assert mask.size == (64, 64) and set(np.unique(np.asarray(mask))) == {0, 255}
    assert mask.getpixel((32, 28)) == 255 and mask.getpixel((2, 2)) == mask.getpixel((60, 60)) == 0


def test_lora_with_weight(page):
    page.click("#g-lora-add")
    expect(page.locator("#lora-names option[value=grain]")).to_have_count(1)  # offered from /loras
    page.fill(".lora-row .lora-name", "grain")
    page.fill(".lora-row .lora-weight", "0.8")
    fill_generate(page, "a barn", seed=5)
    task_id = submit(page)
    tab(page, "queue")
    expect(page.locator(f'#q-list [data-task="{task_id}"]')).to_have_attribute("data-status", "succeeded")
    tab(page, "gallery")
    page.locator(f'#h-grid [data-task="{task_id}"] .open').click()
    expect(page.locator("#d-params tr", has_text="loras")).to_contain_text('"name":"grain","weight":0.8')
    page.click("#d-close")


def test_several_images_at_once(page):
    fill_generate(page, "two owls", seed=40)
    page.fill("#g-count", "2")
    page.click("#g-submit")
    expect(page.locator("#g-status")).to_contain_text("Queued task")
    tab(page, "queue")
    owls = page.locator("#q-list .task", has_text="two owls")
    expect(owls).to_have_count(2)
    for i in range(2):
        expect(owls.nth(i)).to_have_attribute("data-status", "succeeded")
    tab(page, "generate")
    page.check("input[name=mode][value=img2img]")  # batches are text to image only
    expect(page.locator("#g-count")).to_be_hidden()


def test_api_errors_are_shown(page):
    fill_generate(page, "wrong size", size=100)
    page.click("#g-submit")
    expect(page.locator("#error-text")).to_have_text("width 100 is not a multiple of 8")
    page.click("#error-close")
    expect(page.locator("#error")).to_be_hidden()


def test_portrait_stages_shortlist_and_contact_sheet(page, tmp_path):
    selfie = tmp_path / "astronaut.png"
    Image.fromarray(data.astronaut()).save(selfie)
    tab(page, "portraits")
    page.set_input_files("#p-selfies", str(selfie))
    expect(page.locator("#p-previews img")).to_have_count(1)
    page.fill("#p-prompt", "a portrait photo of a woman")
    for field, value in (("#p-n", "4"), ("#p-shortlist", "2"), ("#p-refine", "1"), ("#p-seed", "1")):
        page.fill(field, value)
    page.select_option("#p-upscale", "1")
    page.check("#p-tiny")  # fast drafts: the server has a tiny decoder for SDXL (refused if not)
    page.click("#p-submit")
    expect(page.locator("#p-result")).to_be_visible()
    expect(page.locator("#p-stages li.done")).to_have_count(7)
    expect(page.locator("#p-shortlist-list .card")).to_have_count(2)
    expect(page.locator("#p-shortlist-list .card").first).to_contain_text("#1 score")
    expect(page.locator("#p-shortlist-list img").first).to_have_attribute("src", BLOB)
    page.wait_for_function("document.querySelector('#p-sheet').naturalWidth > 0")
    screenshot(page, "portraits")


def test_phone_layout(browser, server, key):
    with server.client(key) as client:  # something in the gallery, whichever tests ran before
        body = {"text": "x", "width": 64, "height": 64, "steps": 2}
        task = client.post("/api/v1/image/generate", json=body)
        assert task.status_code == 200, task.text
    page, errors = open_page(browser, server, key, PHONE)
    expect(page.locator("#g-style option[value=anime]")).to_have_count(1)
    screenshot(page, "phone-generate")
    tab(page, "gallery")
    expect(page.locator("#h-grid .card").first).to_be_visible()
    screenshot(page, "phone-gallery")
    # Nothing wider than the screen: no sideways scrolling.
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    errors.check()
    page.context.close()
