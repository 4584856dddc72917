"""The Diagnose tab: `ldm diagnose timesteps` (loss and prediction bias per timestep bin, on a fixed probe set)
run from the page on the server's cached model, with progress and cancellation."""
from __future__ import annotations

import os

from ldm.ui.jobs import Job
from ldm.ui.models import ModelCache

PLOTS = ("timesteps_loss.png", "timesteps_bias.png", "timesteps_x0_error.png")


def parse_diagnose_form(form: dict, default_model: str | None) -> dict:
    """Returns {"model", "data", "num_images", "bins", "per_bin"} from the form; raises ValueError for a bad field."""
    model = str(form.get("model") or default_model or "").strip()
    if not model:
        raise ValueError("model: no model folder; fill in the model field")
    values = {"model": model, "data": str(form.get("data") or "shapes:64").strip()}
    for name, default, top in (("num_images", 8, 256), ("bins", 10, 100), ("per_bin", 4, 100)):
        text = str(form.get(name) or default)
        if not text.isdigit() or not 1 <= int(text) <= top:
            raise ValueError(f"{name}: {text!r} is not a whole number in [1, {top}]")
        values[name] = int(text)
    return values


def diagnose(form: dict, cache: ModelCache, out_dir: str, job: Job | None = None,
             default_model: str | None = None) -> dict:
    """Runs the timestep diagnostics of the form's model into out_dir; returns {"plots": [paths], "biased_bins"}. Progress counts the denoiser's calls; a cancel stops at the next one."""
    from ldm.pipelines.generate import resolve_device_dtype
    from ldm.diagnostics.timesteps import diagnose_timesteps

    job = job or Job("0", "diagnose")
    values = parse_diagnose_form(form, default_model)
    device, dtype = resolve_device_dtype("auto", "float32")
    job.update(0.0, "loading the model")
    loaded = cache.get(values["model"], device, dtype)
    job.update(0.0, "waiting for the model (a generation is running)")
    with loaded.use(None) as pipe:
        calls = {"n": 0}

        def count(_module, _inputs):
            calls["n"] += 1
            job.update(0.5, f"probing: {calls['n']} denoiser calls")

        hook = pipe.denoiser.register_forward_pre_hook(count)
        try:
            job.update(0.05, f"encoding {values['num_images']} probe images from {values['data']}")
            report = diagnose_timesteps(pipe, values["data"], out_dir, values["num_images"], values["bins"],
                                        values["per_bin"])
        finally:
            hook.remove()
    return {"plots": [os.path.join(out_dir, name) for name in PLOTS], "biased_bins": report["biased_bins"]}
