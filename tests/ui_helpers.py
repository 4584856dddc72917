"""What the tests of `ldm ui` share (tests/test_ui.py, tests/test_ui_edit.py): a running server read from the URL
it prints, plain HTTP calls to it, and headless Chromium driving the page."""
import os
import threading

import PIL.Image
import pytest


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, data: bytes | None = None, headers: dict | None = None) -> tuple[int, bytes]:
    """Returns (status, body) of a GET (or a POST of data), errors included."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers or {}), timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


class Server:
    """A running `ldm ui`: the URL it printed (with its token), and requests that carry the token."""

    def __init__(self, page: str):
        import urllib.parse

        self.page = page
        parts = urllib.parse.urlsplit(page)
        self.url, self.token = f"{parts.scheme}://{parts.netloc}", urllib.parse.parse_qs(parts.query)["token"][0]

    def get(self, path: str, data: bytes | None = None) -> tuple[int, bytes]:
        return get(self.url + path, data, {"X-LDM-Token": self.token})


def serve_ui(model: str, runs: str, out: str):
    """Runs `ldm ui --model MODEL --runs RUNS --out OUT` on a free localhost port; yields it as a Server, from the
    URL it printed on a line of its own, and stops it after (a fixture's body: `yield from serve_ui(...)`)."""
    import re
    import subprocess
    import sys
    import time

    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, "-m", "ldm.cli", "ui", "--model", model, "--port", str(port),
                                "--runs", runs, "--out", out], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    printed = []
    while not printed or not printed[-1].startswith("http"):
        printed.append(process.stdout.readline())
        if printed[-1] == "" and process.poll() is not None:
            pytest.fail(f"ldm ui exited: {''.join(printed)}")
    threading.Thread(target=process.stdout.read, daemon=True).start()  # its request log must not fill the pipe
    assert re.fullmatch(rf"http://127\.0\.0\.1:{port}/\?token=[\w-]{{40,}}\n", printed[-1]), printed
    server = Server(printed[-1].strip())
    for _ in range(20):  # its first answer imports the pipelines: slow on a busy machine
        try:
            if server.get("/api/config")[0] == 200:
                break
        except OSError:
            time.sleep(0.25)
    yield server
    process.terminate()
    process.wait(timeout=30)


def chromium():
    """Yields Debian's headless Chromium under Selenium, and quits it after (`yield from chromium()`)."""
    import shutil

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver = shutil.which("chromium"), shutil.which("chromedriver") or "/usr/bin/chromedriver"
    if binary is None or not os.path.exists(driver):
        pytest.fail("the browser test needs Debian's headless Chromium: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(driver), options=options)
    yield browser
    browser.quit()


def screenshot(browser, name: str, tmp_path) -> None:
    """Saves the page to tmp_path, and as a small PNG to $LDM_UI_SCREENSHOTS (the web UI guide's) when it is set."""
    browser.save_screenshot(str(tmp_path / f"{name}.png"))
    folder = os.environ.get("LDM_UI_SCREENSHOTS")
    if folder:
        os.makedirs(folder, exist_ok=True)
        image = PIL.Image.open(tmp_path / f"{name}.png").convert("RGB")
        image.thumbnail((900, 900))
        image.quantize(64).save(os.path.join(folder, f"{name}.png"), optimize=True)


def wait_for(browser, condition: str, seconds: float = 60):
    """Waits until the JavaScript expression is true; fails with the page's status line otherwise."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        WebDriverWait(browser, seconds, poll_frequency=0.2).until(lambda b: b.execute_script(f"return {condition}"))
    except TimeoutException:
        status = browser.execute_script("return document.querySelector('.panel:not(.hidden) .status').textContent")
        pytest.fail(f"timed out waiting for {condition}; the page says: {status}")
