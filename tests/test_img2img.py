"""img2img (pipelines/editing.py): parity with diffusers' StableDiffusionImg2ImgPipeline on the same tiny
random weights and generator, the two ends of strength, every named sampler (flow ones too), sizes and errors."""
import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusionImg2ImgPipeline

from ldm import Pipeline
from ldm.models.presets import build_components
from ldm.pipelines.schedulers import FLOW_SCHEDULERS, SCHEDULERS, make_scheduler

pytestmark = pytest.mark.usefixtures("one_thread")
CALL = dict(prompt="a red circle on the left", negative_prompt="blurry", guidance_scale=7.5, height=32, width=32)


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def init_image(size=32, seed=0) -> PIL.Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return PIL.Image.fromarray(pixels)


@pytest.fixture(scope="module")
def components():
    return build_components("tiny", seed=0)


@pytest.fixture(scope="module")
def pipe(components):
    pipe = Pipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def flow_pipe():
    components = build_components("tiny", seed=0)
    components["scheduler"] = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
    pipe = Pipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_img2img(components, scheduler_name):
    theirs = StableDiffusionImg2ImgPipeline(
        **{k: components[k] for k in ("vae", "text_encoder", "tokenizer", "unet")},
        scheduler=make_scheduler(scheduler_name, components["scheduler"].config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    theirs.set_progress_bar_config(disable=True)
    return theirs


@pytest.mark.parametrize("scheduler_name", ["ddim", "euler", "lms", "dpm++"])
def test_img2img_matches_diffusers(components, pipe, scheduler_name):
    pipe.set_scheduler(scheduler_name)
    image = init_image()
    ours = pipe(**CALL, image=image, strength=0.6, num_inference_steps=5, generator=seeded(3),
                output_type="np").images
    theirs = diffusers_img2img(components, scheduler_name)(
        **CALL, image=image, strength=0.6, num_inference_steps=5, generator=seeded(3), output_type="np").images
    assert ours.shape == theirs.shape == (1, 32, 32, 3)
    assert np.abs(ours - theirs).max() <= 1e-4
    assert ours.std() > 0.01


def test_img2img_with_a_generator_per_image_matches_diffusers(components, pipe):
    pipe.set_scheduler("ddim")
    call = dict(**CALL, image=init_image(), strength=0.5, num_inference_steps=4, num_images_per_prompt=2,
                output_type="np")
    ours = pipe(**call, generator=[seeded(1), seeded(2)]).images
    theirs = diffusers_img2img(components, "ddim")(**call, generator=[seeded(1), seeded(2)]).images
    assert np.abs(ours - theirs).max() <= 1e-4
    # image i depends on its own generator alone
    alone = pipe(**{**call, "num_images_per_prompt": 1}, generator=[seeded(2)]).images
    assert np.abs(ours[1] - alone[0]).max() <= 1e-5


def test_strength_zero_returns_the_vae_round_trip(pipe):
    pipe.set_scheduler("euler")
    image = init_image()
    out = pipe(**CALL, image=image, strength=0.0, num_inference_steps=4, generator=seeded(5), output_type="pt").images
    pixels = pipe.image_processor.preprocess(image)  # (1, 3, 32, 32) in [-1, 1]
    z = pipe.vae.encode(pixels).latent_dist.sample(seeded(5))
    expected = pipe.image_processor.postprocess(pipe.vae.decode(z).sample, output_type="pt")
    # z is scaled by the VAE's scaling_factor and back on the way, hence float32 rounding, not exact equality
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("scheduler_name", ["ddim", "lms", "heun"])
def test_strength_one_is_text_to_image_from_the_same_noise(pipe, scheduler_name):
    pipe.set_scheduler(scheduler_name)
    text = pipe(**CALL, num_inference_steps=3, generator=seeded(7), output_type="pt").images
    edit = pipe(**CALL, image=init_image(), strength=1.0, num_inference_steps=3, generator=seeded(7),
                output_type="pt").images
    assert torch.equal(text, edit)


def count_denoiser_calls(pipe, **call) -> int:
    calls = []
    handle = pipe.denoiser.register_forward_hook(lambda *args: calls.append(1))
    try:
        pipe(**CALL, **call)
    finally:
        handle.remove()
    return len(calls)


@pytest.mark.parametrize("flow,name", [(False, n) for n in SCHEDULERS] + [(True, n) for n in FLOW_SCHEDULERS])
def test_every_sampler_runs_img2img_from_the_step_strength_picks(pipe, flow_pipe, flow, name):
    model = flow_pipe if flow else pipe
    image = init_image()
    model.set_scheduler(name)
    images = model(**CALL, image=image, strength=0.5, num_inference_steps=4, generator=seeded(0),
                   output_type="pt").images
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()
    # 2 of the 4 steps are skipped; Heun evaluates the model twice per step but the last (scheduler.order = 2)
    order = model.scheduler.order
    calls = count_denoiser_calls(model, image=image, strength=0.5, num_inference_steps=4, generator=seeded(0))
    full = count_denoiser_calls(model, num_inference_steps=4, generator=seeded(0))
    assert calls == full - 2 * order


def test_low_strength_stays_near_the_image(pipe):
    pipe.set_scheduler("euler")
    image = init_image()
    round_trip = pipe(**CALL, image=image, strength=0.0, num_inference_steps=10, generator=seeded(1),
                      output_type="pt").images
    low = pipe(**CALL, image=image, strength=0.2, num_inference_steps=10, generator=seeded(1), output_type="pt").images
    high = pipe(**CALL, image=image, strength=0.9, num_inference_steps=10, generator=seeded(1), output_type="pt").images
    assert (low - round_trip).abs().mean() < (high - round_trip).abs().mean()


def test_image_size_is_the_default_and_other_sizes_are_rounded_or_refused(pipe, tmp_path):
    pipe.set_scheduler("ddim")
    path = tmp_path / "in.png"
    init_image(40).crop((0, 0, 40, 37)).save(path)  # 40x37: not multiples of 8
    with pytest.warns(UserWarning, match=r"not a multiple of the VAE's factor 8: resized to 40x32"):
        out = pipe("a", image=str(path), strength=0.5, num_inference_steps=2, generator=seeded(0)).images
    assert out[0].size == (40, 32)
    out = pipe("a", image=str(path), strength=0.5, num_inference_steps=2, height=16, width=24).images
    assert out[0].size == (24, 16)
    tensor = torch.rand(1, 3, 24, 16)  # (B, 3, H, W) in [0, 1]
    assert pipe("a", image=tensor, strength=0.5, num_inference_steps=2).images[0].size == (16, 24)
    with pytest.raises(ValueError, match=r"image is 4x4 pixels; the VAE needs at least 8x8"):
        pipe("a", image=init_image(4), num_inference_steps=2)


def test_bad_img2img_inputs_are_refused_with_the_fix(pipe, tmp_path):
    with pytest.raises(ValueError, match=r"image: no file at .*missing.png"):
        pipe("a", image=str(tmp_path / "missing.png"))
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ValueError, match=r"is not an image PIL can read"):
        pipe("a", image=str(tmp_path / "text.png"))
    with pytest.raises(ValueError, match=r"strength=1.5 must be a number in \[0, 1\]"):
        pipe("a", image=init_image(), strength=1.5)
    with pytest.raises(ValueError, match=r"strength= needs image="):
        pipe("a", strength=0.5)
    with pytest.raises(ValueError, match=r"mask_image= needs image="):
        pipe("a", mask_image=init_image())
