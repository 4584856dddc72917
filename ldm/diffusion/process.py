"""The diffusion math, defined once, as pure tensor functions: schedules, alpha_bar, SNR, the posterior, noising,
targets, eps/x0/v conversions, loss weights, timestep sampling and caption dropout. Training, the pipeline's trace,
the objectives (ldm/objectives/) and every diagnostic call these; nothing else writes a formula of its own.

Notation (Ho et al. 2020, arXiv:2006.11239): beta_t the noise schedule, alpha_t = 1 - beta_t,
alpha_bar_t = prod_{s<=t} alpha_s (`alphas_cumprod`), x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps,
SNR(t) = alpha_bar_t / (1 - alpha_bar_t) (Kingma et al. 2021, arXiv:2107.00630). Timesteps t are 0-based
indices into the schedule (diffusers' convention, the paper's t = 1..T), so t = 0 is the least noisy step.
"""
from __future__ import annotations

import torch

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
WEIGHTINGS = ("uniform", "min_snr", "vlb")
TIMESTEP_SAMPLING = ("uniform", "logit_normal", "mode", "cosmap")
REVERSE_VARIANCES = ("posterior", "beta")

__all__ = ["BETA_SCHEDULES", "PREDICTION_TYPES", "WEIGHTINGS", "TIMESTEP_SAMPLING", "REVERSE_VARIANCES",
           "make_betas", "rescale_zero_terminal_snr", "alphas_cumprod", "snr", "posterior_variance",
           "posterior_mean_coefs", "reverse_variance", "vlb_weights", "alpha_bar_at", "add_noise", "restart_noised", "restart_noised_sigma",
           "velocity",
           "velocity_at", "eps_to_x0", "x0_to_eps", "v_to_x0_eps", "broadcast_alpha_bar", "training_target",
           "to_parameterisations", "v_eps_loss_factor", "eps_loss_factor", "min_snr_eps_weight", "min_snr_weight",
           "vlb_eps_weight", "vlb_weight", "eps_weights", "loss_weights", "per_sample_loss", "offset_noise",
           "input_perturbation", "drop_captions", "sample_timesteps", "stratified_timesteps", "timestep_bins",
           "unit_times", "flow_noised", "flow_velocity", "flow_to_x0", "flow_to_noise", "shift_sigmas",
           "resolution_shift", "flow_marginal_moments"]


def make_betas(schedule: str, num_train_timesteps: int = 1000, beta_start: float = 0.00085,
               beta_end: float = 0.012) -> torch.Tensor:
    """Returns betas (T,) float64 of a named schedule, computed by diffusers' DDPMScheduler (one source of truth)."""
    from diffusers import DDPMScheduler

    if schedule not in BETA_SCHEDULES:
        raise ValueError(f"unknown noise schedule {schedule!r}; choose one of {BETA_SCHEDULES}")
    if not 0 < beta_start < beta_end < 1:
        raise ValueError(f"need 0 < beta_start < beta_end < 1, got {beta_start}, {beta_end}")
    scheduler = DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=schedule,
                              beta_start=beta_start, beta_end=beta_end)
    return scheduler.betas.double()


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Returns betas rescaled so that SNR(T-1) = 0 while SNR(0) is kept.

    Algorithm 1, Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", arXiv:2305.08891.
    """
    alpha_bar_sqrt = torch.cumprod(1 - betas.double(), dim=0).sqrt()
    first, last = alpha_bar_sqrt[0].clone(), alpha_bar_sqrt[-1].clone()
    alpha_bar_sqrt = (alpha_bar_sqrt - last) * first / (first - last)  # shift to 0 at T-1, rescale to keep t=0
    alpha_bar = alpha_bar_sqrt ** 2
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1 - alphas


def alphas_cumprod(betas: torch.Tensor) -> torch.Tensor:
    """Returns alpha_bar_t = prod_{s<=t} (1 - beta_s), (T,). Eq. (4) context, Ho et al. 2020."""
    return torch.cumprod(1 - betas, dim=0)


def _gather(values: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """Returns values[t] shaped (B, 1, ..., 1) to broadcast over a (B, ...) tensor of `ndim` dims."""
    out = values.to(t.device)[t].float()
    return out.reshape(-1, *([1] * (ndim - 1)))


def snr(alpha_bar: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
    """Returns SNR = alpha_bar / (1 - alpha_bar): at timesteps t (B,) float32, or, without t, of every entry of
    alpha_bar in its own dtype. Eq. (2), Kingma et al. 2021, "Variational Diffusion Models"."""
    if t is None:
        return alpha_bar / (1 - alpha_bar)
    a = alpha_bar.to(t.device)[t].double()
    return (a / (1 - a)).float()


def posterior_variance(betas: torch.Tensor) -> torch.Tensor:
    """Returns beta_tilde_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) beta_t, (T,). Eq. (7), Ho et al. 2020.

    At t = 0 (the paper's t = 1) alpha_bar_{-1} = 1 gives 0: q(x_{-1} | x_0, x_0) is a point mass.
    """
    a_bar = alphas_cumprod(betas)
    a_bar_prev = torch.cat([a_bar.new_ones(1), a_bar[:-1]])
    return (1 - a_bar_prev) / (1 - a_bar) * betas


def posterior_mean_coefs(betas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (c0, ct) with mu_tilde_t(x_t, x0) = c0 x0 + ct x_t, each (T,). Eq. (7), Ho et al. 2020."""
    a_bar = alphas_cumprod(betas)
    a_bar_prev = torch.cat([a_bar.new_ones(1), a_bar[:-1]])
    return a_bar_prev.sqrt() * betas / (1 - a_bar), (1 - betas).sqrt() * (1 - a_bar_prev) / (1 - a_bar)


def reverse_variance(betas: torch.Tensor, kind: str = "posterior") -> torch.Tensor:
    """Returns sigma_t^2 of p(x_{t-1} | x_t), (T,): "posterior" (beta_tilde_t, what diffusers' DDPM sampler draws
    with, variance_type="fixed_small") or "beta" (beta_t), the two fixed choices of Ho et al. 2020, Sec. 3.2.

    beta_tilde_0 = 0 would make the t = 0 term infinite; there (the decoder term L_0 in the paper) beta_0 is used.
    """
    if kind == "beta":
        return betas.clone()
    if kind != "posterior":
        raise ValueError(f"unknown reverse variance {kind!r}; choose one of {REVERSE_VARIANCES}")
    var = posterior_variance(betas)
    var[0] = betas[0]
    return var


def vlb_weights(betas: torch.Tensor, variance: str = "posterior") -> torch.Tensor:
    """Returns lambda_t with L_{t-1} = lambda_t ||eps - eps_pred||^2, (T,); the simple loss uses lambda_t = 1.

    Eq. (12), Ho et al. 2020: lambda_t = beta_t^2 / (2 sigma_t^2 alpha_t (1 - alpha_bar_t)), sigma_t^2 from
    `reverse_variance` (by default the posterior variance beta_tilde_t, the one our DDPM sampler uses). The one
    definition of the VLB weight: `--weighting vlb` in training and `ldm diagnose schedule` both use it.
    """
    betas = betas.double()
    return betas ** 2 / (2 * reverse_variance(betas, variance) * (1 - betas) * (1 - alphas_cumprod(betas)))


def alpha_bar_at(alphas_cumprod: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """Returns alpha_bar at (possibly fractional) timesteps t, interpolating sigma_t = sqrt((1 - a) / a) linearly
    in t as diffusers' LMS/Euler schedulers do; exact at integer t."""
    t = torch.as_tensor(t, dtype=torch.float64).clamp(0, len(alphas_cumprod) - 1)
    sigmas = ((1 - alphas_cumprod.double()) / alphas_cumprod.double()).sqrt()
    lo = t.floor().long()
    hi = (lo + 1).clamp(max=len(sigmas) - 1)
    frac = t - lo
    # at integer t the exact value, also where sigma is infinite (zero terminal SNR: alpha_bar_{T-1} = 0)
    sigma = torch.where(frac == 0, sigmas[lo], sigmas[lo] * (1 - frac) + sigmas[hi] * frac)
    return 1 / (1 + sigma ** 2)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """Returns x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps. Eq. (4), Ho et al. 2020."""
    a = _gather(alpha_bar, t, x0.ndim)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def velocity(x0: torch.Tensor, noise: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Returns v = sqrt(a) eps - sqrt(1 - a) x0 for alpha_bar_t = a (broadcastable). Sec. 4 / Appendix D,
    Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of Diffusion Models", arXiv:2202.00512."""
    return a.sqrt() * noise - (1 - a).sqrt() * x0


def velocity_at(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """Returns v (`velocity`) at integer timesteps t (B,) of the schedule alpha_bar (T,)."""
    return velocity(x0, noise, _gather(alpha_bar, t, x0.ndim))


# Each prediction -> (x0, eps) conversion at x_t = sqrt(a) x0 + sqrt(1 - a) eps; a = alpha_bar_t broadcastable
# to x_t. The objectives (ldm/objectives/) pick theirs; to_parameterisations names them by diffusers' types.
def restart_noised(x_t: torch.Tensor, noise: torch.Tensor, alpha_bar_from, alpha_bar_to) -> torch.Tensor:
    """Returns x_{t'} ~ q(x_{t'} | x_t) for t' > t: the forward process run on from t to t', whose transition is
    N(sqrt(a) x_t, (1 - a) I) with a = alpha_bar_t' / alpha_bar_t (Ho et al. 2020, Eq. 2 composed). Restart
    sampling's "add noise back" step (Xu et al. 2023, arXiv:2306.14878, Algorithm 1, line 4) in VP form."""
    a = broadcast_alpha_bar(torch.as_tensor(alpha_bar_to) / alpha_bar_from, x_t)  # (B or 1, 1, 1, 1)
    return a.sqrt() * x_t + (1 - a).sqrt() * noise


def restart_noised_sigma(x_sigma: torch.Tensor, noise: torch.Tensor, sigma_from, sigma_to) -> torch.Tensor:
    """Returns x + sqrt(sigma_to^2 - sigma_from^2) noise: restart_noised in the sigma (VE) units of Euler-type
    samplers, x_sigma = x0 + sigma eps (Xu et al. 2023, Algorithm 1, line 4 as written there)."""
    return x_sigma + (torch.as_tensor(sigma_to) ** 2 - sigma_from ** 2).sqrt().to(x_sigma) * noise


def eps_to_x0(eps: torch.Tensor, x_t: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Returns x0 = (x_t - sqrt(1 - a) eps) / sqrt(a), Eq. (15), Ho et al. 2020."""
    return (x_t - (1 - a).sqrt() * eps) / a.sqrt()


def x0_to_eps(x0: torch.Tensor, x_t: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Returns eps = (x_t - sqrt(a) x0) / sqrt(1 - a), Eq. (4), Ho et al. 2020, solved for eps."""
    return (x_t - a.sqrt() * x0) / (1 - a).sqrt()


def v_to_x0_eps(v: torch.Tensor, x_t: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (x0, eps) = (sqrt(a) x_t - sqrt(1 - a) v, sqrt(1 - a) x_t + sqrt(a) v), Sec. 4, Salimans & Ho 2022."""
    return a.sqrt() * x_t - (1 - a).sqrt() * v, (1 - a).sqrt() * x_t + a.sqrt() * v


def broadcast_alpha_bar(alpha_bar_t, x_t: torch.Tensor) -> torch.Tensor:
    """Returns alpha_bar_t (a number or (B,)) as x_t's dtype and device, shaped (B or 1, 1, ..., 1)."""
    return torch.as_tensor(alpha_bar_t).to(x_t).reshape(-1, *([1] * (x_t.ndim - 1)))


def training_target(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alpha_bar: torch.Tensor,
                    kind: str) -> torch.Tensor:
    """Returns what the network learns to predict for a diffusers prediction type: eps, v or x0 (the objectives
    own this choice: ldm.objectives; this names it for a caller that holds only the type)."""
    if kind == "epsilon":
        return noise
    if kind == "sample":
        return x0
    if kind == "v_prediction":
        return velocity_at(x0, noise, t, alpha_bar)
    raise ValueError(f"unknown prediction type {kind!r}; choose one of {PREDICTION_TYPES}")


def to_parameterisations(prediction: torch.Tensor, x_t: torch.Tensor, alpha_bar_t: torch.Tensor,
                         kind: str) -> dict[str, torch.Tensor]:
    """Returns {"eps", "x0", "v"} implied by a prediction of diffusers type `kind` at x_t, each shaped like x_t
    (B, C, ...); alpha_bar_t is a number or (B,). The conversions: eps_to_x0, x0_to_eps, v_to_x0_eps."""
    a = broadcast_alpha_bar(alpha_bar_t, x_t)  # (B or 1, 1, ..., 1)
    if kind == "epsilon":
        x0, eps = eps_to_x0(prediction, x_t, a), prediction
    elif kind == "v_prediction":
        x0, eps = v_to_x0_eps(prediction, x_t, a)
    elif kind == "sample":
        x0, eps = prediction, x0_to_eps(prediction, x_t, a)
    else:
        raise ValueError(f"unknown prediction type {kind!r}; choose one of {PREDICTION_TYPES}")
    return {"eps": eps, "x0": x0, "v": velocity(x0, eps, a)}


def v_eps_loss_factor(snr_t: torch.Tensor) -> torch.Tensor:
    """Returns c = SNR / (1 + SNR) with ||eps - eps_pred||^2 = c ||v - v_pred||^2: a v error e gives an eps error
    sqrt(a) e, a = SNR / (1 + SNR). (An x0 error e gives an eps error sqrt(SNR) e: c = SNR.)"""
    return snr_t / (snr_t + 1)


def eps_loss_factor(snr_t: torch.Tensor, kind: str) -> torch.Tensor:
    """Returns c with ||eps - eps_pred||^2 = c ||target - pred||^2 for a diffusers prediction type, (B,)."""
    if kind == "epsilon":
        return torch.ones_like(snr_t)
    if kind == "sample":
        return snr_t
    if kind == "v_prediction":
        return v_eps_loss_factor(snr_t)
    raise ValueError(f"unknown prediction type {kind!r}; choose one of {PREDICTION_TYPES}")


def min_snr_eps_weight(snr_t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Returns the Min-SNR-gamma weight of the eps-MSE, min(SNR, gamma) / SNR, (B,). Eq. (7)ff, Hang et al. 2023,
    "Efficient Diffusion Training via Min-SNR Weighting", arXiv:2303.09556."""
    return torch.clamp(snr_t, max=gamma) / snr_t.clamp(min=1e-20)


def min_snr_weight(snr_t: torch.Tensor, gamma: float, kind: str) -> torch.Tensor:
    """Returns the Min-SNR-gamma loss weight of the prediction type's MSE, (B,): for eps min(SNR, gamma) / SNR,
    for x0 min(SNR, gamma) and for v min(SNR, gamma) / (SNR + 1)."""
    return min_snr_eps_weight(snr_t, gamma) * eps_loss_factor(snr_t, kind)


def vlb_eps_weight(t: torch.Tensor, betas: torch.Tensor) -> torch.Tensor:
    """Returns the ELBO weight of each timestep's eps-MSE relative to the simple (uniform) loss, (B,): `vlb_weights`
    (posterior variance) divided by their mean over all T steps. The relative weighting is the ELBO's exactly, while
    the loss keeps the simple loss's scale (the ELBO's overall scale only rescales the learning rate)."""
    lam = vlb_weights(betas)
    lam = lam / lam.mean()  # (T,) eps-MSE weights, mean 1
    return lam.to(t.device)[t].float()


def vlb_weight(t: torch.Tensor, betas: torch.Tensor, kind: str) -> torch.Tensor:
    """Returns `vlb_eps_weight` times the eps-loss factor of the prediction type, (B,)."""
    return vlb_eps_weight(t, betas) * eps_loss_factor(snr(alphas_cumprod(betas.double()), t), kind)


def eps_weights(t: torch.Tensor, betas: torch.Tensor, weighting: str, gamma: float = 5.0) -> torch.Tensor | None:
    """Returns a weighting's per-sample weights of the eps-MSE (B,): min_snr or vlb; None for uniform (DDPM's
    L_simple, Eq. (14), Ho et al. 2020, weighs the prediction's own MSE by 1, whatever it predicts)."""
    if weighting == "uniform":
        return None
    if weighting == "min_snr":
        return min_snr_eps_weight(snr(alphas_cumprod(betas.double()), t), gamma)
    if weighting == "vlb":
        return vlb_eps_weight(t, betas)
    raise ValueError(f"unknown timestep weighting {weighting!r}; choose one of {WEIGHTINGS}")


def loss_weights(t: torch.Tensor, betas: torch.Tensor, weighting: str, kind: str, gamma: float = 5.0) -> torch.Tensor:
    """Returns per-sample loss weights (B,) of a diffusers prediction type's MSE for a weighting name: uniform,
    min_snr or vlb (`eps_weights` times the type's eps-loss factor)."""
    weights = eps_weights(t, betas, weighting, gamma)
    if weights is None:
        return torch.ones(t.shape, device=t.device)
    return weights * eps_loss_factor(snr(alphas_cumprod(betas.double()), t), kind)


def per_sample_loss(pred: torch.Tensor, target: torch.Tensor, kind: str, huber_c: float = 0.1,
                    weight: torch.Tensor | None = None) -> torch.Tensor:
    """Returns the loss of each sample, mean over all but the batch dim, (B,): mse, l1 or pseudo-huber.

    Pseudo-Huber sqrt(d^2 + c^2) - c: Song & Dhariwal 2023, "Improved Techniques for Training Consistency Models".
    `weight` (B, 1, H, W), e.g. a loss mask (ldm.data.masks.loss_weight), makes it the weighted mean
    sum(w * l) / sum(w) per sample: the loss keeps its scale whatever share of the image the mask covers
    (OneTrainer's normalize_masked_area_loss; kohya's masked loss multiplies and takes the plain mean, so a small
    mask also shrinks the step). A sample whose weights are all 0 contributes 0.
    """
    diff = pred.float() - target.float()  # (B, C, H, W)
    if kind == "mse":
        loss = diff.pow(2)
    elif kind == "l1":
        loss = diff.abs()
    elif kind == "huber":
        loss = (diff.pow(2) + huber_c ** 2).sqrt() - huber_c
    else:
        raise ValueError(f"unknown loss {kind!r}; choose one of ('mse', 'huber', 'l1')")
    if weight is None:
        return loss.flatten(1).mean(1)
    weight = weight.float().expand_as(loss).flatten(1)  # (B, C*H*W)
    return (weight * loss.flatten(1)).sum(1) / weight.sum(1).clamp_min(1e-8)


def offset_noise(noise: torch.Tensor, strength: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Returns eps + strength * n with one n ~ N(0, 1) per sample and channel, so the model can shift means.

    Guttenberg 2023, "Diffusion with Offset Noise" (crosslabs.org blog).
    """
    if strength == 0:
        return noise
    shift = torch.randn(noise.shape[:2], generator=generator, device=noise.device, dtype=noise.dtype)  # (B, C)
    return noise + strength * shift.reshape(*noise.shape[:2], *([1] * (noise.ndim - 2)))


def input_perturbation(noise: torch.Tensor, gamma: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Returns the noise the model's input is made with, eps + gamma xi with xi ~ N(0, I) fresh, while the target
    stays eps: DDPM-IP, Eq. (9)-(10), Ning et al. 2023, "Input Perturbation Reduces Exposure Bias in Diffusion
    Models", arXiv:2301.11706 (gamma 0.1 there). gamma 0 returns eps itself and draws nothing."""
    if gamma == 0:
        return noise
    xi = torch.randn(noise.shape, generator=generator, dtype=noise.dtype).to(noise.device)  # (B, C, h, w)
    return noise + gamma * xi


def drop_captions(captions: list[str], prob: float, generator: torch.Generator | None = None) -> list[str]:
    """Returns the captions with each replaced by "" with probability `prob`: trains the unconditional model.

    Sec. 3.2 / Algorithm 1, Ho & Salimans 2022, arXiv:2207.12598 (p_uncond); DiT's `token_drop`.
    """
    keep = torch.rand(len(captions), generator=generator) >= prob
    return [c if k else "" for c, k in zip(captions, keep.tolist())]


def unit_times(batch: int, generator: torch.Generator | None = None, sampling: str = "uniform", mean: float = 0.0,
               std: float = 1.0, mode_scale: float = 1.29) -> torch.Tensor:
    """Returns times u (B,) float64 in [0, 1] drawn from one of the densities of Esser et al. 2024 ("Scaling
    Rectified Flow Transformers", SD3), Sec. 3.1; 1 is the noisiest end.

    uniform:      u ~ U(0, 1);
    logit_normal: u = sigmoid(n), n ~ N(mean, std) (Eq. 19): most draws in the middle, where layout is decided;
    mode:         u = 1 - v - mode_scale (cos^2(pi v / 2) - 1 + v), v ~ U(0, 1) (Eq. 20; mode_scale in
                  [-1, 2/(pi-2)], 0 = uniform);
    cosmap:       u = 1 - 1 / (tan(pi v / 2) + 1), v ~ U(0, 1) (Eq. 21).
    """
    if sampling == "logit_normal":
        return torch.sigmoid(mean + std * torch.randn(batch, generator=generator, dtype=torch.float64))
    if sampling not in TIMESTEP_SAMPLING:
        raise ValueError(f"timestep sampling {sampling!r} is not one of {TIMESTEP_SAMPLING}")
    v = torch.rand(batch, generator=generator, dtype=torch.float64)
    if sampling == "mode":
        return 1 - v - mode_scale * (torch.cos(torch.pi * v / 2) ** 2 - 1 + v)
    if sampling == "cosmap":
        return 1 - 1 / (torch.tan(torch.pi * v / 2) + 1)
    return v


def sample_timesteps(batch: int, num_train_timesteps: int, generator: torch.Generator | None = None,
                     sampling: str = "uniform", mean: float = 0.0, std: float = 1.0,
                     mode_scale: float = 1.29) -> torch.Tensor:
    """Returns training timesteps (B,) int64 in [0, T-1]: uniform, t ~ U{0, ..., T-1} (Algorithm 1, Ho et al. 2020),
    or t = floor(u T) for u from `unit_times`'s other densities (e.g. logit_normal leans on the middle noise
    levels; mean > 0 toward noisier steps)."""
    if sampling == "uniform":
        return torch.randint(0, num_train_timesteps, (batch,), generator=generator)
    u = unit_times(batch, generator, sampling, mean, std, mode_scale)
    return (u * num_train_timesteps).long().clamp_(0, num_train_timesteps - 1)


def stratified_timesteps(count: int, num_train_timesteps: int) -> torch.Tensor:
    """Returns `count` evenly spread timesteps covering [0, T-1], (count,) int64: deterministic validation."""
    return torch.linspace(0, num_train_timesteps - 1, count).round().long()


def timestep_bins(fraction: torch.Tensor, num_bins: int) -> torch.Tensor:
    """Returns the bin index in [0, num_bins) of each time given as a fraction in [0, 1] of the noise range (t / T
    for timesteps, sigma for flow), equal-width bins (bin 0 = the least noise)."""
    return torch.clamp((fraction.double() * num_bins).floor().long(), 0, num_bins - 1)


# Rectified flow / flow matching (Liu et al. 2022, arXiv:2209.03003; Lipman et al. 2022, arXiv:2210.02747), as in
# Esser et al. 2024 (SD3, arXiv:2403.03206) and diffusers' FlowMatchEulerDiscreteScheduler: sigma in [0, 1] is
# the time, sigma = 1 pure noise; the denoiser is given sigma * num_train_timesteps.

def flow_noised(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Returns x_sigma = (1 - sigma) x0 + sigma eps, the straight path from data to noise (SD3 Eq. 3ff, RF)."""
    s = torch.as_tensor(sigma).to(x0).reshape(-1, *([1] * (x0.ndim - 1)))
    return (1 - s) * x0 + s * noise


def flow_velocity(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Returns the path's velocity d x_sigma / d sigma = eps - x0: the network's target."""
    return noise - x0


def flow_to_x0(velocity: torch.Tensor, x_t: torch.Tensor, sigma) -> torch.Tensor:
    """Returns the x0 a velocity prediction implies at x_sigma: x0 = x_sigma - sigma v."""
    s = torch.as_tensor(sigma).to(x_t).reshape(-1, *([1] * (x_t.ndim - 1)))
    return x_t - s * velocity


def flow_to_noise(velocity: torch.Tensor, x_t: torch.Tensor, sigma) -> torch.Tensor:
    """Returns the eps a velocity prediction implies at x_sigma: eps = x_sigma + (1 - sigma) v."""
    s = torch.as_tensor(sigma).to(x_t).reshape(-1, *([1] * (x_t.ndim - 1)))
    return x_t + (1 - s) * velocity


def shift_sigmas(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """Returns shift sigma / (1 + (shift - 1) sigma): SD3 Eq. 23, the timestep shift (shift > 1 spends more of
    training and sampling at high noise); diffusers' FlowMatchEulerDiscreteScheduler(shift=...) applies the same."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def resolution_shift(resolution: int, reference: int = 256) -> float:
    """Returns the resolution-dependent shift sqrt(m / n) of SD3 Sec. 5.3.2 (Eq. 23): m and n the pixel counts of
    the training resolution and of the reference resolution at which the unshifted schedule was tuned."""
    return resolution / reference


def flow_marginal_moments(mean: torch.Tensor, var: torch.Tensor, sigma) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns the mean and variance of x_sigma = (1 - sigma) x0 + sigma eps, elementwise, for x0 of the given mean
    and variance and eps ~ N(0, I) independent of it: ((1 - sigma) mean, (1 - sigma)^2 var + sigma^2). The flow
    path's marginal (the straight path of Liu et al. 2022 / SD3 Sec. 2), which sampling should follow."""
    return (1 - sigma) * mean, (1 - sigma) ** 2 * var + sigma ** 2
