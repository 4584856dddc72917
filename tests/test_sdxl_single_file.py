"""SDXL single files: the original (Stability AI sgm) layout of sd_xl_base_1.0.safetensors, written by
save_single_file and read by from_single_file, checked against diffusers' own single-file reader, against the
real base model's key names and sizes, and refused when a config of the other family is given."""
import dataclasses

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ldm import Pipeline
from ldm.cli import main as ldm_main
from ldm.models.presets import build_components, get_spec

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models on shared cores: one thread is faster
COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
SAME_WIDTHS = "both text encoders are 32 wide"


def sdxl_wide():
    """sdxl-tiny with a 40-wide second text encoder projecting to 24: diffusers' from_single_file tells SDXL's two
    encoders apart by width (768 and 1280 in the base model), so its parity test needs two widths."""
    spec = get_spec("sdxl-tiny")
    return dataclasses.replace(spec, name="sdxl-wide",
                               text_encoder_2=dict(spec.text_encoder_2, hidden_size=40, projection_dim=24),
                               unet=dict(spec.unet, cross_attention_dim=32 + 40,
                                         projection_class_embeddings_input_dim=24 + 6 * 8))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(sdxl-tiny pipeline, its folder, its single file)."""
    root = tmp_path_factory.mktemp("sdxl-tiny")
    pipe = Pipeline(**build_components("sdxl-tiny", seed=0))
    pipe.save_pretrained(root / "folder")
    with pytest.warns(UserWarning, match=SAME_WIDTHS):
        path = pipe.save_single_file(root / "model.safetensors")
    return pipe, str(root / "folder"), path


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl-wide")
    pipe = Pipeline(**build_components(sdxl_wide(), seed=1))
    pipe.save_pretrained(root / "folder")
    return pipe, str(root / "folder"), pipe.save_single_file(root / "model.safetensors")


def assert_same_weights(a, b):
    for name in COMPONENTS:
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys(), name
        for key in sa:
            assert torch.equal(sa[key].float(), sb[key].float()), f"{name}.{key}"


def sdxl_images(pipe, guidance_scale=5.0):
    """Images from diffusers' StableDiffusionXLPipeline over the pipeline's own modules, from fixed noise."""
    sampler = StableDiffusionXLPipeline(**{n: getattr(pipe, n) for n in COMPONENTS + ("tokenizer", "tokenizer_2")},
                                        scheduler=pipe.scheduler,
                                        force_zeros_for_empty_prompt=pipe.config.force_zeros_for_empty_prompt)
    sampler.set_progress_bar_config(disable=True)
    return sampler("a red circle", negative_prompt="blurry", guidance_scale=guidance_scale, num_inference_steps=3,
                   height=64, width=64, output_type="np", generator=torch.Generator().manual_seed(0)).images


def test_round_trip_gives_every_tensor_and_the_same_images(tiny):
    pipe, _, path = tiny
    back = Pipeline.from_single_file(path)
    assert back.is_sdxl and back.config.force_zeros_for_empty_prompt
    assert_same_weights(back, pipe)
    assert back.tokenizer.pad_token == pipe.tokenizer.pad_token and back.tokenizer_2.pad_token == "!"
    public = lambda scheduler: {k: v for k, v in scheduler.config.items() if not k.startswith("_")}  # noqa: E731
    assert type(back.scheduler) is type(pipe.scheduler) and public(back.scheduler) == public(pipe.scheduler)
    images = sdxl_images(pipe)
    assert images.std() > 0.01 and (sdxl_images(back) == images).all()


def test_our_pipeline_and_ldm_generate_sample_an_sdxl_file(tiny, tmp_path):
    _, folder, path = tiny
    call = dict(prompt="a red circle", negative_prompt="blurry", num_inference_steps=3, output_type="np")
    from_file, from_folder = Pipeline.from_single_file(path), Pipeline.from_pretrained(folder)
    images = from_folder(**call, generator=torch.Generator().manual_seed(0)).images
    assert np.array_equal(from_file(**call, generator=torch.Generator().manual_seed(0)).images, images)
    out = tmp_path / "file.png"
    assert ldm_main(["generate", "a red circle", "--model", path, "--steps", "2", "--seed", "1", "--out", str(out)]) == 0
    assert Image.open(out).size == (64, 64)


# Keys of sd_xl_base_1.0.safetensors with their shapes, written from sgm's module names (openaimodel.UNetModel with
# transformer depth (0, 2, 10), label_emb for the pooled text + size embedding; FrozenCLIPEmbedder and
# FrozenOpenCLIPEmbedder2 under conditioner.embedders) as diffusers' single-file reader maps them.
SDXL_BASE_KEYS = {
    "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
    "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
    "model.diffusion_model.input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
    "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight": (640, 640),
    "model.diffusion_model.input_blocks.4.1.proj_in.weight": (640, 640),
    "model.diffusion_model.input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight": (1280, 2048),
    "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
    "model.diffusion_model.label_emb.0.2.weight": (1280, 1280),
    "model.diffusion_model.middle_block.1.transformer_blocks.9.ff.net.2.weight": (1280, 5120),
    "model.diffusion_model.output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
    "model.diffusion_model.output_blocks.5.2.conv.weight": (640, 640, 3, 3),
    "model.diffusion_model.output_blocks.8.0.out_layers.3.weight": (320, 320, 3, 3),
    "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
    "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
    "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
    "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
    "conditioner.embedders.0.transformer.text_model.encoder.layers.11.self_attn.q_proj.weight": (768, 768),
    "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": (768,),
    "conditioner.embedders.1.model.positional_embedding": (77, 1280),
    "conditioner.embedders.1.model.text_projection": (1280, 1280),
    "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight": (3840, 1280),
    "conditioner.embedders.1.model.transformer.resblocks.31.mlp.c_fc.weight": (5120, 1280),
    "conditioner.embedders.1.model.ln_final.bias": (1280,),
}


def test_sdxl_base_layout_names_and_sizes():
    """The reader's expectations for the `sdxl` preset (meta device) are base 1.0's keys and shapes, and its UNet
    keys add up to the published 2,567,463,684 parameters."""
    from ldm.pipelines.single_file import expected_shapes, resolve_configs

    configs = resolve_configs({"conditioner.embedders.1.model.token_embedding.weight": torch.zeros(1)}, None, None,
                              None, None)
    assert configs.text_layout == "sdxl" and configs.unet["cross_attention_dim"] == 2048  # no config: base 1.0
    shapes = expected_shapes(configs)
    for key, shape in SDXL_BASE_KEYS.items():
        assert shapes.get(key) == shape, key
    unet = sum(torch.Size(s).numel() for k, s in shapes.items() if k.startswith("model.diffusion_model."))
    assert unet == 2_567_463_684
    assert not any(k.startswith("cond_stage_model.") for k in shapes)


def test_tiny_file_uses_the_same_names(tiny):
    """sdxl-tiny's file holds every key of the table that its depth has (2 levels, 2 transformer blocks, 2 text
    layers), under the same names."""
    _, _, path = tiny
    tensors = load_file(path)
    keys = tensors.keys()
    # what tools that repair "broken SDXL CLIP" files look for: CLIP-L's integer position ids (1, 77), bigG's logit_scale
    position_ids = tensors["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"]
    assert position_ids.tolist() == [list(range(77))] and not position_ids.is_floating_point()
    assert tensors["conditioner.embedders.1.model.logit_scale"].shape == ()
    deeper = ("input_blocks.7.", "transformer_blocks.9.", "output_blocks.5.", "output_blocks.8.", "layers.11.",
              "resblocks.31.")  # levels and layers that only the full-size model has
    shallow = [k for k in SDXL_BASE_KEYS if not any(part in k for part in deeper)]
    assert len(shallow) == 17 and all(k in keys for k in shallow)
    assert not any(".lora" in k or k.startswith("cond_stage_model.") for k in keys)


def test_diffusers_from_single_file_reads_our_file_as_our_folder(wide):
    """diffusers' StableDiffusionXLPipeline.from_single_file(our file, config=our folder, offline) holds our
    weights, and draws our images (with and without guidance)."""
    pipe, folder, path = wide
    theirs = StableDiffusionXLPipeline.from_single_file(path, config=folder, local_files_only=True)
    assert_same_weights(theirs, pipe)
    assert theirs.vae.config.scaling_factor == pipe.vae.config.scaling_factor == 0.13025
    for scale in (1.0, 5.0):
        assert (sdxl_images(theirs, scale) == sdxl_images(pipe, scale)).all()
    assert_same_weights(Pipeline.from_single_file(path), pipe)


def test_same_width_encoders_warn_because_diffusers_misreads_them(tiny):
    """The warning is true: with two 32-wide encoders, diffusers' reader fills text_encoder_2 from CLIP-L's keys
    (and leaves its projection unloaded); ldm reads the same file by prefix."""
    pipe, folder, path = tiny
    theirs = StableDiffusionXLPipeline.from_single_file(path, config=folder, local_files_only=True)
    first = pipe.text_encoder.state_dict()["embeddings.token_embedding.weight"]
    assert torch.equal(theirs.text_encoder_2.state_dict()["text_model.embeddings.token_embedding.weight"], first)
    assert_same_weights(Pipeline.from_single_file(path), pipe)


def bare(path, out):
    """The file without ldm's metadata, as real SDXL files come."""
    save_file(load_file(path), str(out))
    with safe_open(str(out), framework="pt") as f:
        assert "ldm_configs" not in (f.metadata() or {})
    return str(out)


def test_without_metadata_config_gives_the_architecture(tiny, tmp_path):
    pipe, folder, path = tiny
    plain = bare(path, tmp_path / "bare.safetensors")
    for config in ("sdxl-tiny", folder):
        assert_same_weights(Pipeline.from_single_file(plain, config=config), pipe)
    with pytest.raises(ValueError, match=r"input_blocks\.0\.0\.weight with shape \(32, 4, 3, 3\) but SDXL base's "
                                         r"architecture \(preset sdxl\) expects \(320, 4, 3, 3\)"):
        Pipeline.from_single_file(plain)


def test_a_config_of_the_other_family_is_refused(tiny, tmp_path):
    pipe, folder, path = tiny
    plain = bare(path, tmp_path / "bare.safetensors")
    with pytest.raises(ValueError, match=r"this file is SDXL .* config='sd15' is an SD 1\.x/2\.x architecture.*"
                                         r"pass config='sdxl'"):
        Pipeline.from_single_file(plain, config="sd15")
    sd1 = Pipeline(**build_components("tiny", seed=0))
    sd1.save_pretrained(tmp_path / "sd1")
    with pytest.raises(ValueError, match="this file is SDXL .* is an SD 1.x/2.x architecture"):
        Pipeline.from_single_file(plain, config=tmp_path / "sd1")
    sd1_file = sd1.save_single_file(tmp_path / "sd1.safetensors")
    for config in ("sdxl-tiny", folder):
        with pytest.raises(ValueError, match=r"is SDXL \(two text encoders\) but this file is SD 1\.x/2\.x"):
            Pipeline.from_single_file(sd1_file, config=config)
    refiner = {"conditioner.embedders.0.model.text_projection": torch.zeros(2, 2)}
    save_file(refiner, str(tmp_path / "refiner.safetensors"))
    with pytest.raises(ValueError, match="SDXL refiner file"):
        Pipeline.from_single_file(tmp_path / "refiner.safetensors")


def test_convert_command_both_directions(wide, tmp_path):
    pipe, folder, _ = wide
    out = tmp_path / "model.safetensors"
    assert ldm_main(["convert", "--model", folder, "--out", str(out), "--dtype", "float16"]) == 0
    assert load_file(out)["conditioner.embedders.1.model.text_projection"].dtype == torch.float16
    assert ldm_main(["convert", "--model", str(out), "--out", str(tmp_path / "back")]) == 0
    back = Pipeline.from_pretrained(tmp_path / "back")
    assert back.is_sdxl and back.text_encoder_2.config.hidden_size == 40
    projection = pipe.text_encoder_2.text_projection.weight.detach()
    assert torch.equal(back.text_encoder_2.text_projection.weight, projection.half().float())
    half = Pipeline.from_single_file(out, torch_dtype=torch.float16)
    assert {p.dtype for n in COMPONENTS for p in getattr(half, n).parameters()} == {torch.float16}
    assert torch.equal(half.text_encoder_2.text_projection.weight, projection.half())
