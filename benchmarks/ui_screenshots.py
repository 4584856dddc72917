"""Screenshots of the web UI on a trained model, for the docs (docs/src/guides/web-ui.md).

    python benchmarks/ui_screenshots.py --model runs/demo/pipeline --runs runs/demo

starts `ldm ui --model MODEL --runs RUNS` on a free localhost port, opens the URL the server prints (with its
token, if it prints one) in Debian's headless Chromium (apt-get install chromium chromium-driver), types a prompt
the demo model knows, generates, visits each tab (Generate, Inside the sampler, Training runs, Diagnose) and
writes generate.png, inside.png, runs.png and diagnose.png into --out (default benchmarks/figures/ui). Then it
inpaints: it uploads the first generated image, paints a mask over its right half with the mouse, generates with
--edit-prompt and writes edit.png (the image, the mask over it, the settings and the results).
"""
import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time

import PIL.Image

HERE = os.path.dirname(os.path.abspath(__file__))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a trained pipeline folder, e.g. runs/demo/pipeline")
    p.add_argument("--runs", required=True, help="a folder of training runs, e.g. runs/demo (its ldm_run, vae_run)")
    p.add_argument("--prompt", default="a red circle on the left")
    p.add_argument("--edit-prompt", default="a blue square on the right",
                   help="the prompt that repaints the right half of the first image (edit.png)")
    p.add_argument("--out", default=os.path.join(HERE, "figures", "ui"))
    p.add_argument("--work", default=None, help="where the page writes its PNGs (default: a temporary folder)")
    args = p.parse_args(argv)
    for name in ("model", "runs"):
        if not os.path.isdir(getattr(args, name)):
            p.error(f"--{name} {getattr(args, name)!r} is not a folder")
    if not os.path.isfile(os.path.join(args.model, "model_index.json")):
        p.error(f"--model {args.model!r} has no model_index.json: pass a pipeline folder, e.g. runs/demo/pipeline")
    return args


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ui(args, port: int, work: str) -> tuple[subprocess.Popen, str]:
    """Starts `ldm ui`; returns the process and the first http URL it prints (its token included)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, "-m", "ldm.cli", "ui", "--model", args.model, "--runs", args.runs,
                                "--out", work, "--port", str(port)], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    found, lines = [], []

    def read():
        for line in process.stdout:
            lines.append(line)
            match = re.search(r"http://(?:127\.0\.0\.1|localhost)[^\s'\"<>)\x1b]*", line)
            if match and not found:
                found.append(match.group(0).rstrip(".,;"))

    threading.Thread(target=read, daemon=True).start()
    for _ in range(600):
        if found:
            return process, found[0]
        if process.poll() is not None:
            time.sleep(0.5)
            sys.exit(f"ldm ui exited before serving:\n{''.join(lines)}")
        time.sleep(0.1)
    process.terminate()
    sys.exit(f"ldm ui printed no URL in 60 s:\n{''.join(lines)}")


def open_browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver") or "/usr/bin/chromedriver"
    if chromium is None or not os.path.exists(driver):
        sys.exit("this needs Debian's headless Chromium: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1280,1000", "--force-device-scale-factor=1"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=options)


def wait_for(browser, condition: str, seconds: float = 180) -> None:
    """Waits until the JavaScript expression is true; exits with the page's status line otherwise."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        WebDriverWait(browser, seconds, poll_frequency=0.25).until(lambda b: b.execute_script(f"return {condition}"))
    except TimeoutException:
        status = browser.execute_script("return document.querySelector('.panel:not(.hidden) .status')?.textContent")
        sys.exit(f"timed out waiting for {condition}; the page says: {status}")


def save(browser, out: str, name: str) -> None:
    """Writes the page as a compact PNG (at most 1000 px wide, 128 colours)."""
    raw = os.path.join(out, f"{name}.raw.png")
    browser.save_screenshot(raw)
    image = PIL.Image.open(raw).convert("RGB")
    image.thumbnail((1000, 1000))
    image.quantize(128).save(os.path.join(out, f"{name}.png"), optimize=True)
    os.remove(raw)
    print(f"wrote {os.path.join(out, name + '.png')}")


def fill(browser, values: dict) -> None:
    from selenium.webdriver.common.by import By

    for field, value in values.items():
        element = browser.find_element(By.ID, field)
        element.clear()
        element.send_keys(value)


def take(browser, url: str, args) -> None:
    """Drives the four tabs and saves a screenshot of each."""
    from selenium.webdriver.common.by import By

    browser.get(url)
    wait_for(browser, "document.getElementById('scheduler').options.length > 1")
    fill(browser, {"prompt": args.prompt, "steps": "25", "guidance_scale": "4", "seed": "1", "num_images": "4"})
    browser.find_element(By.ID, "generate-button").click()
    wait_for(browser, "document.querySelectorAll('#gallery img.result').length >= 4 && "
                      "[...document.querySelectorAll('#gallery img.result')].every(i => i.complete && i.naturalWidth)")
    save(browser, args.out, "generate")

    browser.find_element(By.ID, "tab-inside").click()
    wait_for(browser, "document.getElementById('inside-filmstrip').naturalWidth > 0 && "
                      "document.getElementById('inside-norms').naturalWidth > 0 && "
                      "document.getElementById('inside-ridge').naturalWidth > 0")
    browser.execute_script("const s = document.getElementById('step-slider'); s.value = Math.floor(s.max / 2); "
                           "s.dispatchEvent(new Event('input'))")
    time.sleep(1)
    save(browser, args.out, "inside")

    browser.find_element(By.ID, "tab-runs").click()
    wait_for(browser, "document.getElementById('run-select').options.length > 0")
    browser.execute_script("const s = document.getElementById('run-select'); "
                           "const o = [...s.options].find(o => /ldm_run/.test(o.value)) || s.options[0]; "
                           "s.value = o.value; s.dispatchEvent(new Event('change'))")
    wait_for(browser, "document.getElementById('run-loss').naturalWidth > 0")
    time.sleep(2)
    save(browser, args.out, "runs")

    browser.find_element(By.ID, "tab-diagnose").click()
    fill(browser, {"diag-data": "shapes:64@32", "diag-num_images": "8", "diag-bins": "10"})
    browser.find_element(By.ID, "diagnose-button").click()
    wait_for(browser, "[...document.querySelectorAll('#diagnose-plots img')].filter(i => i.naturalWidth > 0)"
                      ".length >= 3", seconds=600)
    save(browser, args.out, "diagnose")


def take_edit(browser, args, work: str) -> None:
    """Inpaints the first generated image: uploads it, paints over its right half, generates, saves edit.png."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    first = sorted(f for f in os.listdir(work) if f.endswith(".png"))[0]
    browser.find_element(By.ID, "tab-generate").click()
    before = browser.find_element(By.CSS_SELECTOR, "#gallery img.result").get_attribute("src")
    browser.find_element(By.ID, "init-image-input").send_keys(os.path.join(work, first))
    wait_for(browser, "document.getElementById('init-preview').naturalWidth > 0")
    Select(browser.find_element(By.ID, "mode")).select_by_value("inpaint")
    fill(browser, {"prompt": args.edit_prompt, "mask_blur": "4"})
    browser.execute_script("for (const [id, v] of [['strength', 0.9], ['brush-size', 64]]) {"
                           "const s = document.getElementById(id); s.value = v; s.dispatchEvent(new Event('input')); }")
    canvas = browser.find_element(By.ID, "mask-canvas")
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", canvas)  # the mouse moves in view only
    width, height = canvas.size["width"], canvas.size["height"]
    strokes = ActionChains(browser)
    for y in range(-height // 2 + 24, height // 2 - 16, 48):  # offsets from the canvas's centre: its right half
        strokes.move_to_element_with_offset(canvas, 24, y).click_and_hold().move_by_offset(width // 2 - 48, 0).release()
    strokes.perform()
    browser.find_element(By.ID, "generate-button").click()
    wait_for(browser, f"[...document.querySelectorAll('#gallery img.result')].length >= 4 && "
                      f"document.querySelector('#gallery img.result').src !== {before!r} && "
                      "[...document.querySelectorAll('#gallery img.result')].every(i => i.complete && i.naturalWidth)")
    browser.execute_script("window.scrollTo(0, 0)")
    save(browser, args.out, "edit")


def main(argv=None) -> None:
    import tempfile

    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    work = args.work or tempfile.mkdtemp(prefix="ldm-ui-shots-")
    process, url = start_ui(args, free_port(), work)
    print(f"ldm ui at {url}")
    browser = None
    try:
        browser = open_browser()
        take(browser, url, args)
        take_edit(browser, args, work)
    finally:
        if browser is not None:
            browser.quit()
        process.terminate()
        process.wait(timeout=30)


if __name__ == "__main__":
    main()
