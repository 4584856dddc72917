"""LoRA adapters (Hu et al. 2021, arXiv:2106.09685) on the UNet and text encoder, and their file formats.

    unet_config, te_config = add_lora(unet, text_encoder, LoraSettings(rank=8, train_text_encoder=True))
    ...train...
    save_lora("out/", unet, text_encoder)              # out/pytorch_lora_weights.safetensors (diffusers)
    save_webui_lora("out/model.safetensors", unet, text_encoder, metadata={...})   # kohya keys

A LoRA layer adds (alpha / rank) * B A x to a frozen linear layer W x. Files hold B already multiplied by
alpha / rank, so every loader (diffusers with or without adapter metadata, AUTOMATIC1111, ComfyUI) reads the
same weights whatever alpha it assumes: the diffusers file records alpha = rank, the kohya file `.alpha = rank`.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

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


def save_lora(folder: str, unet, text_encoder=None) -> str:
    """Writes FOLDER/pytorch_lora_weights.safetensors in diffusers' format; returns its path.

    Loads with diffusers' `StableDiffusionPipeline.load_lora_weights(folder)` and `ldm.Pipeline.load_lora_weights`.
    A transformer's adapters are written as diffusers writes SD3's and PixArt's ("transformer.<module>...") and
    load with `LatentDiT.load_lora_adapter(file, prefix="transformer")` or `ldm.Pipeline.load_lora_weights`.
    """
    from diffusers import StableDiffusionPipeline
    from diffusers.loaders import SD3LoraLoaderMixin
    from diffusers.utils import convert_state_dict_to_diffusers

    from ldm.models.denoiser import component_name

    if component_name(unet) == "transformer":
        state = peft_state_dict(unet)
        os.makedirs(folder, exist_ok=True)
        SD3LoraLoaderMixin.save_lora_weights(folder, transformer_lora_layers=state,
                                             transformer_lora_adapter_metadata=_metadata(state, TRANSFORMER_TARGETS))
        return os.path.join(folder, WEIGHT_NAME)
    unet_state = peft_state_dict(unet)
    te_state = peft_state_dict(text_encoder) if text_encoder is not None and has_lora(text_encoder) else None
    os.makedirs(folder, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=convert_state_dict_to_diffusers(unet_state),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(te_state) if te_state else None,
        unet_lora_adapter_metadata=_metadata(unet_state, UNET_TARGETS),
        text_encoder_lora_adapter_metadata=_metadata(te_state, TEXT_ENCODER_TARGETS) if te_state else None)
    return os.path.join(folder, WEIGHT_NAME)


def kohya_key(peft_key: str) -> str:
    """Returns the kohya/web-UI name of a PEFT key, SD 1.x convention.

    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"
        -> "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight"
    "text_encoder.encoder.layers.0.self_attn.q_proj.lora_B.weight"   (transformers 5: no .text_model)
        -> "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"
    """
    component, _, rest = peft_key.partition(".")
    module, _, tail = rest.rpartition(".lora_")
    kind = {"A.weight": "lora_down.weight", "B.weight": "lora_up.weight"}.get(tail)
    if kind is None or component not in ("unet", "text_encoder"):
        raise ValueError(f"cannot name {peft_key!r} in kohya format: expected unet./text_encoder. + lora_A/lora_B")
    if component == "text_encoder":
        module = module if module.startswith("text_model.") else "text_model." + module
        return f"lora_te_{module.replace('.', '_')}.{kind}"
    return f"lora_unet_{module.replace('.', '_')}.{kind}"


def to_kohya(unet, text_encoder=None) -> dict[str, torch.Tensor]:
    """Returns the adapters as a kohya state dict: `.lora_down.weight`, `.lora_up.weight` and `.alpha` per layer."""
    from ldm.models.denoiser import component_name

    if component_name(unet) != "unet":
        raise ValueError("the kohya/web-UI LoRA format names UNet layers; a transformer's LoRA is written in "
                         "diffusers' format only (drop --export_webui)")
    state = {f"unet.{k}": v for k, v in peft_state_dict(unet).items()}
    if text_encoder is not None and has_lora(text_encoder):
        state.update({f"text_encoder.{k}": v for k, v in peft_state_dict(text_encoder).items()})
    kohya = {}
    for key, value in state.items():
        name = kohya_key(key)
        kohya[name] = value
        if name.endswith(".lora_down.weight"):  # alpha = rank: B already carries alpha / rank
            kohya[name.replace(".lora_down.weight", ".alpha")] = torch.tensor(float(value.shape[0]))
    return kohya


def save_webui_lora(path: str, unet, text_encoder=None, metadata: dict | None = None) -> str:
    """Writes a kohya-format .safetensors file (AUTOMATIC1111, ComfyUI, InvokeAI) with ss_* metadata; returns path."""
    from safetensors.torch import save_file

    state = to_kohya(unet, text_encoder)
    rank = next(v.shape[0] for k, v in state.items() if k.endswith(".lora_down.weight"))
    info = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(rank),
            "ss_base_model_version": "sd_v1", "ss_training_comment": "written by ldm finetune",
            "ss_text_encoder_lr": "0" if not any(k.startswith("lora_te_") for k in state) else "trained"}
    info.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()})
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(state, path, metadata=info)
    return path


def read_lora_file(path: str) -> dict[str, torch.Tensor]:
    """Returns a LoRA file (diffusers or kohya) as diffusers' PEFT-format state dict, via diffusers' converters."""
    from diffusers import StableDiffusionPipeline

    if not os.path.exists(path):
        raise FileNotFoundError(f"LoRA file {path} does not exist; pass a .safetensors file written by "
                                "`ldm finetune` (pytorch_lora_weights.safetensors) or a web-UI LoRA")
    state = StableDiffusionPipeline.lora_state_dict(path)
    return state[0] if isinstance(state, tuple) else state


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

