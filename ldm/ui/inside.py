"""Inside the sampler, for one image: the decoded x0 prediction of every step (a filmstrip), the histogram of the
latents per step, and the norms of the conditional and unconditional predictions and of their guided combination.

The statistics are ldm.diagnostics.sampling's (trace_report), the filmstrip its decode_x0_strip, the plots
ldm.diagnostics.plots'; this module only picks one image out of a batch's trace and writes the files.
"""
from __future__ import annotations

import dataclasses
import math
import os
import threading

from ldm.pipelines.output import StepRecord

PLOT_LOCK = threading.Lock()  # pyplot keeps global state: one figure at a time across requests


def one_image(trace: list[StepRecord], index: int = 0) -> list[StepRecord]:
    """Returns the trace of image `index` of a batch: every tensor field sliced to (1, ...)."""
    pick = lambda x: None if x is None else x[index: index + 1]  # noqa: E731
    return [dataclasses.replace(r, **{f: pick(getattr(r, f)) for f in StepRecord.FIELDS[2:]}) for r in trace]


def prediction_norms(trace: list[StepRecord]) -> list[dict]:
    """Returns per step {"step", "timestep", "cond", "uncond", "guided"}: the RMS of each prediction (uncond None
    on steps that ran the conditional branch alone)."""
    from ldm.diagnostics.sampling import rms

    return [{"step": r.step, "timestep": r.timestep, "cond": rms(r.noise_pred_cond),
             "uncond": None if r.noise_pred_uncond is None else rms(r.noise_pred_uncond), "guided": rms(r.noise_pred)}
            for r in trace]


def filmstrip(pipe, trace: list[StepRecord], out_dir: str) -> tuple[str, list[str]]:
    """Writes the decoded x0 prediction of every step side by side (filmstrip.png) and one PNG per step; returns
    (the strip's path, the frames' paths)."""
    from ldm.diagnostics.sampling_report import decode_x0_strip

    strip = decode_x0_strip(pipe, trace, list(range(len(trace))))
    width = strip.width // len(trace)
    frames = []
    for i in range(len(trace)):
        frames.append(os.path.join(out_dir, f"x0_step{i:03d}.png"))
        strip.crop((i * width, 0, (i + 1) * width, strip.height)).save(frames[-1])
    strip.save(os.path.join(out_dir, "filmstrip.png"))
    return os.path.join(out_dir, "filmstrip.png"), frames


def plot_norms(norms: list[dict], path: str, guidance_scale: float) -> str:
    """Plots the RMS of the conditional, unconditional and guided predictions against the step."""
    from ldm.diagnostics.plots import line_plot

    nan = lambda v: math.nan if v is None else v  # noqa: E731
    series = {name: [nan(n[name]) for n in norms] for name in ("cond", "uncond", "guided")}
    with PLOT_LOCK:
        return line_plot(path, [n["step"] for n in norms], series, "step", "RMS of the prediction",
                         f"Predictions per step (guidance scale {guidance_scale})")


def inside_report(pipe, trace: list[StepRecord], params: dict, out_dir: str, index: int = 0) -> dict:
    """Writes the filmstrip, the frames, the histogram ridge plot and the norms plot of image `index` of a traced
    call into out_dir; returns their paths and, per step, the histograms (for the page's slider) and the norms."""
    import numpy as np

    from ldm.diagnostics.plots import ridge_plot
    from ldm.diagnostics.sampling import trace_report

    os.makedirs(out_dir, exist_ok=True)
    trace = one_image(trace, index)
    report = trace_report(trace, pipe.scheduler, params["guidance_scale"], params["guidance_rescale"])
    strip, frames = filmstrip(pipe, trace, out_dir)
    norms = prediction_norms(trace)
    labels = [f"{r['step']} (t={r['timestep']:.0f})" for r in report["steps"]]
    with PLOT_LOCK:
        ridge = ridge_plot(os.path.join(out_dir, "histograms.png"), report["latent_histograms"],
                           np.asarray(report["histogram_edges"]), labels, "Histogram of x_t per step",
                           "latent value (variance-preserving units)")
    return {"seed": params.get("seed"), "filmstrip": strip, "frames": frames, "histograms_plot": ridge,
            "norms_plot": plot_norms(norms, os.path.join(out_dir, "norms.png"), params["guidance_scale"]),
            "norms": norms, "timesteps": [r["timestep"] for r in report["steps"]],
            "histogram_edges": report["histogram_edges"], "latent_histograms": report["latent_histograms"],
            "x0_histograms": report["x0_histograms"]}
