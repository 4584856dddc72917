"""Checks for Pipeline.__call__: its inputs, and its results (no NaN images). Every error names the problem and the fix."""
from __future__ import annotations

import dataclasses
import math
import numbers

import torch

from ldm.pipelines.guidance import APGSettings, Guidance
from ldm.pipelines.schedulers import ZERO_SNR_EXACT

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def _as_prompt_list(value, name: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)):
        if len(value) == 0:
            raise ValueError(f"{name} is an empty list; pass at least one string")
        bad = [type(v).__name__ for v in value if not isinstance(v, str)]
        if bad:
            raise ValueError(f"{name} must be a str or a list of str, but the list holds {', '.join(sorted(set(bad)))}; "
                             "convert each item with str()")
        return list(value)
    raise ValueError(f"{name} must be a str or a list of str, not {type(value).__name__}")


def check_call_inputs(pipe, prompt, height, width, steps, guidance_scale, negative_prompt, num_images_per_prompt,
                      eta, generator, latents, prompt_embeds, negative_prompt_embeds, output_type, guidance_rescale,
                      callback_tensor_inputs) -> tuple[list[str] | None, list[str] | None]:
    """Returns (prompts, negative_prompts) as lists after validating every argument of a pipeline call."""
    f = pipe.vae_scale_factor
    for name, side in (("height", height), ("width", width)):
        if not isinstance(side, int) or side <= 0 or side % f:
            below = int(side // f * f) if isinstance(side, (int, float)) else 0
            fix = f"use {name}={below} or {below + f}" if below >= f else f"use {name}={f} or larger"
            raise ValueError(f"{name}={side} is not a positive multiple of {f} (the VAE's downsampling factor); {fix}")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"num_inference_steps={steps!r} must be an integer >= 1 (e.g. 50)")
    if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
        raise ValueError(f"num_images_per_prompt={num_images_per_prompt!r} must be an integer >= 1")
    if not isinstance(guidance_scale, (int, float)):
        raise ValueError(f"guidance_scale must be a number (7.5 is typical), not {type(guidance_scale).__name__}")
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta={eta} must be in [0, 1] (0: deterministic DDIM, 1: DDPM-like noise)")
    if not 0.0 <= guidance_rescale <= 1.0:
        raise ValueError(f"guidance_rescale={guidance_rescale} must be in [0, 1] (0.7 is the paper's choice)")
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type={output_type!r} is not one of {', '.join(OUTPUT_TYPES)}")
    unknown = [k for k in callback_tensor_inputs if k not in pipe._callback_tensor_inputs]
    if unknown:
        raise ValueError(f"callback_on_step_end_tensor_inputs {unknown} are not available; "
                         f"choose from {pipe._callback_tensor_inputs}")

    if (prompt is None) == (prompt_embeds is None):
        raise ValueError("pass exactly one of prompt (str or list of str) and prompt_embeds (tensor)")
    prompts = _as_prompt_list(prompt, "prompt") if prompt is not None else None
    batch = len(prompts) if prompts is not None else prompt_embeds.shape[0]
    negatives = None
    if negative_prompt is not None:
        if negative_prompt_embeds is not None:
            raise ValueError("pass negative_prompt or negative_prompt_embeds, not both")
        negatives = _as_prompt_list(negative_prompt, "negative_prompt")
        if len(negatives) == 1 and batch > 1 and isinstance(negative_prompt, str):
            negatives = negatives * batch  # one negative prompt string applies to every prompt
        if len(negatives) != batch:
            raise ValueError(f"negative_prompt has {len(negatives)} entries but there are {batch} prompts; "
                             "pass one negative prompt per prompt, or a single string for all")
    if prompt_embeds is not None and negative_prompt_embeds is not None and \
            prompt_embeds.shape != negative_prompt_embeds.shape:
        raise ValueError(f"prompt_embeds {tuple(prompt_embeds.shape)} and negative_prompt_embeds "
                         f"{tuple(negative_prompt_embeds.shape)} must have the same shape")

    total = batch * num_images_per_prompt
    if isinstance(generator, list) and len(generator) != total:
        raise ValueError(f"got {len(generator)} generators for {total} images (prompts x num_images_per_prompt); "
                         "pass one generator per image or a single generator")
    if latents is not None:
        expected = (total, pipe.denoiser.config.in_channels, height // f, width // f)
        if not isinstance(latents, torch.Tensor) or tuple(latents.shape) != expected:
            got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ValueError(f"latents must be a tensor of shape {expected} for these settings, got {got}")
    return prompts, negatives


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_interval(interval) -> tuple[float, float] | None:
    """Returns guidance_interval as (t_lo, t_hi) floats, or None."""
    if interval is None:
        return None
    fix = ("pass (t_lo, t_hi) in the scheduler's timesteps with 0 <= t_lo <= t_hi, e.g. (200, 800) for a "
           "1000-step model (sigma * 1000 for a flow model), or None to guide every step")
    if not isinstance(interval, (tuple, list)) or len(interval) != 2 or not all(map(_is_number, interval)):
        raise ValueError(f"guidance_interval={interval!r} is not a pair of numbers; {fix}")
    lo, hi = float(interval[0]), float(interval[1])
    if math.isnan(lo) or math.isnan(hi) or lo < 0:
        raise ValueError(f"guidance_interval={interval!r} has a negative or NaN end; {fix}")
    if lo > hi:
        raise ValueError(f"guidance_interval={interval!r} starts after it ends (t_lo > t_hi); swap them: "
                         f"guidance_interval=({hi:g}, {lo:g})")
    return lo, hi


def _apg_settings(apg) -> APGSettings | None:
    """Returns apg (None, False, True, a dict or APGSettings) as APGSettings, or None when off."""
    if apg is None or apg is False:
        return None
    keys = [f.name for f in dataclasses.fields(APGSettings)]
    if isinstance(apg, dict):
        unknown = sorted(set(apg) - set(keys))
        if unknown:
            raise ValueError(f"apg has unknown keys {unknown}; its keys are {', '.join(keys)}")
        apg = APGSettings(**apg)
    if apg is True:
        apg = APGSettings()
    if not isinstance(apg, APGSettings):
        raise ValueError(f"apg must be True, a dict with keys {', '.join(keys)}, or an APGSettings, not "
                         f"{type(apg).__name__}")
    bad = [k for k in keys if not _is_number(getattr(apg, k))]
    if bad:
        raise ValueError(f"apg {', '.join(bad)} must be numbers, got {apg}")
    if not apg.eta >= 0:
        raise ValueError(f"apg eta={apg.eta!r} must be >= 0: 0 drops the guidance's component parallel to the "
                         "conditional prediction (the paper's choice), 1 keeps it")
    if not apg.norm_threshold >= 0:
        raise ValueError(f"apg norm_threshold={apg.norm_threshold!r} must be >= 0 (0 = no cap on the guidance "
                         "update's norm; the paper uses 15 for Stable Diffusion XL)")
    if not -1 < apg.momentum < 1:
        raise ValueError(f"apg momentum={apg.momentum!r} must be in (-1, 1): the paper uses -0.5; 0 = no momentum")
    return apg


def check_guidance(guidance_scale, guidance_rescale, guidance_interval, apg, cfg_zero_star, cfg_zero_init_steps,
                   steps: int) -> Guidance:
    """Returns the call's Guidance (its state fresh) after validating the guidance methods' arguments; steps is
    the validated num_inference_steps."""
    interval, settings = _check_interval(guidance_interval), _apg_settings(apg)
    if not isinstance(cfg_zero_star, bool):
        raise ValueError(f"cfg_zero_star={cfg_zero_star!r} must be True or False")
    if settings is not None and cfg_zero_star:
        raise ValueError("apg and cfg_zero_star are two rules for combining the two predictions; pass one of them "
                         "(cfg_zero_init_steps and guidance_interval go with either)")
    if not isinstance(cfg_zero_init_steps, int) or isinstance(cfg_zero_init_steps, bool) or \
            not 0 <= cfg_zero_init_steps < steps:
        raise ValueError(f"cfg_zero_init_steps={cfg_zero_init_steps!r} must be an integer in [0, {steps}) "
                         f"(num_inference_steps={steps}): 0 = off; the CFG-Zero* authors zero about 4% of the steps")
    return Guidance(guidance_scale, guidance_rescale, interval, settings, cfg_zero_star, cfg_zero_init_steps)


class NonFiniteError(RuntimeError):
    """A pipeline call produced NaN or inf latents or pixels; the message names where and the likely causes."""


def check_finite(finite_steps: list[torch.Tensor], timesteps: torch.Tensor, scheduler, dtype: torch.dtype,
                 decoded: torch.Tensor | None = None) -> None:
    """Raises NonFiniteError naming the first denoising step whose latents hold NaN or inf, or saying that the
    VAE decoded finite latents to NaN or inf pixels.

    finite_steps: one bool flag per step, "latents all finite", still on the device; decoded: the VAE's output
    (B, 3, H, W), if any. Their values reach the host in one copy, the call's only sync for this check.
    timesteps: the host copy of the scheduler's timesteps.
    """
    flags = finite_steps + ([torch.isfinite(decoded).all()] if decoded is not None else [])
    flags = torch.stack(flags).cpu()  # (steps,) or (steps + 1,)
    if bool(flags.all()):
        return
    steps = flags[:len(finite_steps)]
    if bool(steps.all()):
        raise NonFiniteError(f"the VAE decoded finite latents to NaN/inf pixels ({decoded.dtype}); likely cause: "
                             "float16 overflow in the VAE (SD 1.x VAEs overflow in float16): load with "
                             "torch_dtype=torch.bfloat16 or torch.float32, or use a VAE fixed for float16")
    i = int((~steps).nonzero()[0])
    causes = []
    alpha_bar = getattr(scheduler, "alphas_cumprod", None)
    if alpha_bar is not None and float(alpha_bar.min()) <= 0 and type(scheduler) not in ZERO_SNR_EXACT:
        causes.append(f"the schedule has zero terminal SNR (alpha_bar = 0 at t = T-1), which "
                      f"{type(scheduler).__name__} divides by: choose the sampler by name, e.g. "
                      "pipe.set_scheduler('euler'), which clamps it (ldm.pipelines.schedulers.zero_snr_safe_config)")
    if dtype == torch.float16:
        causes.append("float16 overflow: load with torch_dtype=torch.bfloat16 or torch.float32")
    causes.append("a diverged model (check its training loss and validation images)")
    raise NonFiniteError(f"the latents became NaN/inf at denoising step {i} of {len(steps)} "
                         f"(timestep t={float(timesteps[i]):g}, {type(scheduler).__name__}); likely cause: "
                         + "; or ".join(causes))
