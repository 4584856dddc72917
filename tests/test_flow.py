"""Flow matching (ldm/objectives/flow.py): the formulas, a short run that learns, a checkpoint that diffusers opens and
samples identically, the samplers that can and cannot sample it, and the settings that cannot go with it."""
import os

import numpy as np
import pytest
import torch
from conftest import diffusers_pair

from ldm import diffusion
from ldm.objectives import NoiseSchedule, ObjectiveSettings, make_objective, objective_for
from ldm.training import train_ldm
from ldm.training.ldm_config import TrainLDMConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def flow(**settings):
    return make_objective("flow", NoiseSchedule.from_betas(diffusion.make_betas("linear")), ObjectiveSettings(**settings))


def test_path_target_and_x0_are_consistent():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(6, 4, 8, 8, generator=g), torch.randn(6, 4, 8, 8, generator=g)
    objective = flow()
    sigma = objective.sample_timesteps(6, g)
    x_t = objective.noised(x0, noise, sigma)
    v = objective.target(x0, noise, sigma)
    torch.testing.assert_close(x_t, x0 + sigma.view(-1, 1, 1, 1) * v)  # a straight line with velocity eps - x0
    torch.testing.assert_close(objective.to_x0(v, x_t, objective.model_time(sigma)), x0, atol=1e-5, rtol=0)
    torch.testing.assert_close(diffusion.flow_to_noise(v, x_t, sigma), noise, atol=1e-5, rtol=0)
    assert torch.equal(objective.weight(sigma), torch.ones(6))


def test_shift_is_diffusers_flow_match_shift():
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(10)
    # diffusers spaces the sampling sigmas evenly between 1 and its (already shifted) sigma_min, then shifts them
    plain = torch.linspace(1.0, scheduler.sigma_min, 10, dtype=torch.float64)
    torch.testing.assert_close(diffusion.shift_sigmas(plain, 3.0).float(), scheduler.sigmas[:-1], atol=1e-6, rtol=0)
    assert diffusion.resolution_shift(512) == 2.0  # sqrt(512^2 / 256^2), SD3 Eq. 23


@pytest.mark.parametrize("sampling", ["uniform", "logit_normal", "mode", "cosmap"])
def test_training_times_lie_in_0_1_and_follow_the_density(sampling):
    sigma = flow(timestep_sampling=sampling).sample_timesteps(20000, torch.Generator().manual_seed(1)).double()
    assert 0 <= sigma.min() and sigma.max() <= 1
    middle = ((sigma > 0.25) & (sigma < 0.75)).double().mean().item()
    # in the middle half: uniform 1/2; logit-normal P(|n| < logit(3/4) = 1.0986) = 0.728 (SD3 Eq. 19); mode with
    # s = 1.29 and cosmap lean on the middle too (Eq. 20, 21)
    expected = {"uniform": (0.48, 0.52), "logit_normal": (0.71, 0.75), "mode": (0.70, 0.77), "cosmap": (0.56, 0.62)}
    lo, hi = expected[sampling]
    assert lo < middle < hi, (sampling, middle)


def test_shift_moves_training_toward_noise():
    g = lambda: torch.Generator().manual_seed(2)  # noqa: E731
    assert flow(flow_shift=3.0).sample_timesteps(5000, g()).mean() > flow().sample_timesteps(5000, g()).mean() + 0.1


def tiny_flow_config(tmp_path, **overrides) -> TrainLDMConfig:
    base = dict(model="tiny", data="shapes:48@32", resolution=32, batch_size=8, max_steps=30, learning_rate=2e-3,
                lr_warmup_steps=0, output_dir=str(tmp_path / "flow"), checkpoint_every=1000, validation_every=10,
                num_validation_prompts=0, val_loss_samples=4, report_to="none", log_every=0, ema_decay=0.9,
                prediction_type="flow", timestep_sampling="logit_normal", flow_shift=2.0)
    return TrainLDMConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def flow_run(tmp_path_factory):
    cfg = tiny_flow_config(tmp_path_factory.mktemp("flow"))
    cfg.validate()
    return train_ldm.main(cfg)


@pytest.mark.slow
def test_short_flow_run_lowers_its_validation_loss(flow_run):
    losses = [v["val_loss"] for v in flow_run["val"]]
    assert len(losses) == 3 and losses[-1] < 0.8 * losses[0], losses


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_checkpoint_opens_in_diffusers_and_samples_the_same_images(flow_run, sampler):
    from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler

    ours, theirs = diffusers_pair(os.path.join(flow_run["checkpoint"], "pipeline"))
    assert isinstance(theirs.scheduler, FlowMatchEulerDiscreteScheduler) and theirs.scheduler.config.shift == 2.0
    ours.set_scheduler(sampler)
    if sampler == "heun":
        theirs.scheduler = FlowMatchHeunDiscreteScheduler.from_config(ours.scheduler.config)
    # StableDiffusionPipeline's loop needs init_noise_sigma, which diffusers' flow schedulers lack (x_1 = eps)
    theirs.scheduler.init_noise_sigma = 1.0
    call = dict(prompt=["a red circle on the left", "a blue square"], negative_prompt=["", "a green circle"],
                guidance_scale=4.0, num_inference_steps=6, height=64, width=64, output_type="np")
    a = ours(**call, generator=torch.Generator().manual_seed(7)).images
    b = theirs(**call, generator=torch.Generator().manual_seed(7)).images
    assert a.shape == b.shape == (2, 64, 64, 3) and a.std() > 0.01
    assert np.abs(a - b).max() <= 1e-4


@pytest.mark.slow
def test_trace_and_x0_of_a_flow_model(flow_run):
    from ldm import Pipeline

    pipe = Pipeline.from_pretrained(os.path.join(flow_run["checkpoint"], "pipeline"))
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a red circle", num_inference_steps=5, guidance_scale=3.0, trace=True, output_type="latent",
               generator=torch.Generator().manual_seed(0))
    assert len(out.trace) == 5 and objective_for(pipe.scheduler).name == "flow"
    last = out.trace[-1]  # Euler's last step lands on x0_pred: x_0 = x_s - s v
    torch.testing.assert_close(out.images.float().cpu(), last.x0_pred, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_samplers_that_cannot_sample_flow_say_which_can(flow_run):
    from diffusers import DDIMScheduler

    from ldm import Pipeline

    pipe = Pipeline.from_pretrained(os.path.join(flow_run["checkpoint"], "pipeline"))
    for name in ("lms", "ddpm", "ddim", "dpm++"):
        with pytest.raises(ValueError, match="cannot sample a flow-matching model.*euler, heun"):
            pipe.set_scheduler(name)
    with pytest.raises(ValueError, match="DDIMScheduler cannot sample a flow-matching model"):
        pipe.set_scheduler(DDIMScheduler())


@pytest.mark.parametrize("overrides, message", [
    (dict(zero_terminal_snr=True), "zero_terminal_snr does not apply to prediction_type flow"),
    (dict(weighting="min_snr"), "keep --weighting uniform and choose the density"),
    (dict(weighting="vlb"), "timestep_sampling logit_normal, mode or cosmap"),
])
def test_impossible_flow_settings_say_what_to_use(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_flow_config(tmp_path, **overrides).validate()


@pytest.mark.slow
def test_lora_finetuning_a_flow_model_trains_with_its_objective(flow_run, tmp_path, monkeypatch):
    from ldm.data.shapes import SceneObject, render_scene
    from ldm.training import finetune, step
    from ldm.training.finetune_config import FinetuneConfig

    seen = []
    original = step.diffusion_loss
    monkeypatch.setattr(step, "diffusion_loss", lambda *a, **k: (seen.append(a[3].name), original(*a, **k))[1])
    art = tmp_path / "art"
    art.mkdir()
    for i in range(5):
        render_scene([SceneObject("square", "blue", "right")], 32, (200, 40 * i, 30)).save(art / f"{i}.png")
    cfg = FinetuneConfig(model=os.path.join(flow_run["checkpoint"], "pipeline"), data=str(art), out=str(tmp_path / "ft"),
                         instance_prompt="sks art", resolution=32, max_steps=3, batch_size=2, learning_rate=1e-3,
                         validation_every=3, num_validation_samples=1, validation_sample_steps=2, device="cpu")
    cfg.validate()
    report = finetune.main(cfg)
    assert set(seen) == {"flow"} and report["steps"] == 3 and os.path.exists(report["outputs"]["lora"])
    assert all(np.isfinite(v) for v in report["losses"].values())
    # the LoRA loads onto the flow pipeline: scale 1 changes its images, scale 0 gives the base model's exactly
    from ldm import Pipeline

    pipe = Pipeline.from_pretrained(cfg.model)
    pipe.set_progress_bar_config(disable=True)
    sample = lambda **k: pipe("sks art", num_inference_steps=3, output_type="np",  # noqa: E731
                              generator=torch.Generator().manual_seed(0), **k).images
    base = sample()
    pipe.load_lora_weights(report["outputs"]["lora"])
    adapted, off = sample(), sample(cross_attention_kwargs={"scale": 0.0})
    assert np.isfinite(adapted).all() and np.abs(adapted - base).max() > 1e-3 and np.abs(off - base).max() <= 1e-5


@pytest.mark.slow
def test_demo_with_flow_grades_with_euler_and_heun(tmp_path):
    from ldm.training.demo import DemoConfig, run_demo

    cfg = DemoConfig(out=str(tmp_path), minutes=30.0, model="tiny", num_samples=32, vae_steps=3, vae_batch_size=8,
                     ldm_steps=3, ldm_batch_size=8, num_prompts=2, sample_steps=2, threads=1, prediction_type="flow")
    report = run_demo(cfg)
    assert set(report["adherence"]) == {"euler", "heun"} and report["ldm_steps"] == 3
