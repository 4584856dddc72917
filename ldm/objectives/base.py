"""The objective interface and its variance-preserving diffusion implementation (epsilon, v and x0 share it).

An objective owns its behaviour: the forward process, what the network predicts, the loss's weights, and how a
prediction converts to x0 (and eps); the formulas themselves are pure functions in ldm.diffusion, and nothing
outside the objective's class branches on its name.
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
    timestep_mode_scale: float = 1.29    # the "mode" density's scale (SD3 Eq. 20)
    flow_shift: float = 1.0              # flow objective: the timestep shift (SD3 Eq. 23); 1 = none

    @classmethod
    def from_config(cls, cfg) -> "ObjectiveSettings":
        """Returns the settings of a training config (TrainLDMConfig); flow_shift 0 there means the resolution's
        shift (ldm.diffusion.resolution_shift)."""
        shift = cfg.flow_shift or diffusion.resolution_shift(cfg.resolution)
        return cls(cfg.weighting, cfg.snr_gamma, cfg.timestep_sampling, cfg.timestep_mean, cfg.timestep_std,
                   cfg.timestep_mode_scale, shift)


@dataclass
class NoiseSchedule:
    """A discrete noise schedule: betas (T,) and alpha_bar (T,), both float64."""
    betas: torch.Tensor
    alpha_bar: torch.Tensor
    name: str = "custom"                 # a diffusers beta_schedule, or "custom": saved as trained_betas
    rescaled: bool = False
    beta_start: float = 0.00085
    beta_end: float = 0.012

    @classmethod
    def from_betas(cls, betas: torch.Tensor, name: str = "custom", rescaled: bool = False, beta_start: float = 0.00085,
                   beta_end: float = 0.012) -> "NoiseSchedule":
        return cls(betas.double(), diffusion.alphas_cumprod(betas.double()), name, rescaled, beta_start, beta_end)

    @classmethod
    def from_config(cls, cfg) -> "NoiseSchedule":
        """Returns the schedule of a training config (noise_schedule, num_train_timesteps, beta_start, beta_end,
        zero_terminal_snr)."""
        betas = diffusion.make_betas(cfg.noise_schedule, cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end)
        if cfg.zero_terminal_snr:
            betas = diffusion.rescale_zero_terminal_snr(betas)
        return cls.from_betas(betas, cfg.noise_schedule, cfg.zero_terminal_snr, cfg.beta_start, cfg.beta_end)

    @classmethod
    def from_scheduler_config(cls, config: dict) -> "NoiseSchedule":
        """Returns a saved model's training schedule, read from its scheduler config (trained_betas included)."""
        from diffusers import DDPMScheduler

        config = {k: v for k, v in dict(config).items() if not k.startswith("_")}
        name = "custom" if config.get("trained_betas") is not None else config.get("beta_schedule", "linear")
        return cls.from_betas(DDPMScheduler.from_config(config).betas, name, False,
                              config.get("beta_start", 0.00085), config.get("beta_end", 0.012))

    @property
    def num_train_timesteps(self) -> int:
        return len(self.betas)

    def scheduler_config(self, base: dict, prediction_type: str) -> dict:
        """Returns the scheduler config to save with the model: this schedule, for latents (clip_sample=False)."""
        config = {k: v for k, v in dict(base).items() if not k.startswith("_")}
        config.update(num_train_timesteps=self.num_train_timesteps, beta_schedule=self.name,
                      beta_start=self.beta_start, beta_end=self.beta_end, prediction_type=prediction_type,
                      clip_sample=False, trained_betas=None)
        if self.name in ("sigmoid", "custom") or self.rescaled:
            # DDIM/LMS know no "sigmoid" and LMS no zero-SNR flag: store the exact betas, which every sampler reads.
            config.update(beta_schedule="linear", trained_betas=self.betas.float().tolist())
        if self.rescaled:
            config.update(timestep_spacing="trailing", rescale_betas_zero_snr=False)
        return config


class Objective:
    """What the training step, the pipeline and the diagnostics ask of a training objective.

    Timesteps t are the objective's own training times (B,); `model_time` turns them into the denoiser's time input.
    """
    name: str = ""                       # the config's prediction_type
    prediction_type: str | None = None   # diffusers' prediction_type its scheduler config carries (None: flow)
    samplers: tuple[str, ...] = ()       # the named samplers (pipelines/schedulers.py) the demo and diagnostics compare

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

    def to_x0(self, prediction: torch.Tensor, x_t: torch.Tensor, time: torch.Tensor | float) -> torch.Tensor:
        """Returns the clean sample a prediction at x_t implies; `time` is the denoiser's time input (model_time, the
        sampler's timesteps), possibly fractional (samplers between steps)."""
        raise NotImplementedError

    def validation_times(self, count: int) -> torch.Tensor:
        """Returns `count` training times spread evenly over the whole range: deterministic validation."""
        raise NotImplementedError

    def time_fraction(self, t: torch.Tensor) -> torch.Tensor:
        """Returns where training times lie in [0, 1] (0 = the least noise), for loss-by-noise-level bins."""
        raise NotImplementedError

    def scheduler(self, base_config: dict):
        """Returns the diffusers scheduler a model trained with this objective is saved (and validated) with;
        base_config is the model's current scheduler config (kept where the objective does not decide)."""
        raise NotImplementedError


class VPDiffusion(Objective):
    """Variance-preserving diffusion, x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps (Ho et al. 2020), at
    integer t in [0, T); a subclass says what the network predicts: its `target`, how a prediction converts to
    (x0, eps) (`x0_and_eps`), the factor from its MSE to the eps-MSE (`eps_loss_factor`), and diffusers'
    `prediction_type` its scheduler samples with."""
    samplers = ("ddpm", "ddim", "lms")

    def target(self, x0, noise, t):
        raise NotImplementedError

    def x0_and_eps(self, prediction: torch.Tensor, x_t: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Returns (x0, eps) a prediction at x_t implies; a is alpha_bar_t shaped (B or 1, 1, ..., 1)."""
        raise NotImplementedError

    def eps_loss_factor(self, snr_t: torch.Tensor) -> torch.Tensor:
        """Returns c (B,) with ||eps - eps_pred||^2 = c ||target - pred||^2 at SNR snr_t: what the weightings
        (Min-SNR, the ELBO's), defined on the eps-MSE, become for this prediction."""
        raise NotImplementedError

    def sample_timesteps(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        s = self.settings
        return diffusion.sample_timesteps(batch, self.schedule.num_train_timesteps, generator, s.timestep_sampling,
                                          s.timestep_mean, s.timestep_std, s.timestep_mode_scale)

    def noised(self, x0, noise, t):
        return diffusion.add_noise(x0, noise, t, self.schedule.alpha_bar)

    def model_time(self, t):
        return t

    def weight(self, t):
        s = self.settings
        weights = diffusion.eps_weights(t, self.schedule.betas, s.weighting, s.snr_gamma)  # None: uniform
        if weights is None:
            return torch.ones(t.shape, device=t.device)
        return weights * self.eps_loss_factor(diffusion.snr(self.schedule.alpha_bar, t))

    def alpha_bar_at(self, t) -> torch.Tensor:
        """Returns alpha_bar at times t (fractional ones as diffusers' LMS/Euler interpolate)."""
        return diffusion.alpha_bar_at(self.schedule.alpha_bar, torch.as_tensor(t, dtype=torch.float64).cpu())

    def parameterisations(self, prediction: torch.Tensor, x_t: torch.Tensor, alpha_bar_t) -> dict[str, torch.Tensor]:
        """Returns {"eps", "x0", "v"} a prediction at x_t implies, each shaped like x_t; alpha_bar_t a number or (B,)."""
        a = diffusion.broadcast_alpha_bar(alpha_bar_t, x_t)  # (B or 1, 1, ..., 1)
        x0, eps = self.x0_and_eps(prediction, x_t, a)
        return {"eps": eps, "x0": x0, "v": diffusion.velocity(x0, eps, a)}

    def to_x0(self, prediction, x_t, time):
        return self.parameterisations(prediction, x_t, self.alpha_bar_at(time).to(x_t.device))["x0"]

    def validation_times(self, count):
        return diffusion.stratified_timesteps(count, self.schedule.num_train_timesteps)

    def time_fraction(self, t):
        return t.double() / self.schedule.num_train_timesteps

    def scheduler(self, base_config):
        from diffusers import DDIMScheduler

        return DDIMScheduler.from_config(self.schedule.scheduler_config(base_config, self.prediction_type))
