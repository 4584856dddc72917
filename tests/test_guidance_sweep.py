"""`ldm eval-guidance` (ldm.evaluation.guidance_sweep) and a model folder's recommended guidance (guidance.json, read by
Pipeline.from_pretrained and `ldm generate`)."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from ldm import Pipeline
from ldm.cli import main
from ldm.evaluation.guidance_sweep import (SweepConfig, check_inputs, distances, pixel_features, recommend,
                                           reference_images, run_sweep, write_recommendation)
from ldm.images import read_png_params
from ldm.pipelines.recommended import GUIDANCE_FILE, read_recommended_guidance

from conftest import seeded

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = dict(prompts="digits", reference="digits:test@32", num_reference=20, steps=2, scales=(1.0, 3.0))


def point(method, scale, adherence, fid, kid=0.0):
    return {"method": method, "scale": scale, "params": {}, "adherence": {"all": adherence}, "fid": fid, "kid": kid,
            "n": 10}


@pytest.fixture(scope="module")
def swept(tiny_folder, tmp_path_factory):
    """A sweep of the tiny random model: every method at two scales on the ten digits prompts, 2 steps."""
    out = str(tmp_path_factory.mktemp("sweep"))
    pipe = Pipeline.from_pretrained(tiny_folder)
    return run_sweep(pipe, SweepConfig(**FAST), out), out


@pytest.fixture()
def folder_copy(tiny_folder, tmp_path):
    path = str(tmp_path / "model")
    shutil.copytree(tiny_folder, path)
    return path


# ------------------------------------------------------------------ the sweep

@pytest.mark.slow
def test_sweep_writes_one_point_per_method_and_scale(swept):
    report, out = swept
    assert [(p["method"], p["scale"]) for p in report["points"]] == [
        (m, s) for m in ("cfg", "interval", "apg", "cfg_zero_star", "rescale") for s in (1.0, 3.0)]
    with open(os.path.join(out, "sweep.json")) as f:
        assert json.load(f)["points"] == json.loads(json.dumps(report["points"]))
    for name in ["tradeoff.png"] + [f"grid_{m}.png" for m in ("cfg", "interval", "apg", "cfg_zero_star", "rescale")]:
        assert os.path.getsize(os.path.join(out, name)) > 0
    for p in report["points"]:
        assert p["n"] == 10 and 0 <= p["adherence"]["all"] <= 1 and p["fid"] >= 0
    assert report["noise_floor"]["n"] == 10 and report["settings"]["num_reference"] == 20
    lo, hi = report["settings"]["interval"]  # sigma (0.28, 5.42] on the tiny model's scaled_linear schedule
    assert 0 < lo < hi < 1000


@pytest.mark.slow
def test_scale_1_is_the_same_unguided_images_for_every_method(swept):
    unguided = [p for p in swept[0]["points"] if p["scale"] == 1.0]
    assert len({(p["fid"], p["kid"]) for p in unguided}) == 1
    guided = {p["method"]: p["fid"] for p in swept[0]["points"] if p["scale"] == 3.0}
    assert guided["cfg"] != guided["apg"] and guided["cfg"] != guided["rescale"]


# ------------------------------------------------------------------ distance and recommendation

def test_pixel_distance_is_zero_for_identical_sets_and_grows_with_a_shift():
    images = torch.rand(64, 3, 32, 32, generator=seeded(0))
    features = pixel_features(images)  # (64, 192): 8x8 RGB box averages
    assert features.shape == (64, 192)
    torch.testing.assert_close(features[:, 0], images[:, 0, :4, :4].mean(dim=(1, 2)))
    assert distances(features, features)["fid"] == pytest.approx(0.0, abs=1e-8)
    fids = [distances(features, pixel_features((images + shift).clamp(0, 1)))["fid"] for shift in (0.05, 0.1, 0.2)]
    assert 0 < fids[0] < fids[1] < fids[2]


def test_reference_images_come_from_any_data_spec_first_n():
    images = reference_images("digits:test@32", 32, 6)
    assert images.shape == (6, 3, 32, 32) and 0 <= float(images.min()) and float(images.max()) <= 1
    torch.testing.assert_close(images, reference_images("digits:test@32", 32, 10)[:6])


def test_recommend_takes_the_lowest_distance_within_tolerance_of_the_best_adherence():
    points = [point("cfg", 1.0, 0.90, 20.0), point("cfg", 3.0, 1.00, 60.0), point("cfg", 7.5, 1.00, 200.0),
              point("interval", 3.0, 0.99, 35.0), point("apg", 3.0, 0.97, 25.0)]
    assert (recommend(points, 0.02)["method"], recommend(points, 0.02)["scale"]) == ("interval", 3.0)
    assert recommend(points, 0.0)["scale"] == 3.0 and recommend(points, 0.0)["method"] == "cfg"
    assert recommend(points, 0.05)["method"] == "apg"
    tie = [point("cfg", 4.0, 1.0, 30.0, kid=0.1), point("apg", 2.0, 1.0, 30.0, kid=0.1)]
    assert recommend(tie, 0.0)["scale"] == 2.0


# ------------------------------------------------------------------ guidance.json

@pytest.mark.slow
def test_from_pretrained_uses_guidance_json_when_no_scale_is_given(swept, folder_copy):
    report = {**swept[0], "recommended": {**point("interval", 3.0, 1.0, 5.0), "n": 10,
                                          "params": {"guidance_interval": [100, 700]}}}
    write_recommendation(folder_copy, report)
    pipe = Pipeline.from_pretrained(folder_copy)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.recommended_guidance["guidance_scale"] == 3.0
    kwargs = dict(num_inference_steps=4, output_type="np")
    recommended = pipe("a handwritten digit 3", generator=seeded(1), **kwargs).images
    explicit = pipe("a handwritten digit 3", guidance_scale=3.0, guidance_interval=(100, 700), generator=seeded(1),
                    **kwargs).images
    np.testing.assert_array_equal(recommended, explicit)
    plain_3 = pipe("a handwritten digit 3", guidance_scale=3.0, generator=seeded(1), **kwargs).images
    assert not np.array_equal(recommended, plain_3)  # a given scale takes no recommended method params

    save_dir = os.path.join(os.path.dirname(folder_copy), "saved")
    pipe.save_pretrained(save_dir)  # the recommendation travels with the folder
    assert read_recommended_guidance(save_dir)["params"] == {"guidance_interval": [100, 700]}


def test_without_guidance_json_the_default_is_7_5_bit_for_bit(tiny_pipe):
    kwargs = dict(num_inference_steps=3, output_type="np")
    assert tiny_pipe.recommended_guidance is None
    np.testing.assert_array_equal(tiny_pipe("x", generator=seeded(2), **kwargs).images,
                                  tiny_pipe("x", guidance_scale=7.5, generator=seeded(2), **kwargs).images)


def test_a_broken_guidance_json_fails_at_load_naming_the_file(folder_copy):
    with open(os.path.join(folder_copy, GUIDANCE_FILE), "w") as f:
        json.dump({"guidance_scale": "high"}, f)
    with pytest.raises(ValueError, match="guidance.json: guidance_scale='high'"):
        Pipeline.from_pretrained(folder_copy)


@pytest.mark.slow
def test_cli_save_writes_guidance_json_and_generate_records_its_source(folder_copy, tmp_path):
    out = str(tmp_path / "sweep")
    argv = ["eval-guidance", "--model", folder_copy, "--prompts", "digits", "--reference", "digits:test@32",
            "--num-reference", "10", "--steps", "2", "--scales", "1", "2", "--methods", "cfg", "apg", "--out", out,
            "--save"]
    assert main(argv) == 0
    saved = read_recommended_guidance(folder_copy)
    assert saved["method"] in ("cfg", "apg") and saved["sweep"]["reference"] == "digits:test@32"
    assert json.load(open(os.path.join(out, GUIDANCE_FILE))) == saved

    png = str(tmp_path / "a.png")
    assert main(["generate", "a handwritten digit 1", "--model", folder_copy, "--steps", "2", "--seed", "0",
                 "--out", png]) == 0
    params = read_png_params(png)
    assert params["guidance_source"] == "recommended (guidance.json)"
    assert params["guidance_scale"] == saved["guidance_scale"]
    assert main(["generate", "x", "--model", folder_copy, "--steps", "2", "--guidance-scale", "5", "--out",
                 str(tmp_path / "b.png")]) == 0
    params = read_png_params(str(tmp_path / "b.png"))
    assert params["guidance_scale"] == 5 and "guidance_source" not in params and "apg_eta" not in params


# ------------------------------------------------------------------ bad input, before any sampling

@pytest.mark.parametrize("changes, error, message", [
    ({"methods": ("cfg", "classifier")}, ValueError, "unknown guidance method"),
    ({"scales": (2.0, -1.0)}, ValueError, "guidance scales must be in"),
    ({"grader": "no_such_module_xyz:grade"}, ValueError, "cannot be imported"),
    ({"grader": "shapes"}, ValueError, "must name exactly one colour"),
    ({"prompts": "/no/such/prompts.txt"}, FileNotFoundError, "does not exist"),
    ({"features": "inception", "feature_weights": "/no/such/weights.pth"}, FileNotFoundError, "not found"),
])
def test_bad_settings_raise_before_loading(changes, error, message):
    with pytest.raises(error, match=message):
        check_inputs(SweepConfig(**{**FAST, **changes}))


def test_empty_prompt_file_and_tiny_reference_raise_before_sampling(tiny_pipe, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match="holds no prompts"):
        check_inputs(SweepConfig(**{**FAST, "prompts": str(empty)}))
    one = tmp_path / "one_image"
    one.mkdir()
    Image.new("RGB", (32, 32), "white").save(one / "a.png")
    calls = []  # the sweep must stop before its first pipeline call
    with pytest.raises(ValueError, match="gave 1 image.*at least two"):
        run_sweep(CallCounter(tiny_pipe, calls), SweepConfig(**{**FAST, "reference": str(one)}), str(tmp_path / "o"))
    assert calls == []


def test_cli_errors_are_one_line(capsys, tiny_folder, tmp_path):
    assert main(["eval-guidance", "--model", tiny_folder, "--prompts", "digits", "--reference", "digits:test@32",
                 "--methods", "cfg", "guess", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown guidance method" in err and "Traceback" not in err


class CallCounter:
    """A pipeline stand-in that records calls and forwards attributes."""

    def __init__(self, pipe, calls):
        self._pipe, self._calls = pipe, calls

    def __getattr__(self, name):
        return getattr(self._pipe, name)

    def __call__(self, *args, **kwargs):
        self._calls.append(1)
        return self._pipe(*args, **kwargs)


def test_generate_without_a_scale_takes_the_recommended_method_params_and_flags_fill_the_rest(folder_copy, tmp_path):
    with open(os.path.join(folder_copy, GUIDANCE_FILE), "w") as f:
        json.dump({"method": "apg", "guidance_scale": 4.0, "params": {"apg": {"eta": 0.0, "norm_threshold": 1.0,
                                                                              "momentum": -0.5}}}, f)
    png = str(tmp_path / "a.png")
    assert main(["generate", "x", "--model", folder_copy, "--steps", "2", "--guidance-interval", "100", "900",
                 "--out", png]) == 0
    params = read_png_params(png)
    assert (params["guidance_scale"], params["apg_norm_threshold"], params["guidance_interval"]) == (4.0, 1.0,
                                                                                                      [100.0, 900.0])
    assert params["guidance_source"] == "recommended (guidance.json)"


def test_training_validation_grids_use_a_named_guidance_method(tiny_pipe, tmp_path):
    from ldm.evaluation.guidance_sweep import method_params
    from ldm.training.ldm_config import TrainLDMConfig
    from ldm.training.validation import sample_grid

    t_lo, t_hi = method_params("interval", tiny_pipe.scheduler)["guidance_interval"]
    assert 0 < t_lo < t_hi < tiny_pipe.scheduler.config.num_train_timesteps
    prompts = ["a red circle on the left", "a blue square"]
    grids = {m: np.asarray(Image.open(sample_grid(tiny_pipe, prompts, str(tmp_path / f"{m}.png"), 4, 7.5, method=m)))
             for m in ("cfg", "interval")}
    direct = tiny_pipe(prompts, num_inference_steps=4, guidance_scale=7.5,
                       generator=torch.Generator().manual_seed(0)).images
    assert np.array_equal(grids["cfg"][:, :direct[0].width], np.asarray(direct[0]))  # cfg: the plain call
    assert not np.array_equal(grids["cfg"], grids["interval"])
    with pytest.raises(ValueError, match="validation_guidance_method"):
        TrainLDMConfig(validation_guidance_method="strong").validate()


def test_finetune_validation_samples_use_the_named_guidance_method(tiny_pipe):
    from ldm.training.finetune import validation_samples
    from ldm.training.finetune_config import FinetuneConfig

    prompts = ["a red circle on the left", "a blue square"]
    size = tiny_pipe.unet.config.sample_size * 2 ** (len(tiny_pipe.vae.config.block_out_channels) - 1)
    cfg = dict(model="base", data="images", resolution=size, validation_sample_steps=4, validation_guidance=7.5)
    samples = {m: validation_samples(FinetuneConfig(**cfg, validation_guidance_method=m), tiny_pipe, prompts)
               for m in ("cfg", "interval")}
    direct = tiny_pipe(prompts, num_inference_steps=4, guidance_scale=7.5, height=size, width=size,
                       output_type="pt", generator=[torch.Generator().manual_seed(i) for i in range(2)]).images
    assert torch.equal(samples["cfg"], direct)  # cfg: the plain call, seed + i per prompt
    assert not torch.allclose(samples["cfg"], samples["interval"])
    with pytest.raises(ValueError, match="validation-guidance-method 'strong' is not one of"):
        FinetuneConfig(**cfg, validation_guidance_method="strong").validate()
