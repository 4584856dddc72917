"""Sampling drift and guidance, per denoising step, from a pipeline's trace (Pipeline(..., trace=True).trace).

All latent statistics are in variance-preserving units, x_t as the UNet sees it (LMS/Euler carry
x_t / sqrt(alpha_bar_t) in their loop; we multiply back). Per step and latent channel:
    latent_mean/std/min/max[C], x0_mean/std/min/max[C]     statistics of x_t and of the predicted x0
    x0_change              RMS of x0_pred(step) - x0_pred(step - 1): how far the prediction moves (null at step 0)
    marginal_w2[C]         Wasserstein-2 distance between N(mean, std) of x_t and the forward process's marginal
                           N(sqrt(a) m_data, sqrt(a s_data^2 + 1 - a)) for that step (Ho et al. 2020, Eq. 4)
    guidance_diff_rms      RMS of eps_cond - eps_uncond (the direction guidance amplifies)
    guidance_inflation     RMS(guided) / RMS(eps_cond): the norm inflation from the guidance scale
    rescale_std_ratio      std(guided) / std(eps_cond), what guidance_rescale pulls back to 1 (Lin et al. 2023)
    rescale_change_rms     RMS of rescale_guidance(guided, cond, phi) - guided for phi = the run's (else 0.7)
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ldm.diffusion import alpha_bar_at
from ldm.pipelines.guidance import cfg_combine, rescale_guidance

HISTOGRAM_BINS = 60


def histogram_edges(trace: list, scheduler, bins: int = HISTOGRAM_BINS) -> np.ndarray:
    """Returns common histogram edges (bins + 1,) for every step: the 0.5 to 99.5 percentile range of x_t and
    x0_pred over the whole trace, widened to at least [-3, 3] (the initial noise)."""
    values = []
    for record in trace:
        a = float(alpha_bar_at(scheduler.alphas_cumprod, record.timestep))
        values += [variance_preserving(record.latents, a, scheduler).ravel(), record.x0_pred.ravel()]
    lo, hi = np.percentile(torch.cat(values).numpy(), [0.5, 99.5])
    return np.linspace(min(lo, -3.0), max(hi, 3.0), bins + 1)


def channel_stats(x: torch.Tensor, prefix: str) -> dict[str, list[float]]:
    """Returns {prefix_mean, prefix_std, prefix_min, prefix_max}, each a per-channel list, for x (B, C, h, w)."""
    per_channel = x.double().transpose(0, 1).flatten(1)                      # (C, B*h*w)
    return {f"{prefix}_mean": per_channel.mean(1).tolist(), f"{prefix}_std": per_channel.std(1).tolist(),
            f"{prefix}_min": per_channel.min(1).values.tolist(), f"{prefix}_max": per_channel.max(1).values.tolist()}


def gaussian_w2(mean_a, std_a, mean_b, std_b) -> torch.Tensor:
    """Returns the Wasserstein-2 distance between 1-D Gaussians: sqrt((m_a - m_b)^2 + (s_a - s_b)^2)."""
    return ((mean_a - mean_b) ** 2 + (std_a - std_b) ** 2).sqrt()


def marginal_distance(x_t: torch.Tensor, alpha_bar_t: float, data_mean: torch.Tensor,
                      data_std: torch.Tensor) -> torch.Tensor:
    """Returns per-channel W2 (C,) between x_t (B, C, h, w) and the forward marginal predicted from the data's
    per-channel latent mean and std (Ho et al. 2020, Eq. 4)."""
    per_channel = x_t.double().transpose(0, 1).flatten(1)                    # (C, B*h*w)
    a = float(alpha_bar_t)
    expected_mean = math.sqrt(a) * data_mean.double()
    expected_std = (a * data_std.double() ** 2 + 1 - a).sqrt()
    return gaussian_w2(per_channel.mean(1), per_channel.std(1), expected_mean, expected_std)


def rms(x: torch.Tensor) -> float:
    return float(x.double().pow(2).mean().sqrt())


def guidance_stats(cond: torch.Tensor, uncond: torch.Tensor, scale: float, phi: float) -> dict[str, float]:
    """Returns the guidance breakdown of one step for the branches cond and uncond (B, C, h, w)."""
    guided = cfg_combine(uncond, cond, scale)                                # Ho & Salimans 2022, Eq. (6)
    phi = phi if phi > 0 else 0.7                                            # Lin et al. 2023's choice
    rescaled = rescale_guidance(guided, cond, phi)                           # Lin et al. 2023, Eqs. (15)-(16)
    return {"guidance_diff_rms": rms(cond - uncond), "guidance_inflation": rms(guided) / max(rms(cond), 1e-12),
            "rescale_std_ratio": float(guided.double().std() / cond.double().std().clamp(min=1e-12)),
            "rescale_phi": phi, "rescale_change_rms": rms(rescaled - guided)}


def variance_preserving(latents: torch.Tensor, alpha_bar_t: float, scheduler) -> torch.Tensor:
    """Returns x_t in variance-preserving units: sigma-space schedulers (LMS, Euler, ...) carry x_t / sqrt(a)."""
    sigma_space = hasattr(scheduler, "sigmas") and float(scheduler.init_noise_sigma) > 1.0
    return latents * math.sqrt(alpha_bar_t) if sigma_space else latents


def trace_report(trace: list, scheduler, guidance_scale: float, guidance_rescale: float = 0.0,
                 data_mean: torch.Tensor | None = None, data_std: torch.Tensor | None = None) -> dict:
    """Returns {"steps": [row per step], "histogram_edges", "latent_histograms" (S, B), "x0_histograms"}."""
    channels = trace[0].latents.shape[1]
    data_mean = torch.zeros(channels) if data_mean is None else data_mean
    data_std = torch.ones(channels) if data_std is None else data_std
    rows, latent_hist, x0_hist, previous_x0 = [], [], [], None
    edges = histogram_edges(trace, scheduler)
    for record in trace:
        a = float(alpha_bar_at(scheduler.alphas_cumprod, record.timestep))
        x_t = variance_preserving(record.latents, a, scheduler)
        w2 = marginal_distance(x_t, a, data_mean, data_std)
        row = {"step": record.step, "timestep": record.timestep, "alpha_bar_t": a, **channel_stats(x_t, "latent"),
               **channel_stats(record.x0_pred, "x0"),
               "x0_change": None if previous_x0 is None else rms(record.x0_pred - previous_x0),
               "marginal_w2": w2.tolist(), "marginal_w2_mean": float(w2.mean())}
        if record.noise_pred_uncond is not None:
            row.update(guidance_stats(record.noise_pred_cond, record.noise_pred_uncond, guidance_scale, guidance_rescale))
        rows.append(row)
        latent_hist.append(np.histogram(x_t.numpy().ravel(), edges, density=True)[0].tolist())
        x0_hist.append(np.histogram(record.x0_pred.numpy().ravel(), edges, density=True)[0].tolist())
        previous_x0 = record.x0_pred
    return {"steps": rows, "histogram_edges": edges.tolist(), "latent_histograms": latent_hist,
            "x0_histograms": x0_hist}
