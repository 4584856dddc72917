"""The VAE's one way from pixels to latents, used by training, fine-tuning, the latent cache, validation, the
demo and the diagnostics: the posterior q(z|x) = N(mean, exp(logvar)) of AutoencoderKL, and a draw from it.
"""
from __future__ import annotations

import torch


@torch.no_grad()
def encode_posterior(vae, pixel_values: torch.Tensor, batch_size: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns the posterior's (mean, logvar), each (B, C, h, w) float32 on the VAE's device, of pixel_values
    (B, 3, H, W) in [-1, 1]; batch_size > 0 encodes in chunks of that many images (bounded memory)."""
    chunks = pixel_values.split(batch_size) if batch_size > 0 else (pixel_values,)
    means, logvars = [], []
    for chunk in chunks:
        dist = vae.encode(chunk.to(vae.device, vae.dtype, non_blocking=True)).latent_dist
        means.append(dist.mean.float())
        logvars.append(dist.logvar.float())
    return torch.cat(means), torch.cat(logvars)


def sample_latents(mean: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None,
                   scaling_factor: float) -> torch.Tensor:
    """Returns z * scaling_factor with z = mean + std * eps, eps ~ N(0, 1) drawn on the CPU with `generator` (the
    same draw on any device), as diffusers' DiagonalGaussianDistribution.sample (logvar clamped to [-30, 20])."""
    eps = torch.randn(mean.shape, generator=generator).to(mean.device, non_blocking=True)
    return (mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * eps) * scaling_factor
