"""SDXL sampling (ldm.pipelines.sdxl): our Pipeline against diffusers' StableDiffusionXL(Img2Img|Inpaint)Pipeline
built from the SAME sdxl-tiny components, prompts and noise; folders both ways; every sampler; the CLI."""
import json
import os
import re
import warnings

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import (DiffusionPipeline, EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline,
                       StableDiffusionXLInpaintPipeline, StableDiffusionXLPipeline)

from ldm import Pipeline
from ldm.cli import main as ldm_main
from ldm.images import read_png_params
from ldm.models.presets import build_components, get_spec, inpainting
from ldm.pipelines import sdxl
from ldm.pipelines.generate import GenerateRequest
from ldm.pipelines.prompts import tokenize_prompts
from ldm.pipelines.schedulers import SCHEDULERS

PARTS = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "scheduler")
PROMPTS = ["a red circle on the left", "a blue square above a yellow triangle"]
TOLERANCE = 1e-4
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: faster on one thread of the shared cores


@pytest.fixture(scope="module")
def parts():
    return build_components("sdxl-tiny", seed=0)


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory):
    """An sdxl-tiny folder written by `ldm create-model`."""
    folder = str(tmp_path_factory.mktemp("models") / "sdxl")
    assert ldm_main(["create-model", "--model", "sdxl-tiny", "--out", folder]) == 0
    return folder


@pytest.fixture()
def ours(parts):
    pipe = Pipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_pipe(cls, parts, **config):
    pipe = cls(**{name: parts[name] for name in PARTS}, **config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture()
def theirs(parts):
    return diffusers_pipe(StableDiffusionXLPipeline, parts)


def sample(pipe, scheduler: str | None = None, prompt=PROMPTS, seed: int = 0, **call):
    """Returns the pipe's images (np) from fixed latents: the same noise for both pipelines, on any sampler."""
    if scheduler is not None:
        pipe.scheduler = SCHEDULERS[scheduler][0].from_config(pipe.scheduler.config)
    count = 1 if isinstance(prompt, str) else len(prompt) if prompt is not None else len(call["prompt_embeds"])
    latents = torch.randn(count, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
    return pipe(prompt, num_inference_steps=4, latents=latents, output_type="np", **call).images


CASES = {
    "no-guidance": dict(guidance_scale=1.0),
    "empty-negative-zeros": dict(guidance_scale=5.0),
    "text-negative": dict(guidance_scale=5.0, negative_prompt=["blurry", "a green circle"]),
    "rescale": dict(guidance_scale=5.0, negative_prompt=["blurry", "a green circle"], guidance_rescale=0.7),
    # one prompt: diffusers pairs negative time_ids with the wrong rows past a batch of one (see below)
    "micro-conditioning": dict(prompt="a red circle", guidance_scale=5.0, original_size=(32, 48),
                               crops_coords_top_left=(4, 8), target_size=(48, 64), negative_original_size=(16, 16),
                               negative_target_size=(64, 64), negative_crops_coords_top_left=(2, 0)),
}


@pytest.mark.parametrize("scheduler", ["ddim", "euler"])
@pytest.mark.parametrize("case", list(CASES))
def test_same_images_as_diffusers_sdxl(ours, theirs, scheduler, case):
    a, b = sample(ours, scheduler, **CASES[case]), sample(theirs, scheduler, **CASES[case])
    assert a.shape == b.shape and a.std() > 0.01
    assert np.abs(a - b).max() <= TOLERANCE
    if case != "no-guidance":  # the case's conditioning reaches the UNet: unguided images differ
        unguided = sample(ours, scheduler, prompt=CASES[case].get("prompt", PROMPTS), guidance_scale=1.0)
        assert np.abs(a - unguided).max() > 100 * TOLERANCE


def test_micro_conditioning_changes_the_image_and_is_per_image(ours):
    """original_size, crop and target each reach the UNet; in a batch, each image's unconditional branch gets the
    negative time_ids (diffusers' repeat puts them on alternate rows), so a batch equals its images alone."""
    call = dict(guidance_scale=5.0, negative_original_size=(16, 16), negative_target_size=(64, 64))
    base = sample(ours, "ddim", **call)
    for name, value in (("original_size", (32, 48)), ("crops_coords_top_left", (4, 8)), ("target_size", (48, 64))):
        assert np.abs(sample(ours, "ddim", **call, **{name: value}) - base).max() > 1e-3, name
    alone = [ours(p, num_inference_steps=4, latents=torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
                  [i: i + 1], output_type="np", **call).images[0] for i, p in enumerate(PROMPTS)]
    assert np.abs(base - np.stack(alone)).max() <= TOLERANCE


def test_empty_negative_prompt_is_zeros_under_force_zeros(ours, theirs):
    """force_zeros_for_empty_prompt: a negative prompt None or "" gives zero context and pooled embeddings (A1111's
    rule; diffusers zeroes only None); turned off, the empty prompt is encoded, as diffusers does."""
    expected = sample(theirs, "ddim", guidance_scale=5.0)  # diffusers, negative_prompt=None: zeros
    assert np.abs(sample(ours, "ddim", guidance_scale=5.0, negative_prompt="") - expected).max() <= TOLERANCE
    _, negative, _, negative_pooled = ours.encode_prompt(PROMPTS, ["", "blurry"], 1, True)
    assert negative[0].abs().max() == 0 and negative_pooled[0].abs().max() == 0
    assert negative[1].abs().max() > 0 and negative_pooled[1].abs().max() > 0  # per prompt
    ours.register_to_config(force_zeros_for_empty_prompt=False)
    theirs.register_to_config(force_zeros_for_empty_prompt=False)
    a, b = sample(ours, "ddim", guidance_scale=5.0), sample(theirs, "ddim", guidance_scale=5.0)
    assert np.abs(a - b).max() <= TOLERANCE and np.abs(a - expected).max() > 1e-3


def test_encode_prompt_matches_diffusers_and_takes_the_first_windows_pool(ours, theirs, parts):
    mine = ours.encode_prompt(PROMPTS, ["blurry", "green"], 2, True, clip_skip=1)
    reference = theirs.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=2, negative_prompt=["blurry", "green"],
                                     clip_skip=1)
    assert mine[0].shape == (4, 77, 64) and mine[2].shape == (4, 32)
    for name, a, b in zip(("prompt", "negative", "pooled", "negative pooled"), mine, reference):
        if name != "negative":  # diffusers reads the negative prompt's penultimate layer whatever clip_skip says
            assert torch.allclose(a, b, atol=1e-6), name
    long_prompt = ", ".join(["a red circle on the left"] * 20)  # 120+ tokens: two windows
    context, _, pooled, _ = ours.encode_prompt([long_prompt], None, 1, False)
    assert context.shape == (1, 2 * 77, 64)
    windows = tokenize_prompts(parts["tokenizer_2"], [long_prompt]).ids  # (2, 77)
    assert torch.allclose(pooled, parts["text_encoder_2"](windows[:1]).text_embeds, atol=1e-6)  # the first's
    assert not torch.allclose(pooled, parts["text_encoder_2"](windows[1:]).text_embeds, atol=1e-3)


def test_emphasis_weights_each_encoders_half_on_its_own(ours):
    """A1111's (word:1.5): the token's states times 1.5, then each encoder's half rescaled to its own former mean
    (A1111's two SDXL embedders each normalise); the pooled embedding is the unweighted one."""
    with torch.no_grad():
        plain, _, plain_pooled, _ = ours.encode_prompt(["a red circle"], None, 1, False)
        emphasised, _, pooled, _ = ours.encode_prompt(["a (red:1.5) circle"], None, 1, False)
    assert torch.equal(pooled, plain_pooled)
    scales = []
    for half in (slice(0, 32), slice(32, 64)):  # text_encoder's 32 channels, then text_encoder_2's
        ratio = emphasised[0, :, half] / plain[0, :, half]  # tokens: start, a, red, circle, end, pad...
        assert torch.allclose(emphasised[0, :, half].mean(), plain[0, :, half].mean(), rtol=1e-5)
        assert torch.allclose(ratio[2], 1.5 * ratio[0], rtol=1e-4)
        scales.append(float(ratio[0].mean()))
    assert abs(scales[0] - scales[1]) > 1e-3  # two normalisations, not one over the concatenation


def test_given_embeddings_give_the_same_images(ours):
    embeds, negative, pooled, negative_pooled = ours.encode_prompt(PROMPTS, ["blurry", "green"], 1, True)
    expected = sample(ours, "ddim", guidance_scale=5.0, negative_prompt=["blurry", "green"])
    given = sample(ours, "ddim", prompt=None, prompt_embeds=embeds, negative_prompt_embeds=negative,
                   pooled_prompt_embeds=pooled, negative_pooled_prompt_embeds=negative_pooled, guidance_scale=5.0)
    from_text = sample(ours, "ddim", prompt=None, prompt_embeds=embeds, pooled_prompt_embeds=pooled,
                       negative_prompt=["blurry", "green"], guidance_scale=5.0)
    assert np.abs(given - expected).max() <= TOLERANCE and np.abs(from_text - expected).max() <= TOLERANCE
    with pytest.raises(ValueError, match="pooled_prompt_embeds is needed with prompt_embeds"):
        ours(prompt_embeds=embeds, num_inference_steps=2)
    with pytest.raises(ValueError, match="negative_pooled_prompt_embeds is needed with negative_prompt_embeds"):
        ours(prompt_embeds=embeds, pooled_prompt_embeds=pooled, negative_prompt_embeds=negative, num_inference_steps=2)


def test_long_prompts_sample_with_text_and_zero_negatives(ours):
    long_prompt = ", ".join(["a red circle on the left"] * 20)  # two windows
    with torch.no_grad():
        embeds, negative, pooled, _ = ours.encode_prompt([long_prompt], ["blurry"], 1, True)
    assert embeds.shape == negative.shape == (1, 2 * 77, 64)  # the short negative padded with empty windows
    with_text = sample(ours, "ddim", prompt=long_prompt, negative_prompt="blurry", guidance_scale=5.0)
    given = sample(ours, "ddim", prompt=None, prompt_embeds=embeds, pooled_prompt_embeds=pooled,
                   negative_prompt="blurry", guidance_scale=5.0)
    zeros = sample(ours, "ddim", prompt=long_prompt, guidance_scale=5.0)
    assert np.abs(with_text - given).max() <= TOLERANCE and np.abs(with_text - zeros).max() > 1e-3


def test_sdxl_arguments_are_refused_where_they_do_not_apply(ours, tiny_pipe):
    with pytest.raises(ValueError, match="pooled_prompt_embeds, original_size: SDXL's"):
        tiny_pipe("a red circle", original_size=(64, 64), pooled_prompt_embeds=torch.zeros(1, 32),
                  num_inference_steps=1)
    with pytest.raises(ValueError, match=r"crops_coords_top_left=\(-1, 0\) must be a pair of numbers \(top, left\)"):
        ours("a red circle", crops_coords_top_left=(-1, 0), num_inference_steps=1)
    with pytest.raises(ValueError, match=r"target_size=64 must be a pair"):
        ours("a red circle", target_size=64, num_inference_steps=1)


@pytest.mark.parametrize("scheduler", ["ddim", "euler"])
def test_img2img_and_inpainting_match_diffusers(parts, ours, scheduler):
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 16:48, 8:40] = 1
    call = dict(prompt="a red circle", num_inference_steps=5, guidance_scale=5.0, negative_prompt="blurry",
                original_size=(128, 96), crops_coords_top_left=(8, 0), output_type="np")
    for cls, edit, ours_only in ((StableDiffusionXLImg2ImgPipeline, dict(image=image, strength=0.6), {}),
                                 (StableDiffusionXLInpaintPipeline, dict(image=image, mask_image=mask, strength=0.6),
                                  dict(mask_blur=0, paste_back=False))):
        theirs = diffusers_pipe(cls, parts, requires_aesthetics_score=False)  # the 6 time_ids, as the base pipeline
        ours.set_scheduler(scheduler)
        theirs.scheduler = type(ours.scheduler).from_config(ours.scheduler.config)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # diffusers' own VAE upcast warns on CPU
            b = theirs(**call, **edit, generator=torch.Generator().manual_seed(1)).images
        a = ours(**call, **edit, **ours_only, generator=torch.Generator().manual_seed(1)).images
        assert a.shape == (1, 64, 64, 3) and np.abs(a - b).max() <= TOLERANCE, cls.__name__


def test_inpainting_unet_matches_diffusers_and_saves_as_its_pipeline(tmp_path):
    parts = build_components(inpainting(get_spec("sdxl-tiny"), "sdxl-tiny-inpaint"), seed=0)  # 9 input channels
    ours = Pipeline(**parts)
    ours.set_progress_bar_config(disable=True)
    theirs = diffusers_pipe(StableDiffusionXLInpaintPipeline, parts, requires_aesthetics_score=False)
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 16:48, 8:40] = 1
    call = dict(prompt="a red circle", image=image, mask_image=mask, num_inference_steps=4, output_type="np",
                guidance_scale=5.0, strength=1.0)  # diffusers' SDXL default is 0.9999, ours 1.0
    a = ours(**call, mask_blur=0, paste_back=False, generator=torch.Generator().manual_seed(1)).images
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        b = theirs(**call, generator=torch.Generator().manual_seed(1)).images
    assert np.abs(a - b).max() <= TOLERANCE
    ours.save_pretrained(tmp_path / "inpaint")
    assert type(DiffusionPipeline.from_pretrained(tmp_path / "inpaint")).__name__ == "StableDiffusionXLInpaintPipeline"


def test_folders_round_trip_both_ways(ours, parts, tmp_path):
    ours.save_pretrained(tmp_path / "ours")
    opened = StableDiffusionXLPipeline.from_pretrained(tmp_path / "ours")
    opened.set_progress_bar_config(disable=True)
    call = dict(guidance_scale=5.0, negative_prompt=["blurry", "green"])
    assert np.abs(sample(opened, "ddim", **call) - sample(ours, "ddim", **call)).max() <= TOLERANCE

    theirs = diffusers_pipe(StableDiffusionXLPipeline, {**parts, "scheduler": EulerDiscreteScheduler.from_config(
        parts["scheduler"].config)})
    theirs.save_pretrained(tmp_path / "theirs")
    loaded = Pipeline.from_pretrained(tmp_path / "theirs")
    loaded.set_progress_bar_config(disable=True)
    assert loaded.is_sdxl and type(loaded.scheduler) is EulerDiscreteScheduler
    assert np.abs(sample(loaded, **call) - sample(theirs, **call)).max() <= TOLERANCE


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_every_sampler_runs_on_sdxl_tiny(ours, scheduler):
    ours.set_scheduler(scheduler)
    images = ours("a red circle", num_inference_steps=3, guidance_scale=5.0, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all() and images.std() > 0.01


def test_guidance_methods_trace_and_callbacks(ours):
    base = sample(ours, "ddim", guidance_scale=5.0)
    for method in (dict(guidance_interval=(0, 600)), dict(apg=True), dict(cfg_zero_star=True)):
        images = sample(ours, "ddim", guidance_scale=5.0, **method)
        assert np.isfinite(images).all() and np.abs(images - base).max() > 1e-4, method
    seen = []

    def callback(pipe, i, t, tensors):
        seen.append(tuple(tensors["prompt_embeds"].shape))
        return {}

    out = ours(PROMPTS, num_inference_steps=3, guidance_scale=5.0, trace=True, callback_on_step_end=callback,
               callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"], output_type="latent")
    assert len(out.trace) == 3 and out.trace[0].noise_pred_uncond is not None and seen == [(2, 77, 64)] * 3


def test_float16_vae_decodes_in_float32_when_its_config_asks(ours):
    ours.vae.to(torch.float16)
    try:
        with sdxl.vae_upcast(ours) as dtype:
            assert dtype == torch.float32 and ours.vae.dtype == torch.float32
        assert ours.vae.dtype == torch.float16
    finally:
        ours.vae.to(torch.float32)


def test_cli_creates_an_sdxl_model_and_generates_a_png(sdxl_folder, tmp_path):
    out = str(tmp_path / "img.png")
    assert json.load(open(os.path.join(sdxl_folder, "model_index.json")))["_class_name"] == "StableDiffusionXLPipeline"
    assert ldm_main(["generate", "a red circle", "--model", sdxl_folder, "--steps", "2", "--seed", "1", "--out", out,
                     "--original-size", "512", "512", "--crops-coords-top-left", "0", "8"]) == 0
    params = read_png_params(out)
    assert params["original_size"] == [512, 512] and params["crops_coords_top_left"] == [0, 8]
    with pytest.raises(SystemExit):  # two numbers or none
        ldm_main(["generate", "x", "--model", sdxl_folder, "--target-size", "64"])
    with pytest.raises(ValueError, match=r"target_size \(--target-size\): \(64, 64, 1\) must be two whole numbers"):
        GenerateRequest("x", sdxl_folder, target_size=(64, 64, 1)).validate()


def test_create_model_names_both_text_encoders(tmp_path, capsys):
    assert ldm_main(["create-model", "--model", "sdxl-tiny", "--out", str(tmp_path / "m")]) == 0
    assert re.search(r"text_encoder [\d,]+, text_encoder_2 [\d,]+ parameters", capsys.readouterr().out)


def test_the_web_page_generates_with_an_sdxl_folder(sdxl_folder, tmp_path):
    from ldm.ui.generate import generate
    from ldm.ui.models import ModelCache

    result = generate({"prompt": "a red circle", "steps": "2", "seed": "3", "negative_prompt": "blurry"},
                      ModelCache(), str(tmp_path / "page"), default_model=sdxl_folder)
    image = np.asarray(PIL.Image.open(result["images"][0]["path"]))
    assert image.shape == (64, 64, 3) and image.std() > 1


def test_per_timestep_diagnostics_give_the_unet_its_pooled_text_and_sizes(ours, sdxl_folder, tmp_path):
    from ldm.diagnostics.probe import make_probe, predict_probe
    from ldm.models import sdxl
    from ldm.models.denoiser import denoise
    from ldm.objectives import objective_for

    probe = make_probe(ours, "shapes:2@64", num_images=2, n_bins=2, per_bin=1)
    assert probe.pooled.shape == (4, 32) and torch.equal(probe.time_ids[0], sdxl.time_ids((64, 64), (0, 0), (64, 64)))
    pred = predict_probe(ours.unet, probe, objective_for(ours.scheduler))
    direct = denoise(ours.unet, probe.x_t[:1], probe.timesteps[:1], probe.context[:1], probe.pooled[:1],
                     probe.time_ids[:1])  # epsilon model: the prediction as it is
    assert torch.allclose(pred[:1], direct, atol=1e-5)
    assert ldm_main(["diagnose", "timesteps", "--model", sdxl_folder, "--data", "shapes:2@64", "--num-images", "2", "--bins", "2",
                     "--out", str(tmp_path)]) == 0
    assert (tmp_path / "timesteps.json").exists() and (tmp_path / "timesteps_bias.png").exists()
