"""--lora-type lora | locon | loha | lokr | dora: each trains, scale 0 is the base model, merging equals the adapter,
and its kohya / LyCORIS file has the names and parts A1111 / ComfyUI read, means what peft trained (ComfyUI's
formulas, written out below) and loads back into ldm (and into diffusers, where diffusers loads the type) with the
same outputs."""
import os

import pytest
import torch
from safetensors import safe_open

from test_finetune_resume import art, run as finetune_run  # noqa: F401 (art: a fixture)
from test_lora_formats import run

from ldm.models.lora import LORA_TYPES, LoraSettings, add_lora, save_lora, save_webui_lora
from ldm.models.presets import build_components

pytestmark = pytest.mark.usefixtures("one_thread")
SETTINGS = dict(rank=4, alpha=2.0, conv_rank=2, conv_alpha=3.0)  # alpha != rank: the files must fold the scales in

# The parts of one layer in each type's file, from LyCORIS (lycoris/modules/locon.py, loha.py, lokr.py: the
# state-dict names; DoRA's "dora_scale") and ComfyUI (comfy/weight_adapter/lora.py, loha.py, lokr.py: the keys its
# load() reads). LoKr's factors are full ("lokr_w1", "lokr_w2") or low-rank ("_a" @ "_b") per layer.
PARTS = {
    "lora": [{"lora_down.weight", "lora_up.weight", "alpha"}],
    "locon": [{"lora_down.weight", "lora_up.weight", "alpha"}],
    "dora": [{"lora_down.weight", "lora_up.weight", "alpha", "dora_scale"}],
    "loha": [{"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"}],
    "lokr": [{"lokr_w1", "lokr_w2", "alpha"}, {"lokr_w1", "lokr_w2_a", "lokr_w2_b", "alpha"}],
}


def adapt(preset: str, kind: str, seed: int = 0) -> dict:
    """Returns the preset's components with random non-zero adapters of `kind` on the UNet and text encoder(s)."""
    parts = build_components(preset, seed=0)
    params = add_lora(parts["unet"], parts["text_encoder"], LoraSettings(train_text_encoder=True, lora_type=kind,
                      **SETTINGS), text_encoder_2=parts.get("text_encoder_2"))
    with torch.no_grad():
        for i, p in enumerate(params):
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed + i)) * 0.1)
    return parts


@pytest.fixture(scope="module")
def adapted(tmp_path_factory):
    """A tiny base folder; per type: the adapted pipeline's images and its two files (main and kohya / LyCORIS)."""
    from ldm import Pipeline

    root = tmp_path_factory.mktemp("lora_types")
    Pipeline(**build_components("tiny", seed=0)).save_pretrained(root / "base")
    out = {"root": root, "base": str(root / "base"), "base_images": run(Pipeline.from_pretrained(root / "base"))}
    for kind in LORA_TYPES:
        parts = adapt("tiny", kind)
        out[kind] = {"parts": parts, "images": run(Pipeline(**parts)),
                     "main": save_lora(str(root / kind), parts["unet"], parts["text_encoder"]),
                     "kohya": save_webui_lora(str(root / f"{kind}.safetensors"), parts["unet"], parts["text_encoder"])}
    return out


@pytest.mark.parametrize("kind", LORA_TYPES)
def test_each_type_trains_on_a_fixed_batch(kind):
    """Twenty AdamW steps on one batch lower the noise-prediction loss by more than 15% (adapters start at zero)."""
    parts = build_components("tiny", seed=0)
    unet = parts["unet"]
    params = add_lora(unet, parts["text_encoder"], LoraSettings(lora_type=kind, **SETTINGS))
    g = torch.Generator().manual_seed(0)
    x, noise, context = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g), \
        torch.randn(4, 77, 32, generator=g)
    t = torch.tensor([100, 300, 500, 700])
    noisy = parts["scheduler"].add_noise(x, noise, t)
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(20):
        loss = torch.nn.functional.mse_loss(unet(noisy, t, encoder_hidden_states=context).sample, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.85 * losses[0], (kind, losses[0], losses[-1])  # measured: 0.82 (attention only) .. 0.39


@pytest.mark.slow
@pytest.mark.parametrize("kind", LORA_TYPES)
def test_each_type_lowers_the_held_out_validation_loss_in_finetune(kind, tmp_path):
    """`ldm finetune --lora-type KIND` on a folder of art: the loss of the held-out picture (fixed noise and
    timesteps) is lower at the second check than at the first. Measured at 20 -> 40 steps on the tiny model:
    a fall of 4-17%, deterministic for a given machine."""
    from ldm import Pipeline
    from ldm.data.photos import write_art_folder
    from ldm.training.finetune import main
    from ldm.training.finetune_config import FinetuneConfig

    Pipeline(**build_components("tiny", seed=0)).save_pretrained(tmp_path / "base")
    write_art_folder(str(tmp_path / "art"), 12, 64)
    report = main(FinetuneConfig(model=str(tmp_path / "base"), data=str(tmp_path / "art"), out=str(tmp_path / "run"),
                                 instance_prompt="sks art", lora_type=kind, max_steps=40, validation_every=20,
                                 learning_rate=1e-3, device="cpu", num_validation_samples=1))
    first, last = (record["val_heldout"]["val_loss"] for record in (report["history"][0], report["history"][-1]))
    assert report["num_heldout_images"] >= 1 and last < 0.99 * first, (kind, first, last)


def expected_sd1_names(unet, text_encoder, kind: str) -> set[str]:
    """kohya's rule (sd-scripts networks/lora.py create_modules): "lora_unet_" + (block name + "." + child name) with
    dots as underscores, for the children of each Transformer2DModel (attention projections) and, with conv layers
    (LoCon; LyCORIS does the same), of each ResnetBlock2D / Downsample2D / Upsample2D; "lora_te_" + the CLIP names."""
    names = set()
    for block, module in unet.named_modules():
        kind_of = type(module).__name__
        if kind_of == "Attention":
            names |= {f"{block}.{c}" for c in ("to_q", "to_k", "to_v", "to_out.0")}
        elif kind in ("locon", "loha", "lokr") and kind_of == "ResnetBlock2D":
            names |= {f"{block}.{c}" for c in ("conv1", "conv2", "conv_shortcut") if getattr(module, c, None)}
        elif kind in ("locon", "loha", "lokr") and kind_of in ("Downsample2D", "Upsample2D"):
            names.add(f"{block}.conv")
    names = {"lora_unet_" + n.replace(".", "_") for n in names}
    return names | {f"lora_te_text_model_encoder_layers_{i}_self_attn_{p}"
                    for i in range(text_encoder.config.num_hidden_layers)
                    for p in ("q_proj", "k_proj", "v_proj", "out_proj")}


def layers_of(path: str) -> dict[str, dict[str, torch.Tensor]]:
    with safe_open(path, "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    layers = {}
    for key, value in state.items():
        name, _, part = key.partition(".")
        layers.setdefault(name, {})[part] = value
    return layers


@pytest.mark.parametrize("kind", LORA_TYPES)
def test_kohya_file_names_and_parts_follow_kohya_and_lycoris(adapted, kind):
    parts = adapted[kind]["parts"]
    layers = layers_of(adapted[kind]["kohya"])
    assert set(layers) == expected_sd1_names(parts["unet"], parts["text_encoder"], kind)
    for name, found in layers.items():
        assert set(found) in PARTS[kind], (name, sorted(found))
        alpha = found["alpha"].item()
        rank = found.get("lora_down.weight", found.get("hada_w1_b", found.get("lokr_w2_b"))).shape[0] \
            if "lokr_w2" not in found else alpha
        assert alpha == rank  # alpha / rank = 1: the scales are folded into the weights
    if kind == "locon":  # a 3x3 conv's down is (r, in, 3, 3) at the conv rank, its up (out, r, 1, 1)
        conv = layers["lora_unet_down_blocks_0_resnets_0_conv1"]
        assert conv["lora_down.weight"].shape == (2, 32, 3, 3) and conv["lora_up.weight"].shape == (32, 2, 1, 1)
    with safe_open(adapted[kind]["kohya"], "pt") as f:
        metadata = f.metadata()
    assert metadata["ss_network_module"] == ("networks.lora" if kind == "lora" else "lycoris.kohya")


def comfyui_weight(weight: torch.Tensor, parts: dict) -> torch.Tensor:
    """Returns the weight ComfyUI computes from one layer's parts at strength 1 (comfy/weight_adapter/lora.py,
    loha.py, lokr.py calculate_weight, and base.py weight_decompose for dora_scale), written out here."""
    def mm(a, b):
        return a.flatten(1).float() @ b.flatten(1).float()

    if "hada_w1_a" in parts:  # LoHa: (w1a w1b) * (w2a w2b) * alpha / w1b.shape[0]
        alpha = parts["alpha"].item() / parts["hada_w1_b"].shape[0]
        diff = mm(parts["hada_w1_a"], parts["hada_w1_b"]) * mm(parts["hada_w2_a"], parts["hada_w2_b"])
        return weight + alpha * diff.reshape(weight.shape)
    if "lokr_w1" in parts or "lokr_w1_a" in parts:  # LoKr: kron(w1, w2), alpha / dim only with a low-rank factor
        dim = None
        w1 = parts.get("lokr_w1")
        if w1 is None:
            dim, w1 = parts["lokr_w1_b"].shape[0], mm(parts["lokr_w1_a"], parts["lokr_w1_b"])
        w2 = parts.get("lokr_w2")
        if w2 is None:
            dim, w2 = parts["lokr_w2_b"].shape[0], mm(parts["lokr_w2_a"], parts["lokr_w2_b"])
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        alpha = parts["alpha"].item() / dim if dim is not None else 1.0
        return weight + alpha * torch.kron(w1.float(), w2.float()).reshape(weight.shape)
    alpha = parts["alpha"].item() / parts["lora_down.weight"].shape[0]  # LoRA / LoCon: up @ down * alpha / rank
    diff = mm(parts["lora_up.weight"], parts["lora_down.weight"]).reshape(weight.shape)
    if "dora_scale" not in parts:
        return weight + alpha * diff
    dora_scale = parts["dora_scale"]  # one row per output channel: ComfyUI's wd_on_output_axis branch
    assert dora_scale.shape[0] == weight.shape[0]
    weight_calc = weight + alpha * diff
    weight_norm = weight.reshape(weight.shape[0], -1).norm(dim=1).reshape(-1, *[1] * (weight.dim() - 1))
    return weight_calc * (dora_scale / (weight_norm + torch.finfo(weight.dtype).eps))


@pytest.mark.parametrize("kind", LORA_TYPES)
def test_comfyui_formulas_on_the_file_give_peft_merged_weights(adapted, kind):
    from ldm.models.lycoris import module_table

    fresh = build_components("tiny", seed=0)
    modules = {"unet": fresh["unet"], "text_encoder": fresh["text_encoder"]}
    table = module_table(modules, fresh["unet"].config)
    merged = {"unet": adapted[kind]["parts"]["unet"], "text_encoder": adapted[kind]["parts"]["text_encoder"]}
    merged = {name: _merged_copy(module) for name, module in merged.items()}
    layers = layers_of(adapted[kind]["kohya"])
    for name, parts in layers.items():
        component, path = table[name]
        base = modules[component].get_submodule(path).weight.detach()
        want = merged[component].get_submodule(path).weight.detach()
        assert (want - base).abs().max() > 1e-4, name  # every layer's adapter changes its weight
        torch.testing.assert_close(comfyui_weight(base, parts), want, atol=2e-5, rtol=1e-4, msg=name)


def _merged_copy(module):
    """Returns a copy of the module with its adapters merged into the weights and removed (peft's merge_and_unload)."""
    import copy

    from peft.tuners.tuners_utils import BaseTunerLayer

    copied = copy.deepcopy(module)
    for path, layer in list(copied.named_modules()):
        if isinstance(layer, BaseTunerLayer):
            layer.merge()
            parent, _, child = path.rpartition(".")
            setattr(copied.get_submodule(parent) if parent else copied, child, layer.get_base_layer())
    return copied


@pytest.mark.parametrize("kind", LORA_TYPES)
@pytest.mark.parametrize("file", ["main", "kohya"])
def test_files_load_back_into_ldm_with_the_same_images(adapted, kind, file):
    from ldm import Pipeline

    pipe = Pipeline.from_pretrained(adapted["base"])
    pipe.load_lora_weights(adapted[kind][file])
    want = adapted[kind]["images"]
    assert abs(want - adapted["base_images"]).max() > 1e-3  # the adapters matter
    assert abs(run(pipe) - want).max() <= 1e-4


@pytest.mark.parametrize("kind", LORA_TYPES)
def test_scale_zero_is_the_base_model_and_unload_restores_it(adapted, kind):
    """Scale 0 gives the base images for every type but DoRA: peft's scale multiplies DoRA's low-rank direction,
    not its trained magnitude m, so at 0 a DoRA layer is m W / ||W||; unloading the adapter restores the base."""
    from ldm import Pipeline

    pipe = Pipeline.from_pretrained(adapted["base"])
    pipe.load_lora_weights(adapted[kind]["kohya"], scale=0.0)
    gap = abs(run(pipe) - adapted["base_images"]).max()
    assert gap > 1e-3 if kind == "dora" else gap <= 1e-5
    pipe.unload_lora_weights()
    assert abs(run(pipe) - adapted["base_images"]).max() <= 1e-5


@pytest.mark.parametrize("kind", LORA_TYPES)
def test_merge_lora_equals_the_unmerged_adapter(adapted, kind):
    from ldm import Pipeline
    from ldm.pipelines.lora import merge_lora

    out = merge_lora(adapted["base"], adapted[kind]["main"], str(adapted["root"] / f"merged_{kind}"))
    merged = Pipeline.from_pretrained(out)
    assert not any("lora" in n or "hada" in n or "lokr" in n for n, _ in merged.unet.named_parameters())
    assert abs(run(merged) - adapted[kind]["images"]).max() <= 1e-4


@pytest.mark.parametrize("kind", ["locon", "dora"])
def test_diffusers_loads_the_main_file_with_the_same_images(adapted, kind):
    """diffusers loads peft-format LoRA on convolutions (LoCon) and DoRA's magnitudes; it has no LoHa / LoKr loader,
    so those types' main file is the LyCORIS one (lycoris_weights.safetensors)."""
    from diffusers import StableDiffusionPipeline

    theirs = StableDiffusionPipeline.from_pretrained(adapted["base"], safety_checker=None)
    theirs.load_lora_weights(os.path.dirname(adapted[kind]["main"]))
    assert abs(run(theirs) - adapted[kind]["images"]).max() <= 1e-4
    assert os.path.basename(adapted["loha"]["main"]) == "lycoris_weights.safetensors"


@torch.no_grad()
def sdxl_unet_output(unet) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x, context, pooled = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 64, generator=g), \
        torch.randn(1, 32, generator=g)
    time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])
    return unet(x, torch.tensor([500]), encoder_hidden_states=context,
                added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample


@pytest.mark.parametrize("kind", ["locon", "loha", "lokr", "dora"])
def test_sdxl_files_use_the_original_unet_names_and_load_back(kind, tmp_path):
    """SDXL: every UNet name is "lora_unet_" + the original checkpoint's module name (ComfyUI's rule, from ldm's
    single-file layout map), ResNet and resampler convolutions included; the file loads back with the same output."""
    from ldm.models.lycoris import load_lycoris
    from ldm.pipelines.original_layout import UNET_PREFIX, unet_to_original

    parts = adapt("sdxl-tiny", kind)
    path = save_webui_lora(str(tmp_path / "sdxl.safetensors"), parts["unet"], parts["text_encoder"],
                           text_encoder_2=parts["text_encoder_2"])
    layers = layers_of(path)
    adapted_paths = {p for p, m in parts["unet"].named_modules() if hasattr(m, "base_layer")}
    original, _ = unet_to_original({f"{p}.weight": torch.zeros(1) for p in adapted_paths}, dict(parts["unet"].config))
    expected = {"lora_unet_" + k.removeprefix(UNET_PREFIX).removesuffix(".weight").replace(".", "_") for k in original}
    assert {n for n in layers if n.startswith("lora_unet_")} == expected
    assert {n.split("_")[1] for n in layers} == {"unet", "te1", "te2"}
    if kind == "locon":
        assert "lora_unet_input_blocks_3_0_op" in layers and "lora_unet_output_blocks_2_2_conv" in layers
    fresh = build_components("sdxl-tiny", seed=0)
    with safe_open(path, "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    load_lycoris({n: fresh[n] for n in ("unet", "text_encoder", "text_encoder_2")}, state, "x", fresh["unet"].config)
    torch.testing.assert_close(sdxl_unet_output(fresh["unet"]), sdxl_unet_output(parts["unet"]), atol=1e-5, rtol=0)


def test_bad_settings_name_the_fix():
    from ldm.training.finetune_config import FinetuneConfig

    with pytest.raises(ValueError, match="lora-type"):
        LoraSettings(lora_type="lycoris").validate()
    with pytest.raises(ValueError, match="locon, loha or lokr"):
        FinetuneConfig(model="m", data="d", instance_prompt="x", lora_conv_rank=4).validate()
    with pytest.raises(ValueError, match="lora-type"):
        FinetuneConfig(model="m", data="d", instance_prompt="x", lora_type="boft").validate()
    FinetuneConfig(model="m", data="d", instance_prompt="x", lora_type="lokr", lora_conv_rank=4).validate()
    dit = build_components("dit-tiny", seed=0)
    with pytest.raises(ValueError, match="transformer model trains plain LoRA"):
        add_lora(dit["transformer"], dit["text_encoder"], LoraSettings(lora_type="loha"))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["locon", "loha", "lokr", "dora"])
def test_finetune_of_each_type_resumes_exactly_and_writes_its_files(tiny_folder, art, tmp_path, kind):
    from safetensors.torch import load_file

    from ldm.models.lora import lora_path

    common = dict(lora_type=kind, checkpoint_every=2, export_webui=True, lora_rank=4, **(
        {"lora_conv_rank": 2} if kind in ("locon", "loha", "lokr") else {}))
    straight = finetune_run(tiny_folder, art, tmp_path / "a", **common)
    finetune_run(tiny_folder, art, tmp_path / "b", max_steps=2, **common)
    first = load_file(lora_path(str(tmp_path / "b")))
    resumed = finetune_run(tiny_folder, art, tmp_path / "b", resume="latest", **common)
    a, b = load_file(lora_path(str(tmp_path / "a"))), load_file(lora_path(str(tmp_path / "b")))
    assert a.keys() == b.keys() == first.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert max((a[k] - first[k]).abs().max().item() for k in a) > 1e-3  # steps 3-4 moved the weights
    for step in (3, 4):
        assert abs(resumed["losses"][step] - straight["losses"][step]) <= 1e-6
    main = {"loha": "lycoris_weights.safetensors", "lokr": "lycoris_weights.safetensors"}.get(
        kind, "pytorch_lora_weights.safetensors")
    assert os.path.basename(straight["outputs"]["lora"]) == main and os.path.isfile(straight["outputs"]["webui"])
