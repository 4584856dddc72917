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
from ldm.cli import main as ldm_main
from ldm.models.presets import _clip_text, _latent_scheduler, build_components, tiny

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models on shared cores: one thread is faster
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
        assert np.abs(images(Pipeline.from_pretrained(folder), family) - a).max() <= 1e-5


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
        # SD 2.x reads the tower's penultimate layer: a 2-layer CLIPTextModel is a 3-block tower, as real files hold
        assert "cond_stage_model.model.transformer.resblocks.2.attn.in_proj_weight" in keys
        assert not any(k.startswith("cond_stage_model.transformer.") for k in keys)
        return
    assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in keys
    assert "cond_stage_model.transformer.text_model.encoder.layers.1.self_attn.q_proj.weight" in keys
    assert not any(k.startswith("cond_stage_model.transformer.embeddings.") for k in keys)
    assert not any(k.startswith("cond_stage_model.transformer.encoder.") for k in keys)
    assert load_file(path)["model.diffusion_model.input_blocks.0.0.weight"].shape[1] == (9 if family == "inpaint" else 4)


# ------------------------------------------------------------------ files ldm did not write, and bad files

def rewrite(src, dst, change=None, keep_metadata=True):
    """Copies a single file with its tensors passed through `change` (a function of the dict)."""
    with safe_open(src, framework="pt") as f:
        metadata = f.metadata()
    state = load_file(src)
    state = change(state) if change else state
    save_file(state, dst, metadata=metadata if keep_metadata else None)
    return str(dst)


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd1")
    pipe = Pipeline(**build_components("tiny", seed=0))
    pipe.save_pretrained(root / "folder")
    return pipe, str(root / "folder"), pipe.save_single_file(root / "model.safetensors")


def test_without_metadata_the_architecture_comes_from_config(sd1, tmp_path):
    """A file without ldm's metadata (as real files are) is read with config= a preset or a folder; without one,
    its keys say SD 1.x, and the first tensor whose shape differs from sd15's is named."""
    pipe, folder, path = sd1
    bare = rewrite(path, tmp_path / "bare.safetensors", keep_metadata=False)
    for config in ("tiny", folder):
        assert_same_weights(Pipeline.from_single_file(bare, config=config), pipe)
    with pytest.raises(ValueError, match=r"model\.diffusion_model\.input_blocks\.0\.0\.weight with shape "
                                         r"\(32, 4, 3, 3\) but Stable Diffusion 1\.x's architecture \(preset "
                                         r"sd15\) expects \(320, 4, 3, 3\)"):
        Pipeline.from_single_file(bare)


def test_a_missing_key_is_named_before_anything_is_built(sd1, tmp_path):
    _, _, path = sd1
    key = "first_stage_model.decoder.mid.attn_1.q.weight"
    bad = rewrite(path, tmp_path / "missing.safetensors", lambda s: {k: v for k, v in s.items() if k != key})
    with pytest.raises(ValueError, match=rf"lacks {key.replace('.', '[.]')} \(expected shape \(16, 16, 1, 1\)"):
        Pipeline.from_single_file(bad)


def test_a_misshapen_key_is_named(sd1, tmp_path):
    _, _, path = sd1
    key = "cond_stage_model.transformer.text_model.encoder.layers.1.mlp.fc1.weight"
    bad = rewrite(path, tmp_path / "shape.safetensors", lambda s: {**s, key: torch.zeros(65, 32)})
    with pytest.raises(ValueError, match=rf"{key.replace('.', '[.]')} with shape \(65, 32\) but .* expects \(64, 32\)"):
        Pipeline.from_single_file(bad)


def test_pickled_checkpoints_are_refused_unless_allowed(sd1, tmp_path):
    pipe, folder, path = sd1
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": load_file(path), "global_step": 10}, ckpt)
    with pytest.raises(ValueError, match="pickled checkpoint.*allow_pickle=True"):
        Pipeline.from_single_file(ckpt, config=folder)
    with pytest.warns(UserWarning, match="weights_only=False"):
        assert_same_weights(Pipeline.from_single_file(ckpt, config=folder, allow_pickle=True), pipe)


def test_text_encoder_written_without_text_model_prefix_is_read_with_a_warning(sd1, tmp_path):
    """The transformers-5 trap: a blind map of our folder writes cond_stage_model.transformer.embeddings...;
    such a file still reads (with a warning saying A1111 and ComfyUI expect text_model.)."""
    pipe, _, path = sd1
    prefix = "cond_stage_model.transformer.text_model."
    trap = rewrite(path, tmp_path / "trap.safetensors", lambda s: {
        (k.replace(prefix, "cond_stage_model.transformer.") if k.startswith(prefix) else k): v for k, v in s.items()})
    assert "cond_stage_model.transformer.embeddings.token_embedding.weight" in load_file(trap)
    with pytest.warns(UserWarning, match="lack 'text_model.'"):
        assert_same_weights(Pipeline.from_single_file(trap), pipe)


def test_float16_halves_the_file_and_loads(sd1, tmp_path):
    pipe, _, path = sd1
    half = pipe.save_single_file(tmp_path / "half.safetensors", dtype=torch.float16)
    assert load_file(half)["model.diffusion_model.out.2.weight"].dtype == torch.float16
    assert 0.45 < os.path.getsize(half) / os.path.getsize(path) < 0.55
    (tmp_path / "plain").write_bytes(b"")
    assert os.stat(half).st_mode & 0o777 == os.stat(tmp_path / "plain").st_mode & 0o777  # not mkstemp's 0600
    loaded = Pipeline.from_single_file(half)
    assert loaded.unet.dtype == torch.float32  # read as float32 unless torch_dtype says otherwise
    expected = pipe.unet.conv_in.weight.detach().half().float()
    assert torch.equal(loaded.unet.conv_in.weight, expected)
    assert Pipeline.from_single_file(half, torch_dtype=torch.float16).unet.dtype == torch.float16


def test_transformer_pipelines_and_other_suffixes_are_refused(sd1, tmp_path):
    dit = Pipeline(**build_components("dit-tiny", seed=0))
    with pytest.raises(ValueError, match="transformer backbone.*no original Stable Diffusion single-file layout"):
        dit.save_single_file(tmp_path / "dit.safetensors")
    with pytest.raises(ValueError, match="written as .safetensors"):
        sd1[0].save_single_file(tmp_path / "model.ckpt")
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_demo_sized_unet_extensions_round_trip(tmp_path):
    """The `small` preset's pooled-text embedding has no original name: it is written under its diffusers name
    (with a warning that other tools ignore it) and read back by ldm."""
    pipe = Pipeline(**build_components("small", seed=0))
    with pytest.warns(UserWarning, match="add_embedding"):
        path = pipe.save_single_file(tmp_path / "small.safetensors")
    assert "model.diffusion_model.add_embedding.norm1.weight" in load_file(path)
    assert_same_weights(Pipeline.from_single_file(path), pipe)


def test_sd15_key_manifest_matches_the_real_v1_5_file():
    """The keys and shapes we would write for the sd15 preset (built on the meta device: no memory), against
    what the real v1-5 file holds: every UNet/VAE/CLIP tensor by its original name."""
    from ldm.pipelines.single_file import _configs_from, expected_shapes

    shapes = expected_shapes(_configs_from("sd15"))
    count = lambda prefix: sum(k.startswith(prefix) for k in shapes)  # noqa: E731
    assert (count("model.diffusion_model."), count("first_stage_model."), count("cond_stage_model.")) == (686, 248, 196)
    known = {"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
             "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
             "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
             "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight": (1280, 768),
             "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
             "model.diffusion_model.output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
             "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
             "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
             "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
             "first_stage_model.quant_conv.weight": (8, 8, 1, 1),
             "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
             "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight": (768, 3072),
             "cond_stage_model.transformer.text_model.final_layer_norm.weight": (768,)}
    assert {k: shapes.get(k) for k in known} == known
    sd21 = expected_shapes(_configs_from("sd21"))
    assert sd21["model.diffusion_model.input_blocks.1.1.proj_in.weight"] == (320, 320)  # linear projections
    assert sd21["cond_stage_model.model.transformer.resblocks.22.attn.in_proj_weight"] == (3072, 1024)
    assert sd21["cond_stage_model.model.token_embedding.weight"] == (49408, 1024)


def test_convert_command_both_directions(sd1, tmp_path, capsys):
    pipe, folder, _ = sd1
    out = tmp_path / "model.safetensors"
    assert ldm_main(["convert", "--model", folder, "--out", str(out), "--dtype", "float16"]) == 0
    assert load_file(out)["model.diffusion_model.out.2.weight"].dtype == torch.float16
    assert ldm_main(["convert", "--model", str(out), "--out", str(tmp_path / "back"),
                     "--prediction-type", "v_prediction"]) == 0
    back = Pipeline.from_pretrained(tmp_path / "back")
    assert back.scheduler.config.prediction_type == "v_prediction"
    assert torch.equal(back.unet.conv_in.weight, pipe.unet.conv_in.weight.detach().half().float())
    assert ldm_main(["convert", "--model", folder, "--out", str(tmp_path / "folder2")]) == 2
    assert "both folders" in capsys.readouterr().err
    # `ldm generate` takes the single file as its model
    assert ldm_main(["generate", "x", "--model", str(out), "--steps", "1", "--out", str(tmp_path / "a.png")]) == 0
    assert (tmp_path / "a.png").is_file()


# ------------------------------------------------------------------ a file made by diffusers' conversion script

SCRIPT_FILE = os.path.join(FIXTURES, "sd1-tiny-diffusers-script.safetensors")
SCRIPT_CONFIG = os.path.join(FIXTURES, "sd1-tiny-config")


def test_file_from_diffusers_conversion_script_reads_as_its_source_folder(tmp_path):
    """tests/fixtures/README.md: the script's file, read with config= its folder's configs, holds the source
    folder's weights (rebuilt here from its seed) and draws its images."""
    from fixtures.make_sd1_script_fixture import build_source

    build_source(str(tmp_path / "source"))
    source = Pipeline.from_pretrained(tmp_path / "source")
    ours = Pipeline.from_single_file(SCRIPT_FILE, config=SCRIPT_CONFIG)
    assert_same_weights(ours, source)
    assert np.abs(images(ours, "sd1") - images(source, "sd1")).max() <= 1e-5
    # diffusers' own reader of the same file agrees (the tokenizer passed: the config folder has none)
    theirs = StableDiffusionPipeline.from_single_file(SCRIPT_FILE, config=SCRIPT_CONFIG, local_files_only=True,
                                                      safety_checker=None, tokenizer=ours.tokenizer)
    assert_same_weights(theirs, ours)
    assert np.abs(images(theirs, "sd1") - images(ours, "sd1")).max() <= 1e-5
    with safe_open(SCRIPT_FILE, framework="pt") as f:
        assert "ldm_configs" not in (f.metadata() or {})  # not ours: the configs came from config=


# ------------------------------------------------------------------ SD 2.x: the OpenCLIP tower, and what is guessed

def test_open_clip_tower_is_written_as_sd2_files_hold_it(tmp_path):
    """A pipeline on our OpenCLIPTextEncoder (penultimate layer) writes its whole tower, last block and
    text_projection included; diffusers and ldm read back a CLIPTextModel with the same output."""
    from ldm.models.text_encoders import OpenCLIPTextEncoder
    from ldm.models.tokenizer import build_clip_tokenizer

    components = build_components(sd2_like(), seed=0)
    torch.manual_seed(0)
    tower = OpenCLIPTextEncoder.from_config({"embed_dim": 16, "text_cfg": dict(
        context_length=77, vocab_size=49408, width=32, heads=4, layers=3)})
    pipe = Pipeline(**{**components, "text_encoder": tower, "tokenizer": build_clip_tokenizer("!")})
    pipe.save_pretrained(tmp_path / "folder")
    path = pipe.save_single_file(tmp_path / "sd2.safetensors")
    state = load_file(path)
    for key, value in tower.tower.state_dict().items():
        if key != "attn_mask":
            assert torch.equal(state["cond_stage_model.model." + key], value), key
    ids = pipe.tokenizer(["a red circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    expected = tower(ids)[0]
    theirs = StableDiffusionPipeline.from_single_file(path, config=str(tmp_path / "folder"), local_files_only=True,
                                                      safety_checker=None)
    for reader in (theirs, Pipeline.from_single_file(path)):
        assert torch.allclose(reader.text_encoder(ids)[0], expected, atol=1e-5)


def test_what_a_file_without_configs_is_taken_for():
    """Keys tell SD 1.x from 2.x and a 9-channel inpainting conv_in; the prediction type and 2.x's size follow
    diffusers' guess (768 px v-prediction, except 2.0-base's global_step 875000 and inpainting: 512 px epsilon);
    prediction_type= overrides."""
    from ldm.pipelines.single_file import resolve_configs

    def file(family, channels=4):
        text = ("cond_stage_model.model.token_embedding.weight" if family == "sd2"
                else "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight")
        return {text: torch.zeros(1), "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, channels, 3, 3)}

    def guess(state, **kwargs):
        c = resolve_configs(state, None, kwargs.pop("config", None), kwargs.pop("prediction_type", None),
                            kwargs.pop("global_step", None))
        return c.text_layout, c.unet["in_channels"], c.unet["sample_size"], c.scheduler["prediction_type"]

    assert guess(file("sd1")) == ("clip", 4, 64, "epsilon")
    assert guess(file("sd1", 9)) == ("clip", 9, 64, "epsilon")
    assert guess(file("sd2")) == ("open_clip", 4, 96, "v_prediction")
    assert guess(file("sd2"), global_step=875000) == ("open_clip", 4, 64, "epsilon")
    assert guess(file("sd2", 9)) == ("open_clip", 9, 64, "epsilon")
    assert guess(file("sd2"), prediction_type="epsilon")[3] == "epsilon"
    assert guess(file("sd1", 9), config="sd15")[1] == 9  # a preset adopts the inpainting conv_in
    with pytest.raises(ValueError, match="prediction_type='x0' must be one of epsilon, v_prediction"):
        guess(file("sd1"), prediction_type="x0")
    with pytest.raises(ValueError, match="no Stable Diffusion text encoder.*SD3, Flux are not supported"):
        guess({"text_encoders.clip_l.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(1)})


def test_a_layout_diffusers_reader_would_misread_is_refused_before_writing(sd1, tmp_path, monkeypatch):
    """Every save reads its tensors back with diffusers' reader (which A1111's layout follows): a key map it would
    misread (here the mid block's second resnet moved to middle_block.3, past the reader's count) is refused,
    naming the tensor, and nothing is written."""
    from ldm.pipelines import original_layout

    real = original_layout.unet_prefix_map
    monkeypatch.setattr(original_layout, "unet_prefix_map",
                        lambda config: {**real(config), "mid_block.resnets.1.": "middle_block.3."})
    with pytest.raises(ValueError, match=r"UNet's mid_block\.resnets\.1\..* has no place in the original"):
        sd1[0].save_single_file(tmp_path / "m.safetensors")
    assert not list(tmp_path.iterdir())
    # and a real architecture diffusers' reader cannot take: a timestep class embedding it expects as label_emb
    spec = tiny()
    odd = Pipeline(**build_components(dataclasses.replace(spec, unet=dict(spec.unet, class_embed_type="timestep"))))
    with pytest.warns(UserWarning, match="class_embedding"), pytest.raises(ValueError, match="label_emb"):
        odd.save_single_file(tmp_path / "m.safetensors")
    assert not list(tmp_path.iterdir())
