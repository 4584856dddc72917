"""Guidance methods beyond plain CFG (pipelines/guidance.py): the guidance interval, adaptive projected guidance and
CFG-Zero*, as closed forms on small tensors, in the pipeline (calls saved, trace, defaults off), in `ldm generate`."""
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from ldm import Pipeline, diffusion
from ldm.cli import main
from ldm.images import read_png_params
from ldm.models.presets import build_components
from ldm.objectives import NoiseSchedule, make_objective, objective_for
from ldm.pipelines.guidance import (APGSettings, Guidance, apg_combine, cap_norm, cfg_combine, cfg_zero_star_combine,
                                    optimized_scale, prediction_from_x0, project)

from conftest import seeded

pytestmark = pytest.mark.usefixtures("one_thread")


def column(*values):
    """Returns one sample per row of `values`, each a (1, 2, 2) latent: shape (B, 1, 2, 2)."""
    return torch.tensor(values, dtype=torch.float32).reshape(len(values), 1, 2, 2)


class CountCalls:
    """Counts the denoiser's forward calls and the batch size of each."""

    def __init__(self, module):
        self.batch = []
        self.handle = module.register_forward_hook(lambda m, args, out: self.batch.append(args[0].shape[0]))


# ------------------------------------------------------------------ closed forms

def test_project_splits_into_parallel_and_orthogonal_parts():
    onto, v = column([2, 0, 0, 0], [0, 0, 0, -1]), column([3, 4, 0, 0], [1, 2, 3, 4])
    parallel, orthogonal = project(v, onto)
    torch.testing.assert_close(parallel, column([3, 0, 0, 0], [0, 0, 0, 4]))
    torch.testing.assert_close(orthogonal, column([0, 4, 0, 0], [1, 2, 3, 0]))


def test_apg_with_eta_0_removes_exactly_the_component_parallel_to_the_conditional_x0():
    x0_cond = column([1, 0, 0, 0])
    x0_uncond = x0_cond - column([3, 4, 0, 0])  # D = (3, 4, 0, 0): parallel part (3, 0, 0, 0), orthogonal (0, 4, 0, 0)
    settings = APGSettings(eta=0.0, norm_threshold=0.0, momentum=0.0)
    guided, _ = apg_combine(x0_uncond, x0_cond, 3.0, settings)
    torch.testing.assert_close(guided, column([1, 8, 0, 0]))  # x0_cond + (w - 1) D_orthogonal
    assert float(((guided - x0_cond) * x0_cond).sum()) == 0.0
    half, _ = apg_combine(x0_uncond, x0_cond, 3.0, APGSettings(eta=0.5, norm_threshold=0.0, momentum=0.0))
    torch.testing.assert_close(half, column([4, 8, 0, 0]))  # + (w - 1) eta D_parallel


def test_apg_with_eta_1_and_no_cap_or_momentum_is_plain_cfg():
    g = torch.Generator().manual_seed(0)
    x0_uncond, x0_cond = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    guided, _ = apg_combine(x0_uncond, x0_cond, 7.5, APGSettings(eta=1.0, norm_threshold=0.0, momentum=0.0))
    torch.testing.assert_close(guided, cfg_combine(x0_uncond, x0_cond, 7.5))


def test_norm_threshold_caps_the_update_norm_per_sample_and_keeps_its_direction():
    update = column([3, 4, 0, 0], [0.3, 0.4, 0, 0], [0, 0, 0, 0])  # norms 5, 0.5, 0
    capped = cap_norm(update, 1.0)
    torch.testing.assert_close(capped, column([0.6, 0.8, 0, 0], [0.3, 0.4, 0, 0], [0, 0, 0, 0]))
    x0_cond = column([0, 0, 1, 0])  # orthogonal to D: with eta = 1 the guided step is (w - 1) capped D
    guided, _ = apg_combine(x0_cond - column([3, 4, 0, 0]), x0_cond, 2.0,
                            APGSettings(eta=1.0, norm_threshold=2.0, momentum=0.0))
    torch.testing.assert_close(guided - x0_cond, column([1.2, 1.6, 0, 0]))


def test_momentum_accumulates_the_running_average_and_restarts_with_each_guidance():
    x0_cond = column([0, 0, 0, 1])
    updates = [column([1, 0, 0, 0]), column([0, 2, 0, 0]), column([4, 0, 0, 0])]
    expected_average = [updates[0]]  # D_bar_t = D_t + beta D_bar_{t-1}, beta = -0.5
    for d in updates[1:]:
        expected_average.append(d - 0.5 * expected_average[-1])
    guidance = Guidance(3.0, apg=APGSettings(eta=1.0, norm_threshold=0.0, momentum=-0.5))
    identity = lambda pred: pred  # noqa: E731  (an x0-predicting model: x0 = pred)
    for d, average in zip(updates, expected_average):
        guided = guidance.combine(x0_cond - d, x0_cond, identity)
        torch.testing.assert_close(guidance.apg_average, average)
        torch.testing.assert_close(guided, x0_cond + 2.0 * average)  # D_bar orthogonal to x0_cond here
    fresh = Guidance(3.0, apg=guidance.apg)  # a new call: the first step sees its own D only
    torch.testing.assert_close(fresh.combine(x0_cond - updates[2], x0_cond, identity), x0_cond + 2.0 * updates[2])


def test_optimized_scale_is_the_projection_coefficient():
    uncond, cond = column([1, 1, 0, 0], [0, 2, 0, 0]), column([3, 1, 5, 0], [1, 1, 1, 1])
    torch.testing.assert_close(optimized_scale(uncond, cond).flatten(), torch.tensor([2.0, 0.5]))  # 4/2, 2/4
    g = torch.Generator().manual_seed(1)
    uncond, cond = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    s_star = optimized_scale(uncond, cond)
    residual = lambda s: ((cond - s * uncond) ** 2).flatten(1).sum(1)  # noqa: E731
    assert (residual(s_star) < residual(s_star + 1e-2)).all() and (residual(s_star) < residual(s_star - 1e-2)).all()


def test_cfg_zero_star_with_uncond_a_multiple_of_cond():
    cond = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    c = torch.tensor([2.0, -4.0]).view(2, 1, 1, 1)
    uncond = c * cond
    torch.testing.assert_close(optimized_scale(uncond, cond).flatten(), torch.tensor([0.5, -0.25]))  # s* = 1 / c
    # s* uncond = cond: the guided prediction is the conditional one, where plain CFG would extrapolate
    torch.testing.assert_close(cfg_zero_star_combine(uncond, cond, 7.5), cond)
    assert not torch.allclose(cfg_combine(uncond, cond, 7.5), cond)


def test_zero_init_steps_predict_zero_and_skip_the_unconditional_branch():
    guidance = Guidance(5.0, cfg_zero_star=True, zero_init_steps=2)
    pred = torch.ones(1, 4, 2, 2)
    assert [guidance.uses_uncond(i, 500.0) for i in range(4)] == [False, False, True, True]
    assert torch.equal(guidance.unguided(1, pred), torch.zeros_like(pred)) and guidance.unguided(2, pred) is pred


@pytest.mark.parametrize("name", ["epsilon", "v_prediction", "sample", "flow"])
def test_x0_space_round_trip_for_every_objective(name):
    objective = make_objective(name, NoiseSchedule.from_betas(diffusion.make_betas("linear")))
    g = torch.Generator().manual_seed(3)
    x_t, pred, other = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    to_x0 = lambda p: objective.to_x0(p, x_t, 700.0)  # noqa: E731  (sigma = 0.7 for flow)
    torch.testing.assert_close(prediction_from_x0(to_x0(other), pred, to_x0(pred), to_x0), other, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------ in the pipeline

def ddim_timesteps(pipe, steps):
    pipe.scheduler.set_timesteps(steps)
    return [float(t) for t in pipe.scheduler.timesteps]


def test_interval_skips_the_unconditional_branch_with_one_call_on_b_rows(tiny_pipe):
    tiny_pipe.set_scheduler("ddim")
    t = ddim_timesteps(tiny_pipe, 6)  # descending
    counter = CountCalls(tiny_pipe.unet)
    out = tiny_pipe(["a red circle", "a blue square"], num_inference_steps=6, guidance_scale=7.5, output_type="latent",
                    guidance_interval=(t[3], t[1]), trace=True, generator=seeded())
    assert counter.batch == [2, 4, 4, 4, 2, 2]  # B rows outside [t_lo, t_hi], 2B inside: 3 of 6 steps at half cost
    guided = [r.noise_pred_uncond is not None for r in out.trace]
    assert guided == [False, True, True, True, False, False] and [r.timestep for r in out.trace] == t
    for record in out.trace:
        if record.noise_pred_uncond is None:  # w(sigma) = 1: the conditional prediction alone
            assert torch.equal(record.noise_pred, record.noise_pred_cond)
        else:
            torch.testing.assert_close(record.noise_pred, cfg_combine(record.noise_pred_uncond,
                                                                      record.noise_pred_cond, 7.5))


@pytest.mark.slow
def test_defaults_off_are_bit_identical_to_a_call_without_them(tiny_pipe):
    call = dict(prompt=["a red circle"], num_inference_steps=4, num_images_per_prompt=2, output_type="np",
                negative_prompt=["blurry"])
    plain = tiny_pipe(**call, generator=seeded(5)).images
    off = tiny_pipe(**call, generator=seeded(5), guidance_interval=None, apg=None, cfg_zero_star=False,
                    cfg_zero_init_steps=0).images
    everywhere = tiny_pipe(**call, generator=seeded(5), guidance_interval=(0, 1000)).images
    assert np.array_equal(plain, off) and np.array_equal(plain, everywhere) and plain.std() > 0.01
    # APG reduced to CFG (eta 1, no cap, no momentum) differs only by the x0 round trip's rounding
    apg_as_cfg = tiny_pipe(**call, generator=seeded(5), apg=dict(eta=1.0, norm_threshold=0.0, momentum=0.0)).images
    assert np.abs(apg_as_cfg - plain).max() < 1e-3


def test_apg_guides_in_x0_space_and_its_momentum_restarts_every_call(tiny_pipe):
    call = dict(prompt=["a red circle"], num_inference_steps=5, guidance_scale=9.0, output_type="latent", trace=True)
    a = tiny_pipe(**call, generator=seeded(), apg=dict(norm_threshold=2.0))
    b = tiny_pipe(**call, generator=seeded(), apg=dict(norm_threshold=2.0))
    assert torch.equal(a.images, b.images)  # no running average carried over from the first call
    assert (a.images - tiny_pipe(**call, generator=seeded()).images).abs().max() > 1e-2
    # an epsilon model guided in x0 space: at eta = 0 the guided x0 leaves x0_cond orthogonally to it (DDIM's
    # model input is x_t itself, which the trace records)
    first, to_x0 = a.trace[0], objective_for(tiny_pipe.scheduler).to_x0
    assert tiny_pipe.scheduler.config.prediction_type == "epsilon"
    x0_cond = to_x0(first.noise_pred_cond, first.latents, first.timestep)
    x0_guided = to_x0(first.noise_pred, first.latents, first.timestep)
    cosine = torch.nn.functional.cosine_similarity((x0_guided - x0_cond).flatten(1), x0_cond.flatten(1))
    assert cosine.abs().max() < 1e-4 and (x0_guided - x0_cond).abs().max() > 1e-2


def flow_pipe():
    components = build_components("tiny", seed=0)
    components["scheduler"] = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
    pipe = Pipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_cfg_zero_star_on_a_flow_model_stands_still_during_zero_init():
    pipe = flow_pipe()
    out = pipe("a red circle", num_inference_steps=5, guidance_scale=4.0, output_type="latent", trace=True,
               cfg_zero_star=True, cfg_zero_init_steps=1, generator=seeded())
    first, second = out.trace[0], out.trace[1]
    assert torch.equal(first.noise_pred, torch.zeros_like(first.noise_pred)) and first.noise_pred_uncond is None
    assert torch.equal(second.latents, first.latents)  # zero velocity: x_sigma unchanged by the Euler step
    s_star = optimized_scale(second.noise_pred_uncond, second.noise_pred_cond)
    torch.testing.assert_close(second.noise_pred, cfg_combine(s_star * second.noise_pred_uncond,
                                                              second.noise_pred_cond, 4.0))
    # interval in flow units: t = sigma * 1000
    sigma_steps = [r.timestep for r in out.trace]
    counter = CountCalls(pipe.unet)
    pipe("a red circle", num_inference_steps=5, guidance_scale=4.0, output_type="latent",
         guidance_interval=(sigma_steps[2], sigma_steps[1]), generator=seeded())
    assert counter.batch == [1, 2, 2, 1, 1]


@pytest.mark.parametrize("kwargs, message", [
    (dict(guidance_interval=(800, 200)), "guidance_interval=(800, 200) starts after it ends"),
    (dict(guidance_interval=(-5, 200)), "guidance_interval=(-5, 200) has a negative"),
    (dict(guidance_interval=(1, 2, 3)), "guidance_interval=(1, 2, 3) is not a pair of numbers"),
    (dict(apg=dict(norm_threshold=-1.0)), "apg norm_threshold=-1.0 must be >= 0"),
    (dict(apg=dict(eta=-0.5)), "apg eta=-0.5 must be >= 0"),
    (dict(apg=dict(momentum=1.5)), "apg momentum=1.5 must be in (-1, 1)"),
    (dict(apg=dict(beta=0.5)), "apg has unknown keys ['beta']"),
    (dict(apg="yes"), "apg must be True, a dict"),
    (dict(apg=True, cfg_zero_star=True), "apg and cfg_zero_star are two rules"),
    (dict(cfg_zero_init_steps=-1), "cfg_zero_init_steps=-1 must be an integer in [0, 4)"),
    (dict(cfg_zero_init_steps=4), "cfg_zero_init_steps=4 must be an integer in [0, 4)"),
])
def test_bad_inputs_raise_before_any_work_naming_the_parameter(tiny_pipe, kwargs, message):
    counter = CountCalls(tiny_pipe.unet)
    with pytest.raises(ValueError) as error:
        tiny_pipe("x", num_inference_steps=4, output_type="latent", **kwargs)
    assert message in str(error.value) and counter.batch == []


# ------------------------------------------------------------------ ldm generate

@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "tiny"
    assert main(["create-model", "--preset", "tiny", "--out", str(path)]) == 0
    return str(path)


@pytest.mark.slow
def test_generate_with_interval_and_apg_records_them(tiny_model, tmp_path):
    argv = ["generate", "a red circle", "--model", tiny_model, "--steps", "4", "--seed", "3", "--scheduler", "ddim",
            "--guidance-interval", "200", "800", "--apg", "--apg-norm-threshold", "5", "--apg-momentum", "-0.25",
            "--cfg-zero-init-steps", "1", "--out", str(tmp_path / "a.png")]
    assert main(argv) == 0
    params = read_png_params(str(tmp_path / "a.png"))
    assert params["guidance_interval"] == [200.0, 800.0] and params["cfg_zero_init_steps"] == 1
    assert (params["apg_eta"], params["apg_norm_threshold"], params["apg_momentum"]) == (0.0, 5.0, -0.25)
    assert main(["generate", "x", "--model", tiny_model, "--steps", "3", "--cfg-zero-star",
                 "--out", str(tmp_path / "b.png")]) == 0
    params = read_png_params(str(tmp_path / "b.png"))
    assert params["cfg_zero_star"] is True and "apg_eta" not in params and "guidance_interval" not in params


@pytest.mark.parametrize("flags, message", [
    (["--apg-eta", "0.5"], "--apg-eta set adaptive projected guidance, which is off; add --apg"),
    (["--guidance-interval", "800", "200"], "guidance_interval=(800.0, 200.0) starts after it ends"),
    (["--apg", "--cfg-zero-star"], "apg and cfg_zero_star are two rules"),
])
def test_generate_refuses_bad_guidance_flags_in_one_line_before_loading(capsys, flags, message):
    assert main(["generate", "x", "--model", "/no/such/model", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and "does not exist" not in err


def test_every_named_guidance_method_has_its_call_keywords():
    from ldm.evaluation.guidance_sweep import METHODS, SweepConfig
    from ldm.pipelines.guidance import GUIDANCE_METHODS

    assert tuple(METHODS) == GUIDANCE_METHODS
    assert all(isinstance(METHODS[name](SweepConfig(interval=(100.0, 800.0))), dict) for name in GUIDANCE_METHODS)
