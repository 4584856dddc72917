"""Model presets build offline, quickly for tiny, and with Stable Diffusion's exact sizes for sd15."""
import time

import pytest
import torch

from ldm.models.presets import (MODEL_PRESETS, build_components, build_text_encoder, build_unet, build_vae,
                         count_parameters, get_spec)


def test_tiny_builds_fast_with_the_right_shapes():
    start = time.perf_counter()
    c = build_components("tiny")
    elapsed = time.perf_counter() - start
    assert elapsed < 5  # loose guard against accidental downloads or huge models, not a benchmark
    spec = get_spec("tiny")
    latents = torch.randn(1, 4, 8, 8)
    ids = c["tokenizer"]("a red circle", padding="max_length", max_length=77, return_tensors="pt").input_ids
    context = c["text_encoder"](ids)[0]
    assert context.shape == (1, 77, spec.unet["cross_attention_dim"])
    assert c["unet"](latents, 10, encoder_hidden_states=context).sample.shape == latents.shape
    image = torch.rand(1, 3, 64, 64) * 2 - 1
    assert c["vae"].encode(image).latent_dist.mean.shape == (1, 4, 64 // spec.vae_scale_factor, 64 // spec.vae_scale_factor)


@pytest.mark.slow
def test_sd15_has_stable_diffusion_15_parameter_counts():
    spec = get_spec("sd15")
    torch.manual_seed(0)
    unet, vae, text = build_unet(spec), build_vae(spec), build_text_encoder(spec)  # real random init, offline
    assert count_parameters(unet) == 859_520_964
    assert count_parameters(vae) == 83_653_863
    assert count_parameters(text) == 123_060_480
    assert spec.resolution // spec.vae_scale_factor == 64 and spec.text_encoder["hidden_size"] == 768
    assert unet.conv_in.weight.std() > 0  # randomly initialised, not empty


def test_sd21_sizes_on_meta_device():
    from accelerate import init_empty_weights

    spec = get_spec("sd21")
    with init_empty_weights():
        assert count_parameters(build_unet(spec)) == 865_910_724
        assert count_parameters(build_text_encoder(spec)) == 340_387_840


def test_sdxl_has_the_base_models_sizes_on_meta_device():
    """stabilityai/stable-diffusion-xl-base-1.0: UNet, VAE, CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 (+ projection)."""
    from accelerate import init_empty_weights

    from ldm.models.presets import build_text_encoder_2

    spec = get_spec("sdxl")
    with init_empty_weights():
        assert count_parameters(build_unet(spec)) == 2_567_463_684
        assert count_parameters(build_vae(spec)) == 83_653_863
        assert count_parameters(build_text_encoder(spec)) == 123_060_480
        assert count_parameters(build_text_encoder_2(spec)) == 694_659_840
    assert spec.vae["scaling_factor"] == 0.13025 and spec.resolution // spec.vae_scale_factor == 128
    assert spec.unet["cross_attention_dim"] == 768 + 1280 and spec.is_sdxl and not get_spec("sd15").is_sdxl


def test_sdxl_tiny_builds_both_tokenizers_and_encoders_offline():
    from ldm.models import sdxl
    from ldm.models.denoiser import denoise

    parts = build_components("sdxl-tiny")
    ids_1 = parts["tokenizer"]("a cat", padding="max_length", max_length=77, return_tensors="pt").input_ids
    ids_2 = parts["tokenizer_2"]("a cat", padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert ids_1[0, -1] == 49407 and ids_2[0, -1] == 0  # padded with <|endoftext|> and with "!", as SDXL's are
    context, pooled = sdxl.encode_text(parts["text_encoder"], parts["text_encoder_2"], ids_1, ids_2)
    assert context.shape == (1, 77, 64) and pooled.shape == (1, 32)
    x = torch.randn(1, 4, 8, 8)
    out = denoise(parts["unet"], x, torch.tensor([10]), context, pooled, sdxl.time_ids((64, 64), (0, 0), (64, 64))[None])
    assert out.shape == x.shape
    with pytest.raises(ValueError, match="time_ids"):
        denoise(parts["unet"], x, torch.tensor([10]), context)


def test_unknown_preset_lists_choices():
    with pytest.raises(ValueError, match=r"unknown model preset 'huge'; choose one of \[.*'sd15', 'sd15-inpaint', 'sd21', 'sdxl', 'sdxl-tiny', 'small', 'small-photo', 'small-photo-deep', 'tiny', 'tiny-inpaint'\]"):
        get_spec("huge")
    assert set(MODEL_PRESETS) >= {"tiny", "small", "sd15"}


def test_small_photo_is_small_with_a_wider_vae_and_the_same_latents():
    small, photo = get_spec("small"), get_spec("small-photo")
    assert photo.unet == small.unet and photo.text_encoder == small.text_encoder
    x = torch.zeros(1, 3, 32, 32)
    vae_small, vae_photo = build_vae(small), build_vae(photo)
    assert vae_photo.encode(x).latent_dist.mean.shape == vae_small.encode(x).latent_dist.mean.shape == (1, 4, 8, 8)
    assert sum(p.numel() for p in vae_photo.parameters()) == 954_567  # 4x small's 242,327


def test_small_photo_deep_is_small_photo_with_deeper_levels_and_the_same_latents():
    photo, deep = get_spec("small-photo"), get_spec("small-photo-deep")
    assert deep.unet == photo.unet and deep.text_encoder == photo.text_encoder
    assert deep.vae == dict(photo.vae, layers_per_block=2)
    vae = build_vae(deep)
    assert vae.encode(torch.zeros(1, 3, 32, 32)).latent_dist.mean.shape == (1, 4, 8, 8)
    assert len(vae.decoder.up_blocks[0].resnets) == 3 and len(vae.encoder.down_blocks[0].resnets) == 2
    assert sum(p.numel() for p in vae.parameters()) == 1_288_263


def head_widths(unet) -> set[int]:
    """Channels per attention head over every attention layer of a UNet."""
    from diffusers.models.attention_processor import Attention

    return {m.inner_dim // m.heads for m in unet.modules() if isinstance(m, Attention)}


def test_attention_heads_are_as_wide_as_intended():
    """diffusers reads UNet2DConditionModel's `attention_head_dim` as the number of heads (SD 1.x's naming), so
    a preset that means 16-channel heads must pass head counts. `small` once had 16 heads of 2 and 4 channels."""
    from accelerate import init_empty_weights

    assert head_widths(build_unet(get_spec("small"))) == {16}
    with init_empty_weights():
        assert head_widths(build_unet(get_spec("sd15"))) == {40, 80, 160}  # SD 1.5: 8 heads in every block
        assert head_widths(build_unet(get_spec("sd21"))) == {64}  # SD 2.1: 64-channel heads
