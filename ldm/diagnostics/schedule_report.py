"""`ldm diagnose schedule`: noise-schedule tables and plots, and the timesteps each sampler visits.

schedule.json = {"num_train_timesteps", "variance", "schedules": {name: {"beta_start", "beta_end", "summary":
{"alpha_bar_last", "snr_first", "snr_last", "vlb_weight_max_over_min"}}}, "visited": {scheduler: {spacing: [t]}},
"num_inference_steps"}; schedule_<name>.csv has one row per t with the fields of
schedule_table below; schedule_timesteps.csv one row per (scheduler, spacing).
PNGs: schedule_alpha_bar.png, schedule_posterior_variance.png, schedule_vlb_weights.png, schedule_timesteps.png.

A flow model has no beta schedule: `diagnose_flow_schedule` writes its schedule.json = {"objective": "flow",
"shift", "num_train_timesteps", "num_inference_steps", "visited": {sampler: {"linspace": [t]}}}, schedule_timesteps.csv,
schedule_sigmas.png (sigma against uniform time, unshifted, SD3's shift 3 and the model's, SD3 Eq. 23) and
schedule_timesteps.png.
"""
from __future__ import annotations

import os

import torch

from ldm.diagnostics.io import write_csv, write_json
from ldm.diagnostics.plots import dot_plot, line_plot, panels_plot
from ldm.diffusion import alphas_cumprod, make_betas, posterior_variance, shift_sigmas, snr, vlb_weights

TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")

# Each schedule's usual (beta_start, beta_end): DDPM's for linear, Stable Diffusion's for scaled_linear.
DEFAULT_BETA_RANGE = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012),
                      "squaredcos_cap_v2": (1e-4, 0.02), "sigmoid": (1e-4, 0.02)}


def schedule_table(betas: torch.Tensor, variance: str = "posterior") -> dict[str, torch.Tensor]:
    """Returns {"t", "beta_t", "alpha_bar_t", "snr_t", "log_snr_t", "posterior_variance_t", "vlb_weight_t",
    "vlb_weight_normalised_t"} (each (T,)), all from ldm.diffusion; the normalised VLB weights have mean 1, like the
    simple loss's, and with the default variance are exactly training's `--weighting vlb` for epsilon models."""
    a_bar = alphas_cumprod(betas)
    weights = vlb_weights(betas, variance)
    return {"t": torch.arange(len(betas)), "beta_t": betas, "alpha_bar_t": a_bar, "snr_t": snr(a_bar),
            "log_snr_t": snr(a_bar).log(), "posterior_variance_t": posterior_variance(betas),
            "vlb_weight_t": weights, "vlb_weight_normalised_t": weights / weights.mean()}


def visited_timesteps(scheduler_names: list[str], schedule_config: dict, num_inference_steps: int,
                      spacings: tuple[str, ...] = TIMESTEP_SPACINGS) -> dict[str, dict[str, list[float]]]:
    """Returns {scheduler: {spacing: timesteps the scheduler visits}} for each timestep_spacing."""
    from ldm.pipelines.schedulers import make_scheduler

    visited = {}
    for name in scheduler_names:
        visited[name] = {}
        for spacing in spacings:
            scheduler = make_scheduler(name, {**schedule_config, "timestep_spacing": spacing})
            scheduler.set_timesteps(num_inference_steps)
            visited[name][spacing] = [round(float(t), 3) for t in scheduler.timesteps]
    return visited


def schedule_tables(names: list[str], num_train_timesteps: int = 1000, beta_start: float | None = None,
                    beta_end: float | None = None, variance: str = "posterior") -> dict[str, dict]:
    """Returns {name: {"beta_start", "beta_end", "table": schedule_table(...)}} for each beta schedule name."""
    tables = {}
    for name in names:
        start, end = DEFAULT_BETA_RANGE.get(name, (1e-4, 0.02))
        start, end = beta_start if beta_start is not None else start, beta_end if beta_end is not None else end
        betas = make_betas(name, num_train_timesteps, start, end)
        tables[name] = {"beta_start": start, "beta_end": end, "table": schedule_table(betas, variance)}
    return tables


def _summary(table: dict) -> dict:
    w = table["vlb_weight_t"][1:]  # t = 0 is the decoder term, whose weight depends on the variance choice
    return {"alpha_bar_last": float(table["alpha_bar_t"][-1]), "snr_first": float(table["snr_t"][0]),
            "snr_last": float(table["snr_t"][-1]), "vlb_weight_max_over_min": float(w.max() / w.min())}


def plot_schedules(tables: dict, visited: dict, out_dir: str) -> list[str]:
    """Writes the four schedule PNGs."""
    t = next(iter(tables.values()))["table"]["t"].tolist()
    col = lambda key: {n: v["table"][key].tolist() for n, v in tables.items()}  # noqa: E731
    paths = [panels_plot(os.path.join(out_dir, "schedule_alpha_bar.png"), t,
                         {"alpha_bar_t": col("alpha_bar_t"), "log SNR(t)": col("log_snr_t")}, "timestep t",
                         "Noise schedules")]
    paths.append(line_plot(os.path.join(out_dir, "schedule_posterior_variance.png"), t, col("posterior_variance_t"),
                           "timestep t", "beta_tilde_t", "Posterior variance (Ho et al. 2020, Eq. 7)", logy=True,
                           markers=False))
    weights = {f"VLB {n}": v["table"]["vlb_weight_normalised_t"].tolist() for n, v in tables.items()}
    paths.append(line_plot(os.path.join(out_dir, "schedule_vlb_weights.png"), t, weights, "timestep t",
                           "weight (mean 1)", "VLB weights (Ho et al. 2020, Eq. 12) vs the simple loss's",
                           logy=True, hlines={"simple loss (1)": 1.0}, markers=False))
    paths.append(plot_visited(visited, out_dir))
    return paths


def plot_visited(visited: dict, out_dir: str) -> str:
    """Writes schedule_timesteps.png: the timesteps each sampler visits, one row per (sampler, spacing)."""
    rows = {f"{s} / {sp}": ts for s, by in visited.items() for sp, ts in by.items()}
    return dot_plot(os.path.join(out_dir, "schedule_timesteps.png"), rows, "timestep t",
                    "Timesteps each sampler visits, per timestep_spacing")


def write_visited(visited: dict, out_dir: str) -> str:
    """Writes schedule_timesteps.csv, one row per (sampler, spacing), and returns its path."""
    return write_csv(os.path.join(out_dir, "schedule_timesteps.csv"),
                     [{"scheduler": s, "spacing": sp, "timesteps": " ".join(map(str, ts))}
                      for s, by in visited.items() for sp, ts in by.items()])


def diagnose_schedule(names: list[str], out_dir: str, num_train_timesteps: int = 1000, beta_start: float | None = None,
                      beta_end: float | None = None, schedulers: list[str] = ("ddpm", "ddim", "lms"),
                      num_inference_steps: int = 20, variance: str = "posterior",
                      scheduler_config: dict | None = None) -> dict:
    """Writes the schedule tables (JSON, CSV) and plots; returns the report (with "files").

    scheduler_config: a model's scheduler config, used for the visited timesteps (its steps_offset included);
    by default the first named schedule with steps_offset=0.
    """
    tables = schedule_tables(names, num_train_timesteps, beta_start, beta_end, variance)
    first = next(iter(tables))
    config = dict(num_train_timesteps=num_train_timesteps, beta_schedule=first,
                  beta_start=tables[first]["beta_start"], beta_end=tables[first]["beta_end"], steps_offset=0)
    config = dict(scheduler_config) if scheduler_config is not None else config
    visited = visited_timesteps(list(schedulers), config, num_inference_steps, TIMESTEP_SPACINGS)
    report = {"num_train_timesteps": num_train_timesteps, "variance": variance, "num_inference_steps": num_inference_steps,
              "schedules": {n: {"beta_start": v["beta_start"], "beta_end": v["beta_end"], "summary": _summary(v["table"])}
                            for n, v in tables.items()}, "visited": visited}
    os.makedirs(out_dir, exist_ok=True)
    files = [write_json(os.path.join(out_dir, "schedule.json"), report)]
    for name, v in tables.items():
        rows = [dict(zip(v["table"], values)) for values in zip(*(c.tolist() for c in v["table"].values()))]
        files.append(write_csv(os.path.join(out_dir, f"schedule_{name}.csv"), rows))
    files.append(write_visited(visited, out_dir))
    report["files"] = files + plot_schedules(tables, visited, out_dir)
    return report


def diagnose_flow_schedule(out_dir: str, scheduler_config: dict, schedulers: list[str] = ("euler", "heun"),
                           num_inference_steps: int = 20) -> dict:
    """Writes a flow model's schedule report (see the module docstring); returns it (with "files"). The flow
    samplers have one spacing, linspace in sigma before the shift."""
    config = dict(scheduler_config)
    shift, num_train_timesteps = float(config.get("shift", 1.0)), int(config.get("num_train_timesteps", 1000))
    visited = visited_timesteps(list(schedulers), config, num_inference_steps, ("linspace",))
    report = {"objective": "flow", "shift": shift, "num_train_timesteps": num_train_timesteps,
              "num_inference_steps": num_inference_steps, "visited": visited}
    os.makedirs(out_dir, exist_ok=True)
    u = torch.linspace(0, 1, 101, dtype=torch.float64)
    curves = {"no shift": u.tolist(), "shift 3 (SD3's)": shift_sigmas(u, 3.0).tolist(),
              f"shift {shift:g} (the model's)": shift_sigmas(u, shift).tolist()}
    sigmas = line_plot(os.path.join(out_dir, "schedule_sigmas.png"), u.tolist(), curves, "uniform time u", "sigma",
                       "Flow timestep shift (Esser et al. 2024, Eq. 23)", markers=False)
    report["files"] = [write_json(os.path.join(out_dir, "schedule.json"), report), write_visited(visited, out_dir),
                       sigmas, plot_visited(visited, out_dir)]
    return report
