"""Per-timestep-bin loss and prediction bias, as pure tensor functions.

Given, for a probe set of N samples, the clean latents x0, the noise eps, the timestep's alpha_bar_t and the model's
prediction, every quantity is reported in all three parameterisations (Salimans & Ho 2022, arXiv:2202.00512, Sec. 4):
    eps:  x_t = sqrt(a) x0 + sqrt(1 - a) eps                                   (Ho et al. 2020, Eq. 4)
    x0:   x0_pred = (x_t - sqrt(1 - a) eps_pred) / sqrt(a)                     (Ho et al. 2020, Eq. 15)
    v:    v = sqrt(a) eps - sqrt(1 - a) x0
so mse_x0 = mse_eps / SNR(t) and mse_v = mse_eps / a for the same prediction.
A bin's channel is flagged as biased when the mean of (eps_pred - eps) is more than z_threshold standard errors
from 0 (standard error over samples of the per-sample channel mean).

Flow models (ldm/objectives/flow.py) predict the velocity v = eps - x0 of x_s = (1 - s) x0 + s eps at sigma s in
[0, 1]: their report (`flow_per_bin_report`, bins of equal width in sigma) takes the loss and the bias of the
velocity itself, and the x0 and eps it implies, x0 = x_s - s v and eps = x_s + (1 - s) v (ldm.diffusion's
flow_to_x0 / flow_to_noise), so mse_x0 = s^2 mse_v and mse_eps = (1 - s)^2 mse_v at each sigma.
"""
from __future__ import annotations

import torch

from ldm.diffusion import (flow_to_noise, flow_to_x0, flow_velocity, timestep_bins, to_parameterisations,
                           velocity)


def _bcast(alpha_bar_t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return alpha_bar_t.to(like).reshape(-1, *([1] * (like.ndim - 1)))  # (N, 1, 1, 1)


def probe_timesteps(num_train_timesteps: int, n_bins: int, per_bin: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (timesteps (n_bins * per_bin,) long, bin index of each): per_bin evenly spaced points in each of
    n_bins equal bins of [0, T)."""
    if n_bins < 1 or per_bin < 1 or n_bins * per_bin > num_train_timesteps:
        raise ValueError(f"need 1 <= n_bins * per_bin <= {num_train_timesteps}, got n_bins={n_bins}, per_bin={per_bin}")
    edges = torch.linspace(0, num_train_timesteps, n_bins + 1)
    width = edges[1] - edges[0]
    offsets = (torch.arange(per_bin) + 0.5) / per_bin * width                   # (per_bin,)
    t = (edges[:-1, None] + offsets[None, :]).floor().long().flatten()          # (n_bins * per_bin,)
    return t, torch.arange(n_bins).repeat_interleave(per_bin)


def bin_edges(num_train_timesteps: int, n_bins: int) -> list[tuple[int, int]]:
    """Returns [(t_lo, t_hi)] for each bin, t_hi exclusive."""
    edges = torch.linspace(0, num_train_timesteps, n_bins + 1).round().long().tolist()
    return list(zip(edges[:-1], edges[1:]))


def channel_bias(eps_pred: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (mean of eps_pred - eps per channel (C,), its standard error (C,)) over samples (N, C, h, w)."""
    per_sample = (eps_pred - eps).double().mean(dim=(2, 3))                     # (N, C)
    se = per_sample.std(0, unbiased=True) / len(per_sample) ** 0.5 if len(per_sample) > 1 \
        else torch.full_like(per_sample[0], float("inf"))
    return per_sample.mean(0), se


def _mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).pow(2).mean())


def prediction_bias(pred: torch.Tensor, target: torch.Tensor, z_threshold: float) -> dict:
    """Returns {"bias", "bias_se", "bias_z", "biased_channels", "norm_ratio"} of predictions against their targets
    (each (n, C, h, w)): the per-channel bias, its standard error and z-score, the channels past z_threshold, and
    the mean of ||pred|| / ||target|| per sample."""
    bias, se = channel_bias(pred, target)
    z = (bias / se).abs()
    norm_ratio = pred.flatten(1).norm(dim=1) / target.flatten(1).norm(dim=1).clamp(min=1e-12)  # (n,)
    return {"bias": bias.tolist(), "bias_se": se.tolist(), "bias_z": z.tolist(),
            "biased_channels": [int(c) for c in torch.nonzero(z > z_threshold).flatten()],
            "norm_ratio": float(norm_ratio.double().mean())}


def bin_stats(eps_pred: torch.Tensor, eps: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor,
              alpha_bar_t: torch.Tensor, z_threshold: float = 5.0) -> dict:
    """Returns the statistics of one bin's samples (each (n, C, h, w)) as JSON-ready floats and lists."""
    pred = to_parameterisations(eps_pred, x_t, alpha_bar_t, "epsilon")
    target_v = velocity(x0, eps, _bcast(alpha_bar_t, x_t))
    return {
        "n": len(eps), "alpha_bar_mean": float(alpha_bar_t.double().mean()),
        "loss_eps": _mse(eps_pred, eps), "loss_v": _mse(pred["v"], target_v), "loss_x0": _mse(pred["x0"], x0),
        "eps_pred_mean": eps_pred.double().mean(dim=(0, 2, 3)).tolist(),      # target 0 per channel
        "eps_pred_std": eps_pred.double().std(dim=(0, 2, 3)).tolist(),        # target 1 per channel
        **prediction_bias(eps_pred, eps, z_threshold),
        "x0_rmse": _mse(pred["x0"], x0) ** 0.5,
    }


def per_bin_report(eps_pred: torch.Tensor, eps: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor,
                   timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, n_bins: int,
                   z_threshold: float = 5.0) -> list[dict]:
    """Returns one bin_stats dict per timestep bin (with "bin", "t_lo", "t_hi", "biased"); inputs (N, C, h, w),
    timesteps (N,) integers in [0, T)."""
    T = len(alphas_cumprod)
    alpha_bar_t = alphas_cumprod.double()[timesteps.long()]                      # (N,)
    rows = []
    for b, (lo, hi) in enumerate(bin_edges(T, n_bins)):
        idx = torch.nonzero((timesteps >= lo) & (timesteps < hi)).flatten()
        if len(idx) == 0:
            continue
        stats = bin_stats(eps_pred[idx], eps[idx], x0[idx], x_t[idx], alpha_bar_t[idx], z_threshold)
        rows.append({"bin": b, "t_lo": lo, "t_hi": hi, **stats, "biased": bool(stats["biased_channels"])})
    return rows


def probe_sigmas(n_bins: int, per_bin: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (sigmas (n_bins * per_bin,) float64, bin index of each): per_bin evenly spaced points in each of
    n_bins equal bins of [0, 1], the flow probe's times (never exactly 0 or 1)."""
    if n_bins < 1 or per_bin < 1:
        raise ValueError(f"need n_bins >= 1 and per_bin >= 1, got n_bins={n_bins}, per_bin={per_bin}")
    offsets = (torch.arange(per_bin, dtype=torch.float64) + 0.5) / per_bin                 # (per_bin,) in (0, 1)
    sigmas = (torch.arange(n_bins, dtype=torch.float64)[:, None] + offsets[None, :]) / n_bins
    return sigmas.flatten(), torch.arange(n_bins).repeat_interleave(per_bin)


def flow_bin_stats(v_pred: torch.Tensor, eps: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor,
                   sigma: torch.Tensor, z_threshold: float = 5.0) -> dict:
    """Returns the statistics of one sigma bin of a flow model's velocity predictions (each (n, C, h, w); sigma
    (n,)) as JSON-ready floats and lists: the velocity's loss and per-channel bias, and the x0 / eps it implies."""
    v = flow_velocity(x0, eps)                                                   # the target, eps - x0
    x0_pred, eps_pred = flow_to_x0(v_pred, x_t, sigma), flow_to_noise(v_pred, x_t, sigma)
    return {
        "n": len(v), "sigma_mean": float(sigma.double().mean()),
        "loss_v": _mse(v_pred, v), "loss_x0": _mse(x0_pred, x0), "loss_eps": _mse(eps_pred, eps),
        "v_pred_mean": v_pred.double().mean(dim=(0, 2, 3)).tolist(), "v_mean": v.double().mean(dim=(0, 2, 3)).tolist(),
        "v_pred_std": v_pred.double().std(dim=(0, 2, 3)).tolist(), "v_std": v.double().std(dim=(0, 2, 3)).tolist(),
        **prediction_bias(v_pred, v, z_threshold),
        "x0_rmse": _mse(x0_pred, x0) ** 0.5, "eps_rmse": _mse(eps_pred, eps) ** 0.5,
    }


def flow_per_bin_report(v_pred: torch.Tensor, eps: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor,
                        sigmas: torch.Tensor, n_bins: int, z_threshold: float = 5.0) -> list[dict]:
    """Returns one flow_bin_stats dict per sigma bin (with "bin", "sigma_lo", "sigma_hi", "biased") for a flow
    model's velocity predictions v_pred; inputs (N, C, h, w), sigmas (N,) in [0, 1]."""
    bins = timestep_bins(sigmas, n_bins)                                         # (N,)
    rows = []
    for b in range(n_bins):
        idx = torch.nonzero(bins == b).flatten()
        if len(idx) == 0:
            continue
        stats = flow_bin_stats(v_pred[idx], eps[idx], x0[idx], x_t[idx], sigmas[idx], z_threshold)
        rows.append({"bin": b, "sigma_lo": b / n_bins, "sigma_hi": (b + 1) / n_bins, **stats,
                     "biased": bool(stats["biased_channels"])})
    return rows
