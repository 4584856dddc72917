"""Sampling-drift remedies (pipelines/drift.py): epsilon scaling (Ning et al. 2024), dynamic thresholding
(Saharia et al. 2022, diffusers' implementation) and Restart sampling (Xu et al. 2023), each against its closed form
or the paper's algorithm on the tiny model; off by default (bit for bit); with SDXL, the trace and `ldm generate`."""
import re

import pytest
import torch
from diffusers import DDIMScheduler
from diffusers.utils.torch_utils import randn_tensor

from ldm import Pipeline, diffusion
from ldm.cli import main
from ldm.images import read_png_params
from ldm.models.presets import build_components
from ldm.pipelines.drift import RestartSettings, ThresholdSettings, check_remedies, step_plan

from conftest import seeded

pytestmark = pytest.mark.usefixtures("one_thread")
FAST = dict(num_inference_steps=10, output_type="latent", height=32, width=32)


def run(pipe, guidance_scale=1.0, **kwargs):
    return pipe("a red circle", generator=seeded(0), guidance_scale=guidance_scale, **FAST, **kwargs)


def divide_output(module, s):
    """Makes `module` return its output divided by s (a model whose prediction is eps / s); returns the hook."""
    def hook(_m, _args, out):
        if isinstance(out, tuple):
            return (out[0] / s, *out[1:])
        out.sample = out.sample / s
        return out
    return module.register_forward_hook(hook)


@pytest.fixture()
def ddim_pipe(tiny_pipe):
    tiny_pipe.set_scheduler("ddim")
    return tiny_pipe


# ------------------------------------------------------------------ off by default

@pytest.mark.parametrize("scheduler", ["ddim", "euler"])
def test_remedies_at_their_neutral_settings_are_plain_sampling_bit_for_bit(tiny_pipe, scheduler):
    tiny_pipe.set_scheduler(scheduler)
    plain = run(tiny_pipe, guidance_scale=3.0).images
    neutral = dict(eps_scale=1.0, eps_scale_slope=0.0, restart=dict(t_min=100, t_max=400, K=0))
    assert torch.equal(run(tiny_pipe, guidance_scale=3.0, **neutral).images, plain)


# ------------------------------------------------------------------ epsilon scaling (Ning et al. 2024)

@pytest.mark.parametrize("scheduler", ["ddim", "euler"])
def test_constant_eps_scale_equals_a_model_whose_output_is_divided_by_it(tiny_pipe, scheduler):
    tiny_pipe.set_scheduler(scheduler)
    scaled = run(tiny_pipe, guidance_scale=3.0, eps_scale=1.25).images
    handle = divide_output(tiny_pipe.unet, 1.25)
    try:
        divided = run(tiny_pipe, guidance_scale=3.0).images
    finally:
        handle.remove()
    torch.testing.assert_close(scaled, divided, rtol=1e-5, atol=1e-5)  # CFG is linear: (u + w(c - u)) / s
    assert (scaled - run(tiny_pipe, guidance_scale=3.0).images).abs().max() > 1e-3  # and it changes the sample


def test_linear_eps_scale_divides_each_step_by_b_plus_k_t_and_the_trace_records_it(ddim_pipe):
    out = run(ddim_pipe, eps_scale=1.01, eps_scale_slope=1e-4, trace=True)
    for record in out.trace:
        factor = 1.01 + 1e-4 * record.timestep
        torch.testing.assert_close(record.noise_pred, record.noise_pred_cond / factor, rtol=0, atol=0)
    assert out.trace[0].noise_pred.abs().sum() < out.trace[0].noise_pred_cond.abs().sum()


# ------------------------------------------------------------------ dynamic thresholding (Saharia et al. 2022)

def imagen_threshold(x0, ratio, max_value):
    """Imagen Sec. 2.3, written out: s = the ratio-quantile of |x0| per sample, in [1, max_value]; clip, divide."""
    s = torch.quantile(x0.abs().reshape(len(x0), -1), ratio, dim=1).clamp(1, max_value)  # (B,)
    s = s.reshape(-1, 1, 1, 1)
    return x0.clamp(-s, s) / s


def test_dynamic_thresholding_is_imagens_formula_on_each_steps_x0(ddim_pipe):
    out = run(ddim_pipe, dynamic_thresholding=(0.9, 1.5), trace=True)
    alpha_bar = ddim_pipe.scheduler.alphas_cumprod
    clipped = 0
    for record in out.trace:
        a = diffusion.broadcast_alpha_bar(alpha_bar[int(record.timestep)], record.latents)
        raw = diffusion.eps_to_x0(record.noise_pred, record.latents, a)  # the model's x0, before thresholding
        torch.testing.assert_close(record.x0_pred, imagen_threshold(raw, 0.9, 1.5), rtol=1e-4, atol=1e-5)
        clipped += int(not torch.allclose(raw, record.x0_pred))
    assert clipped > 0 and out.trace[0].x0_pred.abs().max() <= 1.0 + 1e-6
    assert ddim_pipe.scheduler.config.thresholding is False  # the call's setting is undone after it


def test_dynamic_thresholding_equals_diffusers_ddim_built_with_thresholding(ddim_pipe):
    ours = run(ddim_pipe, dynamic_thresholding=ThresholdSettings(0.95, 2.0)).images
    ddim_pipe.set_scheduler(DDIMScheduler.from_config(ddim_pipe.scheduler.config, thresholding=True,
                                                      dynamic_thresholding_ratio=0.95, sample_max_value=2.0))
    assert torch.equal(ours, run(ddim_pipe).images)


# ------------------------------------------------------------------ Restart sampling (Xu et al. 2023, Algorithm 1)

def test_restart_plan_runs_the_interval_K_more_times_after_reaching_t_min():
    timesteps = torch.tensor([999, 899, 799, 699, 599, 499, 399, 299, 199, 99])
    plan = step_plan(timesteps, RestartSettings(t_min=100, t_max=400, K=2))
    assert [i for i, _ in plan] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 6, 7, 8, 6, 7, 8, 9]
    # before the 10th and 13th steps, x is sent from step 9's noise level (t = 99) back to step 6's (t = 399)
    assert [(k, r) for k, (_, r) in enumerate(plan) if r is not None] == [(9, (9, 6)), (12, (9, 6))]
    assert step_plan(timesteps, RestartSettings(100, 400, K=0)) == [(i, None) for i in range(10)]


@pytest.mark.parametrize("scheduler", ["ddim", "euler"])
def test_restart_calls_the_unet_n_plus_K_times_the_interval_and_renoises_with_the_generator(tiny_pipe, scheduler):
    tiny_pipe.set_scheduler(scheduler)
    calls = []
    handle = tiny_pipe.unet.register_forward_hook(lambda m, args, out: calls.append(1))
    plain = run(tiny_pipe, trace=True)
    n_plain = len(calls)
    restarted = run(tiny_pipe, restart=dict(t_min=100, t_max=400, K=2), trace=True)
    handle.remove()
    times = [float(t) for t in tiny_pipe.scheduler.timesteps]
    j_max, j_min = next(j for j, t in enumerate(times) if t <= 400), next(j for j, t in enumerate(times) if t <= 100)
    assert n_plain == 10 and len(calls) - n_plain == 10 + 2 * (j_min - j_max)  # Algorithm 1: K reruns of [j_max, j_min)
    assert [r.timestep for r in restarted.trace][j_min:j_min + 2] == [times[j_max], times[j_max + 1]]
    # the first restart step's x_{t_max}: x_{t_min} (the plain run's, identical so far) sent forward with the next
    # noise the generator gives after x_T
    generator = seeded(0)
    randn_tensor(plain.trace[0].latents.shape, generator=generator)  # x_T
    noise = randn_tensor(plain.trace[0].latents.shape, generator=generator)
    if scheduler == "ddim":
        alpha_bar = tiny_pipe.scheduler.alphas_cumprod
        expected = diffusion.restart_noised(plain.trace[j_min].latents, noise, alpha_bar[int(times[j_min])],
                                            alpha_bar[int(times[j_max])])
    else:  # sigma units: x + sqrt(sigma_max^2 - sigma_min^2) eps
        sigmas = tiny_pipe.scheduler.sigmas
        expected = diffusion.restart_noised_sigma(plain.trace[j_min].latents, noise, sigmas[j_min], sigmas[j_max])
    torch.testing.assert_close(restarted.trace[j_min].latents, expected, rtol=0, atol=1e-5)
    assert not torch.allclose(restarted.images, plain.images)


def test_restart_noising_is_the_forward_marginal():
    alpha_bar = diffusion.alphas_cumprod(diffusion.make_betas("scaled_linear"))
    a_min, a_max = alpha_bar[100], alpha_bar[400]
    x0 = torch.full((200_000,), 0.7)
    g = torch.Generator().manual_seed(0)
    x_tmin = diffusion.add_noise(x0, torch.randn(x0.shape, generator=g), torch.tensor(100), alpha_bar)
    x_tmax = diffusion.restart_noised(x_tmin, torch.randn(x0.shape, generator=g), a_min, a_max)
    # q(x_{t_max} | x0) = N(sqrt(a_max) x0, 1 - a_max): the forward marginal, as if noised from x0 directly
    assert abs(float(x_tmax.mean()) - 0.7 * float(a_max.sqrt())) < 0.01
    assert abs(float(x_tmax.std()) - float((1 - a_max).sqrt())) < 0.01
    # and with no noise, only the deterministic part sqrt(a_max / a_min) x
    torch.testing.assert_close(diffusion.restart_noised(x_tmin, torch.zeros_like(x_tmin), a_min, a_max),
                               x_tmin * (a_max / a_min).sqrt())
    # the sigma-unit form (Euler's x = x_vp / sqrt(a)) is the same transition: sigma^2 = (1 - a) / a
    noise = torch.randn(x0.shape, generator=g)
    sigma_min, sigma_max = ((1 - a_min) / a_min).sqrt(), ((1 - a_max) / a_max).sqrt()
    torch.testing.assert_close(diffusion.restart_noised_sigma(x_tmin / a_min.sqrt(), noise, sigma_min, sigma_max),
                               diffusion.restart_noised(x_tmin, noise, a_min, a_max) / a_max.sqrt(), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ errors, SDXL, the CLI

@pytest.mark.parametrize("kwargs, scheduler, message", [
    (dict(restart=dict(t_min=100, t_max=400, K=1)), "lms", "use scheduler='ddim' or 'euler'"),
    (dict(dynamic_thresholding=0.99), "euler", "use scheduler 'ddim', 'ddpm' or 'dpm++'"),
    (dict(restart=dict(t_min=400, t_max=100, K=1)), "ddim", "needs t_min < t_max"),
    (dict(restart=dict(t_min=0, t_max=50, K=1)), "ddim", "holds no step of this schedule"),
    (dict(eps_scale=0.0), "ddim", "eps_scale=0.0 must be a number in (0, 10]"),
    (dict(dynamic_thresholding=(0.99, 0.5)), "ddim", "max_value=0.5 must be a number in [1, inf)"),
    (dict(eps_scale=1.0, eps_scale_slope=-0.002), "ddim", "must stay positive for t in [0, 999]"),
])
def test_bad_remedies_are_refused_naming_the_fix(tiny_pipe, kwargs, scheduler, message):
    tiny_pipe.set_scheduler(scheduler)
    with pytest.raises(ValueError, match=re.escape(message)):
        run(tiny_pipe, **kwargs)


def test_eps_scale_is_refused_for_a_v_prediction_model():
    ddim = DDIMScheduler(prediction_type="v_prediction")
    with pytest.raises(ValueError, match="predicts 'v_prediction'"):
        check_remedies(ddim, eps_scale=1.01)
    assert check_remedies(ddim).eps_scale == 1.0


def test_sdxl_samples_with_every_remedy_and_neutral_ones_change_nothing():
    pipe = Pipeline(**build_components("sdxl-tiny", seed=0))
    pipe.set_progress_bar_config(disable=True)
    pipe.set_scheduler("ddim")
    plain = run(pipe, guidance_scale=3.0).images
    assert torch.equal(run(pipe, guidance_scale=3.0, eps_scale=1.0, restart=dict(t_min=100, t_max=400, K=0)).images,
                       plain)
    out = run(pipe, guidance_scale=3.0, eps_scale=1.02, dynamic_thresholding=(0.99, 4.0),
              restart=dict(t_min=100, t_max=400, K=1), trace=True)
    assert len(out.trace) == 10 + 3 and torch.isfinite(out.images).all()
    assert not torch.allclose(out.images, plain)


def test_generate_flags_reach_the_call_and_the_png_records_them(tiny_folder, tmp_path):
    argv = ["generate", "a red circle", "--model", tiny_folder, "--steps", "10", "--seed", "0", "--scheduler",
            "ddim", "--guidance-scale", "1", "--height", "32", "--width", "32", "--eps-scale", "1.01",
            "--dynamic-thresholding", "0.99", "3", "--restart", "100", "400", "1", "--out", str(tmp_path / "a.png")]
    assert main(argv) == 0
    params = read_png_params(str(tmp_path / "a.png"))
    assert params["eps_scale"] == 1.01 and params["dynamic_thresholding"] == [0.99, 3.0]
    assert params["restart"] == [100.0, 400.0, 1] and "eps_scale_slope" not in params
    assert main(argv[:-1] + [str(tmp_path / "b.png")] + ["--eps-scale", "1"]) == 0
    assert "eps_scale" not in read_png_params(str(tmp_path / "b.png"))


def test_generate_refuses_a_bad_restart_before_loading(capsys):
    assert main(["generate", "x", "--model", "/no/such/model", "--restart", "100", "400", "1.5"]) == 2
    err = capsys.readouterr().err
    assert "--restart" in err and "whole number K" in err and "Traceback" not in err


def test_diagnostics_read_a_restarted_trace_step_by_step(ddim_pipe):
    from ldm.diagnostics.sampling import trace_report

    out = run(ddim_pipe, eps_scale=1.01, restart=dict(t_min=100, t_max=400, K=1), trace=True)
    report = trace_report(out.trace, ddim_pipe.scheduler, guidance_scale=1.0)
    assert [row["timestep"] for row in report["steps"]] == [999.0, 899.0, 799.0, 699.0, 599.0, 499.0, 399.0,
                                                            299.0, 199.0, 399.0, 299.0, 199.0, 99.0]
    assert all(row["marginal_w2_mean"] >= 0 for row in report["steps"])


def test_restart_on_euler_img2img_renoises_between_the_edit_schedules_sigmas(tiny_pipe, monkeypatch):
    import ldm.pipelines.drift as drift_module
    from PIL import Image

    tiny_pipe.set_scheduler("euler")
    call = dict(image=Image.new("RGB", (32, 32), (200, 30, 30)), strength=0.8, trace=True)
    plain = run(tiny_pipe, **call)
    monkeypatch.setattr(drift_module, "randn_tensor", lambda shape, **kw: torch.ones(shape, dtype=kw["dtype"]))
    restarted = run(tiny_pipe, restart=dict(t_min=100, t_max=400, K=1), **call)
    times = [float(t) for t in tiny_pipe.scheduler.timesteps]
    start = len(times) - len(plain.trace)  # strength 0.8 of 10 steps: the last 8
    j_max, j_min = (next(j for j, t in enumerate(times[start:]) if t <= bound) for bound in (400, 100))
    sigmas = tiny_pipe.scheduler.sigmas
    lift = float((sigmas[start + j_max] ** 2 - sigmas[start + j_min] ** 2).sqrt())  # the noise is all ones here
    torch.testing.assert_close(restarted.trace[j_min].latents, plain.trace[j_min].latents + lift)
    assert tiny_pipe.scheduler.step_index == len(times)  # the rewound sampler still ends on the schedule's last step
    assert len(restarted.trace) == len(plain.trace) + (j_min - j_max)
