"""Sampling drift and guidance, per denoising step, from a pipeline's trace (Pipeline(..., trace=True).trace).

All latent statistics are in variance-preserving units, x_t as the UNet sees it (LMS/Euler carry
x_t / sqrt(alpha_bar_t) in their loop; we multiply back); for a flow model (a FlowMatch scheduler) they are of
x_sigma = (1 - sigma) x0 + sigma eps, which the flow samplers carry and the model sees as it is, and each step
reports "sigma" (timestep / num_train_timesteps) where diffusion reports "alpha_bar_t". Per step and latent channel:
    latent_mean/std/min/max[C], x0_mean/std/min/max[C]     statistics of x_t and of the predicted x0
    x0_change              RMS of x0_pred(step) - x0_pred(step - 1): how far the prediction moves (null at step 0)
    marginal_w2[C]         Wasserstein-2 distance between N(mean, std) of x_t and the forward process's marginal
                           N(sqrt(a) m_data, sqrt(a s_data^2 + 1 - a)) for that step (Ho et al. 2020, Eq. 4); for
                           flow N((1 - sigma) m_data, sqrt((1 - sigma)^2 s_data^2 + sigma^2))
                           (ldm.diffusion.flow_marginal_moments)
    guidance_diff_rms      RMS of eps_cond - eps_uncond (the direction guidance amplifies; of v for flow models)
    guidance_inflation     RMS(guided) / RMS(eps_cond): the norm inflation from the guidance scale
    rescale_std_ratio      std(guided) / std(eps_cond), what guidance_rescale pulls back to 1 (Lin et al. 2023)
    rescale_change_rms     RMS of rescale_guidance(guided, cond, phi) - guided for phi = the run's (else 0.7)
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ldm.diffusion import alpha_bar_at, flow_marginal_moments
from ldm.objectives import is_flow_scheduler
from ldm.pipelines.guidance import cfg_combine, rescale_guidance

HISTOGRAM_BINS = 60


def histogram_edges(values: list[torch.Tensor], bins: int = HISTOGRAM_BINS) -> np.ndarray:
    """Returns common histogram edges (bins + 1,) for every step: the 0.5 to 99.5 percentile range of the given
    tensors (x_t and x0_pred over the whole trace), widened to at least [-3, 3] (the initial noise)."""
    lo, hi = np.percentile(torch.cat([v.ravel() for v in values]).numpy(), [0.5, 99.5])
    return np.linspace(min(lo, -3.0), max(hi, 3.0), bins + 1)


def channel_stats(x: torch.Tensor, prefix: str) -> dict[str, list[float]]:
    """Returns {prefix_mean, prefix_std, prefix_min, prefix_max}, each a per-channel list, for x (B, C, h, w)."""
    per_channel = x.double().transpose(0, 1).flatten(1)                      # (C, B*h*w)
    return {f"{prefix}_mean": per_channel.mean(1).tolist(), f"{prefix}_std": per_channel.std(1).tolist(),
            f"{prefix}_min": per_channel.min(1).values.tolist(), f"{prefix}_max": per_channel.max(1).values.tolist()}


def gaussian_w2(mean_a, std_a, mean_b, std_b) -> torch.Tensor:
    """Returns the Wasserstein-2 distance between 1-D Gaussians: sqrt((m_a - m_b)^2 + (s_a - s_b)^2)."""
    return ((mean_a - mean_b) ** 2 + (std_a - std_b) ** 2).sqrt()


def forward_marginal(scheduler, timestep: float, data_mean: torch.Tensor,
                     data_std: torch.Tensor) -> tuple[str, float, torch.Tensor, torch.Tensor]:
    """Returns (name, value, mean (C,), std (C,)): the noise level of a sampler timestep, "alpha_bar_t" or for a
    flow scheduler "sigma" = timestep / num_train_timesteps, and the forward process's per-channel marginal there
    predicted from the data's latent mean and std (Ho et al. 2020, Eq. 4; flow_marginal_moments)."""
    if is_flow_scheduler(scheduler):
        s = float(timestep) / scheduler.config.num_train_timesteps
        mean, var = flow_marginal_moments(data_mean.double(), data_std.double() ** 2, s)
        return "sigma", s, mean, var.sqrt()
    a = float(alpha_bar_at(scheduler.alphas_cumprod, timestep))
    return "alpha_bar_t", a, math.sqrt(a) * data_mean.double(), (a * data_std.double() ** 2 + 1 - a).sqrt()


def marginal_distance(x_t: torch.Tensor, expected_mean: torch.Tensor, expected_std: torch.Tensor) -> torch.Tensor:
    """Returns per-channel W2 (C,) between x_t (B, C, h, w) and the marginal N(expected_mean, expected_std) (C,)."""
    per_channel = x_t.double().transpose(0, 1).flatten(1)                    # (C, B*h*w)
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
    """Returns x_t in variance-preserving units: sigma-space schedulers (LMS, Euler, ...) carry x_t / sqrt(a).
    Flow samplers carry x_sigma itself (they have no init_noise_sigma): returned as it is."""
    sigma_space = hasattr(scheduler, "sigmas") and float(getattr(scheduler, "init_noise_sigma", 1.0)) > 1.0
    return latents * math.sqrt(alpha_bar_t) if sigma_space else latents


def _step_row(record, scheduler, data_mean, data_std, previous_x0) -> tuple[dict, torch.Tensor]:
    """Returns (the statistics of one trace step without guidance, x_t as the model saw it)."""
    name, level, mean, std = forward_marginal(scheduler, record.timestep, data_mean, data_std)
    x_t = record.latents if name == "sigma" else variance_preserving(record.latents, level, scheduler)
    w2 = marginal_distance(x_t, mean, std)
    row = {"step": record.step, "timestep": record.timestep, name: level, **channel_stats(x_t, "latent"),
           **channel_stats(record.x0_pred, "x0"),
           "x0_change": None if previous_x0 is None else rms(record.x0_pred - previous_x0),
           "marginal_w2": w2.tolist(), "marginal_w2_mean": float(w2.mean())}
    return row, x_t


def trace_report(trace: list, scheduler, guidance_scale: float, guidance_rescale: float = 0.0,
                 data_mean: torch.Tensor | None = None, data_std: torch.Tensor | None = None) -> dict:
    """Returns {"steps": [row per step], "histogram_edges", "latent_histograms" (S, B), "x0_histograms"}."""
    channels = trace[0].latents.shape[1]
    data_mean = torch.zeros(channels) if data_mean is None else data_mean
    data_std = torch.ones(channels) if data_std is None else data_std
    rows, inputs, previous_x0 = [], [], None
    for record in trace:
        row, x_t = _step_row(record, scheduler, data_mean, data_std, previous_x0)
        if record.noise_pred_uncond is not None:
            row.update(guidance_stats(record.noise_pred_cond, record.noise_pred_uncond, guidance_scale, guidance_rescale))
        rows.append(row)
        inputs.append(x_t)
        previous_x0 = record.x0_pred
    edges = histogram_edges(inputs + [record.x0_pred for record in trace])
    density = lambda x: np.histogram(x.numpy().ravel(), edges, density=True)[0].tolist()  # noqa: E731
    return {"steps": rows, "histogram_edges": edges.tolist(), "latent_histograms": [density(x) for x in inputs],
            "x0_histograms": [density(record.x0_pred) for record in trace]}
