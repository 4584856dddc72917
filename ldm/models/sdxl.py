"""SDXL's conditioning, defined once for the Pipeline and the trainers (Podell et al. 2023, arXiv:2307.01952).

    context, pooled = encode_text(text_encoder, text_encoder_2, ids_1, ids_2)   # (B, 77, D1 + D2), (B, D2)
    ids = time_ids((1024, 1024), (0, 0), (1024, 1024))                           # (6,)
    denoise(unet, x_t, t, context, pooled, ids.expand(B, 6))

- Text: both encoders read at their penultimate layer (no final layer norm), concatenated along channels; the
  pooled embedding is the second encoder's projected end-of-text token (CLIPTextModelWithProjection.text_embeds).
- Micro-conditioning (Sec. 2.2): the image's original size (h, w) before any resize, the top-left (top, left) of
  the crop taken from the resized image, and the target size (h, w) being generated, each embedded with 256
  sinusoidal channels inside the UNet (addition_time_embed_dim).
"""
from __future__ import annotations

import torch


def is_sdxl_unet(unet) -> bool:
    """True for a UNet conditioned on pooled text and time_ids (diffusers' addition_embed_type="text_time")."""
    config = getattr(unet, "config", None)
    # diffusers' FrozenDict config, or any object with attributes (e.g. the diagnostics' closed-form models)
    value = config.get("addition_embed_type") if hasattr(config, "get") else getattr(config, "addition_embed_type", None)
    return value == "text_time"


def time_ids(original_size: tuple[int, int], crop_top_left: tuple[int, int], target_size: tuple[int, int],
             dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """Returns SDXL's six micro-conditioning numbers (6,): original (h, w), crop (top, left), target (h, w)."""
    values = [*original_size, *crop_top_left, *target_size]
    if len(values) != 6:
        raise ValueError(f"time_ids needs (h, w), (top, left) and (h, w); got {original_size}, {crop_top_left}, "
                         f"{target_size}")
    return torch.tensor([float(v) for v in values], dtype=dtype, device=device)


def encode_text(text_encoder, text_encoder_2, ids_1: torch.Tensor, ids_2: torch.Tensor,
                clip_skip: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (context (B, T, D1 + D2), pooled (B, D2)) for token ids of the two tokenizers (B, T) each.

    clip_skip=k reads layer -(k + 2) instead of the penultimate (-2), as diffusers' SDXL pipeline does.
    """
    layer = -2 if clip_skip is None else -(clip_skip + 2)
    out_1 = text_encoder(ids_1.to(text_encoder.device), output_hidden_states=True)
    out_2 = text_encoder_2(ids_2.to(text_encoder_2.device), output_hidden_states=True)
    context = torch.cat([out_1.hidden_states[layer], out_2.hidden_states[layer].to(out_1.hidden_states[layer])], -1)
    return context, out_2.text_embeds  # (B, T, D1 + D2), (B, D2)
