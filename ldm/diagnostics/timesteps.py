"""`ldm diagnose timesteps`: loss and prediction bias per timestep bin on a fixed probe set, as JSON, CSV and PNGs.

timesteps.json = {"data", "prediction_type", "prediction", "num_samples", "z_threshold", "biased_bins", "bins": [row]},
each row (also one CSV line, lists expanded per channel as field_0..field_{C-1}):
    bin, t_lo, t_hi, n, alpha_bar_mean      the bin [t_lo, t_hi) and its samples
    loss_eps, loss_v, loss_x0               MSE of the same prediction expressed as eps, v and x0
    eps_pred_mean[C], eps_pred_std[C]       per latent channel; a calibrated model gives 0 and 1
    bias[C], bias_se[C], bias_z[C]          mean of eps_pred - eps per channel, its standard error, |bias| / se
    biased_channels, biased                 channels with bias_z > z_threshold; whether any
    norm_ratio                              mean of ||eps_pred|| / ||eps|| per sample
    x0_rmse                                 the implied x0 error, sqrt(loss_x0)
  with --gaussian-reference also:
    gaussian_loss_eps, gaussian_loss_x0     the same losses of the optimal Gaussian (Wiener) predictor
    excess_loss_eps                         loss_eps - gaussian_loss_eps (negative: the model beats the optimum
                                            for a Gaussian with the data's mean and covariance)
    mse_to_gaussian_eps                     mean ||eps_pred - eps_gaussian||^2 per element

For a flow model (prediction_type "flow", prediction "velocity") the bins are of sigma in [0, 1] and each row has
    bin, sigma_lo, sigma_hi, n, sigma_mean  the bin [sigma_lo, sigma_hi) and its samples
    loss_v, loss_x0, loss_eps               MSE of the velocity v = eps - x0 (the training loss) and of the x0 and
                                            eps it implies (flow_to_x0 / flow_to_noise)
    v_pred_mean[C], v_pred_std[C]           per latent channel, beside the target's v_mean[C], v_std[C]
    bias[C], bias_se[C], bias_z[C]          mean of v_pred - v per channel, its standard error, |bias| / se
    biased_channels, biased, norm_ratio     as above, of the velocity (||v_pred|| / ||v||)
    x0_rmse, eps_rmse                       sqrt(loss_x0), sqrt(loss_eps)
  with --gaussian-reference: gaussian_loss_v, gaussian_loss_x0, excess_loss_v, mse_to_gaussian_v, against the
  exact velocity field of the fitted Gaussian (GaussianFlowModel).
"""
from __future__ import annotations

import os

import torch

from ldm.diagnostics.bias import flow_per_bin_report, per_bin_report
from ldm.diagnostics.gaussian import GaussianEpsModel, GaussianFlowModel, fit_gaussian
from ldm.diffusion import timestep_bins
from ldm.objectives import objective_for
from ldm.diagnostics.io import write_csv, write_json
from ldm.diagnostics.plots import line_plot, panels_plot
from ldm.diagnostics.probe import Probe, encode_latents, load_probe_images, make_probe, predict_probe

TIMESTEP_PNGS = ("timesteps_loss.png", "timesteps_bias.png", "timesteps_x0_error.png")


def gaussian_reference_prediction(probe: Probe, reference_latents: torch.Tensor,
                                  shrinkage: float = 0.1) -> torch.Tensor:
    """Returns the optimal prediction for a Gaussian fitted to reference_latents (n, C, h, w) at every probe row
    (N, C, h, w): eps*, or for a flow probe the exact velocity v*."""
    mu, sigma = fit_gaussian(reference_latents, shrinkage)
    shape = tuple(probe.x0.shape[1:])
    if probe.flow:
        return GaussianFlowModel(mu, sigma, shape).predict(probe.x_t, probe.sigmas).float()
    return GaussianEpsModel(mu, sigma, probe.alphas_cumprod, shape).predict(probe.x_t, probe.timesteps.double()).float()


def _bin_rows(pred: torch.Tensor, probe: Probe, z_threshold: float) -> list[dict]:
    """Returns the per-bin rows of predictions on the probe: eps (per_bin_report) or, for a flow probe, velocity."""
    if probe.flow:
        return flow_per_bin_report(pred, probe.eps, probe.x0, probe.x_t, probe.sigmas, probe.n_bins, z_threshold)
    return per_bin_report(pred, probe.eps, probe.x0, probe.x_t, probe.timesteps, probe.alphas_cumprod, probe.n_bins,
                          z_threshold)


def _in_bin(probe: Probe, row: dict) -> torch.Tensor:
    """Returns which probe rows (N,) bool fall in a report row's bin."""
    if probe.flow:
        return timestep_bins(probe.sigmas, probe.n_bins) == row["bin"]
    return (probe.timesteps >= row["t_lo"]) & (probe.timesteps < row["t_hi"])


def timestep_report(eps_pred: torch.Tensor, probe: Probe, z_threshold: float = 5.0,
                    reference_eps: torch.Tensor | None = None) -> dict:
    """Returns {"num_samples", "z_threshold", "biased_bins", "bins"} for predictions eps_pred (N, C, h, w) (for a
    flow probe, velocities v_pred, and the reference the exact velocity)."""
    bins = _bin_rows(eps_pred, probe, z_threshold)
    if reference_eps is not None:
        key = "v" if probe.flow else "eps"
        for row, ref in zip(bins, _bin_rows(reference_eps, probe, z_threshold)):
            idx = _in_bin(probe, row)
            row.update({f"gaussian_loss_{key}": ref[f"loss_{key}"], "gaussian_loss_x0": ref["loss_x0"],
                        f"excess_loss_{key}": row[f"loss_{key}"] - ref[f"loss_{key}"],
                        f"mse_to_gaussian_{key}": float((eps_pred[idx] - reference_eps[idx]).double().pow(2).mean())})
    return {"num_samples": len(eps_pred), "z_threshold": z_threshold,
            "biased_bins": [r["bin"] for r in bins if r["biased"]], "bins": bins}


def _bias_panels(report: dict) -> tuple[dict, dict, str]:
    """Returns (panels, reference lines, title) of the bias figure: the predicted noise against N(0, 1) for
    diffusion models, the predicted velocity against its target for flow models."""
    rows = report["bins"]
    channels = range(len(rows[0]["bias"]))
    per_channel = lambda key: {f"ch {c}": [r[key][c] for r in rows] for c in channels}  # noqa: E731
    z = report["z_threshold"]
    if report.get("prediction_type") == "flow":
        std_ratio = {f"ch {c}": [r["v_pred_std"][c] / max(r["v_std"][c], 1e-12) for r in rows] for c in channels}
        panels = {"bias: mean of v_pred - v": per_channel("bias"), "v_pred std / v std": std_ratio,
                  "|bias| / std. error": per_channel("bias_z"),
                  "||v_pred|| / ||v||": {"norm ratio": [r["norm_ratio"] for r in rows]}}
        hlines = {"bias: mean of v_pred - v": 0.0, "v_pred std / v std": 1.0, "|bias| / std. error": z,
                  "||v_pred|| / ||v||": 1.0}
        return panels, hlines, "Predicted velocity against its target (eps - x0), per latent channel"
    panels = {"eps_pred mean (target 0)": per_channel("eps_pred_mean"), "eps_pred std (target 1)":
              per_channel("eps_pred_std"), "|bias| / std. error": per_channel("bias_z"),
              "||eps_pred|| / ||eps||": {"norm ratio": [r["norm_ratio"] for r in rows]}}
    hlines = {"eps_pred mean (target 0)": 0.0, "eps_pred std (target 1)": 1.0, "|bias| / std. error": z,
              "||eps_pred|| / ||eps||": 1.0}
    return panels, hlines, "Predicted noise against its target, per latent channel"


def plot_timestep_report(report: dict, out_dir: str) -> list[str]:
    """Writes the timestep PNGs (loss, bias, x0 error and, with a reference, the Gaussian comparison); for a flow
    model, per sigma bin, of the velocity."""
    rows = report["bins"]
    flow = report.get("prediction_type") == "flow"
    x = [(r["sigma_lo"] + r["sigma_hi"]) / 2 if flow else (r["t_lo"] + r["t_hi"]) / 2 for r in rows]
    axis, keys = ("sigma", ("v", "x0", "eps")) if flow else ("timestep t", ("eps", "v", "x0"))
    loss = {f"loss_{k}": [r[f"loss_{k}"] for r in rows] for k in keys}
    if f"gaussian_loss_{keys[0]}" in rows[0]:
        loss[f"Gaussian optimum, {keys[0]}"] = [r[f"gaussian_loss_{keys[0]}"] for r in rows]
    paths = [line_plot(os.path.join(out_dir, "timesteps_loss.png"), x, loss, f"{axis} (bin centre)", "MSE",
                       f"Loss per {axis.split()[0]} bin in each parameterisation", logy=True)]
    panels, hlines, title = _bias_panels(report)
    paths.append(panels_plot(os.path.join(out_dir, "timesteps_bias.png"), x, panels, axis, title, hlines=hlines))
    errors = {f"{k} RMSE": [r[f"{k}_rmse"] for r in rows] for k in (("x0", "eps") if flow else ("x0",))}
    paths.append(line_plot(os.path.join(out_dir, "timesteps_x0_error.png"), x, errors, axis, "RMSE of implied x0",
                           f"Implied x0 error per {axis.split()[0]} bin", logy=True))
    return paths


def diagnose_timesteps(pipe, data: str, out_dir: str, num_images: int = 8, n_bins: int = 10, per_bin: int = 4,
                       seed: int = 0, z_threshold: float = 5.0, gaussian_reference: bool = False,
                       reference_images: int = 64) -> dict:
    """Runs the probe through the pipeline's UNet and writes timesteps.json, timesteps.csv and the PNGs;
    returns the report (with "files"). A flow model's report is of its velocity, per sigma bin."""
    probe = make_probe(pipe, data, num_images, n_bins, per_bin, seed)
    objective = objective_for(pipe.scheduler)
    prediction_type = objective.name
    eps_pred = predict_probe(pipe.denoiser, probe, objective)
    reference = None
    if gaussian_reference:
        resolution = pipe.denoiser.config.sample_size * pipe.vae_scale_factor
        # fitted on images after the probe's: a covariance fitted on the probe images themselves (rank <= n when
        # n < dim) would contain them and flatter the reference
        pixels, _ = load_probe_images(data, resolution, num_images + reference_images)
        if len(pixels) - num_images < 2:
            raise ValueError(f"--gaussian-reference needs at least 2 images beyond the {num_images} probe images in "
                             f"{data}; use a larger data source or lower --num-images")
        reference = gaussian_reference_prediction(probe, encode_latents(pipe.vae, pixels[num_images:]))
    report = {"data": data, "prediction_type": prediction_type, "prediction": "velocity" if probe.flow else "noise",
              **timestep_report(eps_pred, probe, z_threshold, reference)}
    os.makedirs(out_dir, exist_ok=True)
    files = [write_json(os.path.join(out_dir, "timesteps.json"), report),
             write_csv(os.path.join(out_dir, "timesteps.csv"), report["bins"])]
    report["files"] = files + plot_timestep_report(report, out_dir)
    return report
