"""A fixed probe set for per-timestep diagnostics: fixed images, fixed noise, fixed timesteps, so runs compare.

    probe = make_probe(pipe, "shapes:16", num_images=8, n_bins=10, per_bin=4)
    preds = predict_probe(pipe.denoiser, probe, objective_for(pipe.scheduler))  # (N, C, h, w) eps predictions

The probe holds N = num_images * n_bins * per_bin rows: every image at every probe timestep, each with its own
noise drawn from a fixed seed. For a flow model (its scheduler a FlowMatch one, ldm.objectives.objective_for) the
probe's times are sigmas in [0, 1] instead, x_t is the flow path's x_s = (1 - s) x0 + s eps, the denoiser is given
s * num_train_timesteps, and predict_probe returns the predicted velocity.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from ldm.diagnostics.bias import probe_sigmas, probe_timesteps
from ldm.diffusion import add_noise, flow_noised
from ldm.models.denoiser import denoise
from ldm.models.vae import encode_posterior


@dataclass
class Probe:
    x0: torch.Tensor              # (N, C, h, w) clean latents, scaled by the VAE's scaling_factor
    eps: torch.Tensor             # (N, C, h, w) the noise
    x_t: torch.Tensor             # (N, C, h, w) sqrt(a) x0 + sqrt(1 - a) eps; flow: (1 - s) x0 + s eps
    timesteps: torch.Tensor       # (N,) the denoiser's time input: int64 t; flow: s * T, float32
    context: torch.Tensor         # (N, L, D) text embeddings of the captions
    alphas_cumprod: torch.Tensor | None  # (T,); None for flow
    n_bins: int
    captions: list[str]
    sigmas: torch.Tensor | None = None   # (N,) float64, the flow probe's sigma per row; None for diffusion
    pooled: torch.Tensor | None = None   # (N, D2) SDXL's pooled text embedding; None for other models
    time_ids: torch.Tensor | None = None  # (N, 6) SDXL's size/crop numbers (ldm.models.sdxl.time_ids)

    @property
    def flow(self) -> bool:
        return self.sigmas is not None


def load_probe_images(spec: str, resolution: int, num_images: int) -> tuple[torch.Tensor, list[str]]:
    """Returns (pixel_values (n, 3, R, R) in [-1, 1], captions) of the first num_images of a data source
    (anything ldm.data.open_dataset accepts: a folder, shards, "shapes:N", ...), in a fixed order."""
    from ldm.data import open_dataset

    pixels, captions = [], []
    for sample in open_dataset(spec, resolution=resolution, shuffle=False):
        pixels.append(sample["pixel_values"])
        captions.append(sample["caption"])
        if len(pixels) == num_images:
            break
    if not pixels:
        raise ValueError(f"the data source {spec!r} yielded no images; point --data at a folder of images, "
                         "shards or shapes:N")
    return torch.stack(pixels), captions  # (n, 3, R, R)


def encode_latents(vae, pixel_values: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """Returns the VAE posterior means times scaling_factor, (n, C, h, w) on the CPU: the latents training sees."""
    mean, _ = encode_posterior(vae, pixel_values, batch_size)  # (n, C, h, w) float32
    return mean.cpu() * vae.config.scaling_factor


def _repeat_rows(latents: torch.Tensor, times: torch.Tensor, seed: int) -> tuple[torch.Tensor, ...]:
    """Returns (x0, times, eps), each with one row per (time, latent), time-major, and the noise from `seed`."""
    n, k = len(latents), len(times)
    x0 = latents.float().repeat(k, 1, 1, 1)                                          # (K*n, C, h, w)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))       # (K*n, C, h, w)
    return x0, times.repeat_interleave(n), eps


def build_probe(latents: torch.Tensor, context: torch.Tensor, alphas_cumprod: torch.Tensor, n_bins: int = 10,
                per_bin: int = 4, seed: int = 0, captions: list[str] | None = None) -> Probe:
    """Returns the probe for latents (n, C, h, w) and their text embeddings (n, L, D): every latent at every
    probe timestep, noise from `seed`."""
    t, _ = probe_timesteps(len(alphas_cumprod), n_bins, per_bin)                     # (K,)
    x0, timesteps, eps = _repeat_rows(latents, t, seed)
    x_t = add_noise(x0, eps, timesteps, alphas_cumprod)                              # (K*n, C, h, w)
    return Probe(x0, eps, x_t, timesteps, context.float().cpu().repeat(len(t), 1, 1), alphas_cumprod.double().cpu(),
                 n_bins, list(captions or [""] * len(latents)) * len(t))


def build_flow_probe(latents: torch.Tensor, context: torch.Tensor, n_bins: int = 10, per_bin: int = 4, seed: int = 0,
                     captions: list[str] | None = None, num_train_timesteps: int = 1000) -> Probe:
    """Returns the flow probe for latents (n, C, h, w) and their text embeddings (n, L, D): every latent at every
    probe sigma (equal bins of [0, 1]), x_s = flow_noised(x0, eps, s), the denoiser's time s * num_train_timesteps;
    the same noise as build_probe's for the same seed."""
    s, _ = probe_sigmas(n_bins, per_bin)                                             # (K,)
    x0, sigmas, eps = _repeat_rows(latents, s, seed)
    x_t = flow_noised(x0, eps, sigmas)                                               # (K*n, C, h, w)
    return Probe(x0, eps, x_t, (sigmas * num_train_timesteps).float(), context.float().cpu().repeat(len(s), 1, 1), None,
                 n_bins, list(captions or [""] * len(latents)) * len(s), sigmas)


@torch.no_grad()
def predict_probe(unet, probe: Probe, objective, batch_size: int = 64) -> torch.Tensor:
    """Returns the model's noise prediction eps_pred (N, C, h, w) for every probe row (converted from v or x0 by
    the model's objective, ldm.objectives.objective_for); for a flow probe, the predicted velocity as it is."""
    dtype, device = unet.dtype, unet.device
    out = []
    for i in range(0, len(probe.timesteps), batch_size):
        x_t, t = probe.x_t[i:i + batch_size], probe.timesteps[i:i + batch_size]
        context = probe.context[i:i + batch_size].to(device, dtype)
        sdxl = [None if v is None else v[i:i + batch_size].to(device, dtype) for v in (probe.pooled, probe.time_ids)]
        pred = denoise(unet, x_t.to(device, dtype), t.to(device), context, *sdxl).float().cpu()
        if not probe.flow:  # a flow model's velocity is reported as it is
            pred = objective.parameterisations(pred, x_t, probe.alphas_cumprod[t])["eps"]
        out.append(pred)
    return torch.cat(out)


def make_probe(pipe, data: str, num_images: int = 8, n_bins: int = 10, per_bin: int = 4, seed: int = 0) -> Probe:
    """Returns the probe set of a pipeline for a data source: images -> VAE latents, captions -> embeddings; a
    flow probe for a flow model (ldm.objectives.objective_for its scheduler)."""
    from ldm.objectives import objective_for

    resolution = pipe.denoiser.config.sample_size * pipe.vae_scale_factor
    pixels, captions = load_probe_images(data, resolution, num_images)
    latents = encode_latents(pipe.vae, pixels)
    with warnings.catch_warnings():  # captions are encoded as training tokenized them: literally, cut at 77
        warnings.simplefilter("ignore")
        encoded = pipe.encode_prompt(captions, None, 1, False, prompt_syntax="plain", long_prompts="truncate")
    context = encoded[0].float().cpu()  # (n, 77, D)
    if objective_for(pipe.scheduler).name == "flow":
        probe = build_flow_probe(latents, context, n_bins, per_bin, seed, captions,
                                 pipe.scheduler.config.num_train_timesteps)
    else:
        probe = build_probe(latents, context, pipe.scheduler.alphas_cumprod, n_bins, per_bin, seed, captions)
    if getattr(pipe, "is_sdxl", False):  # the pooled text and the square images' sizes, as training gave them
        from ldm.models.sdxl import time_ids

        rows = len(probe.timesteps) // len(latents)  # every latent at every probe time, time-major
        probe.pooled = encoded[2].float().cpu().repeat(rows, 1)                             # (N, D2)
        probe.time_ids = time_ids((resolution,) * 2, (0, 0), (resolution,) * 2).expand(len(probe.timesteps), 6)
    return probe


def latent_channel_stats(pipe, data: str, num_images: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns the per-channel mean and std (C,) of the data's scaled VAE latents: the forward process's x0."""
    resolution = pipe.denoiser.config.sample_size * pipe.vae_scale_factor
    latents = encode_latents(pipe.vae, load_probe_images(data, resolution, num_images)[0])  # (n, C, h, w)
    return latents.mean(dim=(0, 2, 3)), latents.std(dim=(0, 2, 3))
