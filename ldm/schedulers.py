"""Samplers by name. Every entry is a diffusers scheduler class; we only name them and configure them.

    make_scheduler("lms", pipe.scheduler.config)   # -> LMSDiscreteScheduler with the model's noise schedule
"""
from __future__ import annotations

from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, HeunDiscreteScheduler, LMSDiscreteScheduler, PNDMScheduler)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

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


def scheduler_name(scheduler: SchedulerMixin) -> str:
    """Returns our name for a scheduler object, or its class name when it has none."""
    for name, (cls, _) in SCHEDULERS.items():
        if type(scheduler) is cls:
            return name
    return type(scheduler).__name__


def make_scheduler(name: str | SchedulerMixin, config) -> SchedulerMixin:
    """Returns a scheduler built from `config` (the model's noise schedule), chosen by name.

    Any diffusers scheduler object passes through unchanged. Clipping x0 to [-1, 1] suits pixels, not latents,
    so a config that does not say (an LMS or Euler config, say) gets clip_sample=False rather than DDPM's and
    DDIM's default of True; a config that sets it explicitly is respected.
    """
    if isinstance(name, SchedulerMixin):
        return name
    if not isinstance(name, str) or name.lower() not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; valid names are {', '.join(SCHEDULERS)} "
                         "(or pass any diffusers scheduler object)")
    cls, overrides = SCHEDULERS[name.lower()]
    if "clip_sample" not in config:
        overrides = {**overrides, "clip_sample": False}
    return cls.from_config(config, **overrides)
