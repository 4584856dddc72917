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


@torch.no_grad()
def reconstruction_psnr(vae, pixel_values: torch.Tensor, batch_size: int = 64) -> float:
    """Returns the mean PSNR (dB, peak-to-peak 2) of the VAE's round trip decode(posterior mean) of pixel_values
    (N, 3, H, W) in [-1, 1], in chunks of batch_size."""
    from ldm.training.vae_losses import psnr

    values = []
    for chunk in pixel_values.split(batch_size):
        x = chunk.to(vae.device, vae.dtype)
        values.append(float(psnr(vae.decode(encode_posterior(vae, x)[0].to(vae.dtype)).sample.float(), x.float()))
                      * len(chunk))
    return sum(values) / len(pixel_values)


def reconstruction_report(vae, resolution: int) -> dict:
    """Returns the VAE's PSNR (dB) at `resolution` on images it was not trained on: "photos" (crops of
    ldm.data.photos.HELD_OUT), "art" (ldm.data.photos.art_images: dark, saturated, textured) and "shapes" (128
    scenes of a seed no trainer uses)."""
    from ldm.data.photos import art_images, held_out_crops, to_pixels
    from ldm.data.shapes import ShapesDataset

    shapes = ShapesDataset(128, resolution, seed=987_654)
    sets = {"photos": held_out_crops(resolution), "art": to_pixels(art_images(12, resolution)),
            "shapes": to_pixels([shapes[i]["image"] for i in range(len(shapes))])}
    was_training = vae.training
    vae.eval()
    report = {name: round(reconstruction_psnr(vae, pixels), 2) for name, pixels in sets.items()}
    vae.train(was_training)
    return report


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
