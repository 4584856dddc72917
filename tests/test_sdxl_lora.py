"""SDXL LoRA files: diffusers' StableDiffusionXLPipeline format and kohya's SDXL names (A1111, ComfyUI), loaded by
diffusers and by ldm.Pipeline onto unet, text_encoder and text_encoder_2, and merged by `ldm merge-lora`."""
import pytest
import torch
from safetensors import safe_open

from ldm.models.lora import LoraSettings, add_lora, kohya_key, save_lora, save_webui_lora, to_kohya
from ldm.models.presets import build_components, get_spec

pytestmark = pytest.mark.usefixtures("one_thread")
MODULES = ("unet", "text_encoder", "text_encoder_2")

# diffusers module -> the name kohya's sd-scripts writes for SDXL base 1.0, from its rules:
# - networks/lora.py create_modules: lora_name = (prefix + "." + module name + "." + child name).replace(".", "_"),
#   prefix "lora_unet", and "lora_te1" / "lora_te2" for SDXL's first / second text encoder (LORA_PREFIX_TEXT_ENCODER1/2);
# - the UNet is the original (SGM) one (library/sdxl_original_unet.py): input_blocks[0] = conv_in, then per level
#   layers_per_block=2 (ResBlock, SpatialTransformer) pairs and a Downsample, so down_blocks.1 -> input_blocks 4, 5
#   and down_blocks.2 -> 7, 8; middle_block = (ResBlock, SpatialTransformer, ResBlock); output_blocks 0-2 / 3-5 are
#   up_blocks.0 / 1; a pair's transformer is its child .1. Inside it the names equal diffusers' (attn1.to_q, to_out.0).
# - the text encoders are transformers' CLIPTextModel(WithProjection) ("text_model.encoder.layers.N.self_attn.q_proj");
#   ComfyUI's comfy/lora.py model_lora_keys_clip reads "lora_te1_text_model_encoder_layers_{b}_self_attn_q_proj" (clip_l)
#   and "lora_te2_..." (clip_g); A1111's networks.py maps lora_te2_text_model_encoder_layers_N_ to
#   1_model_transformer_resblocks_N_ and reads lora_unet_<SGM name> as diffusion_model_<SGM name>.
KOHYA_SDXL_NAMES = {
    "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q":
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
    "unet.down_blocks.1.attentions.1.transformer_blocks.1.attn2.to_k":
        "lora_unet_input_blocks_5_1_transformer_blocks_1_attn2_to_k",
    "unet.down_blocks.2.attentions.0.transformer_blocks.3.attn1.to_v":
        "lora_unet_input_blocks_7_1_transformer_blocks_3_attn1_to_v",
    "unet.down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_out.0":
        "lora_unet_input_blocks_8_1_transformer_blocks_9_attn2_to_out_0",
    "unet.mid_block.attentions.0.transformer_blocks.5.attn1.to_q":
        "lora_unet_middle_block_1_transformer_blocks_5_attn1_to_q",
    "unet.up_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q":
        "lora_unet_output_blocks_0_1_transformer_blocks_0_attn2_to_q",
    "unet.up_blocks.0.attentions.2.transformer_blocks.9.attn1.to_out.0":
        "lora_unet_output_blocks_2_1_transformer_blocks_9_attn1_to_out_0",
    "unet.up_blocks.1.attentions.2.transformer_blocks.1.attn2.to_v":
        "lora_unet_output_blocks_5_1_transformer_blocks_1_attn2_to_v",
    "text_encoder.encoder.layers.0.self_attn.q_proj": "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
    "text_encoder.text_model.encoder.layers.11.self_attn.out_proj":
        "lora_te1_text_model_encoder_layers_11_self_attn_out_proj",
    "text_encoder_2.text_model.encoder.layers.31.self_attn.v_proj":
        "lora_te2_text_model_encoder_layers_31_self_attn_v_proj",
}


def fresh():
    """Returns sdxl-tiny's components without adapters (the base weights the adapted ones started from)."""
    return build_components("sdxl-tiny", seed=0)


@pytest.fixture(scope="module")
def adapted(tmp_path_factory):
    """sdxl-tiny with random non-zero LoRA on the UNet and both text encoders (alpha != rank), and its two files."""
    root = tmp_path_factory.mktemp("sdxl_lora")
    parts = fresh()
    params = add_lora(parts["unet"], parts["text_encoder"], LoraSettings(rank=4, alpha=2.0, train_text_encoder=True),
                      text_encoder_2=parts["text_encoder_2"])
    with torch.no_grad():
        for i, p in enumerate(params):
            p.normal_(0, 0.3, generator=torch.Generator().manual_seed(i))
    files = {"diffusers": save_lora(str(root / "lora"), parts["unet"], parts["text_encoder"], parts["text_encoder_2"]),
             "kohya": save_webui_lora(str(root / "webui.safetensors"), parts["unet"], parts["text_encoder"],
                                      text_encoder_2=parts["text_encoder_2"])}
    adapted_outputs, base_outputs = outputs(parts), outputs(fresh())
    for name, value in adapted_outputs.items():  # every network's adapters change its output
        assert (value - base_outputs[name]).abs().max() > 1e-2, name
    return {"root": root, "parts": parts, "files": files, "outputs": adapted_outputs}


@torch.no_grad()
def outputs(parts) -> dict[str, torch.Tensor]:
    """Returns each adapted network's output on fixed inputs: UNet noise prediction (1, 4, 8, 8), text states."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 1000, (1, 77), generator=g)
    x, context, pooled = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 64, generator=g), torch.randn(1, 32, generator=g)
    time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])
    unet = parts["unet"](x, torch.tensor([500]), encoder_hidden_states=context,
                         added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
    te2 = parts["text_encoder_2"](ids, output_hidden_states=True)
    return {"unet": unet, "text_encoder": parts["text_encoder"](ids).last_hidden_state,
            "text_encoder_2": te2.hidden_states[-2], "text_embeds": te2.text_embeds}


def assert_outputs_close(got: dict, want: dict, atol: float) -> None:
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=atol, rtol=0, msg=lambda m: f"{name}: {m}")


def comfyui_names(parts) -> set[str]:
    """Returns the LoRA names ComfyUI maps for sdxl-tiny's adapted layers, written from its rules independently of
    kohya_key: "lora_unet_" + the original checkpoint key (diffusion_model.<...>.weight, from ldm's single-file
    layout map) with dots as underscores, and "lora_te{1,2}_text_model_encoder_layers_{b}_{self_attn_q_proj...}"."""
    from ldm.pipelines.original_layout import UNET_PREFIX, unet_to_original

    unet = parts["unet"]
    adapted = {n for n, m in unet.named_modules() if hasattr(m, "lora_A")}
    original, _ = unet_to_original({f"{n}.weight": torch.zeros(1) for n in adapted}, dict(unet.config))
    names = {"lora_unet_" + k.removeprefix(UNET_PREFIX).removesuffix(".weight").replace(".", "_") for k in original}
    for index, name in ((1, "text_encoder"), (2, "text_encoder_2")):
        for module, m in parts[name].named_modules():
            if hasattr(m, "lora_A"):
                layer, kind = module.split("layers.")[1].split(".", 1)
                names.add(f"lora_te{index}_text_model_encoder_layers_{layer}_{kind.replace('.', '_')}")
    return names


def test_kohya_names_follow_kohyas_sdxl_rules():
    config = get_spec("sdxl").unet  # SDXL base 1.0's UNet: the table's names are those of real SDXL LoRA files
    for module, name in KOHYA_SDXL_NAMES.items():
        assert kohya_key(f"{module}.lora_A.weight", config) == f"{name}.lora_down.weight"
        assert kohya_key(f"{module}.lora_B.weight", config) == f"{name}.lora_up.weight"
    # SD 1.x's convention is unchanged: diffusers' block names and one "lora_te_"
    assert kohya_key("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight") == \
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight"
    assert kohya_key("text_encoder.encoder.layers.0.self_attn.q_proj.lora_A.weight").startswith("lora_te_text_model")
    with pytest.raises(ValueError, match="text_encoder_2"):
        kohya_key("text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight")  # SD 1.x has no te2
    with pytest.raises(ValueError, match="attention blocks"):
        kohya_key("unet.conv_in.lora_A.weight", config)  # conv_in: no LoRA type adapts it


def test_kohya_file_holds_exactly_the_names_comfyui_and_a1111_read(adapted):
    expected = comfyui_names(adapted["parts"])
    assert len(expected) == 96 + 8 + 8  # 24 attention layers x 4 projections; 2 layers x 4 projections per encoder
    with safe_open(adapted["files"]["kohya"], "pt") as f:
        keys, metadata = set(f.keys()), f.metadata()
        alphas = {k: f.get_tensor(k).item() for k in keys if k.endswith(".alpha")}
    assert keys == {f"{n}.{part}" for n in expected for part in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert set(alphas.values()) == {4.0}  # alpha = rank: lora_up carries alpha / rank
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0" and metadata["ss_network_dim"] == "4"
    assert {k.split("_")[1] for k in expected} == {"unet", "te1", "te2"}


def test_diffusers_file_has_diffusers_sdxl_keys_and_metadata(adapted):
    import json

    with safe_open(adapted["files"]["diffusers"], "pt") as f:
        keys, metadata = set(f.keys()), f.metadata()
    assert {k.split(".")[0] for k in keys} == set(MODULES)
    assert all(k.startswith(("unet.", "text_encoder.text_model.encoder.layers.",
                             "text_encoder_2.text_model.encoder.layers.")) for k in keys)
    assert len(keys) == 2 * (96 + 8 + 8)
    assert "unet.up_blocks.0.attentions.2.transformer_blocks.1.attn2.to_out.0.lora.down.weight" in keys
    assert "text_encoder_2.text_model.encoder.layers.1.self_attn.q_proj.lora_linear_layer.up.weight" in keys
    for name in MODULES:  # alpha = rank: the up weights carry alpha / rank
        config = json.loads(metadata["lora_adapter_metadata"])  # flat: "<network>.r", "<network>.lora_alpha"
        assert config[f"{name}.r"] == config[f"{name}.lora_alpha"] == 4, name


@pytest.mark.parametrize("kind", ["diffusers", "kohya"])
def test_diffusers_sdxl_pipeline_loads_our_file_with_the_same_outputs(adapted, kind):
    from diffusers import StableDiffusionXLPipeline

    base = fresh()
    pipe = StableDiffusionXLPipeline(**base)
    pipe.load_lora_weights(adapted["files"][kind])
    assert_outputs_close(outputs(base), adapted["outputs"], atol=1e-5)


def test_diffusers_images_from_our_file_equal_images_from_our_adapted_modules(adapted):
    from diffusers import StableDiffusionXLPipeline

    def images(parts):
        pipe = StableDiffusionXLPipeline(**parts)
        pipe.set_progress_bar_config(disable=True)
        return pipe("a red circle", negative_prompt="blurry", num_inference_steps=3, guidance_scale=5.0,
                    height=64, width=64, output_type="np", generator=torch.Generator().manual_seed(0)).images

    base = fresh()
    loaded = StableDiffusionXLPipeline(**base)
    loaded.load_lora_weights(adapted["files"]["kohya"])
    ours = images(adapted["parts"])
    assert abs(images(base) - ours).max() < 1e-5
    assert abs(images(fresh()) - ours).max() > 1e-3


@pytest.mark.parametrize("kind", ["diffusers", "kohya"])
def test_our_pipeline_loads_sdxl_files_onto_all_three_networks(adapted, kind):
    from ldm import Pipeline

    base = fresh()
    pipe = Pipeline(**base)
    pipe.load_lora_weights(adapted["files"][kind])
    assert set(pipe.get_list_adapters()) == set(MODULES)
    assert_outputs_close(outputs(base), adapted["outputs"], atol=1e-5)
    pipe.set_adapters("lora_0", adapter_weights=0.0)  # scale 0 = the base model on every network
    assert_outputs_close(outputs(base), outputs(fresh()), atol=1e-6)

    zero = fresh()
    Pipeline(**zero).load_lora_weights(adapted["files"][kind], scale=0.0)
    assert_outputs_close(outputs(zero), outputs(fresh()), atol=1e-6)


@pytest.mark.parametrize("kind", ["diffusers", "kohya"])
def test_merge_lora_on_sdxl_equals_the_unmerged_adapters(adapted, kind):
    from ldm import Pipeline
    from ldm.cli import main as ldm

    base_folder, out = adapted["root"] / "base", adapted["root"] / f"merged_{kind}"
    if not base_folder.exists():
        Pipeline(**fresh()).save_pretrained(base_folder)
    assert ldm(["merge-lora", "--model", str(base_folder), "--lora", adapted["files"][kind], "--out", str(out)]) == 0
    merged = Pipeline.from_pretrained(str(out))
    assert merged.is_sdxl and not any("lora" in n for m in MODULES for n, _ in getattr(merged, m).named_parameters())
    assert_outputs_close(outputs({m: getattr(merged, m) for m in MODULES}), adapted["outputs"], atol=1e-4)


def test_a_lora_of_the_other_family_raises_a_clear_error(adapted, tmp_path):
    from ldm import Pipeline

    sd = build_components("tiny", seed=0)
    for path in adapted["files"].values():  # SDXL files on an SD 1.x pipeline: they carry text_encoder_2's weights
        with pytest.raises(ValueError, match="SDXL's second text encoder"):
            Pipeline(**build_components("tiny", seed=0)).load_lora_weights(path)
    unet_only = save_webui_lora(str(tmp_path / "unet.safetensors"), adapted["parts"]["unet"])
    with pytest.raises(ValueError, match="reads 64-wide text context, but the pipeline's UNet takes 32"):
        Pipeline(**sd).load_lora_weights(unet_only)
    assert not getattr(sd["unet"], "peft_config", None)  # the check runs before anything is loaded

    add_lora(sd["unet"], sd["text_encoder"], LoraSettings(rank=2, train_text_encoder=True))
    sd_file = save_lora(str(tmp_path / "sd"), sd["unet"], sd["text_encoder"])
    for path in (sd_file, save_webui_lora(str(tmp_path / "sd.safetensors"), sd["unet"], sd["text_encoder"])):
        with pytest.raises(ValueError, match="reads 32-wide text context, but the pipeline's UNet takes 64"):
            Pipeline(**fresh()).load_lora_weights(path)


def test_text_encoder_2_needs_an_sdxl_unet():
    parts = build_components("tiny", seed=0)
    add_lora(parts["unet"], parts["text_encoder"], LoraSettings(rank=2))
    with pytest.raises(ValueError, match="not an SDXL UNet"):
        to_kohya(parts["unet"], parts["text_encoder"], text_encoder_2=fresh()["text_encoder_2"])
