"""LoRA adapters (Hu et al. 2021, arXiv:2106.09685) on the UNet and text encoder, and their file formats.

    unet_config, te_config = add_lora(unet, text_encoder, LoraSettings(rank=8, train_text_encoder=True))
    ...train...
    save_lora("out/", unet, text_encoder)              # out/pytorch_lora_weights.safetensors (diffusers)
    save_webui_lora("out/model.safetensors", unet, text_encoder, metadata={...})   # kohya keys
    save_lora("out/", unet, text_encoder, text_encoder_2)   # SDXL: StableDiffusionXLPipeline's format

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
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")          # every attention block's projections
TRANSFORMER_TARGETS = UNET_TARGETS + ("ff.net.0.proj", "ff.net.2")  # a DiT's attention and MLP projections
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


@dataclass
class LoraSettings:
    rank: int = 8
    alpha: float = 8.0                 # scale = alpha / rank
    dropout: float = 0.0
    train_text_encoder: bool = False

    def validate(self) -> None:
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
    common = dict(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                  init_lora_weights="gaussian")
    targets = UNET_TARGETS if component_name(unet) == "unet" else TRANSFORMER_TARGETS
    unet.add_adapter(LoraConfig(target_modules=list(targets), **common))
    modules = [unet]
    if settings.train_text_encoder:
        for encoder in encoders:
            encoder.add_adapter(LoraConfig(target_modules=list(TEXT_ENCODER_TARGETS), **common))
            modules.append(encoder)
    return [p for m in modules for n, p in m.named_parameters() if "lora_" in n and p.requires_grad]


def has_lora(module) -> bool:
    return any("lora_A" in n for n, _ in module.named_parameters())


def _lora_scale(module) -> float:
    """Returns alpha / rank of the module's (single) adapter."""
    config = next(iter(module.peft_config.values()))
    return float(config.lora_alpha) / float(config.r)


def peft_state_dict(module) -> dict[str, torch.Tensor]:
    """Returns {"<module path>.lora_A.weight": (r, in), "...lora_B.weight": (out, r)} with B scaled by alpha/rank."""
    from peft.utils import get_peft_model_state_dict

    scale = _lora_scale(module)
    state = get_peft_model_state_dict(module)
    return {k: (v * scale if ".lora_B." in k else v).detach().float().cpu().contiguous() for k, v in state.items()}


def _metadata(state: dict[str, torch.Tensor], targets) -> dict:
    rank = next(v.shape[0] for k, v in state.items() if ".lora_A." in k)
    return {"r": rank, "lora_alpha": rank, "target_modules": list(targets), "init_lora_weights": True}


def save_lora(folder: str, unet, text_encoder=None, text_encoder_2=None) -> str:
    """Writes FOLDER/pytorch_lora_weights.safetensors in diffusers' format; returns its path.

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
            kwargs.update({f"{name}_lora_layers": layers, f"{name}_lora_adapter_metadata": metadata})
    pipeline = StableDiffusionXLPipeline if is_sdxl_unet(unet) else StableDiffusionPipeline
    pipeline.save_lora_weights(folder, **kwargs)
    return os.path.join(folder, WEIGHT_NAME)


def _diffusers_layers(module, targets) -> tuple[dict[str, torch.Tensor], dict]:
    """Returns (the module's adapters in diffusers' key format, their adapter metadata)."""
    from diffusers.utils import convert_state_dict_to_diffusers

    state = peft_state_dict(module)
    return convert_state_dict_to_diffusers(state), _metadata(state, targets)


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
    sdxl = unet_config is not None and unet_config.get("addition_embed_type") == "text_time"
    component, _, rest = peft_key.partition(".")
    module, _, tail = rest.rpartition(".lora_")
    kind = {"A.weight": "lora_down.weight", "B.weight": "lora_up.weight"}.get(tail)
    components = ("unet", "text_encoder", "text_encoder_2") if sdxl else ("unet", "text_encoder")
    if kind is None or component not in components:
        raise ValueError(f"cannot name {peft_key!r} in kohya format: expected {'./'.join(components)}. + "
                         "lora_A/lora_B")
    if component == "unet":
        module = sgm_module_name(module, unet_config["layers_per_block"]) if sdxl else module
        return f"lora_unet_{module.replace('.', '_')}.{kind}"
    module = module if module.startswith("text_model.") else "text_model." + module
    prefix = {"text_encoder": "lora_te1" if sdxl else "lora_te", "text_encoder_2": "lora_te2"}[component]
    return f"{prefix}_{module.replace('.', '_')}.{kind}"


def sgm_module_name(module: str, layers_per_block: int) -> str:
    """Returns the original (SGM / CompVis) UNet's name of a diffusers UNet attention module.

    The original UNet numbers its blocks in one list per side: input_blocks[0] is conv_in, then each down level
    has layers_per_block (ResBlock, SpatialTransformer) pairs and a Downsample; the middle block is (ResBlock,
    SpatialTransformer, ResBlock); each up level has layers_per_block + 1 pairs. So (the inverse of diffusers'
    lora_conversion_utils._maybe_map_sgm_blocks_to_diffusers)
        down_blocks.i.attentions.j -> input_blocks.{1 + i (layers_per_block + 1) + j}.1
        mid_block.attentions.0     -> middle_block.1
        up_blocks.i.attentions.j   -> output_blocks.{i (layers_per_block + 1) + j}.1
    and the names inside a transformer block (transformer_blocks.k.attn1.to_q, proj_in, ...) are the same.
    """
    parts = module.split(".")
    if parts[:3] == ["mid_block", "attentions", "0"]:
        return ".".join(["middle_block", "1", *parts[3:]])
    if len(parts) > 4 and parts[0] in ("down_blocks", "up_blocks") and parts[2] == "attentions":
        level, index = int(parts[1]), int(parts[3])
        if parts[0] == "down_blocks":
            return ".".join(["input_blocks", str(1 + level * (layers_per_block + 1) + index), "1", *parts[4:]])
        return ".".join(["output_blocks", str(level * (layers_per_block + 1) + index), "1", *parts[4:]])
    raise ValueError(f"no kohya SDXL name for UNet module {module!r}: only attention blocks' layers have one "
                     "here (LoRA targets to_q, to_k, to_v, to_out.0)")


def to_kohya(unet, text_encoder=None, text_encoder_2=None) -> dict[str, torch.Tensor]:
    """Returns the adapters as a kohya state dict: `.lora_down.weight`, `.lora_up.weight` and `.alpha` per layer.

    An SDXL UNet's file uses SDXL's names (lora_unet_input_blocks_..., lora_te1_, lora_te2_; kohya_key)."""
    from ldm.models.denoiser import component_name

    if component_name(unet) != "unet":
        raise ValueError("the kohya/web-UI LoRA format names UNet layers; a transformer's LoRA is written in "
                         "diffusers' format only (drop --export_webui)")
    _check_text_encoder_2(unet, text_encoder_2)
    state = {f"unet.{k}": v for k, v in peft_state_dict(unet).items()}
    for name, encoder in (("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2)):
        if encoder is not None and has_lora(encoder):
            state.update({f"{name}.{k}": v for k, v in peft_state_dict(encoder).items()})
    kohya = {}
    for key, value in state.items():
        name = kohya_key(key, unet.config)
        kohya[name] = value
        if name.endswith(".lora_down.weight"):  # alpha = rank: B already carries alpha / rank
            kohya[name.replace(".lora_down.weight", ".alpha")] = torch.tensor(float(value.shape[0]))
    return kohya


def save_webui_lora(path: str, unet, text_encoder=None, metadata: dict | None = None, text_encoder_2=None) -> str:
    """Writes a kohya-format .safetensors file (AUTOMATIC1111, ComfyUI, InvokeAI) with ss_* metadata; returns path."""
    from safetensors.torch import save_file

    state = to_kohya(unet, text_encoder, text_encoder_2)
    rank = next(v.shape[0] for k, v in state.items() if k.endswith(".lora_down.weight"))
    trained_text = any(k.startswith(("lora_te_", "lora_te1_", "lora_te2_")) for k in state)
    info = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(rank),
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
    path = os.path.join(source, weight_name or WEIGHT_NAME) if os.path.isdir(source) else str(source)
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

