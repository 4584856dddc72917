"""Pipeline behaviour: folders both ways, scheduler names, guidance, trace, outputs, callbacks."""
import os

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline

from ldm import Pipeline, StepRecord
from ldm.models.presets import build_components
from ldm.pipelines.schedulers import SCHEDULERS

from conftest import seeded

pytestmark = pytest.mark.usefixtures("one_thread")


def test_opens_folder_written_by_diffusers(tmp_path):
    c = build_components("tiny", seed=3)
    sd = StableDiffusionPipeline(**c, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    sd.save_pretrained(tmp_path / "sd")
    pipe = Pipeline.from_pretrained(tmp_path / "sd")
    for name in ("unet", "vae", "text_encoder"):
        ours, ref = getattr(pipe, name).state_dict(), getattr(sd, name).state_dict()
        assert all(torch.equal(ours[k], ref[k]) for k in ref)


def test_diffusers_opens_our_folder_without_arguments(tiny_folder):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(tiny_folder, local_files_only=True)
    assert isinstance(pipe, StableDiffusionPipeline) and pipe.safety_checker is None


def test_saved_folder_uses_safetensors_and_latent_friendly_scheduler(tiny_folder):
    for sub, name in (("unet", "diffusion_pytorch_model.safetensors"), ("vae", "diffusion_pytorch_model.safetensors"),
                      ("text_encoder", "model.safetensors")):
        assert os.path.exists(os.path.join(tiny_folder, sub, name))
    assert Pipeline.from_pretrained(tiny_folder).scheduler.config.clip_sample is False


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_scheduler_names(tiny_pipe, tiny_folder, name):
    cls = SCHEDULERS[name][0]
    tiny_pipe.set_scheduler(name)
    assert type(tiny_pipe.scheduler) is cls
    assert tiny_pipe.scheduler.config.beta_schedule == "scaled_linear"  # the model's schedule is kept
    images = tiny_pipe("a red circle", num_inference_steps=3, output_type="np", generator=seeded()).images
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()


def test_scheduler_by_name_at_load_and_by_assignment(tiny_folder, tiny_pipe):
    assert type(Pipeline.from_pretrained(tiny_folder, scheduler="lms").scheduler).__name__ == "LMSDiscreteScheduler"
    tiny_pipe.scheduler = EulerDiscreteScheduler.from_config(tiny_pipe.scheduler.config)
    out = tiny_pipe("a red circle", num_inference_steps=3, output_type="np", generator=seeded()).images
    assert np.isfinite(out).all()
    tiny_pipe.set_scheduler("ddim")  # chains back with the original schedule (set_alpha_to_one kept)
    assert isinstance(tiny_pipe.scheduler, DDIMScheduler) and tiny_pipe.scheduler.config.set_alpha_to_one is False


class CountCalls:
    def __init__(self, unet):
        self.calls, self.batch = 0, []
        self.handle = unet.register_forward_hook(self.hook)

    def hook(self, module, args, output):
        self.calls += 1
        self.batch.append(args[0].shape[0])


@pytest.mark.parametrize("scale, batch_per_call", [(1.0, 2), (0.5, 2), (7.5, 4)])
def test_unet_calls_per_step(tiny_pipe, scale, batch_per_call):
    counter = CountCalls(tiny_pipe.unet)
    tiny_pipe(["a", "b"], num_inference_steps=4, guidance_scale=scale, output_type="latent")
    assert counter.calls == 4  # one UNet call per step; guidance batches both branches
    assert counter.batch == [batch_per_call] * 4


def test_trace_has_one_record_per_step_with_documented_fields(tiny_pipe):
    out = tiny_pipe(["a red circle"], num_inference_steps=5, num_images_per_prompt=2, output_type="latent",
                    trace=True, generator=seeded())
    assert len(out.trace) == 5
    for i, record in enumerate(out.trace):
        assert isinstance(record, StepRecord) and record.step == i
        assert {f for f in StepRecord.FIELDS} == set(vars(record))
        for field in ("latents", "x0_pred", "noise_pred", "noise_pred_cond", "noise_pred_uncond"):
            assert getattr(record, field).shape == (2, 4, 8, 8)
        assert torch.allclose(record.noise_pred, record.noise_pred_uncond
                              + 7.5 * (record.noise_pred_cond - record.noise_pred_uncond), atol=1e-5)
    assert [r.timestep for r in out.trace] == sorted([r.timestep for r in out.trace], reverse=True)
    no_cfg = tiny_pipe("x", num_inference_steps=2, guidance_scale=1.0, output_type="latent", trace=True)
    assert no_cfg.trace[0].noise_pred_uncond is None
    assert tiny_pipe("x", num_inference_steps=2, output_type="latent").trace is None


def test_output_types(tiny_pipe):
    kw = dict(prompt="a red circle", num_inference_steps=2)
    pil = tiny_pipe(**kw, generator=seeded()).images
    np_images = tiny_pipe(**kw, output_type="np", generator=seeded()).images
    pt = tiny_pipe(**kw, output_type="pt", generator=seeded()).images
    latent = tiny_pipe(**kw, output_type="latent", generator=seeded()).images
    assert isinstance(pil[0], PIL.Image.Image) and pil[0].size == (64, 64)
    assert np_images.shape == (1, 64, 64, 3) and 0 <= np_images.min() and np_images.max() <= 1
    assert pt.shape == (1, 3, 64, 64) and np.allclose(pt.permute(0, 2, 3, 1).numpy(), np_images, atol=1e-6)
    assert latent.shape == (1, 4, 8, 8)


def test_user_latents_and_non_square_size(tiny_pipe):
    latents = torch.randn(2, 4, 4, 12, generator=seeded())
    a = tiny_pipe("x", height=32, width=96, num_images_per_prompt=2, latents=latents, num_inference_steps=2,
                  output_type="np").images
    b = tiny_pipe("x", height=32, width=96, num_images_per_prompt=2, latents=latents.clone(), num_inference_steps=2,
                  output_type="np").images
    assert a.shape == (2, 32, 96, 3) and np.array_equal(a, b)


def test_callback_on_step_end_can_replace_latents(tiny_pipe):
    seen = []

    def callback(pipe, i, t, tensors):
        seen.append((i, int(t)))
        return {"latents": torch.zeros_like(tensors["latents"])}

    out = tiny_pipe("x", num_inference_steps=3, output_type="latent", callback_on_step_end=callback)
    assert [i for i, _ in seen] == [0, 1, 2] and torch.count_nonzero(out.images) == 0


def test_negative_prompt_changes_the_result(tiny_pipe):
    a = tiny_pipe("a red circle", num_inference_steps=3, output_type="np", generator=seeded()).images
    b = tiny_pipe("a red circle", negative_prompt="a blue square", num_inference_steps=3, output_type="np",
                  generator=seeded()).images
    assert np.abs(a - b).max() > 1e-3


def test_enable_xformers_explains_why_not(tiny_pipe):
    with pytest.raises(RuntimeError, match="xformers (is not installed|needs a CUDA device)"):
        tiny_pipe.enable_xformers()


def test_clip_skip_applies_to_both_branches(tiny_pipe):
    cond, uncond = tiny_pipe.encode_prompt(["a red circle"], ["blue"], 1, True, clip_skip=1)
    te = tiny_pipe.text_encoder
    for text, got in (("a red circle", cond), ("blue", uncond)):
        hidden = te(tiny_pipe._tokenize([text]).ids, output_hidden_states=True).hidden_states[-2]
        assert torch.allclose(got, te.final_layer_norm(hidden), atol=1e-6)


def test_memory_options_keep_the_images(tiny_pipe):
    kw = dict(prompt=["a red circle", "a blue square"], num_inference_steps=3, output_type="np")
    a = tiny_pipe(**kw, generator=seeded()).images
    tiny_pipe.enable_attention_slicing(1)
    tiny_pipe.vae.enable_slicing()
    tiny_pipe.vae.enable_tiling()
    b = tiny_pipe(**kw, generator=seeded()).images
    assert np.abs(a - b).max() <= 1e-4


@pytest.mark.slow
def test_compiled_unet_gives_the_same_images_on_cpu(tiny_pipe, tmp_path):
    kw = dict(prompt="a red circle", num_inference_steps=2, output_type="np")
    a = tiny_pipe(**kw, generator=seeded()).images
    b = tiny_pipe.compile()(**kw, generator=seeded()).images
    assert np.abs(a - b).max() <= 1e-4
    tiny_pipe.save_pretrained(tmp_path / "saved")  # a compiled pipeline still saves a plain folder
    assert Pipeline.from_pretrained(tmp_path / "saved").unet.config.sample_size == 8


@pytest.mark.slow
def test_fused_qkv_and_channels_last_keep_the_images_and_refuse_to_save(tiny_pipe, tmp_path):
    kw = dict(prompt="a red circle", num_inference_steps=2, output_type="np")
    modes = []
    tiny_pipe.vae.decoder.register_forward_hook(
        lambda m, i, o: modes.append((torch.is_inference_mode_enabled(), torch.is_grad_enabled())) and None)
    a = tiny_pipe(**kw, generator=seeded()).images
    # backend="eager" runs TorchDynamo's capture without Inductor's code generation: seconds, not minutes
    b = tiny_pipe.compile(channels_last=True, fuse_qkv=True, backend="eager")(**kw, generator=seeded()).images
    assert np.abs(a - b).max() <= 1e-4
    assert modes == [(True, False), (False, False)]  # a compiled UNet's pipeline runs under no_grad
    assert any(getattr(m, "fused_projections", False) for m in tiny_pipe.unet.modules())
    with pytest.raises(RuntimeError, match="save the pipeline before fusing"):
        tiny_pipe.save_pretrained(tmp_path / "fused")
    assert not (tmp_path / "fused").exists()  # nothing half-written


def test_calls_run_in_inference_mode_and_return_ordinary_tensors(tiny_pipe):
    modes = []
    tiny_pipe.unet.register_forward_hook(lambda m, i, o: modes.append(torch.is_inference_mode_enabled()) and None)
    out = tiny_pipe("a red circle", num_inference_steps=2, output_type="pt", trace=True, generator=seeded())
    latents = tiny_pipe("a red circle", num_inference_steps=2, output_type="latent", generator=seeded()).images
    assert modes and all(modes)  # no autograd bookkeeping inside the loop
    tensors = [out.images, latents] + [getattr(r, f) for r in out.trace for f in ("latents", "x0_pred", "noise_pred")]
    assert not any(t.is_inference() for t in tensors)
    weight = torch.ones((), requires_grad=True)
    (out.images * weight).sum().backward()  # inference tensors would be refused here
    assert weight.grad is not None
