"""The denoiser interface: every backbone is called as

    denoise(model, latents, time, text_context, pooled_text=None, time_ids=None) -> prediction   # (B, C, h, w)

so that the training step, the pipeline and the diagnostics never know which backbone they hold. A backbone of our
own (ldm.models.dit.LatentDiT) implements `forward(latents, time, text_context, pooled_text=None)` and returns the
tensor; a diffusers class with another call signature (UNet2DConditionModel, PixArtTransformer2DModel) gets an
adapter in ADAPTERS. COMPONENT names the model folder's subfolder for each class ("unet" for the UNet,
"transformer" for transformers, as diffusers names them); denoiser_of finds the one in a components dict.
"""
from __future__ import annotations

from typing import Callable

import torch


def _unet(model, latents, time, text_context, pooled_text=None, time_ids=None, **kwargs):
    # UNet2DConditionModel: cross-attention over the token embeddings; SD 1.x/2.x use no pooled text. SDXL's
    # ("text_time") adds the pooled text (B, D2) and the size/crop numbers time_ids (B, 6) to the time embedding.
    if _unwrapped(model).config.addition_embed_type == "text_time":
        if pooled_text is None or time_ids is None:
            raise ValueError("this UNet is SDXL's (addition_embed_type='text_time'): it needs pooled_text (B, D) and "
                             "time_ids (B, 6) = original size, crop top-left, target size (ldm.models.sdxl)")
        kwargs["added_cond_kwargs"] = {"text_embeds": pooled_text, "time_ids": time_ids}
    return model(latents, time, encoder_hidden_states=text_context, return_dict=False, **kwargs)[0]


def _pixart(model, latents, time, text_context, pooled_text=None, time_ids=None, cross_attention_kwargs=None,
            **kwargs):
    # PixArtTransformer2DModel: cross-attention to the projected tokens, adaLN-single from the timestep (B,);
    # it has no LoRA scale of its own, so cross_attention_kwargs={"scale": s} is applied here
    from diffusers.utils import scale_lora_layers, unscale_lora_layers

    time = torch.as_tensor(time, device=latents.device).reshape(-1).expand(latents.shape[0])
    scale = (cross_attention_kwargs or {}).get("scale")
    if scale is not None:
        scale_lora_layers(model, scale)
    try:
        return model(latents, encoder_hidden_states=text_context, timestep=time,
                     added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False, **kwargs)[0]
    finally:
        if scale is not None:
            unscale_lora_layers(model, scale)


ADAPTERS: dict[str, Callable] = {"UNet2DConditionModel": _unet, "PixArtTransformer2DModel": _pixart}
COMPONENT: dict[str, str] = {"UNet2DConditionModel": "unet", "LatentDiT": "transformer",
                             "PixArtTransformer2DModel": "transformer"}
BACKBONES = ("unet", "transformer")  # the model folder's possible denoiser subfolders


def _unwrapped(model) -> torch.nn.Module:
    """Returns the module inside a DDP / torch.compile wrapper (or the module itself)."""
    return getattr(model, "module", None) or getattr(model, "_orig_mod", None) or model


def _adapter(model) -> Callable | None:
    for cls in type(model).__mro__:
        if cls.__name__ in ADAPTERS:
            return ADAPTERS[cls.__name__]
    return None


def denoise(model, latents: torch.Tensor, time: torch.Tensor, text_context: torch.Tensor,
            pooled_text: torch.Tensor | None = None, time_ids: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
    """Returns the backbone's prediction for noised latents (B, C, h, w) at `time` given the text tokens'
    embeddings (B, L, D) and, for backbones that use it, the pooled text embedding (B, D) and SDXL's
    micro-conditioning time_ids (B, 6).

    `model` may be wrapped (DDP, torch.compile): the call goes through the wrapper, so gradients sync. Keyword
    arguments go to the backbone as they are (e.g. the UNet's cross_attention_kwargs={"scale": ...} for LoRA).
    """
    adapter = _adapter(_unwrapped(model))
    if adapter is None:
        return model(latents, time, text_context, pooled_text, **kwargs)
    return adapter(model, latents, time, text_context, pooled_text, time_ids, **kwargs)


def denoiser_of(parts) -> torch.nn.Module:
    """Returns the denoiser of a components dict ({"unet": ...} or {"transformer": ...}) or of a pipeline."""
    get = parts.get if isinstance(parts, dict) else lambda name: getattr(parts, name, None)
    found = [get(name) for name in BACKBONES if get(name) is not None]
    if len(found) != 1:
        raise ValueError(f"expected exactly one denoiser (unet or transformer), found {len(found)}")
    return found[0]


def component_name(model) -> str:
    """Returns the model folder's subfolder for this backbone ("unet" or "transformer")."""
    for cls in type(model).__mro__:
        if cls.__name__ in COMPONENT:
            return COMPONENT[cls.__name__]
    return "transformer"
