"""Per-timestep-bin loss and prediction bias, as pure tensor functions.

Given, for a probe set of N samples, the clean latents x0, the noise eps, the timestep's alpha_bar_t and the model's
prediction, every quantity is reported in all three parameterisations (Salimans & Ho 2022, arXiv:2202.00512, Sec. 4):
    eps:  x_t = sqrt(a) x0 + sqrt(1 - a) eps                                   (Ho et al. 2020, Eq. 4)
    x0:   x0_pred = (x_t - sqrt(1 - a) eps_pred) / sqrt(a)                     (Ho et al. 2020, Eq. 15)
    v:    v = sqrt(a) eps - sqrt(1 - a) x0
so mse_x0 = mse_eps / SNR(t) and mse_v = mse_eps / a for the same prediction.
A bin's channel is flagged as biased when the mean of (eps_pred - eps) is more than z_threshold standard errors
from 0 (standard error over samples of the per-sample channel mean).
"""
from __future__ import annotations

import torch

from ldm.diffusion import to_parameterisations, velocity



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


def bin_stats(eps_pred: torch.Tensor, eps: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor,
              alpha_bar_t: torch.Tensor, z_threshold: float = 5.0) -> dict:
    """Returns the statistics of one bin's samples (each (n, C, h, w)) as JSON-ready floats and lists."""
    pred = to_parameterisations(eps_pred, x_t, alpha_bar_t, "epsilon")
    target_v = velocity(x0, eps, _bcast(alpha_bar_t, x_t))
    mse = lambda a, b: float((a.double() - b.double()).pow(2).mean())  # noqa: E731
    bias, se = channel_bias(eps_pred, eps)
    z = (bias / se).abs()
    norm_ratio = eps_pred.flatten(1).norm(dim=1) / eps.flatten(1).norm(dim=1).clamp(min=1e-12)  # (n,)
    return {
        "n": len(eps), "alpha_bar_mean": float(alpha_bar_t.double().mean()),
        "loss_eps": mse(eps_pred, eps), "loss_v": mse(pred["v"], target_v), "loss_x0": mse(pred["x0"], x0),
        "eps_pred_mean": eps_pred.double().mean(dim=(0, 2, 3)).tolist(),      # target 0 per channel
        "eps_pred_std": eps_pred.double().std(dim=(0, 2, 3)).tolist(),        # target 1 per channel
        "bias": bias.tolist(), "bias_se": se.tolist(), "bias_z": z.tolist(),
        "biased_channels": [int(c) for c in torch.nonzero(z > z_threshold).flatten()],
        "norm_ratio": float(norm_ratio.double().mean()),
        "x0_rmse": mse(pred["x0"], x0) ** 0.5,
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
