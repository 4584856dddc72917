"""LoRA adapters (Hu et al. 2021, arXiv:2106.09685) on the UNet and text encoder, and their file formats.

    unet_config, te_config = add_lora(unet, text_encoder, LoraSettings(rank=8, train_text_encoder=True))
    ...train...
    save_lora("out/", unet, text_encoder)              # out/pytorch_lora_weights.safetensors (diffusers)
    save_webui_lora("out/model.safetensors", unet, text_encoder, metadata={...})   # kohya keys
    save_lora("out/", unet, text_encoder, text_encoder_2)   # SDXL: StableDiffusionXLPipeline's format
    add_lora(unet, None, LoraSettings(lora_type="loha", conv_rank=4))   # LoCon / LoHa / LoKr / DoRA through peft

LoRA types (LORA_TYPES): lora on the attention projections; locon, loha, lokr also on the ResNet and resampler
convolutions (UNET_CONV_TARGETS, at conv_rank / conv_alpha); dora = LoRA with a trained magnitude per output.
Their kohya / LyCORIS files (A1111, ComfyUI) are written and read by ldm/models/lycoris.py.

A LoRA layer adds (alpha / rank) * B A x to a frozen linear layer W x. Files hold B already multiplied by
alpha / rank, so every loader (diffusers with or without adapter metadata, AUTOMATIC1111, ComfyUI) reads the
same weights whatever alpha it assumes: the diffusers file records alpha = rank, the kohya file `.alpha = rank`.

SDXL's kohya names are those of kohya's sd-scripts, which trains the original (SGM) UNet: `lora_unet_input_blocks_
4_1_...`, `lora_unet_middle_block_1_...`, `lora_unet_output_blocks_0_1_...`, and `lora_te1_` / `lora_te2_` for
the two text encoders (sgm_module_name below has the block rule).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

import torch

from ldm.models.sdxl import is_sdxl_unet

WEIGHT_NAME = "pytorch_lora_weights.safetensors"
LYCORIS_WEIGHT_NAME = "lycoris_weights.safetensors"  # LoHa / LoKr: kohya / LyCORIS keys (A1111, ComfyUI, ldm)
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")          # every attention block's projections
TRANSFORMER_TARGETS = UNET_TARGETS + ("ff.net.0.proj", "ff.net.2")  # a DiT's attention and MLP projections
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
# LoCon's convolutions, as kohya's sd-scripts (networks/lora.py, UNET_TARGET_REPLACE_MODULE_CONV2D_3X3) and LyCORIS
# adapt them: every ResnetBlock2D's convolutions and each Downsample2D / Upsample2D conv (conv_in / conv_out stay)
UNET_CONV_TARGETS = ("conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv")
# --lora-type: lora (Hu et al. 2021), locon (LoRA on the convolutions too), loha (Hyeon-Woo et al. 2022,
# arXiv:2108.06098), lokr (Yeh et al. 2024, arXiv:2309.14859), dora (Liu et al. 2024, arXiv:2402.09353)
LORA_TYPES = ("lora", "locon", "loha", "lokr", "dora")
ADAPTER_PREFIXES = ("lora_", "hada_", "lokr_")  # peft's parameter names of LoRA/DoRA, LoHa and LoKr


@dataclass
class LoraSettings:
    rank: int = 8
    alpha: float = 8.0                 # scale = alpha / rank
    dropout: float = 0.0
    train_text_encoder: bool = False
    lora_type: str = "lora"            # one of LORA_TYPES
    conv_rank: int = 0                 # the convolutions' rank (locon, loha, lokr); 0 = rank
    conv_alpha: float = 0.0            # 0 = conv_rank (scale 1)

    def validate(self) -> None:
        if self.lora_type not in LORA_TYPES:
            raise ValueError(f"--lora-type {self.lora_type!r} is not one of {LORA_TYPES}")
        if self.conv_rank < 0 or self.conv_alpha < 0:
            raise ValueError("--lora-conv-rank and --lora-conv-alpha must be >= 0 (0 = --lora-rank / the conv rank)")
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}; try --lora-rank 8")
        if self.alpha <= 0:
            raise ValueError(f"LoRA alpha must be > 0, got {self.alpha}; alpha = rank gives scale 1")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")


def check_lora_backbone(denoiser, train_text_encoder: bool = False) -> None:
    """Raises ValueError when LoRA cannot be trained on this denoiser (before any work starts)."""
    from ldm.models.denoiser import component_name

    if component_name(denoiser) == "unet":
        return
    if not hasattr(denoiser, "add_adapter"):
        raise ValueError(f"LoRA on {type(denoiser).__name__} is not supported (it has no diffusers adapter "
                         "methods); fine-tune it with --method full, or use a dit-* model (LatentDiT)")
    if train_text_encoder:
        raise ValueError("a transformer model's LoRA covers the transformer only; drop --train_text_encoder, or "
                         "fine-tune with --method full --train_text_encoder")


def add_lora(unet, text_encoder, settings: LoraSettings, text_encoder_2=None) -> list[torch.nn.Parameter]:
    """Adds fresh adapters (B = 0, so the model is unchanged) and returns the trainable LoRA parameters.

    `unet` is the denoiser: a UNet gets adapters on its attention projections, a transformer (LatentDiT) on its
    attention and MLP projections. Freezes everything else. The text encoders (SDXL's second one too, when
    given) get adapters only with settings.train_text_encoder.
    """
    from peft import LoraConfig

    from ldm.models.denoiser import component_name

    settings.validate()
    check_lora_backbone(unet, settings.train_text_encoder)
    unet.requires_grad_(False)
    encoders = [text_encoder] + ([text_encoder_2] if text_encoder_2 is not None else [])
    for encoder in encoders:
        encoder.requires_grad_(False)
    targets = UNET_TARGETS if component_name(unet) == "unet" else TRANSFORMER_TARGETS
    if settings.lora_type != "lora" and component_name(unet) != "unet":
        raise ValueError(f"--lora-type {settings.lora_type} adapts a UNet; a transformer model trains plain LoRA "
                         "(--lora-type lora)")
    unet.add_adapter(adapter_config(settings, targets, convolutions=settings.lora_type in ("locon", "loha", "lokr")))
    modules = [unet]
    if settings.train_text_encoder:
        for encoder in encoders:
            encoder.add_adapter(adapter_config(settings, TEXT_ENCODER_TARGETS, convolutions=False))
            modules.append(encoder)
    return [p for m in modules for n, p in m.named_parameters() if p.requires_grad and _is_adapter(n)]


def _is_adapter(name: str) -> bool:
    return any(prefix in name for prefix in ADAPTER_PREFIXES)


def adapter_config(settings: LoraSettings, targets, convolutions: bool):
    """Returns the peft config of settings.lora_type on `targets` (+ UNET_CONV_TARGETS at the conv rank/alpha).

    Fresh adapters leave the model unchanged: LoRA/DoRA start with B = 0, LoHa with w2_a = 0, LoKr with w2 = 0."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    conv_rank = settings.conv_rank or settings.rank
    conv_alpha = settings.conv_alpha or float(conv_rank)
    conv = list(UNET_CONV_TARGETS) if convolutions else []
    common = dict(r=settings.rank, target_modules=list(targets) + conv,
                  rank_pattern={t: conv_rank for t in conv}, alpha_pattern={t: conv_alpha for t in conv})
    if settings.lora_type == "loha":
        return LoHaConfig(alpha=settings.alpha, module_dropout=settings.dropout, **common)
    if settings.lora_type == "lokr":
        return LoKrConfig(alpha=settings.alpha, module_dropout=settings.dropout, **common)
    if settings.lora_type == "lora":  # the original call, so that plain LoRA trains bit for bit as before
        common = dict(r=settings.rank, target_modules=list(targets))
    return LoraConfig(lora_alpha=settings.alpha, lora_dropout=settings.dropout, init_lora_weights="gaussian",
                      use_dora=settings.lora_type == "dora", **common)


def has_lora(module) -> bool:
    return any(_is_adapter(n) for n, _ in module.named_parameters())


def lora_type_of(module) -> str | None:
    """Returns the type of the module's (single) adapter: "lora" (LoCon's too), "dora", "loha", "lokr"; or None."""
    config = next(iter((getattr(module, "peft_config", None) or {}).values()), None)
    if config is None:
        return None
    kind = config.peft_type.value.lower()
    return "dora" if kind == "lora" and config.use_dora else kind


def _module_scalings(module) -> dict[str, float]:
    """Returns {module path: alpha / rank} of every adapted layer (conv layers may have their own rank and alpha)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {name: float(next(iter(layer.scaling.values()))) for name, layer in module.named_modules()
            if isinstance(layer, BaseTunerLayer) and getattr(layer, "scaling", None)}


def peft_state_dict(module) -> dict[str, torch.Tensor]:
    """Returns {"<module path>.lora_A.weight": (r, in), "...lora_B.weight": (out, r)} with B scaled by alpha/rank
    (conv layers: (r, in, k, k) and (out, r, 1, 1); DoRA adds "<module path>.lora_magnitude_vector": (out,))."""
    from peft.utils import get_peft_model_state_dict

    scales = _module_scalings(module)
    state = get_peft_model_state_dict(module, save_embedding_layers=False)  # no adapter targets them
    return {k: (v * scales[k.split(".lora_B.")[0]] if ".lora_B." in k else v).detach().float().cpu().contiguous()
            for k, v in state.items()}


def _metadata(state: dict[str, torch.Tensor], targets) -> dict:
    """Returns diffusers' adapter metadata (LoraConfig kwargs): alpha = rank per layer, as B carries alpha / rank."""
    ranks = {k.split(".lora_A.")[0]: v.shape[0] for k, v in state.items() if ".lora_A." in k}
    rank = max(set(ranks.values()), key=list(ranks.values()).count)
    metadata = {"r": rank, "lora_alpha": rank, "target_modules": list(targets), "init_lora_weights": True}
    other = {name: r for name, r in ranks.items() if r != rank}  # LoCon's convolutions at --lora-conv-rank
    if other or any(v.dim() == 4 for k, v in state.items() if ".lora_A." in k):  # LoCon: name every layer
        metadata.update(rank_pattern=other, alpha_pattern=other, target_modules=sorted(ranks))
    if any(k.endswith(".lora_magnitude_vector") for k in state):
        metadata["use_dora"] = True
    return metadata


def save_lora(folder: str, unet, text_encoder=None, text_encoder_2=None) -> str:
    """Writes FOLDER/pytorch_lora_weights.safetensors in diffusers' format (LoHa, LoKr: FOLDER/
    lycoris_weights.safetensors, LyCORIS's keys); returns its path.

    Loads with diffusers' `StableDiffusionPipeline.load_lora_weights(folder)` (an SDXL UNet's file, with
    `text_encoder_2`'s adapters when it has them: `StableDiffusionXLPipeline.load_lora_weights`) and
    `ldm.Pipeline.load_lora_weights`. A transformer's adapters are written as diffusers writes SD3's and PixArt's
    ("transformer.<module>...") and load with `LatentDiT.load_lora_adapter(file, prefix="transformer")` or
    `ldm.Pipeline.load_lora_weights`.
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.loaders import SD3LoraLoaderMixin

    from ldm.models.denoiser import component_name

    os.makedirs(folder, exist_ok=True)
    if lora_type_of(unet) in ("loha", "lokr"):  # diffusers has no LoHa / LoKr loader: LyCORIS's file instead
        return save_webui_lora(os.path.join(folder, LYCORIS_WEIGHT_NAME), unet, text_encoder,
                               text_encoder_2=text_encoder_2)
    if component_name(unet) == "transformer":
        state = peft_state_dict(unet)
        SD3LoraLoaderMixin.save_lora_weights(folder, transformer_lora_layers=state,
                                             transformer_lora_adapter_metadata=_metadata(state, TRANSFORMER_TARGETS))
        return os.path.join(folder, WEIGHT_NAME)
    _check_text_encoder_2(unet, text_encoder_2)
    layers, metadata = _diffusers_layers(unet, UNET_TARGETS)
    kwargs = dict(unet_lora_layers=layers, unet_lora_adapter_metadata=metadata)
    for name, encoder in (("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2)):
        if encoder is not None and has_lora(encoder):
            layers, metadata = _diffusers_layers(encoder, TEXT_ENCODER_TARGETS)
            # transformers 4's names, as diffusers' own files have them (diffusers maps them onto transformers 5's
            # CLIPTextModel, which has no .text_model; ComfyUI reads "text_encoder.text_model.encoder.layers...")
            layers = {k if k.startswith("text_model.") else "text_model." + k: v for k, v in layers.items()}
            # DoRA: transformers' adapter loader wants the magnitude's parameter name (peft's loader adds it itself)
            layers = {k + ".weight" if k.endswith(".lora_magnitude_vector") else k: v for k, v in layers.items()}
            kwargs.update({f"{name}_lora_layers": layers, f"{name}_lora_adapter_metadata": metadata})
    pipeline = StableDiffusionXLPipeline if is_sdxl_unet(unet) else StableDiffusionPipeline
    pipeline.save_lora_weights(folder, **kwargs)
    return os.path.join(folder, WEIGHT_NAME)


def _diffusers_layers(module, targets) -> tuple[dict[str, torch.Tensor], dict]:
    """Returns (the module's adapters in diffusers' key format, their adapter metadata). LoCon and DoRA keep peft's
    key names (lora_A, lora_B, lora_magnitude_vector), which diffusers' loaders read as they are."""
    from diffusers.utils import convert_state_dict_to_diffusers

    state = peft_state_dict(module)
    metadata = _metadata(state, targets)
    plain = lora_type_of(module) == "lora" and "rank_pattern" not in metadata
    return (convert_state_dict_to_diffusers(state) if plain else state), metadata


def _check_text_encoder_2(unet, text_encoder_2) -> None:
    if text_encoder_2 is not None and not is_sdxl_unet(unet):
        raise ValueError("text_encoder_2= is SDXL's second text encoder, but this UNet is not an SDXL UNet "
                         "(addition_embed_type='text_time'); drop text_encoder_2")


def kohya_key(peft_key: str, unet_config=None) -> str:
    """Returns the kohya/web-UI name of a PEFT key ("<component>.<module>.lora_A.weight").

    SD 1.x (unet_config None or not SDXL's): diffusers' module names,
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"
        -> "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight"
    "text_encoder.encoder.layers.0.self_attn.q_proj.lora_B.weight"   (transformers 5: no .text_model)
        -> "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"
    SDXL (an SDXL UNet's config): the original UNet's names (sgm_module_name) and te1 / te2, as kohya's
    sd-scripts writes them (networks/lora.py: LORA_PREFIX_TEXT_ENCODER1/2 = "lora_te1"/"lora_te2"),
    "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"
        -> "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight"
    "text_encoder_2.text_model.encoder.layers.0.mlp.fc1.lora_B.weight"
        -> "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"
    """
    component, _, rest = peft_key.partition(".")
    module, _, tail = rest.rpartition(".lora_")
    kind = {"A.weight": "lora_down.weight", "B.weight": "lora_up.weight"}.get(tail)
    if kind is None:
        raise ValueError(f"cannot name {peft_key!r} in kohya format: expected <component>.<module>.lora_A/lora_B")
    return f"{kohya_module_name(component, module, unet_config)}.{kind}"


def kohya_module_name(component: str, module: str, unet_config=None) -> str:
    """Returns the kohya / LyCORIS layer name of a module ("unet", "down_blocks.0.resnets.0.conv1" ->
    "lora_unet_down_blocks_0_resnets_0_conv1"; an SDXL UNet: the original UNet's name; kohya_key has examples)."""
    sdxl = unet_config is not None and unet_config.get("addition_embed_type") == "text_time"
    components = ("unet", "text_encoder", "text_encoder_2") if sdxl else ("unet", "text_encoder")
    if component not in components:
        raise ValueError(f"cannot name {component}.{module} in kohya format: expected {'/'.join(components)}")
    if component == "unet":
        module = sgm_module_name(module, unet_config) if sdxl else module
        return f"lora_unet_{module.replace('.', '_')}"
    module = module if module.startswith("text_model.") else "text_model." + module
    prefix = {"text_encoder": "lora_te1" if sdxl else "lora_te", "text_encoder_2": "lora_te2"}[component]
    return f"{prefix}_{module.replace('.', '_')}"


# a diffusers ResnetBlock2D's layers in the original ResBlock (sgm's openaimodel.py)
SGM_RESNET_LAYERS = {"conv1": "in_layers.2", "conv2": "out_layers.3", "conv_shortcut": "skip_connection",
                     "time_emb_proj": "emb_layers.1"}


def sgm_module_name(module: str, unet_config) -> str:
    """Returns the original (SGM / CompVis) UNet's name of a diffusers UNet module (attention or ResNet block).

    The original UNet numbers its blocks in one list per side: input_blocks[0] is conv_in, then each down level
    has layers_per_block (ResBlock, SpatialTransformer) pairs and a Downsample; the middle block is (ResBlock,
    SpatialTransformer, ResBlock); each up level has layers_per_block + 1 pairs and its Upsample last. So (the
    inverse of diffusers' lora_conversion_utils._maybe_map_sgm_blocks_to_diffusers), with L = layers_per_block,
        down_blocks.i.attentions.j -> input_blocks.{1 + i (L + 1) + j}.1   (resnets.j: .0, conv1 -> in_layers.2 ...)
        down_blocks.i.downsamplers.0.conv -> input_blocks.{(i + 1)(L + 1)}.0.op
        mid_block.attentions.0     -> middle_block.1                        (resnets.0 / 1: middle_block.0 / .2)
        up_blocks.i.attentions.j   -> output_blocks.{i (L + 1) + j}.1       (resnets.j: .0)
        up_blocks.i.upsamplers.0.conv -> output_blocks.{i (L + 1) + L}.{2 with attentions, else 1}.conv
    and the names inside a transformer block (transformer_blocks.k.attn1.to_q, proj_in, ...) are the same.
    """
    per_level = unet_config["layers_per_block"] + 1
    parts = module.split(".")
    rest = ".".join(parts[4:])
    resnet = SGM_RESNET_LAYERS.get(parts[-1]) if "resnets" in parts else None
    if parts[:3] == ["mid_block", "attentions", "0"]:
        return ".".join(["middle_block", "1", *parts[3:]])
    if parts[:2] == ["mid_block", "resnets"] and resnet:
        return f"middle_block.{2 * int(parts[2])}.{resnet}"
    if len(parts) > 4 and parts[0] in ("down_blocks", "up_blocks"):
        level, index, side = int(parts[1]), int(parts[3]), parts[0]
        block = 1 + level * per_level + index if side == "down_blocks" else level * per_level + index
        blocks = "input_blocks" if side == "down_blocks" else "output_blocks"
        if parts[2] == "attentions":
            return f"{blocks}.{block}.1.{rest}"
        if parts[2] == "resnets" and resnet:
            return f"{blocks}.{block}.0.{resnet}"
        if module == f"down_blocks.{level}.downsamplers.0.conv":
            return f"input_blocks.{(level + 1) * per_level}.0.op"
        if module == f"up_blocks.{level}.upsamplers.0.conv":
            attention = "CrossAttn" in unet_config["up_block_types"][level]
            return f"output_blocks.{level * per_level + per_level - 1}.{2 if attention else 1}.conv"
    raise ValueError(f"no kohya SDXL name for UNet module {module!r}: only the attention blocks' and ResNet blocks' "
                     "layers have one here (--lora-type lora adapts to_q, to_k, to_v, to_out.0; locon the convs)")


def to_kohya(unet, text_encoder=None, text_encoder_2=None) -> dict[str, torch.Tensor]:
    """Returns the adapters as a kohya state dict: `.lora_down.weight`, `.lora_up.weight` and `.alpha` per layer
    (LoHa, LoKr, DoRA: LyCORIS's parts, ldm/models/lycoris.py).

    An SDXL UNet's file uses SDXL's names (lora_unet_input_blocks_..., lora_te1_, lora_te2_; kohya_key)."""
    from ldm.models.denoiser import component_name
    from ldm.models.lycoris import to_lycoris

    if component_name(unet) != "unet":
        raise ValueError("the kohya/web-UI LoRA format names UNet layers; a transformer's LoRA is written in "
                         "diffusers' format only (drop --export_webui)")
    _check_text_encoder_2(unet, text_encoder_2)
    return to_lycoris(unet, text_encoder, text_encoder_2)


def save_webui_lora(path: str, unet, text_encoder=None, metadata: dict | None = None, text_encoder_2=None) -> str:
    """Writes a kohya-format .safetensors file (AUTOMATIC1111, ComfyUI, InvokeAI) with ss_* metadata; returns path."""
    from safetensors.torch import save_file

    from ldm.models.lycoris import network_info

    state = to_kohya(unet, text_encoder, text_encoder_2)
    rank = next(int(v.item()) for k, v in state.items() if k.endswith(".alpha"))
    trained_text = any(k.startswith(("lora_te_", "lora_te1_", "lora_te2_")) for k in state)
    kind = lora_type_of(unet)
    kind = "locon" if kind == "lora" and any(v.dim() == 4 for k, v in state.items() if "lora_down" in k) else kind
    info = {**network_info(kind), "ss_network_dim": str(rank), "ss_network_alpha": str(rank),
            # kohya's values (sd-scripts library/train_util.py): SDXL base is "sdxl_base_v1-0"
            "ss_base_model_version": "sdxl_base_v1-0" if is_sdxl_unet(unet) else "sd_v1",
            "ss_training_comment": "written by ldm finetune", "ss_text_encoder_lr": "trained" if trained_text else "0"}
    info.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()})
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(state, path, metadata=info)
    return path


def read_lora_file(path: str, unet_config=None) -> dict[str, torch.Tensor]:
    """Returns a LoRA file (diffusers or kohya) as diffusers' PEFT-format state dict, via diffusers' converters.

    An SDXL kohya file names the original UNet's blocks; pass the UNet's config to map them to diffusers'."""
    from diffusers import StableDiffusionPipeline

    if not os.path.exists(path):
        raise FileNotFoundError(f"LoRA file {path} does not exist; pass a .safetensors file written by "
                                "`ldm finetune` (pytorch_lora_weights.safetensors) or a web-UI LoRA")
    state = StableDiffusionPipeline.lora_state_dict(path, unet_config=unet_config)
    return state[0] if isinstance(state, tuple) else state


def lora_shapes(source, weight_name: str | None = None) -> dict[str, tuple] | None:
    """Returns {key: shape} of a LoRA state dict, .safetensors file or folder (read without loading tensors), or
    None for what is not a local .safetensors file (a Hub id, a pickle), which the loader checks itself."""
    from safetensors import safe_open

    if isinstance(source, dict):
        return {k: tuple(v.shape) for k, v in source.items()}
    path = str(source)
    if os.path.isdir(source):
        path = os.path.join(source, weight_name) if weight_name else os.path.join(source, WEIGHT_NAME)
        lycoris = os.path.join(source, LYCORIS_WEIGHT_NAME)
        path = lycoris if not weight_name and not os.path.isfile(path) and os.path.isfile(lycoris) else path
    if not path.endswith(".safetensors") or not os.path.isfile(path):
        return None
    with safe_open(path, "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def check_lora_fits(shapes: dict[str, tuple], unet, sdxl: bool) -> None:
    """Raises ValueError when a LoRA was trained on another model family (SD 1.x/2.x vs SDXL) than the pipeline's,
    before diffusers fails on a size mismatch or a missing module deep inside peft."""
    if not sdxl and any(k.startswith(("lora_te2_", "text_encoder_2.")) for k in shapes):
        raise ValueError("this LoRA has weights for SDXL's second text encoder (lora_te2_ / text_encoder_2 keys), but "
                         "the pipeline is not SDXL; load it on the SDXL model it was trained on")
    width = unet.config.cross_attention_dim  # the text context the cross-attention keys read: 768 SD 1.x, 2048 SDXL
    for key, shape in shapes.items():  # kohya ".lora_down.weight", diffusers ".lora.down.weight", PEFT ".lora_A.weight"
        if re.search(r"attn2[._]to_k\.(lora_down|lora\.down|lora_A)\.weight$", key) and shape[-1] != width:
            raise ValueError(f"this LoRA's cross-attention reads {shape[-1]}-wide text context, but the pipeline's UNet "
                             f"takes {width} (SD 1.x: 768, SD 2.x: 1024, SDXL: 2048): it was trained on another model "
                             "family; load a LoRA trained on this model")


def lora_path(path: str) -> str:
    """Returns the .safetensors file for a LoRA file or a folder holding pytorch_lora_weights.safetensors."""
    candidate = os.path.join(path, WEIGHT_NAME) if os.path.isdir(path) else path
    if os.path.isdir(path) and not os.path.isfile(candidate):  # a LoHa / LoKr run's folder
        candidate = os.path.join(path, LYCORIS_WEIGHT_NAME)
    if not os.path.isfile(candidate):
        raise FileNotFoundError(f"no LoRA file at {candidate}; pass the .safetensors file (or the folder holding "
                                f"{WEIGHT_NAME}) that `ldm finetune --method lora` wrote")
    return candidate


def load_transformer_lora(transformer, path_or_state, adapter_name: str | None = None, scale: float = 1.0) -> None:
    """Loads a transformer LoRA (a file, a folder holding pytorch_lora_weights.safetensors, or a state dict with
    "transformer.<module>.lora_A.weight" keys) onto `transformer` as adapter `adapter_name` at weight `scale`."""
    from ldm.folders import load_state_dict

    state = path_or_state if isinstance(path_or_state, dict) else load_state_dict(lora_path(str(path_or_state)))
    other = sorted({k.split(".")[0] for k in state if not k.startswith("transformer.")})
    if other:
        raise ValueError(f"this LoRA has {', '.join(other)} weights, but the pipeline's denoiser is a transformer; "
                         "load a LoRA trained on this model (`ldm finetune --model` it)")
    existing = set(getattr(transformer, "peft_config", {}) or {})
    if adapter_name is None:
        adapter_name = next(f"lora_{i}" for i in range(len(existing) + 1) if f"lora_{i}" not in existing)
    transformer.load_lora_adapter(state, prefix="transformer", adapter_name=adapter_name)
    if scale != 1.0:
        transformer.set_adapters([adapter_name], weights=[scale])

