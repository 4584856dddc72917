"""Training objectives behind one interface (`Objective` in base.py): what the training step asks for a batch
(timesteps, the noised input, the model's time input, the target, the per-sample weight) and what the pipeline
and the diagnostics ask of a prediction (x0). One file per objective; each registers itself by name here.

    objective = make_objective("v_prediction", NoiseSchedule.from_betas(betas), ObjectiveSettings("min_snr"))
    t = objective.sample_timesteps(batch, generator); x_t = objective.noised(x0, noise, t)
    loss = objective.weight(t) * mse(denoise(model, x_t, objective.model_time(t), context), objective.target(x0, noise, t))

Adding one: a file defining a subclass of Objective (or of VPDiffusion: target, x0_and_eps, eps_loss_factor) with
its `name` and diffusers' `prediction_type`, decorated with @register, and its import below; nothing else changes
(the training config's prediction_type choices, the trainer, the pipeline and the diagnostics ask the objective).
tests/test_objectives.py defines one in a test file, trains it and samples with it.
"""
from __future__ import annotations

from ldm import diffusion
from ldm.objectives.base import NoiseSchedule, Objective, ObjectiveSettings, VPDiffusion

OBJECTIVES: dict[str, type[Objective]] = {}


def register(cls: type[Objective]) -> type[Objective]:
    """Class decorator: makes an objective available by its `name` (the config's prediction_type)."""
    OBJECTIVES[cls.name] = cls
    return cls


def make_objective(name: str, schedule: NoiseSchedule, settings: ObjectiveSettings | None = None) -> Objective:
    """Returns the objective called `name` over `schedule`; unknown names raise ValueError listing the known ones."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective (prediction_type) {name!r}; choose one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name](schedule, settings or ObjectiveSettings())


def is_flow_scheduler(scheduler_or_config) -> bool:
    """Returns whether a diffusers scheduler (or its config) integrates a flow (FlowMatch*Scheduler)."""
    if hasattr(scheduler_or_config, "config"):
        return "FlowMatch" in type(scheduler_or_config).__name__
    config = dict(scheduler_or_config)
    return "FlowMatch" in config.get("_class_name", "") or ("shift" in config and "beta_start" not in config)


def objective_for(scheduler_or_config, settings: ObjectiveSettings | None = None) -> Objective:
    """Returns the objective a saved model was trained with, read from its scheduler (or scheduler config):
    prediction_type and the noise schedule, trained_betas included; a FlowMatch scheduler means flow."""
    config = dict(getattr(scheduler_or_config, "config", scheduler_or_config))
    if is_flow_scheduler(scheduler_or_config):  # diffusers' flow schedulers name no prediction type
        schedule = NoiseSchedule.from_betas(diffusion.make_betas("linear", config.get("num_train_timesteps", 1000)))
        return make_objective("flow", schedule, ObjectiveSettings(flow_shift=config.get("shift", 1.0)))
    return make_objective(config.get("prediction_type", "epsilon"), NoiseSchedule.from_scheduler_config(config),
                          settings)


from ldm.objectives import epsilon, flow, sample, v_prediction  # noqa: E402,F401  (each registers itself)

__all__ = ["OBJECTIVES", "NoiseSchedule", "Objective", "ObjectiveSettings", "VPDiffusion", "make_objective",
           "is_flow_scheduler", "objective_for", "register"]
