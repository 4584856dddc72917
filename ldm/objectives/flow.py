"""Flow matching (rectified flow): x_sigma = (1 - sigma) x0 + sigma eps on a straight path, the network predicts
its velocity eps - x0 (Liu et al. 2022; Lipman et al. 2022; the SD3 recipe, Esser et al. 2024, Sec. 2-3).

Times are sigma in [0, 1] (1 = pure noise), drawn by a density of SD3 Sec. 3.1 (timestep_sampling: uniform,
logit_normal, mode, cosmap) and shifted by `flow_shift` (SD3 Eq. 23); the denoiser sees sigma * T, as diffusers'
flow models and FlowMatchEulerDiscreteScheduler's timesteps do. SD3 expresses its loss weightings as these
densities over a plain velocity MSE, so the per-sample weight is 1 (weighting "uniform").
"""
import torch

from ldm import diffusion
from ldm.objectives import register
from ldm.objectives.base import Objective

FLOW_SAMPLERS = ("euler", "heun")   # the named samplers that integrate a velocity field (pipelines/schedulers.py)


@register
class FlowMatching(Objective):
    name = "flow"
    samplers = FLOW_SAMPLERS

    @property
    def num_train_timesteps(self) -> int:
        return self.schedule.num_train_timesteps

    def sample_timesteps(self, batch, generator):
        s = self.settings
        u = diffusion.unit_times(batch, generator, s.timestep_sampling, s.timestep_mean, s.timestep_std,
                                 s.timestep_mode_scale)
        return diffusion.shift_sigmas(u, s.flow_shift).float()

    def noised(self, x0, noise, t):
        return diffusion.flow_noised(x0, noise, t)

    def model_time(self, t):
        return t * self.num_train_timesteps

    def target(self, x0, noise, t):
        return diffusion.flow_velocity(x0, noise)

    def weight(self, t):
        return torch.ones(t.shape, device=t.device)

    def to_x0(self, prediction, x_t, time):
        sigma = torch.as_tensor(time, dtype=torch.float64) / self.num_train_timesteps
        return diffusion.flow_to_x0(prediction, x_t, sigma.to(x_t.device))

    def validation_times(self, count):
        return (torch.arange(count, dtype=torch.float64) + 0.5) / count  # midpoints: sigma = 0 and 1 are trivial

    def time_fraction(self, t):
        return t.double()

    def scheduler(self, base_config):
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=self.num_train_timesteps,
                                               shift=self.settings.flow_shift)
