"""The objective interface and its variance-preserving diffusion implementation (epsilon, v and x0 share it).

An objective owns the forward process and the loss's choices; the formulas themselves are in ldm.diffusion.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ldm import diffusion


@dataclass(frozen=True)
class ObjectiveSettings:
    """How training draws timesteps and weights them (the same fields as TrainLDMConfig's)."""
    weighting: str = "uniform"           # uniform | min_snr | vlb (ldm.diffusion.loss_weights)
    snr_gamma: float = 5.0               # Min-SNR's gamma
    timestep_sampling: str = "uniform"   # uniform | logit_normal (ldm.diffusion.sample_timesteps)
    timestep_mean: float = 0.0
    timestep_std: float = 1.0

    @classmethod
    def from_config(cls, cfg) -> "ObjectiveSettings":
        """Returns the settings of a config that has these five fields (TrainLDMConfig)."""
        return cls(cfg.weighting, cfg.snr_gamma, cfg.timestep_sampling, cfg.timestep_mean, cfg.timestep_std)


@dataclass
class NoiseSchedule:
    """A discrete noise schedule: betas (T,) and alpha_bar (T,), both float64."""
    betas: torch.Tensor
    alpha_bar: torch.Tensor
    name: str = "custom"
    rescaled: bool = False

    @classmethod
    def from_betas(cls, betas: torch.Tensor, name: str = "custom", rescaled: bool = False) -> "NoiseSchedule":
        return cls(betas.double(), diffusion.alphas_cumprod(betas.double()), name, rescaled)

    @classmethod
    def from_config(cls, cfg) -> "NoiseSchedule":
        """Returns the schedule of a training config (noise_schedule, num_train_timesteps, beta_start, beta_end,
        zero_terminal_snr)."""
        betas = diffusion.make_betas(cfg.noise_schedule, cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end)
        if cfg.zero_terminal_snr:
            betas = diffusion.rescale_zero_terminal_snr(betas)
        return cls.from_betas(betas, cfg.noise_schedule, cfg.zero_terminal_snr)

    @classmethod
    def from_scheduler_config(cls, config: dict) -> "NoiseSchedule":
        """Returns a saved model's training schedule, read from its scheduler config (trained_betas included)."""
        from diffusers import DDPMScheduler

        return cls.from_betas(DDPMScheduler.from_config(dict(config)).betas, config.get("beta_schedule", "custom"))

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


class Objective:
    """What the training step, the pipeline and the diagnostics ask of a training objective.

    Timesteps t are the objective's own training times (B,); `model_time` turns them into the denoiser's time input.
    """
    name: str = ""

    def __init__(self, schedule: NoiseSchedule, settings: ObjectiveSettings):
        self.schedule, self.settings = schedule, settings

    def sample_timesteps(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        """Returns training times (B,) drawn with `generator` (on the CPU: the same draw on any device)."""
        raise NotImplementedError

    def noised(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Returns the model's noised input x_t (B, C, h, w)."""
        raise NotImplementedError

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        """Returns the denoiser's time input for training times t."""
        raise NotImplementedError

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Returns what the denoiser learns to predict at x_t = noised(x0, noise, t)."""
        raise NotImplementedError

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        """Returns the per-sample loss weight (B,) of the prediction's per-sample loss."""
        raise NotImplementedError

    def to_x0(self, prediction: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """Returns the clean sample a prediction at x_t implies; t may be fractional (samplers between steps)."""
        raise NotImplementedError


class VPDiffusion(Objective):
    """Variance-preserving diffusion, x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps (Ho et al. 2020), at
    integer t in [0, T); subclasses name what the network predicts (diffusers' `prediction_type`)."""

    def sample_timesteps(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        s = self.settings
        return diffusion.sample_timesteps(batch, self.schedule.num_train_timesteps, generator, s.timestep_sampling,
                                          s.timestep_mean, s.timestep_std)

    def noised(self, x0, noise, t):
        return diffusion.add_noise(x0, noise, t, self.schedule.alpha_bar)

    def model_time(self, t):
        return t

    def target(self, x0, noise, t):
        return diffusion.training_target(x0, noise, t, self.schedule.alpha_bar, self.name)

    def weight(self, t):
        s = self.settings
        return diffusion.loss_weights(t, self.schedule.betas, s.weighting, self.name, s.snr_gamma)

    def alpha_bar_at(self, t) -> torch.Tensor:
        """Returns alpha_bar at times t (fractional ones as diffusers' LMS/Euler interpolate)."""
        return diffusion.alpha_bar_at(self.schedule.alpha_bar, torch.as_tensor(t, dtype=torch.float64).cpu())

    def to_x0(self, prediction, x_t, t):
        a = self.alpha_bar_at(t)
        return diffusion.to_parameterisations(prediction, x_t, a.to(x_t.device), self.name)["x0"]
