"""`ldm diagnose timesteps`: loss and prediction bias per timestep bin on a fixed probe set, as JSON, CSV and PNGs.

timesteps.json = {"model", "data", "prediction_type", "num_samples", "z_threshold", "biased_bins", "bins": [row]},
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
"""
from __future__ import annotations

import os

import torch

from ldm.diagnostics.bias import per_bin_report
from ldm.diagnostics.gaussian import GaussianEpsModel, fit_gaussian
from ldm.diagnostics.io import write_csv, write_json
from ldm.diagnostics.plots import line_plot, panels_plot
from ldm.diagnostics.probe import Probe, encode_latents, load_probe_images, make_probe, predict_probe

TIMESTEP_PNGS = ("timesteps_loss.png", "timesteps_bias.png", "timesteps_x0_error.png")


def gaussian_reference_eps(probe: Probe, reference_latents: torch.Tensor, shrinkage: float = 0.1) -> torch.Tensor:
    """Returns the optimal eps for a Gaussian fitted to reference_latents (n, C, h, w) at every probe row (N, C, h, w)."""
    mu, sigma = fit_gaussian(reference_latents, shrinkage)
    model = GaussianEpsModel(mu, sigma, probe.alphas_cumprod, tuple(probe.x0.shape[1:]))
    return model.predict(probe.x_t, probe.timesteps.double()).float()


def timestep_report(eps_pred: torch.Tensor, probe: Probe, z_threshold: float = 5.0,
                    reference_eps: torch.Tensor | None = None) -> dict:
    """Returns {"num_samples", "z_threshold", "biased_bins", "bins"} for predictions eps_pred (N, C, h, w)."""
    args = (probe.eps, probe.x0, probe.x_t, probe.timesteps, probe.alphas_cumprod, probe.n_bins, z_threshold)
    bins = per_bin_report(eps_pred, *args)
    if reference_eps is not None:
        reference = per_bin_report(reference_eps, *args)
        for row, ref in zip(bins, reference):
            idx = (probe.timesteps >= row["t_lo"]) & (probe.timesteps < row["t_hi"])
            row.update(gaussian_loss_eps=ref["loss_eps"], gaussian_loss_x0=ref["loss_x0"],
                       excess_loss_eps=row["loss_eps"] - ref["loss_eps"],
                       mse_to_gaussian_eps=float((eps_pred[idx] - reference_eps[idx]).double().pow(2).mean()))
    return {"num_samples": len(eps_pred), "z_threshold": z_threshold,
            "biased_bins": [r["bin"] for r in bins if r["biased"]], "bins": bins}


def plot_timestep_report(report: dict, out_dir: str) -> list[str]:
    """Writes the timestep PNGs (loss, bias, x0 error and, with a reference, the Gaussian comparison)."""
    rows = report["bins"]
    x = [(r["t_lo"] + r["t_hi"]) / 2 for r in rows]
    channels = range(len(rows[0]["bias"]))
    per_channel = lambda key: {f"ch {c}": [r[key][c] for r in rows] for c in channels}  # noqa: E731
    loss = {f"loss_{k}": [r[f"loss_{k}"] for r in rows] for k in ("eps", "v", "x0")}
    if "gaussian_loss_eps" in rows[0]:
        loss["Gaussian optimum, eps"] = [r["gaussian_loss_eps"] for r in rows]
    paths = [line_plot(os.path.join(out_dir, "timesteps_loss.png"), x, loss, "timestep t (bin centre)", "MSE",
                       "Loss per timestep bin in each parameterisation", logy=True)]
    panels = {"eps_pred mean (target 0)": per_channel("eps_pred_mean"), "eps_pred std (target 1)":
              per_channel("eps_pred_std"), "|bias| / std. error": per_channel("bias_z"),
              "||eps_pred|| / ||eps||": {"norm ratio": [r["norm_ratio"] for r in rows]}}
    paths.append(panels_plot(os.path.join(out_dir, "timesteps_bias.png"), x, panels, "timestep t",
                             "Predicted noise against its target, per latent channel",
                             hlines={"eps_pred mean (target 0)": 0.0, "eps_pred std (target 1)": 1.0,
                                     "|bias| / std. error": report["z_threshold"], "||eps_pred|| / ||eps||": 1.0}))
    paths.append(line_plot(os.path.join(out_dir, "timesteps_x0_error.png"), x,
                           {"x0 RMSE": [r["x0_rmse"] for r in rows]}, "timestep t", "RMSE of implied x0",
                           "Implied x0 error per timestep bin", logy=True))
    return paths


def diagnose_timesteps(pipe, data: str, out_dir: str, num_images: int = 8, n_bins: int = 10, per_bin: int = 4,
                       seed: int = 0, z_threshold: float = 5.0, gaussian_reference: bool = False,
                       reference_images: int = 64) -> dict:
    """Runs the probe through the pipeline's UNet and writes timesteps.json, timesteps.csv and the PNGs;
    returns the report (with "files")."""
    probe = make_probe(pipe, data, num_images, n_bins, per_bin, seed)
    prediction_type = pipe.scheduler.config.prediction_type
    eps_pred = predict_probe(pipe.unet, probe, prediction_type)
    reference = None
    if gaussian_reference:
        resolution = pipe.unet.config.sample_size * pipe.vae_scale_factor
        # fitted on images after the probe's: a covariance fitted on the probe images themselves (rank <= n when
        # n < dim) would contain them and flatter the reference
        pixels, _ = load_probe_images(data, resolution, num_images + reference_images)
        if len(pixels) - num_images < 2:
            raise ValueError(f"--gaussian-reference needs at least 2 images beyond the {num_images} probe images in "
                             f"{data}; use a larger data source or lower --num-images")
        reference = gaussian_reference_eps(probe, encode_latents(pipe.vae, pixels[num_images:]))
    report = {"data": data, "prediction_type": prediction_type,
              **timestep_report(eps_pred, probe, z_threshold, reference)}
    os.makedirs(out_dir, exist_ok=True)
    files = [write_json(os.path.join(out_dir, "timesteps.json"), report),
             write_csv(os.path.join(out_dir, "timesteps.csv"), report["bins"])]
    report["files"] = files + plot_timestep_report(report, out_dir)
    return report
