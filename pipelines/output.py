"""What a pipeline call returns: images, and optionally a per-step trace for diagnostics."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers.utils import BaseOutput


@dataclass
class StepRecord:
    """One denoising step, on the CPU in float32. Predictions are in the model's prediction_type units
    (noise for epsilon models, v for v-prediction); noise_pred_uncond is None on steps that ran the conditional
    branch alone (no guidance, outside guidance_interval, CFG-Zero*'s zero-init steps).

    step: loop index i; timestep: t; latents: x_t entering the step (B, C, h, w); x0_pred: the clean-latent
    estimate at this step; noise_pred: the guided prediction the scheduler used; noise_pred_cond and
    noise_pred_uncond: the two branches before guidance.
    """
    step: int
    timestep: float
    latents: torch.Tensor
    x0_pred: torch.Tensor
    noise_pred: torch.Tensor
    noise_pred_cond: torch.Tensor
    noise_pred_uncond: torch.Tensor | None

    FIELDS = ("step", "timestep", "latents", "x0_pred", "noise_pred", "noise_pred_cond", "noise_pred_uncond")

    @classmethod
    def capture(cls, i, t, x_t, x0, noise_pred, pred_cond, pred_uncond) -> "StepRecord":
        cpu = lambda x: None if x is None else x.detach().float().cpu()  # noqa: E731
        return cls(i, float(t), cpu(x_t), cpu(x0), cpu(noise_pred), cpu(pred_cond), cpu(pred_uncond))


@dataclass
class PipelineOutput(BaseOutput):
    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    trace: list[StepRecord] | None = None


def predict_x0(step_output, objective, x_t: torch.Tensor, model_output: torch.Tensor, t) -> torch.Tensor:
    """Returns the x0 estimate of one denoising step: the scheduler's own (step_output.pred_original_sample)
    where its step() reports one, else the one the model's objective implies (objective.to_x0, which takes
    fractional t as LMS/Euler interpolate). x_t must be the (variance-preserving) model input, i.e. after
    scheduler.scale_model_input; `objective` is ldm.objectives.objective_for(scheduler.config).
    """
    x0 = getattr(step_output, "pred_original_sample", None)
    return x0 if x0 is not None else objective.to_x0(model_output, x_t, t)
