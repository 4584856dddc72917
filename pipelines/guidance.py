"""Classifier-free guidance as pure tensor functions.

Notation: eps_uncond = eps(x_t, t, empty), eps_cond = eps(x_t, t, c), w = guidance scale.
"""
from __future__ import annotations

import torch


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
