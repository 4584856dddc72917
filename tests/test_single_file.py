"""Single-file checkpoints: the original Stable Diffusion layout written by save_single_file and read by
from_single_file, checked against diffusers' own single-file reader and against a file made by diffusers'
conversion script (tests/fixtures/README.md)."""
import dataclasses
import json
import os

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ldm import Pipeline
from ldm.models.presets import _clip_text, _latent_scheduler, build_components, tiny

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
CALL = dict(prompt="a red circle on the left", negative_prompt="blurry", guidance_scale=5.0, num_inference_steps=4,
            height=64, width=64, output_type="np")


def sd2_like():
    """tiny with SD 2.x's traits: an OpenCLIP-style text tower (gelu, padded with "!"), linear attention
    projections, v-prediction."""
    spec = tiny()
    return dataclasses.replace(spec, name="tiny-sd2", unet=dict(spec.unet, use_linear_projection=True),
                               text_encoder=_clip_text(hidden=32, layers=2, heads=4, intermediate=64, act="gelu",
                                                       pad_token_id=0),
                               tokenizer_pad_token="!", scheduler=_latent_scheduler(prediction_type="v_prediction"))


def inpaint_like():
    """tiny with a 9-channel conv_in (latents, mask, masked-image latents), as SD's inpainting UNets."""
    spec = tiny()
    return dataclasses.replace(spec, name="tiny-inpaint", unet=dict(spec.unet, in_channels=9))


FAMILIES = {"sd1": tiny, "sd2": sd2_like, "inpaint": inpaint_like}


@pytest.fixture(scope="module", params=list(FAMILIES))
def saved(request, tmp_path_factory):
    """(family, our folder, the single file save_single_file wrote from it)."""
    root = tmp_path_factory.mktemp(request.param)
    pipe = Pipeline(**build_components(FAMILIES[request.param](), seed=0))
    pipe.save_pretrained(root / "folder")
    pipe.save_single_file(root / "model.safetensors")
    return request.param, str(root / "folder"), str(root / "model.safetensors")


def images(pipe, family):
    pipe.set_progress_bar_config(disable=True)
    call = dict(CALL, generator=torch.Generator().manual_seed(0))
    if family == "inpaint":  # diffusers' inpainting pipeline: the same noise, an image and a mask
        image = torch.linspace(0, 1, 3 * 64 * 64).reshape(1, 3, 64, 64)
        mask = torch.zeros(1, 1, 64, 64)
        mask[..., 16:48, 16:48] = 1
        call.update(image=image, mask_image=mask)
    return pipe(**call).images


def diffusers_class(family):
    return StableDiffusionInpaintPipeline if family == "inpaint" else StableDiffusionPipeline


def assert_same_weights(a, b):
    for name in ("unet", "vae", "text_encoder"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys(), name
        for key in sa:
            assert torch.equal(sa[key].float(), sb[key].float()), f"{name}.{key}"


def test_diffusers_reads_our_file_as_our_folder(saved):
    """diffusers' from_single_file, given our folder as its (local, offline) config, rebuilds the same weights
    and the same images as our folder."""
    family, folder, path = saved
    cls = diffusers_class(family)
    from_file = cls.from_single_file(path, config=folder, local_files_only=True, safety_checker=None)
    from_folder = cls.from_pretrained(folder, local_files_only=True, safety_checker=None)
    assert_same_weights(from_file, from_folder)
    assert from_file.scheduler.config.prediction_type == from_folder.scheduler.config.prediction_type
    a, b = images(from_file, family), images(from_folder, family)
    assert a.std() > 0.01 and np.abs(a - b).max() <= 1e-5
    if family != "inpaint":  # and our pipeline draws the same images from the folder
        assert np.abs(images(Pipeline.from_pretrained(folder), family) - a).max() <= 1e-4


def test_our_reader_round_trips(saved):
    """Our from_single_file (configs from the file's metadata) gives back the folder's weights, schedule,
    tokenizer padding and images."""
    family, folder, path = saved
    ours = Pipeline.from_single_file(path)
    original = Pipeline.from_pretrained(folder)
    assert_same_weights(ours, original)
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(ours.scheduler.config) == public(original.scheduler.config)
    assert ours.tokenizer.pad_token == original.tokenizer.pad_token
    if family == "inpaint":
        theirs = diffusers_class(family).from_pretrained(folder, local_files_only=True, safety_checker=None)
        ours_in_diffusers = diffusers_class(family)(**{n: getattr(ours, n) for n in
                                                       ("vae", "text_encoder", "tokenizer", "unet", "scheduler")},
                                                    safety_checker=None, feature_extractor=None,
                                                    requires_safety_checker=False)
        assert np.abs(images(ours_in_diffusers, family) - images(theirs, family)).max() <= 1e-5
    else:
        assert np.abs(images(ours, family) - images(original, family)).max() <= 1e-5


def test_sd1_text_encoder_keys_have_text_model_prefix(saved):
    """transformers 5 saves CLIPTextModel without `text_model.`; real SD 1.x files (A1111, ComfyUI) have it."""
    family, _, path = saved
    keys = set(load_file(path))
    if family == "sd2":
        assert "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in keys
        assert "cond_stage_model.model.token_embedding.weight" in keys
        assert not any(k.startswith("cond_stage_model.transformer.") for k in keys)
        return
    assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in keys
    assert "cond_stage_model.transformer.text_model.encoder.layers.1.self_attn.q_proj.weight" in keys
    assert not any(k.startswith("cond_stage_model.transformer.embeddings.") for k in keys)
    assert not any(k.startswith("cond_stage_model.transformer.encoder.") for k in keys)
    assert load_file(path)["model.diffusion_model.input_blocks.0.0.weight"].shape[1] == (9 if family == "inpaint" else 4)
