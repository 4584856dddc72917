"""Diagnostics: per-timestep loss and bias, sampling drift, guidance breakdown, schedules, the Gaussian reference.

    gaussian.py          closed-form optimal eps and exact flow velocity for x0 ~ N(mu, Sigma); GaussianEpsModel and
                         GaussianFlowModel, stand-in denoisers; the exact N-step output of the flow samplers
    bias.py              per-bin loss (eps / v / x0), per-channel bias and its z-score, norm ratio; for flow models
                         per sigma bin, of the predicted velocity
    probe.py             the fixed probe set (images, noise, timesteps or flow sigmas) and the model's predictions
    timesteps.py         `ldm diagnose timesteps`: timesteps.json / .csv and PNGs
    sampling.py          per-step statistics of a pipeline trace: drift, marginal distance, guidance
    sampling_report.py   `ldm diagnose sampling`: several samplers from one seed, JSON / CSV / PNGs
    schedule_report.py   `ldm diagnose schedule`: schedule tables, VLB weights, visited timesteps (the formulas
                         themselves are ldm.diffusion's, the ones training uses); a flow model's sigma schedule
    training_heatmap.py  per-bin validation loss over training as a heatmap
    render.py            `ldm diagnose all`: every figure of one model folder (the diagnostics guide's)
"""
_LAZY = {
    "diagnose_timesteps": "ldm.diagnostics.timesteps", "diagnose_sampling": "ldm.diagnostics.sampling_report",
    "diagnose_schedule": "ldm.diagnostics.schedule_report", "training_heatmap": "ldm.diagnostics.training_heatmap",
    "render_all": "ldm.diagnostics.render", "GaussianEpsModel": "ldm.diagnostics.gaussian",
    "gaussian_optimal_eps": "ldm.diagnostics.gaussian", "gaussian_pipeline": "ldm.diagnostics.gaussian",
    "GaussianFlowModel": "ldm.diagnostics.gaussian", "gaussian_optimal_velocity": "ldm.diagnostics.gaussian",
    "flow_sampler_gaussian": "ldm.diagnostics.gaussian", "flow_per_bin_report": "ldm.diagnostics.bias",
    "per_bin_report": "ldm.diagnostics.bias", "trace_report": "ldm.diagnostics.sampling",
    "schedule_table": "ldm.diagnostics.schedule_report", "diagnose_flow_schedule": "ldm.diagnostics.schedule_report",
}


def __getattr__(name):
    # Lazy: `import ldm.diagnostics` stays cheap (matplotlib and diffusers load on first use).
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ldm.diagnostics' has no attribute {name!r}")


__all__ = list(_LAZY)
