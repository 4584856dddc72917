"""`ldm ui` img2img and inpainting: the image to edit and the painted mask uploaded with the generate form (as data
URLs), decoded, saved and passed to the generate service; bad uploads refused with a message; and the page in
headless Chromium, which uploads a file, sets the strength, paints a mask with the mouse and generates."""
import base64
import io
import json
import os
import threading

import numpy as np
import PIL.Image
import pytest

from ldm.images import read_png_params
from ldm.ui.models import ModelCache
from ui_helpers import chromium, get, screenshot, serve_ui, wait_for

pytestmark = pytest.mark.usefixtures("one_thread")
FORM = {"prompt": "a red circle on the left", "steps": "4", "seed": "7"}
HOST = "127.0.0.1:7861"


@pytest.fixture(scope="module")
def cache():
    return ModelCache()


def picture(width: int, height: int, seed: int = 0) -> PIL.Image.Image:
    """A random RGB image: every pixel tells whether it was kept."""
    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def left_half_mask(width: int, height: int) -> PIL.Image.Image:
    """White (repaint) on the left half, black (keep) on the right."""
    mask = np.zeros((height, width), np.uint8)
    mask[:, : width // 2] = 255
    return PIL.Image.fromarray(mask)


def data_url(image: PIL.Image.Image, kind: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, kind)
    return f"data:image/{kind.lower()};base64," + base64.b64encode(buffer.getvalue()).decode()


class Page:
    """The Flask test client of `ldm ui --model MODEL`, with the launch's token and a Host naming the server."""

    def __init__(self, tmp_path, model, cache):
        from ldm.ui.server import UISettings, create_app

        self.settings = UISettings(model=model, runs=str(tmp_path), out=str(tmp_path / "out"), port=7861)
        self.client = create_app(self.settings, cache).test_client()
        self.headers = {"Host": HOST, "X-LDM-Token": self.settings.token}

    def post(self, form: dict, headers: dict | None = None):
        return self.client.post("/api/generate", data=json.dumps(form),
                                headers=self.headers if headers is None else headers)

    def generate(self, form: dict) -> dict:
        """Returns the job's result; fails with the job's message."""
        response = self.post(form)
        assert response.status_code == 200, response.json
        for _ in range(1200):
            state = self.client.get(f"/api/jobs/{response.json['job']}", headers=self.headers).json
            if state["status"] != "running":
                break
            threading.Event().wait(0.05)
        assert state["status"] == "done", state
        return state["result"]

    def path(self, url: str) -> str:
        """Returns the file a /file?path=... URL of the result names."""
        import urllib.parse

        return urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)["path"][0]


def test_img2img_upload_makes_images_of_its_size_recording_the_image(tiny_folder, cache, tmp_path):
    from ldm.cli import main

    page, init = Page(tmp_path, tiny_folder, cache), picture(48, 32)
    result = page.generate({**FORM, "init_image": data_url(init), "strength": "0.5"})
    assert [(i["width"], i["height"]) for i in result["images"]] == [(48, 32)]  # the image's size, not native
    params = read_png_params(page.path(result["images"][0]["path"]))
    assert params["strength"] == 0.5 and params["width"] == 48 and "mask" not in params
    saved = params["init_image"]
    assert saved.startswith(os.path.abspath(page.settings.out)) and np.array_equal(np.asarray(PIL.Image.open(saved)),
                                                                                   np.asarray(init))
    # the page's image is `ldm generate --init-image FILE`'s, bit for bit, with the same metadata
    assert main(["generate", FORM["prompt"], "--model", tiny_folder, "--steps", "4", "--seed", "7", "--init-image",
                 saved, "--strength", "0.5", "--out", str(tmp_path / "cli.png")]) == 0
    ours = np.asarray(PIL.Image.open(page.path(result["images"][0]["path"])))
    assert np.array_equal(ours, np.asarray(PIL.Image.open(tmp_path / "cli.png")))
    drop = lambda p: {k: v for k, v in p.items() if k != "seconds"}  # noqa: E731
    assert drop(params) == drop(read_png_params(str(tmp_path / "cli.png")))


def test_inpainting_upload_repaints_only_the_painted_half(tiny_folder, cache, tmp_path):
    page, init, mask = Page(tmp_path, tiny_folder, cache), picture(32, 32, seed=1), left_half_mask(32, 32)
    form = {**FORM, "init_image": data_url(init), "mask": data_url(mask), "strength": "1", "mask_blur": "0",
            "masked_content": "noise", "paste_back": True}
    result = page.generate(form)
    image = np.asarray(PIL.Image.open(page.path(result["images"][0]["path"]))).astype(int)
    assert np.array_equal(image[:, 16:], np.asarray(init)[:, 16:])  # kept: pasted back exactly
    assert np.abs(image[:, :16] - np.asarray(init)[:, :16]).mean() > 20  # repainted from noise
    params = read_png_params(page.path(result["images"][0]["path"]))
    assert (params["mask_blur"], params["masked_content"], params["paste_back"]) == (0, "noise", True)
    assert np.array_equal(np.asarray(PIL.Image.open(params["mask"])), np.asarray(mask))
    unpasted = page.generate({**form, "paste_back": "false"})
    params = read_png_params(page.path(unpasted["images"][0]["path"]))
    assert params["paste_back"] is False


def test_an_inpainting_model_inpaints_from_the_page_and_says_what_it_needs(cache, tmp_path):
    from ldm import Pipeline
    from ldm.models.presets import build_components

    folder = str(tmp_path / "tiny-inpaint")
    Pipeline(**build_components("tiny-inpaint", seed=0)).save_pretrained(folder)
    page, init = Page(tmp_path, folder, cache), picture(32, 32, seed=2)
    result = page.generate({**FORM, "init_image": data_url(init), "mask": data_url(left_half_mask(32, 32)),
                            "mask_blur": "0"})
    image = np.asarray(PIL.Image.open(page.path(result["images"][0]["path"])))
    assert np.array_equal(image[:, 16:], np.asarray(init)[:, 16:])  # the 9-channel UNet's result, pasted back
    job = page.post(FORM).json["job"]  # text to image: the page shows the pipeline's message
    for _ in range(600):
        state = page.client.get(f"/api/jobs/{job}", headers=page.headers).json
        if state["status"] != "running":
            break
        threading.Event().wait(0.05)
    assert state["status"] == "error" and "inpainting model (9 input channels)" in state["error"]


def test_a_single_file_checkpoint_serves_the_page_as_its_folder_does(tiny_folder, cache, tmp_path):
    from ldm import Pipeline

    file = Pipeline.from_pretrained(tiny_folder).save_single_file(tmp_path / "tiny.safetensors")
    pages = Page(tmp_path, str(file), cache), Page(tmp_path, tiny_folder, cache)
    from_file, from_folder = (page.path(page.generate(FORM)["images"][0]["path"]) for page in pages)
    assert from_file != from_folder
    assert np.array_equal(np.asarray(PIL.Image.open(from_file)), np.asarray(PIL.Image.open(from_folder)))


def test_a_dropped_inpainting_png_fills_the_edit_settings_back(tiny_folder, cache, tmp_path):
    from ldm.ui.generate import read_png_form

    page = Page(tmp_path, tiny_folder, cache)
    form = {**FORM, "init_image": data_url(picture(32, 32)), "mask": data_url(left_half_mask(32, 32)),
            "strength": "0.7", "mask_blur": "2", "masked_content": "noise", "paste_back": "false"}
    path = page.path(page.generate(form)["images"][0]["path"])
    with open(path, "rb") as f:
        fields = read_png_form(f.read())
    assert (fields["strength"], fields["mask_blur"], fields["masked_content"], fields["paste_back"]) == (
        0.7, 2, "noise", False)
    assert "init_image" not in fields and "mask" not in fields  # the page uploads those again


def test_the_prompt_options_go_from_the_page_to_the_png_and_back(tiny_folder, cache, tmp_path):
    from ldm.ui.generate import read_png_form

    # BREAK: a second window under a1111, a word under plain. (Not emphasis: the tiny model's last layer norm is
    # untrained, so its states' mean is ~0 and A1111's mean restoration divides by rounding noise.)
    page, prompt = Page(tmp_path, tiny_folder, cache), "a red circle BREAK on the left"
    a1111, plain = (page.path(page.generate({**FORM, "prompt": prompt, **options})["images"][0]["path"])
                    for options in ({}, {"prompt_syntax": "plain", "long_prompts": "truncate"}))
    assert not np.array_equal(np.asarray(PIL.Image.open(a1111)), np.asarray(PIL.Image.open(plain)))
    with open(plain, "rb") as f:
        fields = read_png_form(f.read())
    assert (fields["prompt_syntax"], fields["long_prompts"]) == ("plain", "truncate")
    response = page.post({**FORM, "prompt_syntax": "sd"})
    assert response.status_code == 400 and "'sd' is not one of a1111, plain" in response.json["error"]


def test_a_bad_upload_is_refused_with_a_message_and_the_server_goes_on(tiny_folder, cache, tmp_path):
    from ldm.ui.uploads import MAX_BODY_BYTES, MAX_UPLOAD_BYTES

    page, image = Page(tmp_path, tiny_folder, cache), data_url(picture(32, 32))
    huge = PIL.Image.new("L", (4097, 4096))
    cases = [({"init_image": "data:text/plain;base64,aGVsbG8="}, "is not an image the page takes"),
             ({"init_image": "data:image/png;base64," + base64.b64encode(b"no png").decode()}, "not a readable PNG"),
             ({"init_image": "C:/photos/cat.png"}, "not an uploaded image"),
             ({"init_image": "data:image/png;base64,@@@"}, "not valid base64"),
             ({"init_image": data_url(huge)}, "4097x4096 pixels is above the page's limit"),
             ({"init_image": "data:image/png;base64," + "A" * (MAX_UPLOAD_BYTES * 4 // 3 + 8)}, "too large"),
             ({"mask": data_url(left_half_mask(32, 32))}, "needs"),
             ({"init_image": image, "mask": data_url(left_half_mask(16, 32))}, "the page's canvas"),
             ({"init_image": image, "strength": "1.5"}, "strength"),
             ({"init_image": image, "masked_content": "blur"}, "masked_content"),
             ({"init_image": image, "paste_back": "maybe"}, "true or false")]
    for fields, words in cases:
        response = page.post({**FORM, **fields})
        assert response.status_code == 400 and words in response.json["error"], (words, response.json)
    response = page.client.post("/api/generate", data=b"{" + b" " * MAX_BODY_BYTES + b"}", headers=page.headers)
    assert response.status_code == 413 and "too large" in response.json["error"]
    assert "MiB each" in response.json["error"]
    assert not os.path.exists(os.path.join(page.settings.out, "inputs"))  # nothing refused was saved
    assert len(page.generate({**FORM, "init_image": image})["images"]) == 1


def test_an_upload_needs_the_launchs_token_and_host(tiny_folder, cache, tmp_path):
    page = Page(tmp_path, tiny_folder, cache)
    form = {**FORM, "init_image": data_url(picture(32, 32)), "mask": data_url(left_half_mask(32, 32))}
    for headers, words in (({"Host": HOST}, "no valid token"), ({"Host": HOST, "X-LDM-Token": "x" * 43}, "no valid"),
                           ({"Host": "attacker.example:7861", "X-LDM-Token": page.settings.token}, "does not name")):
        response = page.post(form, headers)
        assert response.status_code == 403 and words in response.json["error"], headers
    assert not os.path.exists(os.path.join(page.settings.out, "inputs"))
    assert len(page.generate(form)["images"]) == 1


def test_decoded_uploads_are_rgb_and_grey_of_the_files_size():
    from ldm.ui.uploads import decode_uploads

    images = decode_uploads({"init_image": data_url(picture(40, 24).convert("RGBA"), "WEBP"),
                             "mask": data_url(left_half_mask(40, 24).convert("RGB"))})
    assert (images["init_image"].mode, images["init_image"].size) == ("RGB", (40, 24))
    assert (images["mask"].mode, images["mask"].size) == ("L", (40, 24))
    assert np.array_equal(np.asarray(images["mask"]), np.asarray(left_half_mask(40, 24)))
    jpeg = decode_uploads({"init_image": data_url(picture(40, 24), "JPEG")})["init_image"]
    assert (jpeg.mode, jpeg.size) == ("RGB", (40, 24))
    assert decode_uploads({"init_image": "", "mask": None}) == {}
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees to show (as a phone writes a portrait photo)
    buffer = io.BytesIO()
    picture(40, 24).save(buffer, "JPEG", exif=exif)
    upright = decode_uploads({"init_image": "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()})
    assert upright["init_image"].size == (24, 40)  # as the browser shows it, and sizes the mask canvas


# ---------------------------------------------------------------------------------------------- the page in a browser

@pytest.fixture(scope="module")
def server(tiny_folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("ui-edit")
    yield from serve_ui(tiny_folder, str(root), str(root / "out"))


@pytest.fixture(scope="module")
def browser():
    yield from chromium()


def sent_forms(browser) -> list[dict]:
    """Returns the generate forms the page posted since record_forms."""
    return [json.loads(body) for body in browser.execute_script("return window.sentForms")]


def decoded(url: str) -> np.ndarray:
    return np.asarray(PIL.Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))))


def set_slider(browser, element_id: str, value: float, step: float) -> None:
    """Moves a range input with the keyboard, as a person would: Home, then the right arrow."""
    from selenium.webdriver.common.keys import Keys

    slider = browser.find_element("id", element_id)
    slider.send_keys(Keys.HOME + Keys.ARROW_RIGHT * round((value - float(slider.get_attribute("min"))) / step))


def generate_and_wait(browser, server, previous: str | None) -> dict:
    """Clicks Generate; returns the first result image's PNG parameters once it shows (a new one)."""
    browser.find_element("id", "generate-button").click()
    wait_for(browser, f"(i => i && i.complete && i.naturalWidth > 0 && i.src !== {json.dumps(previous or '')})"
                      "(document.querySelector('#gallery img.result'))", seconds=120)
    src = browser.find_element("css selector", "#gallery img.result").get_attribute("src")
    status, png = get(src)
    assert status == 200
    return {"src": src, "size": PIL.Image.open(io.BytesIO(png)).size,
            "params": json.loads(PIL.Image.open(io.BytesIO(png)).text["ldm"])}


@pytest.mark.slow
def test_the_page_uploads_an_image_for_img2img_and_paints_a_mask_for_inpainting(server, browser, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.support.ui import Select

    picture(48, 32).save(tmp_path / "photo.png")
    browser.get(server.page)
    wait_for(browser, "document.getElementById('scheduler').options.length > 1")
    browser.execute_script("window.sentForms = []; const f = window.fetch; window.fetch = (u, o) => {"
                           "if (u === '/api/generate') window.sentForms.push(o.body); return f(u, o); }")
    assert browser.execute_script("return document.querySelector('#mode option[value=inpaint]').disabled")
    for field, value in {"prompt": "a red circle on the left", "steps": "4", "seed": "3"}.items():
        browser.find_element("id", field).clear()
        browser.find_element("id", field).send_keys(value)

    browser.find_element("id", "init-image-input").send_keys(str(tmp_path / "photo.png"))
    wait_for(browser, "document.getElementById('init-preview').naturalWidth === 48")
    assert Select(browser.find_element("id", "mode")).first_selected_option.get_attribute("value") == "img2img"
    assert browser.find_element("id", "strength").is_displayed() and not browser.find_element(
        "id", "mask-canvas").is_displayed()
    set_slider(browser, "strength", 0.6, 0.05)
    assert browser.find_element("id", "strength-value").text == "0.6"
    img2img = generate_and_wait(browser, server, None)
    form = sent_forms(browser)[-1]
    assert form["strength"] == "0.6" and "mask" not in form and decoded(form["init_image"]).shape == (32, 48, 3)
    assert img2img["size"] == (48, 32) and img2img["params"]["strength"] == 0.6 and "mask" not in img2img["params"]
    assert "img2img at strength 0.6" in browser.find_element("id", "generate-status").text

    Select(browser.find_element("id", "mode")).select_by_value("inpaint")
    canvas = browser.find_element("id", "mask-canvas")
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", canvas)  # the mouse moves in view only
    assert canvas.is_displayed() and (canvas.size["width"], canvas.size["height"]) == (320, 213)  # the image's aspect
    set_slider(browser, "brush-size", 40, 1)
    # offsets from the canvas's centre in CSS pixels, 20/3 to an image pixel: a stroke down the left edge, a dab
    ActionChains(browser).move_to_element_with_offset(canvas, -130, -85).click_and_hold().move_by_offset(0, 85) \
        .move_by_offset(0, 80).release().move_to_element_with_offset(canvas, -80, 0).click_and_hold() \
        .move_by_offset(20, 5).release().perform()
    screenshot(browser, "edit", tmp_path)
    inpainted = generate_and_wait(browser, server, img2img["src"])
    mask = decoded(sent_forms(browser)[-1]["mask"])[..., 0]  # (32, 48): the canvas at the image's size
    assert mask.shape == (32, 48) and mask.max() == 255 and mask.min() == 0
    assert (mask[:, 24:] == 0).all() and (mask[4:28, 4] == 255).all()  # painted on the left only
    params = inpainted["params"]
    assert "inpainting at strength 0.6" in browser.find_element("id", "generate-status").text
    assert params["mask"].endswith(".png") and (params["mask_blur"], params["masked_content"]) == (4, "original")
    assert np.array_equal(np.asarray(PIL.Image.open(params["mask"])), mask)  # the server got the mask painted
    shown = browser.execute_script("const c = document.getElementById('mask-canvas'); return [...c.getContext('2d')"
                                   ".getImageData(0, 0, c.width, c.height).data].filter((v, i) => i % 4 === 3 && v)"
                                   ".length")
    assert shown == (mask > 0).sum()  # the overlay on the image shows the strokes the mask holds

    browser.find_element("id", "mask-clear").click()
    browser.find_element("id", "generate-button").click()
    wait_for(browser, "document.getElementById('generate-status').classList.contains('error')")
    assert "paint the area to repaint" in browser.find_element("id", "generate-status").text
