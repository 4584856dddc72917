"""LoRA files: diffusers format (loads in diffusers and in ldm.Pipeline), kohya/web-UI export, merge, scale."""
import os

import pytest
import torch

from ldm.models.lora import LoraSettings, add_lora, kohya_key, read_lora_file, save_lora, save_webui_lora
from ldm.pipelines.lora import merge_lora


pytestmark = pytest.mark.usefixtures("one_thread")


def run(pipe, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    return pipe("a red circle", num_inference_steps=4, guidance_scale=4.0, output_type="np",
                generator=torch.Generator().manual_seed(0), **kwargs).images


@pytest.fixture(scope="module")
def adapted(tmp_path_factory):
    """A tiny base folder, and a pipeline with random (non-zero) LoRA adapters on the UNet and text encoder."""
    from ldm import Pipeline
    from ldm.models.presets import build_components

    root = tmp_path_factory.mktemp("lora")
    parts = build_components("tiny", seed=0)
    Pipeline(**parts).save_pretrained(root / "base")
    params = add_lora(parts["unet"], parts["text_encoder"], LoraSettings(rank=4, alpha=2.0, train_text_encoder=True))
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.3, generator=torch.Generator().manual_seed(p.numel()))
    pipe = Pipeline(**parts)
    lora = save_lora(str(root / "lora"), parts["unet"], parts["text_encoder"])
    webui = save_webui_lora(str(root / "webui.safetensors"), parts["unet"], parts["text_encoder"], {"note": "test"})
    return {"root": root, "base": str(root / "base"), "pipe": pipe, "lora": lora, "webui": webui}


def test_adapters_start_at_zero_and_train_only_lora():
    from ldm.models.presets import build_components

    parts = build_components("tiny", seed=0)
    before = {k: v.clone() for k, v in parts["unet"].state_dict().items()}
    params = add_lora(parts["unet"], parts["text_encoder"], LoraSettings(rank=2))
    assert params and all("lora_" in n for n, p in parts["unet"].named_parameters() if p.requires_grad)
    assert not any(p.requires_grad for p in parts["text_encoder"].parameters())
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 77, 32)
    parts["unet"].disable_adapters()
    base_out = parts["unet"](x, t, encoder_hidden_states=ctx).sample
    parts["unet"].enable_adapters()
    assert torch.equal(parts["unet"](x, t, encoder_hidden_states=ctx).sample, base_out)  # B = 0 at start
    assert len(before) < len(parts["unet"].state_dict())


@pytest.mark.slow
def test_diffusers_and_ldm_load_the_file_with_the_same_images(adapted):
    from diffusers import StableDiffusionPipeline

    from ldm import Pipeline

    expected = run(adapted["pipe"])
    ours = Pipeline.from_pretrained(adapted["base"])
    ours.load_lora_weights(adapted["lora"])
    theirs = StableDiffusionPipeline.from_pretrained(adapted["base"], safety_checker=None)
    theirs.load_lora_weights(os.path.dirname(adapted["lora"]))
    base = run(Pipeline.from_pretrained(adapted["base"]))
    assert abs(expected - base).max() > 0.05  # the adapter matters
    assert abs(run(ours) - expected).max() <= 1e-4
    assert abs(run(theirs) - run(ours)).max() <= 1e-4
    # a LoRA scale through cross_attention_kwargs reaches the UNet and the text encoder alike in both pipelines
    half = dict(cross_attention_kwargs={"scale": 0.5})
    assert abs(run(theirs, **half) - run(ours, **half)).max() <= 1e-4


def test_scale_zero_is_the_base_model_exactly(adapted):
    from ldm import Pipeline

    base = run(Pipeline.from_pretrained(adapted["base"]))
    loaded = Pipeline.from_pretrained(adapted["base"])
    loaded.load_lora_weights(adapted["lora"], scale=0.0)
    assert (run(loaded) == base).all()
    loaded.set_adapters(loaded.get_active_adapters(), adapter_weights=1.0)
    assert (run(loaded, cross_attention_kwargs={"scale": 0.0}) == base).all()


@pytest.mark.slow
def test_merged_folder_equals_base_plus_lora(adapted):
    from ldm import Pipeline

    out = merge_lora(adapted["base"], adapted["lora"], str(adapted["root"] / "merged"))
    assert abs(run(Pipeline.from_pretrained(out)) - run(adapted["pipe"])).max() <= 1e-3


def sd15_kohya_attention_names() -> set[str]:
    """Returns the 128 UNet + 48 text-encoder module names of an attention LoRA for SD 1.x, as kohya writes them."""
    blocks = [f"down_blocks_{b}_attentions_{a}" for b in range(3) for a in range(2)] + ["mid_block_attentions_0"]
    blocks += [f"up_blocks_{b}_attentions_{a}" for b in range(1, 4) for a in range(3)]
    names = {f"lora_unet_{blk}_transformer_blocks_0_{attn}_{proj}" for blk in blocks for attn in ("attn1", "attn2")
             for proj in ("to_q", "to_k", "to_v", "to_out_0")}
    names |= {f"lora_te_text_model_encoder_layers_{i}_self_attn_{p}" for i in range(12)
              for p in ("q_proj", "k_proj", "v_proj", "out_proj")}
    return names


def test_webui_keys_follow_kohya_naming_for_sd15():
    """The exported names for SD 1.5's own UNet and CLIP ViT-L (built on the meta device) match kohya's list."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ldm.models.lora import TEXT_ENCODER_TARGETS, UNET_TARGETS
    from ldm.models.presets import sd15

    spec = sd15()
    with torch.device("meta"):
        unet = UNet2DConditionModel(**spec.unet)
        text_encoder = CLIPTextModel(CLIPTextConfig(**spec.text_encoder))
    keys = set()
    parts = (("unet", unet, UNET_TARGETS), ("text_encoder", text_encoder, TEXT_ENCODER_TARGETS))
    for component, model, targets in parts:
        for name, _ in model.named_modules():
            if any(name.endswith("." + t) for t in targets):
                keys.add(kohya_key(f"{component}.{name}.lora_A.weight").removesuffix(".lora_down.weight"))
    assert keys == sd15_kohya_attention_names()
    assert kohya_key("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight") == \
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight"


def test_webui_file_has_kohya_layout_and_converts_back(adapted):
    from safetensors import safe_open

    from ldm import Pipeline

    with safe_open(adapted["webui"], "pt") as f:
        keys, metadata = set(f.keys()), f.metadata()
    modules = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in keys}
    assert all(k.startswith(("lora_unet_", "lora_te_text_model_encoder_layers_")) for k in modules)
    assert keys == {f"{m}.{s}" for m in modules for s in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert metadata["ss_network_module"] == "networks.lora" and metadata["note"] == "test"
    # diffusers' kohya converter gives back the same adapter weights, and the same images
    converted, original = read_lora_file(adapted["webui"]), read_lora_file(adapted["lora"])
    assert len(converted) == len(original)
    loaded = Pipeline.from_pretrained(adapted["base"])
    loaded.load_lora_weights(adapted["webui"])
    assert abs(run(loaded) - run(adapted["pipe"])).max() <= 1e-4


def test_missing_lora_file_says_what_to_pass(tmp_path):
    from ldm.models.lora import lora_path

    with pytest.raises(FileNotFoundError, match="ldm finetune"):
        lora_path(str(tmp_path / "nope.safetensors"))
    with pytest.raises(ValueError, match="rank"):
        LoraSettings(rank=0).validate()
