"""Every diagnostic of one model folder at once: what `ldm diagnose all` runs to make the diagnostics guide's figures."""
from __future__ import annotations

import os

from ldm.diagnostics.io import write_json


def load_pipeline(model: str, device: str | None = None):
    """Returns the model folder's Pipeline with the progress bar off; a missing folder raises FileNotFoundError."""
    from ldm.pipelines import Pipeline

    if not os.path.isdir(model):
        raise FileNotFoundError(f"model folder {model} does not exist; pass a folder written by `ldm train` / "
                                "`ldm create-model` (with model_index.json, unet/, vae/, ...)")
    pipe = Pipeline.from_pretrained(model, device=device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def render_all(model: str, out_dir: str, data: str = "shapes:64", prompt: str = "a red circle on the left",
               schedulers: tuple[str, ...] | None = None, steps: int = 25, guidance_scale: float = 5.0,
               history: str | None = None, num_images: int = 8, device: str | None = None) -> dict:
    """Runs timesteps (with the Gaussian reference), sampling, schedule and, given a validation history, the
    training heatmap into out_dir; returns {"files": [...], ...} and writes index.json. Samplers default to
    ddpm, ddim and lms, or for a flow model euler and heun (whose schedule report is diagnose_flow_schedule's)."""
    from ldm.diagnostics.probe import latent_channel_stats
    from ldm.diagnostics.sampling_report import default_samplers, diagnose_sampling
    from ldm.diagnostics.schedule_report import diagnose_flow_schedule, diagnose_schedule
    from ldm.diagnostics.timesteps import diagnose_timesteps
    from ldm.diagnostics.training_heatmap import training_heatmap
    from ldm.objectives import is_flow_scheduler

    pipe = load_pipeline(model, device)
    schedule_config = dict(pipe.scheduler.config)
    flow = is_flow_scheduler(pipe.scheduler)
    schedulers = list(schedulers or default_samplers(pipe))
    files = diagnose_timesteps(pipe, data, out_dir, num_images=num_images, gaussian_reference=True)["files"]
    data_mean, data_std = latent_channel_stats(pipe, data, max(num_images, 2))
    files += diagnose_sampling(pipe, prompt, out_dir, schedulers, steps, guidance_scale=guidance_scale,
                               data_mean=data_mean, data_std=data_std)["files"]
    if flow:
        files += diagnose_flow_schedule(out_dir, schedule_config, schedulers, steps)["files"]
    else:
        files += diagnose_schedule([schedule_config.get("beta_schedule", "scaled_linear")], out_dir,
                                   schedule_config.get("num_train_timesteps", 1000), schedule_config.get("beta_start"),
                                   schedule_config.get("beta_end"), schedulers, steps,
                                   scheduler_config=schedule_config)["files"]
    if history:
        files.append(training_heatmap(history, os.path.join(out_dir, "training_heatmap.png")))
    index = {"model": model, "data": data, "prompt": prompt, "files": sorted(os.path.relpath(f, out_dir) for f in files)}
    write_json(os.path.join(out_dir, "index.json"), index)
    return index
