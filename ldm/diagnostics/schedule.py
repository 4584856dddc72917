"""Noise-schedule math as pure tensor functions: betas, alpha_bar_t, SNR(t), posterior variance, VLB weights.

Notation (Ho et al. 2020, "Denoising Diffusion Probabilistic Models", arXiv:2006.11239): beta_t, alpha_t = 1 - beta_t,
alpha_bar_t = prod_{s<=t} alpha_s, x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps. Index t runs 0..T-1 as in
diffusers (the paper's t = 1..T). If ldm.diffusion later exposes the same functions, these are the ones to drop.
"""
from __future__ import annotations

import math

import torch

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")
TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")


def make_betas(name: str, num_train_timesteps: int = 1000, beta_start: float = 1e-4,
               beta_end: float = 0.02) -> torch.Tensor:
    """Returns beta_t, (T,) float64, for a diffusers beta_schedule name."""
    T = num_train_timesteps
    if name == "linear":  # Ho et al. 2020, Sec. 4
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    if name == "scaled_linear":  # Rombach et al. 2022 (Stable Diffusion): linear in sqrt(beta)
        return torch.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=torch.float64) ** 2
    if name == "squaredcos_cap_v2":  # Eq. (17), Nichol & Dhariwal 2021, arXiv:2102.09672, beta capped at 0.999
        f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        return torch.tensor([min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)], dtype=torch.float64)
    if name == "sigmoid":  # GeoDiff, Xu et al. 2022, arXiv:2203.02923
        return torch.sigmoid(torch.linspace(-6, 6, T, dtype=torch.float64)) * (beta_end - beta_start) + beta_start
    raise ValueError(f"unknown beta schedule {name!r}; choose one of {', '.join(BETA_SCHEDULES)}")


def alpha_bar(betas: torch.Tensor) -> torch.Tensor:
    """Returns alpha_bar_t = prod_{s<=t} (1 - beta_s), (T,). Ho et al. 2020, Eq. (4)."""
    return torch.cumprod(1 - betas, dim=0)


def snr(alpha_bar_t: torch.Tensor) -> torch.Tensor:
    """Returns SNR(t) = alpha_bar_t / (1 - alpha_bar_t). Kingma et al. 2021, "Variational Diffusion Models", Eq. (2)."""
    return alpha_bar_t / (1 - alpha_bar_t)


def posterior_variance(betas: torch.Tensor) -> torch.Tensor:
    """Returns beta_tilde_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) beta_t, (T,). Ho et al. 2020, Eq. (7).

    At t = 0 (the paper's t = 1) alpha_bar_{-1} = 1 gives 0: q(x_{-1} | x_0, x_0) is a point mass.
    """
    a_bar = alpha_bar(betas)
    a_bar_prev = torch.cat([a_bar.new_ones(1), a_bar[:-1]])
    return (1 - a_bar_prev) / (1 - a_bar) * betas


def posterior_mean_coefs(betas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (c0, ct) with mu_tilde_t(x_t, x0) = c0 x0 + ct x_t, each (T,). Ho et al. 2020, Eq. (7)."""
    a_bar = alpha_bar(betas)
    a_bar_prev = torch.cat([a_bar.new_ones(1), a_bar[:-1]])
    c0 = a_bar_prev.sqrt() * betas / (1 - a_bar)
    ct = (1 - betas).sqrt() * (1 - a_bar_prev) / (1 - a_bar)
    return c0, ct


def reverse_variance(betas: torch.Tensor, kind: str = "posterior") -> torch.Tensor:
    """Returns sigma_t^2 of p(x_{t-1} | x_t): "posterior" (beta_tilde_t) or "beta" (beta_t), Ho et al. 2020 Sec. 3.2.

    beta_tilde_0 = 0 would make the t = 0 KL infinite; there (the decoder term L_0 in the paper) beta_0 is used.
    """
    if kind == "beta":
        return betas.clone()
    if kind != "posterior":
        raise ValueError(f"unknown reverse variance {kind!r}; choose 'posterior' or 'beta'")
    var = posterior_variance(betas)
    var[0] = betas[0]
    return var


def vlb_weights(betas: torch.Tensor, variance: str = "posterior") -> torch.Tensor:
    """Returns lambda_t with L_{t-1} = lambda_t ||eps - eps_pred||^2, (T,); the simple loss uses lambda_t = 1.

    Ho et al. 2020, Eq. (12): lambda_t = beta_t^2 / (2 sigma_t^2 alpha_t (1 - alpha_bar_t)).
    """
    sigma2 = reverse_variance(betas, variance)
    return betas ** 2 / (2 * sigma2 * (1 - betas) * (1 - alpha_bar(betas)))


def schedule_table(betas: torch.Tensor, variance: str = "posterior") -> dict[str, torch.Tensor]:
    """Returns {"t", "beta_t", "alpha_bar_t", "snr_t", "log_snr_t", "posterior_variance_t", "vlb_weight_t",
    "vlb_weight_normalised_t"} (each (T,)); the normalised VLB weights have mean 1, like the simple loss's."""
    a_bar = alpha_bar(betas)
    weights = vlb_weights(betas, variance)
    return {"t": torch.arange(len(betas)), "beta_t": betas, "alpha_bar_t": a_bar, "snr_t": snr(a_bar),
            "log_snr_t": snr(a_bar).log(), "posterior_variance_t": posterior_variance(betas),
            "vlb_weight_t": weights, "vlb_weight_normalised_t": weights / weights.mean()}


def alpha_bar_at(alphas_cumprod: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """Returns alpha_bar at (possibly fractional) timesteps t, interpolating sigma_t = sqrt((1 - a) / a) linearly
    in t as diffusers' LMS/Euler schedulers do; exact at integer t."""
    t = torch.as_tensor(t, dtype=torch.float64).clamp(0, len(alphas_cumprod) - 1)
    sigmas = ((1 - alphas_cumprod.double()) / alphas_cumprod.double()).sqrt()
    lo = t.floor().long()
    hi = (lo + 1).clamp(max=len(sigmas) - 1)
    frac = t - lo
    sigma = sigmas[lo] * (1 - frac) + sigmas[hi] * frac
    return 1 / (1 + sigma ** 2)


def visited_timesteps(scheduler_names: list[str], schedule_config: dict, num_inference_steps: int,
                      spacings: tuple[str, ...] = TIMESTEP_SPACINGS) -> dict[str, dict[str, list[float]]]:
    """Returns {scheduler: {spacing: timesteps the scheduler visits}} for each timestep_spacing."""
    from ldm.schedulers import make_scheduler

    visited = {}
    for name in scheduler_names:
        visited[name] = {}
        for spacing in spacings:
            scheduler = make_scheduler(name, {**schedule_config, "timestep_spacing": spacing})
            scheduler.set_timesteps(num_inference_steps)
            visited[name][spacing] = [round(float(t), 3) for t in scheduler.timesteps]
    return visited
