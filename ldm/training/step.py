"""One diffusion training step's pieces: the noise schedule, latents, text embeddings and the loss.

Randomness (timesteps, noise, caption dropout, VAE posterior draws) comes from `step_generator`, a pure
function of (seed, step, micro-batch, rank): a resumed run draws exactly what the uninterrupted run drew.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ldm import diffusion


def step_generator(seed: int, step: int, micro: int = 0, rank: int = 0) -> torch.Generator:
    """Returns a CPU generator seeded by (seed, step, micro-batch, rank)."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 97 + micro) * 4099 + rank)


@dataclass
class NoiseSchedule:
    """The training noise schedule: betas (T,) and alpha_bar (T,), both float64."""
    betas: torch.Tensor
    alpha_bar: torch.Tensor
    name: str
    rescaled: bool

    @classmethod
    def from_config(cls, cfg) -> "NoiseSchedule":
        betas = diffusion.make_betas(cfg.noise_schedule, cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end)
        if cfg.zero_terminal_snr:
            betas = diffusion.rescale_zero_terminal_snr(betas)
        return cls(betas, diffusion.alphas_cumprod(betas), cfg.noise_schedule, cfg.zero_terminal_snr)

    @property
    def num_train_timesteps(self) -> int:
        return len(self.betas)

    def scheduler_config(self, base: dict, prediction_type: str, beta_start: float, beta_end: float) -> dict:
        """Returns the scheduler config to save with the model: this schedule, for latents (clip_sample=False)."""
        config = {k: v for k, v in dict(base).items() if not k.startswith("_")}
        config.update(num_train_timesteps=self.num_train_timesteps, beta_schedule=self.name, beta_start=beta_start,
                      beta_end=beta_end, prediction_type=prediction_type, clip_sample=False, trained_betas=None)
        if self.name == "sigmoid" or self.rescaled:
            # DDIM/LMS know no "sigmoid" and LMS no zero-SNR flag: store the exact betas, which every sampler reads.
            config.update(beta_schedule="linear", trained_betas=self.betas.float().tolist())
        if self.rescaled:
            config.update(timestep_spacing="trailing", rescale_betas_zero_snr=False)
        return config


class TextEmbedder:
    """Captions -> CLIP embeddings (B, 77, D); with `cache`, each distinct caption is encoded once."""

    def __init__(self, text_encoder, tokenizer, cache: bool = False):
        self.text_encoder, self.tokenizer, self.cache = text_encoder, tokenizer, {} if cache else None

    def _encode(self, captions: list[str], device) -> torch.Tensor:
        ids = self.tokenizer(captions, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids  # (B, 77)
        return self.text_encoder(ids.to(device))[0]  # (B, 77, D)

    def __call__(self, captions: list[str], device) -> torch.Tensor:
        if self.cache is None:
            return self._encode(captions, device)
        missing = sorted({c for c in captions if c not in self.cache})
        if missing:
            with torch.no_grad():
                for caption, embedding in zip(missing, self._encode(missing, device)):
                    self.cache[caption] = embedding
        return torch.stack([self.cache[c] for c in captions])  # (B, 77, D)


def batch_latents(batch: dict, vae, generator: torch.Generator, device) -> torch.Tensor:
    """Returns scaled latents z * scaling_factor (B, 4, H/f, W/f), drawn from the VAE posterior.

    Takes cached posteriors ("latent_mean", "latent_logvar") when the batch has them, else encodes "pixel_values".
    """
    if "latent_mean" in batch:
        mean = batch["latent_mean"].to(device, non_blocking=True)  # pinned batches: the copies overlap compute
        logvar = batch["latent_logvar"].to(device, non_blocking=True)
    else:
        with torch.no_grad():
            moments = vae.encode(batch["pixel_values"].to(device, vae.dtype, non_blocking=True)).latent_dist
            mean, logvar = moments.mean, moments.logvar
    mean, logvar = mean.float(), logvar.float()
    eps = torch.randn(mean.shape, generator=generator).to(device, non_blocking=True)  # CPU draw: same on any device
    z = mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * eps  # reparameterised draw, as diffusers samples
    return z * vae.config.scaling_factor


def diffusion_loss(unet, latents: torch.Tensor, context: torch.Tensor, schedule: NoiseSchedule, cfg,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (weighted mean loss, unweighted per-sample loss (B,)) of one noised batch. Algorithm 1, Ho et al. 2020."""
    batch = latents.shape[0]
    t = diffusion.sample_timesteps(batch, schedule.num_train_timesteps, generator,  # (B,)
                                   getattr(cfg, "timestep_sampling", "uniform"), getattr(cfg, "timestep_mean", 0.0),
                                   getattr(cfg, "timestep_std", 1.0))
    noise = diffusion.offset_noise(torch.randn(latents.shape, generator=generator), cfg.offset_noise, generator)
    t, noise = t.to(latents.device), noise.to(latents.device)
    x_t = diffusion.add_noise(latents, noise, t, schedule.alpha_bar)
    target = diffusion.training_target(latents, noise, t, schedule.alpha_bar, cfg.prediction_type)
    pred = unet(x_t, t, encoder_hidden_states=context).sample
    per_sample = diffusion.per_sample_loss(pred, target, cfg.loss, cfg.huber_c)  # (B,)
    weights = diffusion.loss_weights(t, schedule.betas, cfg.weighting, cfg.prediction_type, cfg.snr_gamma)
    return (weights.to(per_sample) * per_sample).mean(), per_sample.detach()
