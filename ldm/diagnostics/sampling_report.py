"""`ldm diagnose sampling`: one seed, several samplers, per-step drift and guidance as JSON, CSV and PNGs.

sampling.json = {"prompt", "seed", "num_images", "steps", "guidance_scale", "guidance_rescale", "strip_steps",
                 "prediction" ("noise", or "velocity" for a flow model), "schedulers": {name: trace_report(...)}}
(fields in ldm.diagnostics.sampling); a flow model's default samplers are euler and heun;
files: sampling_<name>.csv, sampling_<name>_ridge.png (histograms of x_t over steps), sampling_drift.png,
sampling_guidance.png (guided runs), sampling_x0_strip.png (decoded x0 predictions, one row per sampler).
"""
from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

from ldm.diagnostics.io import write_csv, write_json
from ldm.diagnostics.plots import panels_plot, ridge_plot
from ldm.diagnostics.sampling import trace_report


def strip_steps(num_steps: int, count: int = 6) -> list[int]:
    """Returns `count` loop indices spread evenly from the first step to the last."""
    return sorted(set(np.linspace(0, num_steps - 1, min(count, num_steps)).round().astype(int).tolist()))


@torch.no_grad()
def decode_x0_strip(pipe, trace: list, steps: list[int]) -> Image.Image:
    """Returns the first sample's decoded x0 prediction at each chosen step, side by side."""
    x0 = torch.cat([trace[i].x0_pred[:1] for i in steps])                   # (S, C, h, w)
    decoded = pipe.vae.decode(x0.to(pipe.vae.device, pipe.vae.dtype) / pipe.vae.config.scaling_factor,
                              return_dict=False)[0]
    images = pipe.image_processor.postprocess(decoded, output_type="pil")
    strip = Image.new("RGB", (sum(im.width for im in images), images[0].height))
    for i, im in enumerate(images):
        strip.paste(im, (i * im.width, 0))
    return strip


def stack_rows(rows: list[Image.Image]) -> Image.Image:
    """Returns the images stacked vertically (left aligned, white padding)."""
    out = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows)), (255, 255, 255))
    y = 0
    for r in rows:
        out.paste(r, (0, y))
        y += r.height
    return out


def plot_sampling(report: dict, out_dir: str) -> list[str]:
    """Writes the ridge plot per sampler, the drift panels and, when guided, the guidance panels. The panels plot
    each sampler against the timesteps it visits (right to left: noise to data), so that samplers with more
    model calls per step (Heun) line up with the rest."""
    flow = report.get("prediction") == "velocity"
    paths = []
    for name, rep in report["schedulers"].items():
        labels = [f"{r['step']} (t={r['timestep']:.0f})" for r in rep["steps"]]
        paths.append(ridge_plot(os.path.join(out_dir, f"sampling_{name}_ridge.png"), rep["latent_histograms"],
                                np.asarray(rep["histogram_edges"]), labels, f"{name}: histogram of x_t per step",
                                "latent value (x_sigma)" if flow else "latent value (variance-preserving units)"))
    runs = report["schedulers"]
    value = lambda v: np.nan if v is None else float(np.mean(v)) if isinstance(v, list) else v  # noqa: E731
    series = lambda key: {n: [value(r[key]) for r in rep["steps"]] for n, rep in runs.items()}  # noqa: E731
    x = {n: [r["timestep"] for r in rep["steps"]] for n, rep in runs.items()}
    drift = {"x_t std (mean over channels)": series("latent_std"), "x0_pred std": series("x0_std"),
             "x0_pred change vs previous step": series("x0_change"),
             "W2 to forward marginal": series("marginal_w2_mean")}
    paths.append(panels_plot(os.path.join(out_dir, "sampling_drift.png"), x, drift, "timestep", "Sampling drift",
                             invert_x=True))
    if "guidance_diff_rms" in next(iter(runs.values()))["steps"][0]:
        p = "v" if flow else "eps"
        guidance = {f"RMS({p}_cond - {p}_uncond)": series("guidance_diff_rms"),
                    f"RMS(guided) / RMS({p}_cond)": series("guidance_inflation"),
                    f"std(guided) / std({p}_cond)": series("rescale_std_ratio"),
                    "RMS change from rescale": series("rescale_change_rms")}
        paths.append(panels_plot(os.path.join(out_dir, "sampling_guidance.png"), x, guidance, "timestep",
                                 f"Guidance breakdown (scale {report['guidance_scale']})",
                                 hlines={f"std(guided) / std({p}_cond)": 1.0}, invert_x=True))
    return paths


def default_samplers(pipe) -> list[str]:
    """Returns the samplers a diagnostic compares by default: the model's objective's (euler and heun for a flow
    model, else ddpm, ddim, lms)."""
    from ldm.objectives import objective_for

    return list(objective_for(pipe.scheduler).samplers)


def diagnose_sampling(pipe, prompt: str, out_dir: str, schedulers: list[str] | None = None, steps: int = 20,
                      seed: int = 0, guidance_scale: float = 7.5, guidance_rescale: float = 0.0, num_strip: int = 6,
                      data_mean: torch.Tensor | None = None, data_std: torch.Tensor | None = None,
                      num_images: int = 4, remedies: dict | None = None) -> dict:
    """Samples `prompt` (num_images samples) per scheduler (default: `default_samplers`) from the same seed with
    trace=True; writes the files; returns the report. Statistics pool the samples; the strip shows the first.
    A flow model's report says "prediction": "velocity": its predictions (and guidance branches) are velocities.
    `remedies`: sampling-drift remedies for every sampler, as ldm.pipelines.drift.recorded_drift gives them
    ({"eps_scale": 1.005, "restart": [t_min, t_max, K], ...}); the report records them."""
    from ldm.objectives import is_flow_scheduler
    from ldm.pipelines.drift import drift_arguments

    os.makedirs(out_dir, exist_ok=True)
    schedulers = list(schedulers or default_samplers(pipe))
    chosen = strip_steps(steps, num_strip)
    report = {"prompt": prompt, "seed": seed, "num_images": num_images, "steps": steps, "guidance_scale": guidance_scale,
              "guidance_rescale": guidance_rescale, "strip_steps": chosen,
              "prediction": "velocity" if is_flow_scheduler(pipe.scheduler) else "noise", "remedies": remedies or {},
              "schedulers": {}}
    files, strips = [], []
    for name in schedulers:
        pipe.set_scheduler(name)
        out = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance_scale, guidance_rescale=guidance_rescale,
                   num_images_per_prompt=num_images, generator=torch.Generator().manual_seed(seed),
                   output_type="latent", trace=True, **drift_arguments(remedies or {}))
        rep = trace_report(out.trace, pipe.scheduler, guidance_scale, guidance_rescale, data_mean, data_std)
        rep["strip_steps"] = strip_steps(len(out.trace), num_strip)  # Heun: 2 model calls a step, 2N - 1 records
        report["schedulers"][name] = rep
        files.append(write_csv(os.path.join(out_dir, f"sampling_{name}.csv"), rep["steps"]))
        strips.append(decode_x0_strip(pipe, out.trace, rep["strip_steps"]))
    strip_path = os.path.join(out_dir, "sampling_x0_strip.png")
    stack_rows(strips).save(strip_path)
    files.append(write_json(os.path.join(out_dir, "sampling.json"), report))
    report["files"] = files + [strip_path] + plot_sampling(report, out_dir)
    return report
