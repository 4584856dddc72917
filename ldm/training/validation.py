"""Validation: a deterministic loss per timestep bin, and prompt grids as PNG.

The validation loss uses fixed latents (posterior means of the first images), fixed noise and fixed, evenly
spread timesteps, so two evaluations differ only by the weights: it goes down when (and only when) the model
improves. It is the unweighted MSE of the model's own target (eps, v or x0).
"""
from __future__ import annotations

import os
import random

import torch

from ldm import diffusion
from ldm.images import image_grid
from ldm.models.denoiser import denoise
from ldm.models.vae import encode_posterior
from ldm.objectives import Objective
from ldm.training.step import batch_time_ids
from ldm.training.stream import collate_dicts


def first_samples(dataset, count: int) -> dict:
    """Returns the first `count` samples of a data set (map-style or stream) as one batch; of aspect buckets
    (several sizes), the first `count` of the first sample's size."""
    mapped = hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")
    samples = []
    for sample in (dataset[i] for i in range(len(dataset))) if mapped else dataset:
        if not samples or _size(sample) == _size(samples[0]):
            samples.append(sample)
        if len(samples) == count:
            break
    if not samples:
        raise ValueError("the validation data set is empty")
    return collate_dicts(samples)


def _size(sample: dict):
    image = sample.get("latent_mean", sample.get("pixel_values"))
    return None if image is None else tuple(image.shape)


def draw_prompts(captions: list[str], count: int, seed: int) -> list[str]:
    """Returns `count` distinct non-empty captions picked by `seed` (all of them when fewer), in their order."""
    distinct = list(dict.fromkeys(c for c in captions if c.strip()))
    picked = random.Random(seed).sample(range(len(distinct)), min(count, len(distinct)))
    return [distinct[i] for i in sorted(picked)]


@torch.no_grad()
def make_val_set(batch: dict, vae, embed, timesteps_per_sample: int, objective: Objective, device) -> dict:
    """Returns {"latents", "context", "noise", "t"} (SDXL: and "pooled", "time_ids"), each repeated over the
    timesteps: (N*K, ...), and the N images' "caption" list."""
    mean = batch["latent_mean"].float() if "latent_mean" in batch else encode_posterior(vae, batch["pixel_values"])[0]
    latents = mean.to(device) * vae.config.scaling_factor  # (N, 4, h, w)
    context, pooled = embed.encode(list(batch["caption"]), device)  # (N, 77, D), SDXL: (N, D2)
    n, k = latents.shape[0], timesteps_per_sample
    t = objective.validation_times(n * k)  # spread over the whole noise range
    t = t[torch.randperm(n * k, generator=torch.Generator().manual_seed(0))]
    noise = torch.randn((n * k, *latents.shape[1:]), generator=torch.Generator().manual_seed(1234))
    val = {"latents": latents.repeat(k, 1, 1, 1), "context": context.repeat(k, 1, 1),  # (N*K, ...)
           "noise": noise.to(device), "t": t.to(device), "caption": list(batch["caption"])}  # caption: (N,)
    if pooled is not None:  # SDXL: the pooled text and each image's own size and crop (N*K, D2), (N*K, 6)
        val["pooled"] = pooled.repeat(k, 1)
        val["time_ids"] = batch_time_ids(batch, latents, vae).repeat(k, 1)
    return val


@torch.no_grad()
def validation_loss(model, val: dict, objective: Objective, num_bins: int, batch_size: int = 64) -> dict:
    """Returns {"val_loss": mean, "val_loss_bin0": ..., ...}: MSE per equal-width timestep bin (bin 0 = least noise)."""
    losses = []
    for i in range(0, len(val["t"]), batch_size):
        t = val["t"][i:i + batch_size]
        x0, noise = val["latents"][i:i + batch_size], val["noise"][i:i + batch_size]
        x_t = objective.noised(x0, noise, t)
        pooled, time_ids = (val[name][i:i + batch_size] if name in val else None for name in ("pooled", "time_ids"))
        pred = denoise(model, x_t, objective.model_time(t), val["context"][i:i + batch_size].to(x_t.dtype),
                       None if pooled is None else pooled.to(x_t.dtype), time_ids)
        losses.append(diffusion.per_sample_loss(pred, objective.target(x0, noise, t), "mse"))
    losses = torch.cat(losses).cpu()  # (N*K,)
    bins = diffusion.timestep_bins(objective.time_fraction(val["t"].cpu()), num_bins)
    report = {"val_loss": float(losses.mean())}
    for b in range(num_bins):
        report[f"val_loss_bin{b}"] = float(losses[bins == b].mean()) if (bins == b).any() else float("nan")
    return report


def inference_pipeline(parts: dict, denoiser, scheduler, text_encoder=None, ema=None, text_encoder_2=None):
    """Returns an ldm.Pipeline (with `scheduler`, the objective's: ldm.objectives.Objective.scheduler; progress bar
    off) over the weights being trained, for sampling or saving:
    the denoiser's EMA weights when `ema` is given (a copy; training's weights stay), else the denoiser itself
    (LoRA adapters active); `text_encoder` (`text_encoder_2`) replaces parts["text_encoder"] (SDXL's
    parts["text_encoder_2"], which goes in with parts["tokenizer_2"]), e.g. one being trained."""
    from ldm.pipelines import Pipeline

    if ema is not None:
        denoiser = type(denoiser).from_config(denoiser.config)
        ema.copy_to(denoiser.parameters())
    from ldm.models.denoiser import component_name

    sdxl = {name: parts[name] for name in ("text_encoder_2", "tokenizer_2") if parts.get(name) is not None}
    if text_encoder_2 is not None:
        sdxl["text_encoder_2"] = text_encoder_2
    pipe = Pipeline(vae=parts["vae"], text_encoder=text_encoder or parts["text_encoder"], tokenizer=parts["tokenizer"],
                    scheduler=scheduler, **sdxl, **{component_name(denoiser): denoiser})
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def sample_grid(pipeline, prompts: list[str], path: str, steps: int, guidance: float, seed: int = 0,
                method: str = "cfg") -> str:
    """Samples one image per prompt with a fixed seed and writes them side by side to `path` (PNG). method: a
    guidance method of ldm.evaluation.guidance_sweep.METHODS (cfg, interval, apg, cfg_zero_star, rescale)."""
    from ldm.evaluation.guidance_sweep import method_params

    generator = torch.Generator().manual_seed(seed)
    images = pipeline(prompts, num_inference_steps=steps, guidance_scale=guidance, generator=generator,
                      **method_params(method, pipeline.scheduler)).images
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    image_grid(images, len(images)).save(path)
    return path
