"""How well a VAE reconstructs images it was not trained on: PSNR on held-out photographs, art and shapes."""
from __future__ import annotations

import torch

from ldm.data.photos import art_images, held_out_crops, to_pixels
from ldm.data.shapes import ShapesDataset
from ldm.models.vae import encode_posterior
from ldm.training.vae_losses import psnr


@torch.no_grad()
def reconstruction_psnr(vae, pixel_values: torch.Tensor, batch_size: int = 64) -> float:
    """Returns the mean PSNR (dB, peak-to-peak 2) of the VAE's round trip decode(posterior mean) of pixel_values
    (N, 3, H, W) in [-1, 1], in chunks of batch_size."""
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
    shapes = ShapesDataset(128, resolution, seed=987_654)
    sets = {"photos": held_out_crops(resolution), "art": to_pixels(art_images(12, resolution)),
            "shapes": to_pixels([shapes[i]["image"] for i in range(len(shapes))])}
    was_training = vae.training
    vae.eval()
    report = {name: round(reconstruction_psnr(vae, pixels), 2) for name, pixels in sets.items()}
    vae.train(was_training)
    return report
