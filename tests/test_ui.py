"""`ldm ui`: the page's functions called directly (bad input in every field, the model loaded once, two tabs at
once, the same image as `ldm generate`, runs and diagnostics), and the page itself in headless Chromium."""
import io
import json
import os
import threading

import numpy as np
import PIL.Image
import pytest

from ldm.cli import main
from ldm.images import read_png_params
from ldm.ui.generate import generate, read_png_form
from ldm.ui.jobs import Jobs
from ldm.ui.models import ModelCache
from ui_helpers import chromium, free_port, get, screenshot, serve_ui, wait_for

pytestmark = pytest.mark.usefixtures("one_thread")
FORM = {"prompt": "a red circle on the left", "steps": "4", "seed": "7", "width": "32", "height": "32"}
# field -> (bad value, words the message must hold)
BAD = [("prompt", "", "empty"), ("prompt", "   ", "empty"), ("model", "/no/such/model", "does not exist"),
       ("width", "30", "multiple of"), ("width", "0", "width"), ("height", "100000", "height"),
       ("height", "abc", "height"), ("steps", "0", "steps"), ("steps", "2.5", "steps"),
       ("guidance_scale", "-1", "guidance-scale"), ("guidance_scale", "lots", "guidance-scale"),
       ("guidance_rescale", "2", "guidance-rescale"), ("seed", "-5", "seed"), ("seed", "abc", "seed"),
       ("num_images", "0", "num-images"), ("num_images", "1000", "num_images"),
       ("lora", "/no/such/lora.safetensors", "lora"), ("lora_scale", "big", "lora-scale"),
       ("scheduler", "nope", "scheduler"), ("colour", "red", "unknown fields")]


@pytest.fixture(scope="module")
def cache():
    return ModelCache()


def run_ui(form, cache, tmp_path, model, **kwargs):
    return generate({**FORM, **form}, cache, str(tmp_path / "out"), default_model=model, **kwargs)


@pytest.mark.parametrize("field,value,words", BAD, ids=[f"{f}={v!r}" for f, v, _ in BAD])
def test_bad_input_in_each_field_gives_a_message_and_the_next_request_works(field, value, words, cache, tiny_folder,
                                                                          tmp_path):
    with pytest.raises((ValueError, FileNotFoundError), match=words):
        run_ui({field: value}, cache, tmp_path, tiny_folder)
    images = run_ui({"steps": "2"}, cache, tmp_path, tiny_folder)["images"]
    assert len(images) == 1 and images[0]["width"] == 32


def test_model_is_loaded_once_across_requests_and_samplers(tiny_folder, tmp_path):
    cache = ModelCache()
    for scheduler in ("lms", "ddim", ""):
        run_ui({"scheduler": scheduler, "steps": "2"}, cache, tmp_path, tiny_folder)
    assert cache.loads == 1


def test_two_tabs_generating_at_once_both_get_their_images(cache, tiny_folder, tmp_path):
    results = {}
    threads = [threading.Thread(target=lambda s=s: results.update({s: run_ui({"seed": str(s), "num_images": "2"}, cache,
                                                                            tmp_path, tiny_folder)}))
               for s in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(results) == [1, 2]
    paths = [image["path"] for r in results.values() for image in r["images"]]
    assert len(set(paths)) == 4 and all(os.path.isfile(p) for p in paths)
    assert sorted(read_png_params(p)["seed"] for p in paths) == [1, 2, 2, 3]


def test_page_image_is_ldm_generates_image_bit_for_bit(cache, tiny_folder, tmp_path):
    form = {"prompt": "a blue square", "negative_prompt": "green", "scheduler": "euler", "steps": "5",
            "guidance_scale": "4", "guidance_rescale": "0.3", "seed": "21", "width": "32", "height": "48",
            "num_images": "2"}
    run_ui({"scheduler": "lms"}, cache, tmp_path, tiny_folder)  # a sampler chosen before must not leak into the next
    page = generate(form, cache, str(tmp_path / "page"), default_model=tiny_folder)["images"]
    assert main(["generate", "a blue square", "--model", tiny_folder, "--negative-prompt", "green", "--scheduler",
                 "euler", "--steps", "5", "--guidance-scale", "4", "--guidance-rescale", "0.3", "--seed", "21",
                 "--width", "32", "--height", "48", "--num-images", "2", "--out", str(tmp_path / "cli")]) == 0
    cli = sorted((tmp_path / "cli").glob("*.png"))
    assert len(page) == len(cli) == 2
    for ours, theirs in zip(page, cli):
        assert np.array_equal(np.asarray(PIL.Image.open(ours["path"])), np.asarray(PIL.Image.open(theirs)))
        drop = lambda p: {k: v for k, v in p.items() if k != "seconds"}  # noqa: E731
        assert drop(read_png_params(ours["path"])) == drop(read_png_params(str(theirs)))


def test_an_empty_guidance_field_takes_the_folders_recommended_guidance(tiny_folder, tmp_path):
    import shutil

    from ldm.ui.server import recommended_guidance

    folder = str(tmp_path / "model")
    shutil.copytree(tiny_folder, folder)
    assert recommended_guidance(folder) is None
    with open(os.path.join(folder, "guidance.json"), "w") as f:
        json.dump({"method": "interval", "guidance_scale": 3.0, "params": {"guidance_interval": [100, 800]}}, f)
    assert recommended_guidance(folder) == {"scale": 3.0, "method": "interval"}
    image = run_ui({"guidance_scale": ""}, ModelCache(), tmp_path, folder)["images"][0]
    params = read_png_params(image["path"])
    assert params["guidance_scale"] == 3.0 and params["guidance_source"] == "recommended (guidance.json)"


def test_a_dropped_png_fills_the_form_back(cache, tiny_folder, tmp_path):
    form = {"negative_prompt": "blur", "scheduler": "ddim", "guidance_scale": "3.5", "seed": "9"}
    image = run_ui(form, cache, tmp_path, tiny_folder)["images"][0]
    with open(image["path"], "rb") as f:
        fields = read_png_form(f.read())
    assert fields["prompt"] == FORM["prompt"] and fields["negative_prompt"] == "blur" and fields["seed"] == 9
    assert fields["scheduler"] == "ddim" and fields["guidance_scale"] == 3.5 and fields["width"] == 32
    again = run_ui({k: str(v) for k, v in fields.items()}, cache, tmp_path, tiny_folder)["images"][0]
    assert np.array_equal(np.asarray(PIL.Image.open(again["path"])), np.asarray(PIL.Image.open(image["path"])))
    plain = io.BytesIO()
    PIL.Image.new("RGB", (8, 8)).save(plain, "PNG")
    for data, words in ((plain.getvalue(), "no ldm parameters"), (b"not an image", "not a PNG")):
        with pytest.raises(ValueError, match=words):
            read_png_form(data)


def test_inside_the_sampler_has_every_step(cache, tiny_folder, tmp_path):
    inside = run_ui({"steps": "6", "num_images": "2"}, cache, tmp_path, tiny_folder,
                    inside_dir=str(tmp_path / "inside"))["inside"]
    assert len(inside["frames"]) == len(inside["norms"]) == len(inside["latent_histograms"]) == 6
    assert PIL.Image.open(inside["filmstrip"]).size == (6 * 32, 32)
    assert all(n["uncond"] is not None and n["guided"] > 0 for n in inside["norms"])
    assert all(os.path.isfile(inside[k]) for k in ("norms_plot", "histograms_plot"))
    histogram = np.asarray(inside["latent_histograms"][0]) * np.diff(inside["histogram_edges"])
    assert histogram.sum() == pytest.approx(1.0, abs=0.02)  # densities of one image's latents


def test_cancel_stops_a_generation_and_the_next_one_works(cache, tiny_folder, tmp_path):
    jobs = Jobs()
    job = jobs.start("generate", lambda job: run_ui({"steps": "1000", "num_images": "4"}, cache, tmp_path,
                                                    tiny_folder, job=job))
    while job.progress == 0 and job.status == "running":
        threading.Event().wait(0.05)
    job.cancel()
    for _ in range(600):
        if job.status != "running":
            break
        threading.Event().wait(0.05)
    assert job.status == "cancelled" and job.result is None
    assert len(run_ui({"steps": "2"}, cache, tmp_path, tiny_folder)["images"]) == 1


def write_train_run(folder):
    """A folder as `ldm train` leaves it mid-run: a checkpoint's state with the validation history, grids."""
    history = [{"step": s, "val_loss": 1.0 / s, **{f"val_loss_bin{b}": (b + 1) / s for b in range(3)}, "prompts": []}
               for s in (10, 20)]
    state = folder / "checkpoints" / "checkpoint-00000020"
    state.mkdir(parents=True)
    (state / "trainer_state.json").write_text(json.dumps({"step": 20, "history": history}))
    (folder / "losses.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 21)))
    write_grids(folder, [f"step-{s:08d}.png" for s in (10, 20)])


def write_grids(folder, names):
    """Writes a validation grid (four coloured squares, side by side) under each name in folder/samples."""
    from ldm.images import image_grid

    (folder / "samples").mkdir(parents=True)
    for i, name in enumerate(names):
        cells = [PIL.Image.new("RGB", (32, 32), (60 * (i + k) % 256, 90 * k % 256, 200 - 40 * k)) for k in range(4)]
        image_grid(cells, 4).save(folder / "samples" / name)


def write_finetune_run(folder):
    """A folder as `ldm finetune` leaves it: report.json with losses and the memorisation guard's records."""
    bins = lambda scale: {"val_loss": scale, "val_loss_bin0": scale, "val_loss_bin1": 2 * scale}  # noqa: E731
    memo = {"d_train": 1.0, "ratios": [0.5, 0.9], "nearest": [0, 1], "near_copy_ratio": 0.3, "near_copies": 0,
            "warning": False, "message": "no near copies"}
    history = [{"step": s, "val_train": bins(1 / s), "val_heldout": bins(1.5 / s), "gap": {"bin0": 1.5, "bin1": 1.5},
                "memorization": memo, "samples": "", "train_loss": 1 / s} for s in (5, 10)]
    folder.mkdir(parents=True)
    (folder / "report.json").write_text(json.dumps({"losses": {str(s): 1 / s for s in range(1, 11)}, "history": history}))
    write_grids(folder, [f"step-{s:06d}.png" for s in (5, 10)])


def test_runs_tab_reads_train_and_finetune_folders(tmp_path):
    from ldm.ui.runs import list_runs, plot_run, read_run

    write_train_run(tmp_path / "runs" / "base")
    write_finetune_run(tmp_path / "runs" / "lora")
    (tmp_path / "runs" / "not-a-run").mkdir()
    assert [os.path.basename(p) for p in list_runs(str(tmp_path / "runs"))] == ["base", "lora"]
    base = read_run(str(tmp_path / "runs" / "base"))
    assert len(base["losses"]) == 20 and [r["step"] for r in base["validation"]] == [10, 20]
    assert base["validation"][1]["val_loss_bin2"] == pytest.approx(3 / 20) and [s for s, _ in base["grids"]] == [10, 20]
    assert base["guard"] == [] and base["heldout"] == []
    lora = read_run(str(tmp_path / "runs" / "lora"))
    assert [g["step"] for g in lora["guard"]] == [5, 10] and lora["guard"][1]["val_heldout"] == pytest.approx(0.15)
    assert [s for s, _ in lora["grids"]] == [5, 10]
    assert lora["guard"][0]["nearest_ratio_min"] == 0.5 and len(lora["heldout"]) == 2
    plots = plot_run(lora, str(tmp_path / "plots"))
    assert all(os.path.isfile(p) for p in plots.values())
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_runs(str(tmp_path / "missing"))


def test_diagnose_runs_on_the_cached_model_with_progress(cache, tiny_folder, tmp_path):
    from ldm.ui.diagnose import diagnose
    from ldm.ui.jobs import Job

    job = Job("1", "diagnose")
    result = diagnose({"num_images": "2", "bins": "3"}, cache, str(tmp_path / "diag"), job, tiny_folder)
    assert all(os.path.isfile(p) for p in result["plots"]) and "denoiser calls" in job.message
    for form, words in (({"bins": "0"}, "bins"), ({"num_images": "x"}, "num_images"), ({"model": "/nope"}, "model")):
        with pytest.raises((ValueError, FileNotFoundError), match=words):
            diagnose(form, cache, str(tmp_path / "diag"), default_model=tiny_folder)


# ---------------------------------------------------------------------------------------------- the page in a browser

@pytest.fixture(scope="module")
def server(tiny_folder, tmp_path_factory):
    """`ldm ui` on a free localhost port with the tiny model and two runs (ui_helpers.serve_ui)."""
    root = tmp_path_factory.mktemp("ui")
    write_train_run(root / "runs" / "base")
    write_finetune_run(root / "runs" / "lora")
    yield from serve_ui(tiny_folder, str(root / "runs"), str(root / "out"))


@pytest.fixture(scope="module")
def browser():
    yield from chromium()


@pytest.mark.slow
def test_the_page_generates_shows_inside_the_sampler_runs_and_diagnoses(server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    browser.get(server.page)
    wait_for(browser, "document.getElementById('scheduler').options.length > 1")
    for field, value in {"prompt": "a red circle on the left", "width": "32", "height": "48", "steps": "6",
                         "seed": "3"}.items():
        element = browser.find_element(By.ID, field)
        element.clear()
        element.send_keys(value)
    browser.find_element(By.ID, "generate-button").click()
    wait_for(browser, "document.querySelector('#gallery img.result')?.complete && "
                      "document.querySelector('#gallery img.result').naturalWidth > 0")
    image = browser.find_element(By.CSS_SELECTOR, "#gallery img.result")
    assert browser.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", image) == [32, 48]
    status, png = get(image.get_attribute("src"))
    served = PIL.Image.open(io.BytesIO(png))
    assert status == 200 and served.size == (32, 48)
    params = json.loads(served.text["ldm"])
    assert params["prompt"] == "a red circle on the left" and params["seed"] == 3 and params["steps"] == 6
    assert "Steps: 6" in served.text["parameters"]
    screenshot(browser, "generate", tmp_path)

    browser.find_element(By.ID, "tab-inside").click()
    wait_for(browser, "document.getElementById('inside-filmstrip').naturalWidth > 0 && "
                      "document.getElementById('inside-norms').naturalWidth > 0")
    assert browser.execute_script("return document.getElementById('inside-filmstrip').naturalWidth") == 6 * 32
    browser.execute_script("const s = document.getElementById('step-slider'); s.value = 3; "
                           "s.dispatchEvent(new Event('input'))")
    assert browser.find_element(By.ID, "step-label").text.startswith("step 3")
    screenshot(browser, "inside", tmp_path)

    browser.find_element(By.ID, "tab-runs").click()
    wait_for(browser, "document.getElementById('run-loss').naturalWidth > 0 && "
                      "document.querySelectorAll('#run-grids img').length === 2")
    browser.execute_script("const s = document.getElementById('run-select'); s.value = s.options[1].value; "
                           "s.dispatchEvent(new Event('change'))")
    wait_for(browser, "document.querySelectorAll('#run-guard tr').length === 3 && "
                      "document.querySelector('#run-grids figcaption').textContent === 'step 10'")
    screenshot(browser, "runs", tmp_path)

    browser.find_element(By.ID, "tab-diagnose").click()
    for field, value in {"diag-num_images": "2", "diag-bins": "4"}.items():
        browser.find_element(By.ID, field).clear()
        browser.find_element(By.ID, field).send_keys(value)
    browser.find_element(By.ID, "diagnose-button").click()
    wait_for(browser, "[...document.querySelectorAll('#diagnose-plots img')].filter(i => i.naturalWidth > 0)"
                      ".length === 3", seconds=120)
    screenshot(browser, "diagnose", tmp_path)

    browser.find_element(By.ID, "tab-generate").click()
    browser.find_element(By.ID, "prompt").clear()
    browser.find_element(By.ID, "generate-button").click()
    wait_for(browser, "document.getElementById('generate-status').classList.contains('error')")
    assert "empty" in browser.find_element(By.ID, "generate-status").text


@pytest.mark.slow
def test_bad_input_in_each_field_leaves_the_server_serving(server):
    for field, value, words in BAD:
        status, body = server.get("/api/generate", json.dumps({**FORM, field: value}).encode())
        if status == 200:  # found once the model is loaded (a size the VAE cannot take): the job says why
            job = json.loads(body)["job"]
            for _ in range(240):
                state = json.loads(server.get(f"/api/jobs/{job}")[1])
                if state["status"] != "running":
                    break
                threading.Event().wait(0.25)
            status, body = 400 if state["status"] == "error" else 200, json.dumps({"error": state["error"]}).encode()
        assert status == 400 and words in json.loads(body)["error"], (field, value, body)
    runs = json.loads(server.get("/api/config")[1])["runs"]
    for path, data in (("/api/generate", b"not json"), ("/api/params", b"not a png"), ("/api/run?path=/etc", None),
                       ("/file?path=/etc/passwd", None), ("/file?path=" + os.path.join(runs, "lora", "report.json"), None),
                       ("/api/jobs/999", None), ("/api/diagnose", b'{"bins": "x"}')):
        assert server.get(path, data)[0] in (400, 404), path
    assert server.get("/")[0] == 200
    job = json.loads(server.get("/api/generate", json.dumps({**FORM, "steps": "2"}).encode())[1])["job"]
    for _ in range(240):
        state = json.loads(server.get(f"/api/jobs/{job}")[1])
        if state["status"] != "running":
            break
        threading.Event().wait(0.25)
    assert state["status"] == "done" and len(state["result"]["images"]) == 1


def test_the_page_builds_a_generate_request_not_an_argv():
    import ast

    from ldm.pipelines.generate import GenerateRequest
    from ldm.ui import generate as page

    tree = ast.parse(open(page.__file__, encoding="utf-8").read())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "argparse" not in imported and not any(m.startswith("ldm.cli") for m in imported if m)
    request = page.parse_form({**FORM, "guidance_scale": "3.5", "negative_prompt": "blur"}, "/some/model")
    assert isinstance(request, GenerateRequest)
    assert (request.steps, request.seed, request.guidance_scale, request.negative_prompt, request.model) == (
        4, 7, 3.5, "blur", "/some/model")


# ---------------------------------------------------------------------------------- who may talk to the server

def ui_app(tmp_path, host="127.0.0.1", port=7861):
    """Returns (settings, Flask test client) of `ldm ui` as served on host:port, without a model."""
    from ldm.ui.server import UISettings, create_app

    settings = UISettings(runs=str(tmp_path), out=str(tmp_path / "out"), host=host, port=port)
    return settings, create_app(settings).test_client()


def test_ui_refuses_a_host_header_that_does_not_name_it(tmp_path):
    settings, client = ui_app(tmp_path)
    token = {"X-LDM-Token": settings.token}
    for host in ("127.0.0.1:7861", "localhost:7861", "LOCALHOST:7861", "[::1]:7861"):
        assert client.get("/api/config", headers={**token, "Host": host}).status_code == 200, host
    for host in ("attacker.example:7861", "attacker.example", "127.0.0.1:80", "localhost", "192.168.1.5:7861"):
        response = client.get("/api/config", headers={**token, "Host": host})
        assert response.status_code == 403 and "does not name this server" in response.json["error"], host
    settings, client = ui_app(tmp_path, host="192.168.1.5")  # --host: its address is answered too
    assert client.get("/api/config", headers={"X-LDM-Token": settings.token, "Host": "192.168.1.5:7861"}).status_code == 200


def test_ui_refuses_a_request_without_the_launchs_token(tiny_folder, tmp_path):
    settings, client = ui_app(tmp_path)
    host = {"Host": "127.0.0.1:7861"}
    png = tmp_path / "out" / "a.png"
    PIL.Image.new("RGB", (8, 8)).save(png)
    form = json.dumps({**FORM, "model": tiny_folder})
    for wrong in ({}, {"X-LDM-Token": ""}, {"X-LDM-Token": settings.token[:-1]}, {"X-LDM-Token": "x" * 43}):
        for method, path in (("get", "/"), ("get", "/api/config"), ("get", "/api/runs"), ("post", "/api/generate"),
                             ("post", "/api/params"), ("get", f"/file?path={png}"), ("get", "/api/jobs/1")):
            response = getattr(client, method)(path, headers={**host, **wrong}, data=form if method == "post" else None)
            assert response.status_code == 403 and "no valid token" in response.json["error"], (path, wrong)
    assert client.get("/api/config", headers={**host, "X-LDM-Token": settings.token}).status_code == 200
    assert client.get(f"/?token={settings.token}", headers=host).status_code == 200
    assert client.get(f"/file?path={png}&token={settings.token}", headers=host).status_code == 200
    assert client.get("/static/app.js", headers=host).status_code == 200  # the page's code: public, it holds no secret
    assert ui_app(tmp_path)[0].token != settings.token  # a new token at each launch


def test_ui_answers_image_urls_that_carry_the_token(tmp_path):
    from ldm.ui.server import with_urls

    png = tmp_path / "a.png"
    PIL.Image.new("RGB", (8, 8)).save(png)
    url = with_urls({"images": [str(png)]}, [str(tmp_path)], "tok")["images"][0]
    assert url.startswith("/file?path=") and url.endswith("&token=tok")


def test_ui_with_a_missing_model_folder_stops_at_start_as_generate_does(tmp_path, capsys):
    assert main(["generate", "x", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    generate_says = capsys.readouterr().err.removeprefix("ldm generate: error: ")
    assert main(["ui", "--model", str(tmp_path / "nope"), "--port", str(free_port())]) == 2  # returns: no server
    err = capsys.readouterr().err
    assert err == "ldm ui: error: " + generate_says and "does not exist" in err


@pytest.mark.slow  # starts `ldm ui` as a server process; the same checks run in the fast tier on the test client
def test_the_running_ui_refuses_a_rebound_host_name_and_a_tokenless_call(server):
    import http.client
    import urllib.parse

    netloc = urllib.parse.urlsplit(server.url).netloc
    for host, headers in (("attacker.example:80", {"X-LDM-Token": server.token}), (netloc, {})):
        connection = http.client.HTTPConnection(netloc, timeout=30)
        connection.request("POST", "/api/generate", body=json.dumps(FORM), headers={"Host": host, **headers})
        assert connection.getresponse().status == 403, host
        connection.close()
