"""Classifier-free guidance and its variants as pure tensor functions, and `Guidance`, one call's choice among them.

Notation: eps_uncond = eps(x_t, t, empty), eps_cond = eps(x_t, t, c), w = guidance scale. "pred" is a prediction in
the model's own units (eps, v, x0 or a flow velocity); x0_cond / x0_uncond are the clean latents the two branches
imply; D = cond - uncond is the guidance update. Norms and inner products are per sample, over all of a sample's
latent elements (C, h, w), as in the papers' code.

    Guidance(7.5)                                        plain CFG, every step
    Guidance(7.5, interval=(200, 800))                   CFG only at 200 <= t <= 800 (Kynkaanniemi et al. 2024)
    Guidance(7.5, apg=APGSettings())                     adaptive projected guidance (Sadat et al. 2024)
    Guidance(7.5, cfg_zero_star=True, zero_init_steps=1) CFG-Zero* (Fan et al. 2025)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

# The guidance methods by name, as `--validation-guidance-method`, `ldm eval-guidance --methods` and guidance.json's
# "method" name them (ldm.evaluation.guidance_sweep.METHODS gives each its call keywords)
GUIDANCE_METHODS = ("cfg", "interval", "apg", "cfg_zero_star", "rescale")


def cfg_combine(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Returns the guided prediction eps_uncond + w (eps_cond - eps_uncond).

    Eq. (6), Ho & Salimans 2022, "Classifier-Free Diffusion Guidance", arXiv:2207.12598 (w here is their 1 + w).
    """
    return eps_uncond + scale * (eps_cond - eps_uncond)


def rescale_guidance(eps_guided: torch.Tensor, eps_cond: torch.Tensor, phi: float) -> torch.Tensor:
    """Returns the guided prediction with its per-sample std pulled back toward the conditional one's.

    Eqs. (15)-(16), Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed",
    arXiv:2305.08891: x_rescaled = x_cfg * std(x_pos) / std(x_cfg); x_final = phi x_rescaled + (1 - phi) x_cfg.
    """
    dims = list(range(1, eps_cond.ndim))
    std_cond = eps_cond.std(dim=dims, keepdim=True)
    std_guided = eps_guided.std(dim=dims, keepdim=True)
    eps_rescaled = eps_guided * (std_cond / std_guided)
    return phi * eps_rescaled + (1 - phi) * eps_guided


# ------------------------------------------------------------------ guidance interval

def guides_at(t: float, interval: tuple[float, float] | None) -> bool:
    """Returns whether guidance applies at timestep t: at every t without an interval, else where t_lo <= t <= t_hi.

    Eqs. (5)-(6), Kynkaanniemi et al. 2024, "Applying Guidance in a Limited Interval Improves Sample and
    Distribution Quality in Diffusion Models", arXiv:2404.07724: w(sigma) = w for sigma in (sigma_lo, sigma_hi],
    1 elsewhere, and w = 1 is the conditional prediction alone. Here the ends are scheduler timesteps (sigma * T
    for flow models); the paper puts them between two steps, where open and closed ends agree.
    """
    return interval is None or interval[0] <= t <= interval[1]


# ------------------------------------------------------------------ adaptive projected guidance (APG)

@dataclass(frozen=True)
class APGSettings:
    """Adaptive projected guidance's settings. Defaults: eta = 0 as the paper recommends; r = 15 and beta = -0.5,
    the paper's Stable Diffusion XL settings (r = 15 is also diffusers' AdaptiveProjectedGuidance default)."""
    eta: float = 0.0             # weight of D's component parallel to x0_cond: 0 drops it, 1 keeps it (plain CFG)
    norm_threshold: float = 15.0  # r: ||D|| is capped at r (an L2 norm over C*h*w latent values); 0 = no cap
    momentum: float = -0.5       # beta of the reverse momentum, in (-1, 1); 0 = none


def project(v: torch.Tensor, onto: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (v_parallel, v_orthogonal): v's component along `onto`, <v, u> u with u = onto / ||onto||, and the
    rest, per sample. `project` of Algorithm 1, Sadat et al. 2024, arXiv:2410.02416 (in float32 where they use
    float64: the sums run over one latent, and MPS has no float64)."""
    dims = tuple(range(1, v.ndim))
    v32 = v.float()
    unit = torch.nn.functional.normalize(onto.float(), dim=dims)  # (B, C, h, w); a zero `onto` gives 0
    parallel = (v32 * unit).sum(dim=dims, keepdim=True) * unit
    return parallel.to(v.dtype), (v32 - parallel).to(v.dtype)


def cap_norm(update: torch.Tensor, threshold: float) -> torch.Tensor:
    """Returns update * min(1, r / ||update||) per sample: its norm capped at r = threshold, its direction kept.
    APG's rescaling, Algorithm 1 (norm_threshold), Sadat et al. 2024."""
    norm = torch.linalg.vector_norm(update.float(), dim=tuple(range(1, update.ndim)), keepdim=True)  # (B, 1, 1, 1)
    return update * (threshold / norm).clamp(max=1.0).to(update.dtype)  # ||update|| = 0: r / 0 = inf -> 1


def reverse_momentum(update: torch.Tensor, average: torch.Tensor | None, beta: float) -> torch.Tensor:
    """Returns the running average D_bar_t = D_t + beta D_bar_{t-1} (D_bar = D at the first guided step); with
    beta < 0 each step's update is pushed away from the previous ones. MomentumBuffer.update of Algorithm 1,
    Sadat et al. 2024."""
    return update if average is None else update + beta * average


def apg_combine(x0_uncond: torch.Tensor, x0_cond: torch.Tensor, scale: float, settings: APGSettings,
                average: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (x0_guided, D_bar): x0_cond + (w - 1) (D_orthogonal + eta D_parallel) for D = x0_cond - x0_uncond
    after reverse momentum and the norm cap, and the running average D_bar to pass to the next step.

    Algorithm 1 (normalized_guidance), Sadat et al. 2024, "Eliminating Oversaturation and Artifacts of High
    Guidance Scales in Diffusion Models", arXiv:2410.02416, in its order: momentum, norm cap, projection onto the
    conditional denoised prediction. eta = 1, r = 0, beta = 0 is plain CFG.
    """
    update = reverse_momentum(x0_cond - x0_uncond, average, settings.momentum)  # D_bar_t
    capped = cap_norm(update, settings.norm_threshold) if settings.norm_threshold > 0 else update
    parallel, orthogonal = project(capped, x0_cond)
    return x0_cond + (scale - 1) * (orthogonal + settings.eta * parallel), update


def prediction_from_x0(x0: torch.Tensor, pred_ref: torch.Tensor, x0_ref: torch.Tensor,
                       to_x0: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Returns the prediction whose clean-latent estimate is x0, given one pair (pred_ref, x0_ref = to_x0(pred_ref)).

    Every objective's x0 is affine in its prediction, x0 = A x_t + B pred, with one slope B per sample (eps:
    B = -sqrt(1 - a) / sqrt(a), Ho et al. 2020 Eq. 15; v: B = -sqrt(1 - a), Salimans & Ho 2022 Sec. 4; x0: B = 1;
    flow: B = -sigma), so pred = pred_ref + (x0 - x0_ref) / B, with B read off to_x0 itself.
    """
    slope = to_x0(torch.ones_like(pred_ref)) - to_x0(torch.zeros_like(pred_ref))  # B, (B, C, h, w)
    return pred_ref + (x0 - x0_ref) / slope


# ------------------------------------------------------------------ CFG-Zero*

def optimized_scale(pred_uncond: torch.Tensor, pred_cond: torch.Tensor) -> torch.Tensor:
    """Returns s* = <pred_cond, pred_uncond> / ||pred_uncond||^2 per sample, (B, 1, ..., 1): the s minimising
    ||pred_cond - s pred_uncond||, i.e. the coefficient of pred_cond's projection onto pred_uncond.

    CFG-Zero*'s optimized scale, Fan et al. 2025, "CFG-Zero*: Improved Classifier-Free Guidance for Flow Matching
    Models", arXiv:2503.18886 (s* = v_cond^T v_uncond / ||v_uncond||^2, as in the authors' reference code).
    """
    dims = tuple(range(1, pred_cond.ndim))
    cond, uncond = pred_cond.float(), pred_uncond.float()
    squared_norm = (uncond * uncond).sum(dim=dims, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
    return (cond * uncond).sum(dim=dims, keepdim=True) / squared_norm  # (B, 1, 1, 1)


def cfg_zero_star_combine(pred_uncond: torch.Tensor, pred_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Returns s* pred_uncond + w (pred_cond - s* pred_uncond): CFG from the unconditional prediction scaled by
    s* (optimized_scale), CFG-Zero*, Fan et al. 2025, arXiv:2503.18886 (their (1 - w) s* v_uncond + w v_cond)."""
    s_star = optimized_scale(pred_uncond, pred_cond).to(pred_cond.dtype)
    return cfg_combine(s_star * pred_uncond, pred_cond, scale)


# ------------------------------------------------------------------ one call's guidance

@dataclass
class Guidance:
    """How one pipeline call combines the unconditional and conditional predictions, with the call's state (APG's
    running average, which advances on guided steps only): make one per call.

    scale: w (<= 1: the conditional prediction alone, every step); rescale: phi of Lin et al. 2023 (0 = off);
    interval: (t_lo, t_hi) in the scheduler's timesteps, guidance only where t_lo <= t <= t_hi, other steps
    running the conditional branch alone (None: every step); apg or cfg_zero_star: the rule that combines the
    branches instead of plain CFG (at most one); zero_init_steps: CFG-Zero*'s zero-init, the first K steps
    predict 0, with or without guidance.
    """
    scale: float
    rescale: float = 0.0
    interval: tuple[float, float] | None = None
    apg: APGSettings | None = None
    cfg_zero_star: bool = False
    zero_init_steps: int = 0
    apg_average: torch.Tensor | None = field(default=None, repr=False)  # D_bar of the last guided step

    @property
    def enabled(self) -> bool:
        return self.scale > 1.0

    def uses_uncond(self, i: int, t: float) -> bool:
        """Returns whether step i, at timestep t, needs the unconditional branch (otherwise: one denoiser call on
        the conditional rows alone, half the work)."""
        return self.enabled and i >= self.zero_init_steps and guides_at(t, self.interval)

    def unguided(self, i: int, pred_cond: torch.Tensor) -> torch.Tensor:
        """Returns the prediction of a step without the unconditional branch: pred_cond, or 0 on a zero-init step
        (CFG-Zero*'s zero-init, Fan et al. 2025: a flow model's first steps move nothing)."""
        return torch.zeros_like(pred_cond) if i < self.zero_init_steps else pred_cond

    def combine(self, pred_uncond: torch.Tensor, pred_cond: torch.Tensor,
                to_x0: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """Returns the guided prediction of a step with both branches, in the model's units and dtype. APG guides
        the x0 the predictions imply: to_x0 is the step's prediction -> x0 map (float32), needed for APG only."""
        if self.apg is not None:
            x0_cond = to_x0(pred_cond)
            x0_guided, self.apg_average = apg_combine(to_x0(pred_uncond), x0_cond, self.scale, self.apg,
                                                      self.apg_average)
            guided = prediction_from_x0(x0_guided, pred_cond, x0_cond, to_x0).to(pred_cond.dtype)
        elif self.cfg_zero_star:
            guided = cfg_zero_star_combine(pred_uncond, pred_cond, self.scale)
        else:
            guided = cfg_combine(pred_uncond, pred_cond, self.scale)
        return rescale_guidance(guided, pred_cond, self.rescale) if self.rescale > 0 else guided
