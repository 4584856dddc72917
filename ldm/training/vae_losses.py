"""VAE losses: reconstruction + KL, a patch discriminator with hinge loss, PSNR and the latent scale.

Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models", arXiv:2112.10752, Sec. 3.1
and Appendix G: perceptual + patch-adversarial reconstruction with a slight KL penalty (~1e-6).
"""
from __future__ import annotations

import torch
from torch import nn


def reconstruction_loss(x_rec: torch.Tensor, x: torch.Tensor, kind: str) -> torch.Tensor:
    """Returns the mean L1 or L2 distance between reconstruction and input."""
    if kind == "l1":
        return (x_rec - x).abs().mean()
    if kind == "l2":
        return (x_rec - x).pow(2).mean()
    raise ValueError(f"unknown reconstruction loss {kind!r}; choose l1 or l2")


def kl_loss(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Returns KL(N(mean, exp(logvar)) || N(0, I)) summed over latent dims, mean over the batch. Kingma & Welling 2014, App. B."""
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)  # (B, C, h, w)
    return kl.flatten(1).sum(1).mean()


def psnr(x_rec: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Returns the PSNR in dB of images in [-1, 1] (peak-to-peak 2), averaged over the batch."""
    mse = (x_rec.clamp(-1, 1) - x).pow(2).flatten(1).mean(1)  # (B,)
    return (10 * torch.log10(4.0 / mse.clamp(min=1e-10))).mean()


class PatchDiscriminator(nn.Module):
    """PatchGAN: a logit per overlapping patch. Isola et al. 2017 (pix2pix), as used by taming-transformers."""

    def __init__(self, in_channels: int = 3, width: int = 64, layers: int = 3):
        super().__init__()
        blocks = [nn.Conv2d(in_channels, width, 4, 2, 1), nn.LeakyReLU(0.2)]
        channels = width
        for i in range(1, layers):
            out = width * min(2 ** i, 8)
            blocks += [nn.Conv2d(channels, out, 4, 2, 1, bias=False), nn.GroupNorm(min(32, out // 4), out),
                       nn.LeakyReLU(0.2)]
            channels = out
        blocks += [nn.Conv2d(channels, 1, 4, 1, 1)]
        self.net = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, 1, h', w') logits


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Returns the discriminator's hinge loss. Lim & Ye 2017, "Geometric GAN"; Eq. in taming-transformers."""
    return 0.5 * (torch.relu(1 - logits_real).mean() + torch.relu(1 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Returns the generator's adversarial loss -E[D(G(z))]."""
    return -logits_fake.mean()


def adaptive_disc_weight(rec_grad: torch.Tensor, gan_grad: torch.Tensor, max_weight: float = 1e4) -> torch.Tensor:
    """Returns lambda = ||grad L_rec|| / (||grad L_GAN|| + 1e-4), clamped to [0, max_weight], detached: the two
    losses' gradients at the decoder's last layer. Eq. 7, Esser et al. 2021 (arXiv:2012.09841)."""
    return (rec_grad.norm() / (gan_grad.norm() + 1e-4)).clamp(0.0, max_weight).detach()


@torch.no_grad()
def latent_scaling_factor(vae, batches, device, generator: torch.Generator | None = None) -> float:
    """Returns 1 / std of posterior samples over `batches`: latents scaled by it have unit variance (Rombach et al. 2022, Sec. 4.3.2)."""
    samples = []
    for pixels in batches:
        dist = vae.encode(pixels.to(device)).latent_dist
        eps = torch.randn(dist.mean.shape, generator=generator).to(device)
        samples.append((dist.mean + dist.std * eps).flatten().cpu())
    return float(1.0 / torch.cat(samples).std())
