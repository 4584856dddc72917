"""Objectives own their behaviour: a new one is one class plus its registration, trained and sampled by the
library without an edit there; the built-in ones answer what they predict through their classes."""
import os

import pytest
import torch

from ldm import diffusion
from ldm.objectives import OBJECTIVES, NoiseSchedule, ObjectiveSettings, VPDiffusion, make_objective, register

pytestmark = pytest.mark.usefixtures("one_thread")


class NoisyHalfEpsilon(VPDiffusion):
    """A new objective, written as a user would: predicts eps (so diffusers' DDIM samples it) but trains only on
    the noisier half of the schedule, each sample weighted by its noise level t / T."""
    name = "noisy_half_epsilon"
    prediction_type = "epsilon"
    drawn: list = []                       # the training times it handed out, to show the trainer used them

    def sample_timesteps(self, batch, generator):
        half = self.schedule.num_train_timesteps // 2
        t = torch.randint(half, self.schedule.num_train_timesteps, (batch,), generator=generator)
        NoisyHalfEpsilon.drawn.append(t)
        return t

    def target(self, x0, noise, t):
        return noise

    def x0_and_eps(self, prediction, x_t, a):
        return diffusion.eps_to_x0(prediction, x_t, a), prediction

    def weight(self, t):  # its own weighting (so VPDiffusion's, through eps_loss_factor, is not needed)
        return t.float() / self.schedule.num_train_timesteps


@pytest.fixture()
def registered():
    register(NoisyHalfEpsilon)
    NoisyHalfEpsilon.drawn.clear()
    yield NoisyHalfEpsilon
    OBJECTIVES.pop(NoisyHalfEpsilon.name)


def test_a_new_objective_in_a_test_file_trains_and_samples_without_a_library_edit(registered, tmp_path):
    from ldm import Pipeline
    from ldm.training import train_ldm
    from ldm.training.ldm_config import TrainLDMConfig

    cfg = TrainLDMConfig(model="tiny", data="shapes:16@32", resolution=32, batch_size=4, max_steps=2,
                         learning_rate=1e-3, lr_warmup_steps=0, output_dir=str(tmp_path / "run"), checkpoint_every=1000,
                         validation_every=1000, num_validation_prompts=0, val_loss_samples=4, report_to="none",
                         log_every=0, use_ema=False, prediction_type=registered.name)
    cfg.validate()  # the config's choices are the registered objectives
    result = train_ldm.main(cfg)
    assert len(registered.drawn) == 2 and all((t >= 500).all() for t in registered.drawn)  # its own times
    assert all(torch.isfinite(torch.tensor(loss)) for loss in result["losses"].values())
    pipe = Pipeline.from_pretrained(os.path.join(result["checkpoint"], "pipeline"))
    assert pipe.scheduler.config.prediction_type == "epsilon"  # what its scheduler() saved
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a red circle", num_inference_steps=2, guidance_scale=2.0, height=32, width=32, trace=True,
               output_type="latent", generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 4, 4, 4) and torch.isfinite(out.images).all()
    objective = make_objective(registered.name, NoiseSchedule.from_scheduler_config(pipe.scheduler.config))
    for step in out.trace:  # its x0 from a prediction is the sampler's (DDIM's pred_original_sample)
        torch.testing.assert_close(objective.to_x0(step.noise_pred, step.latents, step.timestep).float(),
                                   step.x0_pred, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["epsilon", "v_prediction", "sample"])
def test_each_objectives_class_gives_what_the_diffusers_type_names(name):
    """The classes' own target, conversions and weights agree with diffusion's functions of the type's name."""
    betas = diffusion.make_betas("scaled_linear", 1000)
    objective = make_objective(name, NoiseSchedule.from_betas(betas), ObjectiveSettings("min_snr"))
    g = torch.Generator().manual_seed(0)
    x0, noise, t = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g), torch.tensor([5, 400, 990])
    x_t = objective.noised(x0, noise, t)
    target = objective.target(x0, noise, t)
    torch.testing.assert_close(target, diffusion.training_target(x0, noise, t, objective.schedule.alpha_bar, name))
    torch.testing.assert_close(objective.weight(t), diffusion.loss_weights(t, betas, "min_snr", name))
    found = objective.parameterisations(target, x_t, objective.schedule.alpha_bar[t])
    assert all(torch.allclose(found[k], v) for k, v in
               diffusion.to_parameterisations(target, x_t, objective.schedule.alpha_bar[t], name).items())
    torch.testing.assert_close(found["x0"].float(), x0, atol=1e-3, rtol=1e-3)  # the truth, recovered
    torch.testing.assert_close(found["eps"].float(), noise, atol=1e-3, rtol=1e-3)
