"""Checks for Pipeline.__call__: its inputs, and its results (no NaN images). Every error names the problem and the fix."""
from __future__ import annotations

import dataclasses
import numbers

import torch

from ldm.pipelines.guidance import APGSettings, Guidance
from ldm.pipelines.schedulers import ZERO_SNR_EXACT
from ldm.ranges import check_multiple, in_interval

OUTPUT_TYPES = ("pil", "np", "pt", "latent")

# The allowed range of each numeric argument of Pipeline.__call__ (and of APGSettings' fields, as apg_*).
# `ldm generate` declares its flags with these same ranges (int_in(CALL_RANGES[...])), so Python and the CLI
# refuse the same values. num_images_per_prompt is one call's batch: the CLI's --batch-size.
CALL_RANGES = {
    "num_inference_steps": "[1, 1000]", "guidance_scale": "[0, 100]", "guidance_rescale": "[0, 1]",
    "eta": "[0, 1]", "num_images_per_prompt": "[1, 1024]", "height": "[8, 8192]", "width": "[8, 8192]",
    "clip_skip": "[0, 32]", "cfg_zero_init_steps": "[0, 1000]", "guidance_interval": "[0, inf)",
    "apg_eta": "[0, inf)", "apg_norm_threshold": "[0, inf)", "apg_momentum": "(-1, 1)", "lora_scale": "[-10, 10]",
    "strength": "[0, 1]", "mask_blur": "[0, 256]", "size_conditioning": "[0, 65536]",
    # the drift remedies (ldm.pipelines.drift)
    "eps_scale": "(0, 10]", "eps_scale_slope": "[-1, 1]", "threshold_ratio": "(0, 1]",
    "threshold_max_value": "[1, inf)", "restart_t": "[0, inf)", "restart_K": "[0, 100]",
}
_HINTS = {
    "num_inference_steps": " (e.g. 50)", "guidance_scale": " (7.5 is typical; <= 1 turns guidance off)",
    "guidance_rescale": " (0.7 is the paper's choice)", "eta": " (0: deterministic DDIM, 1: DDPM-like noise)",
    "clip_skip": " (None: the last layer; k: the k-th layer from the end)",
    "lora_scale": " (0: the base model, 1: as trained)",
    "strength": " (0: the image unchanged, 1: only its mask and size kept; 0.6 is typical for img2img)",
    "mask_blur": " (pixels of Gaussian feathering of the mask's edge; 0 = off)",
}


def check_number(name: str, value, integer: bool = False):
    """Returns value after checking that it is a number (an int if `integer`) in CALL_RANGES[name]; raises
    ValueError naming the argument, its value and the range otherwise."""
    kind = "an integer" if integer else "a number"
    ok = _is_number(value) and (isinstance(value, int) or not integer)
    if not ok or not in_interval(float(value), CALL_RANGES[name]):
        raise ValueError(f"{name}={value!r} must be {kind} in {CALL_RANGES[name]}{_HINTS.get(name, '')}")
    return value


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
                      callback_tensor_inputs, clip_skip=None) -> tuple[list[str] | None, list[str] | None]:
    """Returns (prompts, negative_prompts) as lists after validating every argument of a pipeline call."""
    f = pipe.vae_scale_factor
    for name, side in (("height", height), ("width", width)):
        check_multiple(name, side, f)
        check_number(name, side, integer=True)
    check_number("num_inference_steps", steps, integer=True)
    check_number("num_images_per_prompt", num_images_per_prompt, integer=True)
    check_number("guidance_scale", guidance_scale)
    check_number("eta", eta)
    check_number("guidance_rescale", guidance_rescale)
    if clip_skip is not None:
        check_number("clip_skip", clip_skip, integer=True)
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
        expected = (total, pipe.num_latent_channels, height // f, width // f)
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
    allowed = CALL_RANGES["guidance_interval"]
    if not in_interval(lo, allowed) or not in_interval(hi, allowed):
        raise ValueError(f"guidance_interval={interval!r} has a negative, NaN or infinite end (allowed: {allowed}); {fix}")
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
    if not in_interval(apg.eta, CALL_RANGES["apg_eta"]):
        raise ValueError(f"apg eta={apg.eta!r} must be >= 0: 0 drops the guidance's component parallel to the "
                         "conditional prediction (the paper's choice), 1 keeps it")
    if not in_interval(apg.norm_threshold, CALL_RANGES["apg_norm_threshold"]):
        raise ValueError(f"apg norm_threshold={apg.norm_threshold!r} must be >= 0 (0 = no cap on the guidance "
                         "update's norm; the paper uses 15 for Stable Diffusion XL)")
    if not in_interval(apg.momentum, CALL_RANGES["apg_momentum"]):
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
            not 0 <= cfg_zero_init_steps < steps:  # steps <= 1000: inside CALL_RANGES["cfg_zero_init_steps"]
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
    if not flags:  # no step and no decode: an img2img call at strength 0 with output_type="latent"
        return
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
