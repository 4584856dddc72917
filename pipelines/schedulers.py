"""Samplers by name. Every entry is a diffusers scheduler class; we only name them and configure them.

    make_scheduler("lms", pipe.scheduler.config)   # -> LMSDiscreteScheduler with the model's noise schedule
"""
from __future__ import annotations

import inspect

from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler,
                       HeunDiscreteScheduler, LMSDiscreteScheduler, PNDMScheduler)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from ldm import diffusion
from ldm.objectives import is_flow_scheduler

# name -> (class, config overrides)
SCHEDULERS = {
    "ddpm": (DDPMScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "lms": (LMSDiscreteScheduler, {}),
    "pndm": (PNDMScheduler, {"skip_prk_steps": True}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "dpm++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
}

# The samplers of flow models (ldm/objectives/flow.py), by the same names: a flow model integrates a velocity field,
# which only these (of diffusers' schedulers) do. They keep the model's num_train_timesteps and shift.
FLOW_SCHEDULERS = {
    "euler": FlowMatchEulerDiscreteScheduler,
    "heun": FlowMatchHeunDiscreteScheduler,
}

# Samplers whose update stays finite at zero terminal SNR (alpha_bar_{T-1} = 0; Lin et al. 2023,
# arXiv:2305.08891): with v-prediction x0 = sqrt(a) x_t - sqrt(1 - a) v (Salimans & Ho 2022, Sec. 4) holds at
# a = 0. The others divide by alpha_bar_t (PNDM) or use sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) (LMS,
# Euler, Heun, DPM++), which is infinite at t = T-1.
ZERO_SNR_EXACT = (DDPMScheduler, DDIMScheduler)
# The alpha_bar_{T-1} the other samplers get instead of 0: diffusers' own value (EulerDiscreteScheduler with
# rescale_betas_zero_snr=True). sigma_max = 4096 is so far above the data's scale that x_T is pure noise.
ZERO_SNR_ALPHA_BAR = 2.0 ** -24


def scheduler_name(scheduler: SchedulerMixin) -> str:
    """Returns our name for a scheduler object, or its class name when it has none."""
    for name, (cls, _) in SCHEDULERS.items():
        if type(scheduler) is cls:
            return name
    for name, cls in FLOW_SCHEDULERS.items():
        if type(scheduler) is cls:
            return name
    return type(scheduler).__name__


def zero_snr_safe_config(cls: type, config) -> dict:
    """Returns `config` for scheduler class `cls`, with a zero terminal SNR clamped where `cls` cannot take it.

    A zero-SNR model (`--zero_terminal_snr true`) stores trained_betas with beta[T-1] = 1, i.e. alpha_bar[T-1] = 0;
    a config may instead say rescale_betas_zero_snr=True, which LMS, PNDM and Heun ignore (they would sample a
    schedule the model was not trained on). For every class outside ZERO_SNR_EXACT the exact betas are written
    out with the last one lowered so that alpha_bar[T-1] = ZERO_SNR_ALPHA_BAR (one code path for all samplers,
    rather than the flag that only some have). DDPM and DDIM keep the exact schedule.
    """
    config = dict(config)
    if cls in ZERO_SNR_EXACT:
        return config
    betas = DDPMScheduler.from_config(config).betas.double()  # the schedule the config describes, rescale included
    alpha_bar = diffusion.alphas_cumprod(betas)
    if alpha_bar[-1] >= ZERO_SNR_ALPHA_BAR:
        return config
    target = min(ZERO_SNR_ALPHA_BAR, float(alpha_bar[-2]) / 2)  # keeps alpha_bar decreasing (beta[T-1] > 0)
    betas[-1] = 1 - target / alpha_bar[-2]
    return {**config, "trained_betas": betas.tolist(), "rescale_betas_zero_snr": False}


def make_scheduler(name: str | SchedulerMixin, config) -> SchedulerMixin:
    """Returns a scheduler built from `config` (the model's noise schedule), chosen by name.

    Any diffusers scheduler object passes through unchanged. Clipping x0 to [-1, 1] suits pixels, not latents,
    so a config that does not say (an LMS or Euler config, say) gets clip_sample=False rather than DDPM's and
    DDIM's default of True; a config that sets it explicitly is respected. A zero-terminal-SNR schedule is
    clamped for the samplers that need it (zero_snr_safe_config).
    """
    if isinstance(name, SchedulerMixin):
        return name
    if is_flow_scheduler(config):
        return flow_scheduler(name, config)
    if not isinstance(name, str) or name.lower() not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; valid names are {', '.join(SCHEDULERS)} "
                         "(or pass any diffusers scheduler object)")
    cls, overrides = SCHEDULERS[name.lower()]
    if "clip_sample" not in config:
        overrides = {**overrides, "clip_sample": False}
    return cls.from_config(zero_snr_safe_config(cls, config), **overrides)


def flow_scheduler(name: str, config) -> SchedulerMixin:
    """Returns the named flow sampler (FLOW_SCHEDULERS) over a flow model's config (num_train_timesteps, shift), or
    raises ValueError naming the ones that can sample a flow model."""
    if not isinstance(name, str) or name.lower() not in FLOW_SCHEDULERS:
        raise ValueError(f"scheduler {name!r} cannot sample a flow-matching model (it predicts a velocity, not noise); "
                         f"use one of {', '.join(FLOW_SCHEDULERS)}, or pass a diffusers FlowMatch scheduler object")
    cls = FLOW_SCHEDULERS[name.lower()]
    accepted = inspect.signature(cls.__init__).parameters  # Heun takes fewer settings than Euler
    return cls.from_config({k: v for k, v in dict(config).items() if k in accepted})
