"""SDXL's conditioning in the Pipeline: both text encoders, the pooled text and the size/crop time_ids, as
diffusers' StableDiffusionXLPipeline makes them (Podell et al. 2023, arXiv:2307.01952).

    pipe = Pipeline.from_pretrained("models/sdxl")            # a folder with text_encoder_2/ and tokenizer_2/
    pipe("a red circle", original_size=(512, 512), crops_coords_top_left=(0, 0), target_size=(1024, 1024))

- Text (ldm.models.sdxl.encode_text): the penultimate hidden states of both encoders concatenated,
  (B, 77*k, D1 + D2), and the pooled embedding, text_encoder_2's projected end-of-text token, (B, D2). A1111
  emphasis and long prompts (ldm.pipelines.prompts) work as for SD 1.x: each encoder's half is weighted and
  renormalised on its own (as A1111's two SDXL embedders do), and a prompt past 75 tokens is encoded in 77-token
  windows by both encoders; its pooled embedding is its FIRST window's (as A1111 and ComfyUI take it).
- Negative conditioning: with force_zeros_for_empty_prompt (SDXL base's model_index.json), a negative prompt
  that is None or "" gives an all-zero context AND pooled embedding, not the encoded "". diffusers zeroes only
  for None (it encodes ""); A1111 zeroes "" too, and so do we.
- Micro-conditioning (Sec. 2.2): time_ids = (original h, w, crop top, left, target h, w) per image (the call's
  original_size, crops_coords_top_left, target_size; defaults (height, width), (0, 0), (height, width)). Given
  any negative_* size, the unconditional branch gets its own time_ids, each missing value defaulting as the
  conditional's (the crop to (0, 0)); diffusers uses them only when both negative sizes are given.
"""
from __future__ import annotations

import contextlib
import numbers
from dataclasses import dataclass
from functools import cached_property

import torch

from ldm.models import sdxl
from ldm.pipelines.calls import lora_scaled
from ldm.pipelines.checks import CALL_RANGES
from ldm.pipelines.prompts import tokenize_prompts
from ldm.ranges import in_interval

@dataclass
class AddedConditioning:
    """An SDXL call's pooled text (B*n, D2) and time_ids (B*n, 6) for each branch; the negative ones are None
    without guidance. The denoiser takes them with the context, uncond first (ldm.models.denoiser.denoise)."""
    pooled: torch.Tensor
    time_ids: torch.Tensor
    negative_pooled: torch.Tensor | None = None
    negative_time_ids: torch.Tensor | None = None

    def cond(self) -> dict:
        """Returns denoise()'s keywords for the conditional branch alone."""
        return dict(pooled_text=self.pooled, time_ids=self.time_ids)

    @cached_property
    def _both(self) -> dict:
        return dict(pooled_text=torch.cat([self.negative_pooled, self.pooled]),        # (2B*n, D2)
                    time_ids=torch.cat([self.negative_time_ids, self.time_ids]))      # (2B*n, 6)

    def both(self) -> dict:
        """Returns denoise()'s keywords for the batched [uncond; cond] call."""
        return self._both


def check_inputs(pipe, size: tuple[int, int], prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds=None,
                 negative_pooled_prompt_embeds=None, original_size=None, crops_coords_top_left=None, target_size=None,
                 negative_original_size=None, negative_crops_coords_top_left=None, negative_target_size=None) -> dict:
    """Returns SDXL's call arguments by name after checking them: the pooled embeddings, and the six sizes with
    their defaults for an image of `size` (height, width) filled in (resolved_sizes). Raises ValueError when
    they go to a model that is not SDXL, when given prompt_embeds lack their pooled embeddings, or when a size
    is not a pair of pixel counts."""
    pooled = dict(pooled_prompt_embeds=pooled_prompt_embeds,
                  negative_pooled_prompt_embeds=negative_pooled_prompt_embeds)
    sizes = dict(original_size=original_size, crops_coords_top_left=crops_coords_top_left, target_size=target_size,
                 negative_original_size=negative_original_size, negative_target_size=negative_target_size,
                 negative_crops_coords_top_left=negative_crops_coords_top_left)
    inputs = {**pooled, **sizes}
    given = [name for name, value in inputs.items() if value is not None]
    if not pipe.is_sdxl:
        if given:
            raise ValueError(f"{', '.join(given)}: SDXL's pooled text and size/crop micro-conditioning, but this "
                             "model is not SDXL (its UNet has no addition_embed_type='text_time'); drop them")
        return inputs
    for embeds, name in ((prompt_embeds, "pooled_prompt_embeds"), (negative_prompt_embeds,
                                                                   "negative_pooled_prompt_embeds")):
        if embeds is not None and pooled[name] is None:
            raise ValueError(f"{name} is needed with {name.replace('pooled_', '')} for an SDXL model: pass "
                             "text_encoder_2's pooled embeddings (pipe.encode_prompt returns them), (B, "
                             f"{pipe.text_encoder_2.config.projection_dim})")
        if embeds is None and pooled[name] is not None:
            raise ValueError(f"{name} goes with {name.replace('pooled_', '')}; pass both or neither")
    allowed = CALL_RANGES["size_conditioning"]
    for name, value in sizes.items():
        if value is not None and not (isinstance(value, (tuple, list)) and len(value) == 2 and all(
                isinstance(v, numbers.Real) and not isinstance(v, bool) and in_interval(float(v), allowed)
                for v in value)):
            kind = "(top, left)" if "crops" in name else "(height, width)"
            raise ValueError(f"{name}={value!r} must be a pair of numbers {kind} in pixels, each in {allowed}, "
                             f"e.g. {(0, 0) if 'crops' in name else (1024, 1024)}")
    return {**pooled, **resolved_sizes(sizes, *size)}


def resolved_sizes(sizes: dict, height: int, width: int) -> dict:
    """Returns the six sizes with their defaults (module docstring): original and target (height, width), crop
    (0, 0); the negative ones the positive ones, or where any negative one is given, each missing one the
    positive's (the crop (0, 0))."""
    original = tuple(sizes["original_size"] or (height, width))
    crop = tuple(sizes["crops_coords_top_left"] or (0, 0))
    target = tuple(sizes["target_size"] or (height, width))
    negatives = [sizes[f"negative_{name}"] for name in ("original_size", "crops_coords_top_left", "target_size")]
    if any(value is not None for value in negatives):
        negatives = [tuple(negatives[0] or original), tuple(negatives[1] or (0, 0)), tuple(negatives[2] or target)]
    else:
        negatives = [original, crop, target]
    return dict(zip(("original_size", "crops_coords_top_left", "target_size", "negative_original_size",
                     "negative_crops_coords_top_left", "negative_target_size"), (original, crop, target, *negatives)))


def conditioning(pipe, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, num_images_per_prompt: int,
                 do_cfg: bool, clip_skip, lora_scale, device, prompt_syntax: str, long_prompts: str, inputs: dict):
    """Returns (prompt_embeds, negative_embeds, AddedConditioning) of an SDXL call: the prompts encoded
    (encode_prompt) or the given embeddings (given_embeddings), and the time_ids of `inputs` (check_inputs)."""
    if prompt_embeds is None:
        embeds = encode_prompt(pipe, prompt, negative_prompt, num_images_per_prompt, do_cfg, clip_skip, lora_scale,
                               device, prompt_syntax, long_prompts)
    else:
        embeds = given_embeddings(pipe, prompt_embeds, negative_prompt_embeds, inputs["pooled_prompt_embeds"],
                                  inputs["negative_pooled_prompt_embeds"], negative_prompt, num_images_per_prompt,
                                  do_cfg, clip_skip, lora_scale, device, prompt_syntax, long_prompts)
    return embeds[0], embeds[1], added_conditioning(embeds[2], embeds[3], inputs)


def added_conditioning(pooled: torch.Tensor, negative_pooled: torch.Tensor | None, sizes: dict) -> AddedConditioning:
    """Returns the call's AddedConditioning: the pooled embeddings with each image's time_ids from the resolved
    sizes (resolved_sizes), as diffusers' StableDiffusionXLPipeline._get_add_time_ids makes them."""
    count, dtype, device = pooled.shape[0], pooled.dtype, pooled.device
    ids = sdxl.time_ids(sizes["original_size"], sizes["crops_coords_top_left"], sizes["target_size"], dtype,
                        device).expand(count, 6)  # (B*n, 6)
    if negative_pooled is None:
        return AddedConditioning(pooled, ids)
    negative_ids = sdxl.time_ids(sizes["negative_original_size"], sizes["negative_crops_coords_top_left"],
                                 sizes["negative_target_size"], dtype, device).expand(count, 6)  # (B*n, 6)
    return AddedConditioning(pooled, ids, negative_pooled, negative_ids)


def encode_texts(pipe, texts: list[str], clip_skip: int | None, lora_scale: float | None, device,
                 prompt_syntax: str, long_prompts: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (context (N, 77*k, D1 + D2), pooled (N, D2)) of N prompts: both encoders over the same k windows
    (ldm.pipelines.prompts), each half weighted by its emphasis on its own, the pooled embedding the first
    window's."""
    tokens_1 = tokenize_prompts(pipe.tokenizer, texts, prompt_syntax, long_prompts)    # ids (N*k, 77)
    tokens_2 = tokenize_prompts(pipe.tokenizer_2, texts, prompt_syntax, long_prompts)  # same windows, "!" padding
    assert tokens_2.windows == tokens_1.windows, "SDXL's two tokenizers share CLIP's vocabulary, so its windows"
    with lora_scaled(pipe.text_encoder, lora_scale), lora_scaled(pipe.text_encoder_2, lora_scale):
        hidden, pooled = sdxl.encode_text(pipe.text_encoder, pipe.text_encoder_2, tokens_1.ids.to(device),
                                          tokens_2.ids.to(device), clip_skip)  # (N*k, 77, D1 + D2), (N*k, D2)
    width_1 = pipe.text_encoder.config.hidden_size
    context = torch.cat([tokens_1.weighted(hidden[..., :width_1]), tokens_2.weighted(hidden[..., width_1:])],
                        dim=-1)  # (N, 77*k, D1 + D2)
    pooled = pooled.reshape(len(texts), tokens_1.windows, -1)[:, 0]  # (N, D2)
    dtype = pipe.text_encoder_2.dtype
    return context.to(device, dtype), pooled.to(device, dtype)


def encode_prompt(pipe, prompt: list[str], negative_prompt: list[str] | None, num_images_per_prompt: int,
                  do_cfg: bool, clip_skip: int | None = None, lora_scale: float | None = None, device=None,
                  prompt_syntax: str = "a1111", long_prompts: str = "chunk"):
    """Returns (prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds):
    (B*n, 77*k, D1 + D2) and (B*n, D2), the negative ones None without guidance, as diffusers' SDXL
    encode_prompt. The prompts and the negative prompts that are encoded go through each encoder in one batched
    call; a negative prompt None or "" is zeros under force_zeros_for_empty_prompt (module docstring). clip_skip
    applies to both branches (diffusers: the conditional one only)."""
    negatives = negative_prompt if negative_prompt is not None else [""] * len(prompt)
    zero = [do_cfg and pipe.config.force_zeros_for_empty_prompt and not text for text in negatives]  # per prompt
    encode_negatives = do_cfg and not all(zero)
    texts = (negatives if encode_negatives else []) + prompt
    context, pooled = encode_texts(pipe, texts, clip_skip, lora_scale, device, prompt_syntax, long_prompts)
    if not do_cfg:
        context, pooled = repeat(num_images_per_prompt, context, pooled)
        return context, None, pooled, None
    if encode_negatives:
        (negative_context, context), (negative_pooled, pooled) = context.chunk(2), pooled.chunk(2)  # (B, ...) each
    else:
        negative_context, negative_pooled = torch.zeros_like(context), torch.zeros_like(pooled)
    negative_context, negative_pooled = zero_rows(zero, negative_context, negative_pooled)
    return repeat(num_images_per_prompt, context, negative_context, pooled, negative_pooled)


def zero_rows(zero: list[bool], *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Returns each tensor (B, ...) with the rows where `zero` is True set to 0 (an empty negative prompt's
    conditioning under force_zeros_for_empty_prompt)."""
    keep = torch.tensor([not z for z in zero], device=tensors[0].device)  # (B,)
    return tuple(t * keep.reshape(-1, *[1] * (t.ndim - 1)).to(t.dtype) for t in tensors)


def repeat(count: int, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Returns each tensor with its rows repeated `count` times in place: (B, ...) -> (B*count, ...)."""
    return tuple(t.repeat_interleave(count, 0) for t in tensors)


def given_embeddings(pipe, prompt_embeds, negative_prompt_embeds, pooled, negative_pooled,
                     negative_prompt: list[str] | None, num_images_per_prompt: int, do_cfg: bool,
                     clip_skip: int | None, lora_scale: float | None, device, prompt_syntax: str, long_prompts: str):
    """Returns encode_prompt's four tensors for given prompt_embeds (B, L, D) and pooled_prompt_embeds (B, D2):
    the negatives as given, else zeros (force_zeros_for_empty_prompt and no negative text) or the negative
    prompt's text (or "") encoded, padded with empty windows to L tokens."""
    dtype = pipe.text_encoder_2.dtype
    prompt_embeds, pooled = prompt_embeds.to(device, dtype), pooled.to(device, dtype)
    if not do_cfg:
        prompt_embeds, pooled = repeat(num_images_per_prompt, prompt_embeds, pooled)
        return prompt_embeds, None, pooled, None
    if negative_prompt_embeds is None:
        batch, length = prompt_embeds.shape[:2]
        texts = negative_prompt if negative_prompt is not None else [""] * batch
        zero = [pipe.config.force_zeros_for_empty_prompt and not text for text in texts]
        if all(zero):
            negative_prompt_embeds, negative_pooled = torch.zeros_like(prompt_embeds), torch.zeros_like(pooled)
        else:
            negative_prompt_embeds, negative_pooled = encode_texts(pipe, texts, clip_skip, lora_scale, device,
                                                                   prompt_syntax, long_prompts)
            if negative_prompt_embeds.shape[1] > length:
                raise ValueError(f"negative_prompt encodes to {negative_prompt_embeds.shape[1]} tokens, more than the "
                                 f"{length} of prompt_embeds; pass negative_prompt_embeds")
            empty = encode_texts(pipe, [""] * batch, clip_skip, lora_scale, device, "plain", "chunk")[0]  # (B, 77, D)
            windows = -(-(length - negative_prompt_embeds.shape[1]) // empty.shape[1])
            padding = empty.repeat(1, windows, 1)  # the empty prompt's windows, as encode_prompt pads
            negative_prompt_embeds = torch.cat([negative_prompt_embeds, padding], dim=1)[:, :length]  # (B, L, D)
            negative_prompt_embeds, negative_pooled = zero_rows(zero, negative_prompt_embeds, negative_pooled)
    return repeat(num_images_per_prompt, prompt_embeds, negative_prompt_embeds.to(prompt_embeds),
                  pooled, negative_pooled.to(pooled))


@contextlib.contextmanager
def vae_upcast(pipe):
    """Runs the block with an SDXL float16 VAE in float32 when its config asks (force_upcast: SDXL's VAE
    overflows in float16), as diffusers' SDXL pipelines decode; a no-op otherwise."""
    vae = pipe.vae
    if not (pipe.is_sdxl and vae.dtype == torch.float16 and vae.config.get("force_upcast", False)):
        yield vae.dtype
        return
    vae.to(torch.float32)
    try:
        yield torch.float32
    finally:
        vae.to(torch.float16)
