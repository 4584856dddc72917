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


def check_vae_folder(path: str, model: str, resolution: int) -> None:
    """Raises a ValueError naming the problem unless `path` is an AutoencoderKL folder whose latents fit the
    preset `model`'s denoiser and whose downsampling divides `resolution`: checked before any training starts."""
    import json
    import os

    from ldm.models.presets import get_spec
    from ldm.ranges import check_multiple

    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        raise ValueError(f"vae {path!r} is not a VAE folder (no config.json); give an AutoencoderKL folder such as "
                         "RUN/checkpoints/checkpoint-N/vae from `ldm train-vae`")
    with open(config, encoding="utf-8") as f:
        vae = json.load(f)
    channels, wanted = vae.get("latent_channels"), get_spec(model).vae["latent_channels"]
    factor = 2 ** (len(vae.get("block_out_channels", ())) - 1)
    if channels != wanted:
        raise ValueError(f"vae {path!r} has {channels} latent channels; the {model} preset's denoiser takes "
                         f"{wanted}: train it with `ldm train-vae --model {model}` (or small-photo for small)")
    check_multiple("resolution", resolution, factor, of=f"vae {path!r} downsamples {factor}x")
