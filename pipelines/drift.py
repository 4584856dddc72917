"""Training-free remedies for sampling drift (exposure bias): the model sees its own errors at sampling time,
which it never saw in training, and x_t leaves the forward marginal q(x_t). Each is off by default, so a call
without them is the plain sampler bit for bit.

    pipe("a red circle", eps_scale=1.005)                                   # Ning et al. 2024
    pipe("a red circle", dynamic_thresholding=(0.995, 4.0))                 # Saharia et al. 2022
    pipe("a red circle", restart=dict(t_min=100, t_max=400, K=2))          # Xu et al. 2023

Epsilon scaling divides the predicted noise by lambda_t = eps_scale + eps_scale_slope * t before the step.
Dynamic thresholding is diffusers' own (the scheduler's `thresholding` config, set for the call and restored):
DDPM, DDIM and DPM++ support it. Restart re-noises x from t_min back to t_max with the forward process and runs
the same sampler steps again, K times: DDIM (deterministic at eta=0) and Euler (its step index rewound).
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler
from diffusers.utils.torch_utils import randn_tensor

from ldm import diffusion
from ldm.pipelines.checks import CALL_RANGES
from ldm.ranges import in_interval


# Samplers Restart can rewind: DDIM's step has no state; Euler's has a step index, set back to the interval's start
RESTART_SAMPLERS = (DDIMScheduler, EulerDiscreteScheduler)


@dataclass(frozen=True)
class ThresholdSettings:
    """Dynamic thresholding (Saharia et al. 2022, Imagen, Sec. 2.3): s = clamp(the `ratio` percentile of
    |x0_pred| per sample, 1, max_value); x0_pred is clipped to [-s, s] and divided by s. max_value = 1 is static
    clipping to [-1, 1], the pixel range; latents span a wider one (set max_value to it, e.g. 4 for SD latents)."""
    ratio: float = 0.995
    max_value: float = 1.0


@dataclass(frozen=True)
class RestartSettings:
    """Restart sampling (Xu et al. 2023, arXiv:2306.14878, Algorithm 1): on reaching t_min, add noise back to
    t_max and run the sampler's steps in [t_min, t_max] again, K times. t_min < t_max are scheduler timesteps,
    snapped to the schedule's first step at or below each."""
    t_min: float
    t_max: float
    K: int = 1


@dataclass(frozen=True)
class DriftRemedies:
    """The remedies of one call, checked (check_remedies)."""
    eps_scale: float = 1.0
    eps_scale_slope: float = 0.0
    threshold: ThresholdSettings | None = None
    restart: RestartSettings | None = None


def _check(name: str, value, range_key: str):
    allowed = CALL_RANGES[range_key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not in_interval(float(value), allowed):
        raise ValueError(f"{name}={value!r} must be a number in {allowed}")
    return value


def check_remedies(scheduler, eps_scale=1.0, eps_scale_slope=0.0, dynamic_thresholding=None,
                   restart=None) -> DriftRemedies:
    """Returns the call's remedies checked (against the sampler unless scheduler is None); raises ValueError naming
    the problem and the fix."""
    _check("eps_scale", eps_scale, "eps_scale")
    _check("eps_scale_slope", eps_scale_slope, "eps_scale_slope")
    scaled = eps_scale != 1.0 or eps_scale_slope != 0.0
    if scaled and scheduler is not None and scheduler.config.get("prediction_type") != "epsilon":
        raise ValueError("eps_scale scales a predicted noise (Ning et al. 2024), but this model predicts "
                         f"{scheduler.config.get('prediction_type', 'a flow velocity')!r}; leave eps_scale at 1")
    last = scheduler.config.num_train_timesteps - 1 if scheduler is not None else 0
    if min(eps_scale, eps_scale + eps_scale_slope * last) <= 0:
        raise ValueError(f"eps_scale + eps_scale_slope * t must stay positive for t in [0, {last}], but "
                         f"eps_scale={eps_scale}, eps_scale_slope={eps_scale_slope}; use a smaller slope")
    threshold = _threshold_settings(dynamic_thresholding, scheduler)
    restart = _restart_settings(restart, scheduler)
    return DriftRemedies(float(eps_scale), float(eps_scale_slope), threshold, restart)


def _restart_settings(restart, scheduler) -> RestartSettings | None:
    """Returns RestartSettings from None, a dict or RestartSettings, checked (the sampler too, unless None)."""
    if restart is not None:
        restart = restart if isinstance(restart, RestartSettings) else RestartSettings(**dict(restart))
        _check("restart t_min", restart.t_min, "restart_t")
        _check("restart t_max", restart.t_max, "restart_t")
        _check("restart K", restart.K, "restart_K")
        if not isinstance(restart.K, int) or restart.t_min >= restart.t_max:
            raise ValueError(f"restart={restart}: needs t_min < t_max and a whole number K")
        if scheduler is not None and type(scheduler) not in RESTART_SAMPLERS:
            raise ValueError(f"restart re-runs a deterministic sampler's steps; {type(scheduler).__name__} is not "
                             "supported: use scheduler='ddim' or 'euler' (pipe.set_scheduler('ddim'), --scheduler)")
    return restart


def _threshold_settings(value, scheduler) -> ThresholdSettings | None:
    """Returns ThresholdSettings from None, a ratio, (ratio, max_value), a dict or ThresholdSettings."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = ThresholdSettings(ratio=value)
    elif isinstance(value, (tuple, list)):
        value = ThresholdSettings(*value)
    elif isinstance(value, dict):
        value = ThresholdSettings(**value)
    if not isinstance(value, ThresholdSettings):
        raise ValueError(f"dynamic_thresholding={value!r}: pass a ratio, (ratio, max_value) or ThresholdSettings")
    _check("dynamic_thresholding ratio", value.ratio, "threshold_ratio")
    _check("dynamic_thresholding max_value", value.max_value, "threshold_max_value")
    # a scheduler's config also carries keys of the schedulers it was made from: ask the class
    if scheduler is not None and "thresholding" not in inspect.signature(type(scheduler).__init__).parameters:
        raise ValueError(f"{type(scheduler).__name__} has no dynamic thresholding; use scheduler 'ddim', 'ddpm' or "
                         "'dpm++' (diffusers' implementation, which these samplers run on their x0 prediction)")
    return value


def eps_scale_factor(remedies: DriftRemedies, t) -> float:
    """Returns lambda_t = eps_scale + eps_scale_slope * t: Ning et al. 2024 (arXiv:2308.15321), Sec. 5,
    constant (EDM-ES) or linear in the timestep (ADM-ES's lambda(t) = k t + b)."""
    return remedies.eps_scale + remedies.eps_scale_slope * float(t)


def scale_eps(noise_pred: torch.Tensor, remedies: DriftRemedies, t) -> torch.Tensor:
    """Returns eps_pred / lambda_t (Ning et al. 2024, Algorithm 1, line 4); the tensor itself when lambda_t = 1."""
    factor = eps_scale_factor(remedies, t)
    return noise_pred if factor == 1.0 else noise_pred / factor


@contextlib.contextmanager
def thresholding(scheduler, settings: ThresholdSettings | None):
    """Turns on the scheduler's dynamic thresholding (diffusers' DDPMScheduler._threshold_sample) for a block,
    and restores its config after it."""
    if settings is None:
        yield
        return
    keys = ("thresholding", "dynamic_thresholding_ratio", "sample_max_value")
    before = {k: scheduler.config[k] for k in keys}
    scheduler.register_to_config(thresholding=True, dynamic_thresholding_ratio=settings.ratio,
                                 sample_max_value=settings.max_value)
    try:
        yield
    finally:
        scheduler.register_to_config(**before)


def step_plan(host_timesteps: torch.Tensor, restart: RestartSettings | None) -> list[tuple[int, tuple | None]]:
    """Returns the steps to run, in order: (index into the timesteps, None or (j_from, j_to): the steps whose
    noise levels x is re-noised between, before the step). Without restart, each index once. With it (Algorithm 1 of Xu et al. 2023): the steps down
    to t_min, then K times [re-noise t_min -> t_max, the steps from t_max down to t_min], then the rest."""
    n = len(host_timesteps)
    if restart is None or restart.K == 0:
        return [(i, None) for i in range(n)]
    at_or_below = lambda t: next((i for i in range(n) if float(host_timesteps[i]) <= t), n)  # noqa: E731
    j_max, j_min = at_or_below(restart.t_max), at_or_below(restart.t_min)
    if j_min >= n or j_max >= j_min:
        raise ValueError(f"restart interval [{restart.t_min}, {restart.t_max}] holds no step of this schedule "
                         f"(timesteps {[int(t) for t in host_timesteps]}); widen it or use more steps")
    again = [(j_max, (j_min, j_max))] + [(i, None) for i in range(j_max + 1, j_min)]
    return [(i, None) for i in range(j_min)] + again * restart.K + [(i, None) for i in range(j_min, n)]


def renoise(latents: torch.Tensor, scheduler, host_timesteps: torch.Tensor, j_from: int, j_to: int,
            generator) -> torch.Tensor:
    """Returns x at step j_to's noise level drawn from the forward process q(x_{t_to} | x_{t_from}), with fresh
    noise from `generator` (Restart's line 4); an Euler sampler's step index is rewound to j_to."""
    noise = randn_tensor(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    if isinstance(scheduler, EulerDiscreteScheduler):  # sigma units; diffusers has no public setter for the index
        start = len(scheduler.timesteps) - len(host_timesteps)  # an edit runs the schedule's last steps only
        scheduler._step_index = start + j_to
        return diffusion.restart_noised_sigma(latents, noise, scheduler.sigmas[start + j_from],
                                              scheduler.sigmas[start + j_to])
    alpha_bar = scheduler.alphas_cumprod
    return diffusion.restart_noised(latents, noise, alpha_bar[int(host_timesteps[j_from])],
                                    alpha_bar[int(host_timesteps[j_to])])


def per_step_flags(finite: list, plan: list) -> list:
    """Returns one finite flag per schedule step from one per planned step (a restarted step's visits ANDed)."""
    if len(finite) == len(plan) and all(r is None for _, r in plan) and [i for i, _ in plan] == list(range(len(plan))):
        return finite
    flags: dict[int, torch.Tensor] = {}
    for (i, _), flag in zip(plan, finite):
        flags[i] = flag if i not in flags else flags[i] & flag
    return [flags[i] for i in sorted(flags)]


# ------------------------------------------------------------------ GenerateRequest / `ldm generate` / PNG metadata

DRIFT_FIELDS = ("eps_scale", "eps_scale_slope", "dynamic_thresholding", "restart")
DRIFT_DEFAULTS = {"eps_scale": 1.0, "eps_scale_slope": 0.0, "dynamic_thresholding": None, "restart": None}


def recorded_drift(values: dict) -> dict:
    """Returns the remedies in use among `values` (a request's fields or a PNG's parameters) as JSON entries:
    dynamic_thresholding [ratio, max_value], restart [t_min, t_max, K]; none when every remedy is off."""
    return {name: list(values[name]) if isinstance(values[name], (tuple, list)) else values[name]
            for name in DRIFT_FIELDS if values.get(name, DRIFT_DEFAULTS[name]) != DRIFT_DEFAULTS[name]}


def drift_arguments(values: dict) -> dict:
    """Returns Pipeline.__call__'s keywords for the remedies recorded in `values` (recorded_drift's entries)."""
    args = {name: values[name] for name in ("eps_scale", "eps_scale_slope") if name in values}
    if values.get("dynamic_thresholding") is not None:
        args["dynamic_thresholding"] = ThresholdSettings(*values["dynamic_thresholding"])
    if values.get("restart") is not None:
        t_min, t_max, K = values["restart"]
        args["restart"] = RestartSettings(t_min, t_max, int(K) if float(K).is_integer() else K)
    return args
