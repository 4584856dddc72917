"""Training-side remedies for exposure bias (issue #35) in the one training loss, ldm.training.step.diffusion_loss:
input perturbation (DDPM-IP, Ning et al. 2023) and the self step (the model's own DDIM step from x_{t+k}). Each off
is plain training bit for bit; each on is checked against its closed form on tiny stand-ins and the tiny UNet."""
import json
import os

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_finetune_resume import art  # noqa: F401 - five 32 px pictures for the finetune test
from test_finetune_resume import run as finetune_run

from ldm import diffusion
from ldm.models.denoiser import denoise
from ldm.models.presets import build_components
from ldm.objectives import NoiseSchedule, ObjectiveSettings, make_objective
from ldm.training import step, train_ldm
from ldm.training.config import parse_config
from ldm.training.ldm_config import TrainLDMConfig
from ldm.training.step import LossSpec, diffusion_loss

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (6, 4, 8, 8)
CONTEXT = torch.zeros(SHAPE[0], 77, 32)


def objective(name: str):
    return make_objective(name, NoiseSchedule.from_betas(diffusion.make_betas("scaled_linear", 1000)))


def x0_batch() -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(7))


def plain_diffusion_loss(model, latents, context, objective, spec, generator):
    """The training loss as it was before the remedies (Algorithm 1, Ho et al. 2020): the reference."""
    t = objective.sample_timesteps(latents.shape[0], generator)
    noise = diffusion.offset_noise(torch.randn(latents.shape, generator=generator), spec.offset_noise, generator)
    pred = denoise(model, objective.noised(latents, noise, t), objective.model_time(t), context)
    per_sample = diffusion.per_sample_loss(pred, objective.target(latents, noise, t), spec.loss, spec.huber_c)
    return (objective.weight(t).to(per_sample) * per_sample).mean()


class Recorder(torch.nn.Module):
    """A 1x1-convolution denoiser (scale 0: predicts zeros) that records each call's input and grad mode."""

    def __init__(self, scale: float = 0.0):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 1)
        with torch.no_grad():
            self.conv.weight.copy_(scale * torch.eye(4).reshape(4, 4, 1, 1))
            self.conv.bias.zero_()
        self.calls = []

    def forward(self, latents, time, context, pooled=None):
        self.calls.append((latents.detach().clone(), torch.is_grad_enabled()))
        return self.conv(latents)


class StandIn(torch.nn.Module):
    """Predicts the objective's exact target for a known x0 (the closed-form stand-in for a perfect model), plus
    `error` in the calls with gradients (the trained prediction), or in every call with `error_everywhere`."""

    def __init__(self, objective, x0: torch.Tensor, error: torch.Tensor, error_everywhere: bool = False):
        super().__init__()
        self.objective, self.x0, self.error, self.everywhere = objective, x0, error, error_everywhere
        self.weight = torch.nn.Parameter(torch.ones(()))
        self.inputs = []

    def forward(self, latents, time, context, pooled=None):
        self.inputs.append(latents.detach().clone())
        a = diffusion.broadcast_alpha_bar(self.objective.schedule.alpha_bar[time], latents)  # (B, 1, 1, 1)
        eps = diffusion.x0_to_eps(self.x0, latents, a)  # the noise this x_t was made with
        exact = self.objective.target(self.x0, eps, time).float()
        return self.weight * exact + (self.error if torch.is_grad_enabled() or self.everywhere else 0)


@pytest.fixture(scope="module")
def unet():
    return build_components("tiny", seed=0)["unet"]


@pytest.mark.parametrize("name", ["epsilon", "v_prediction", "sample", "flow"])
@pytest.mark.parametrize("spec", [LossSpec(), LossSpec(loss="huber", offset_noise=0.05, input_perturbation=0.0,
                                                     self_step_prob=0.0, self_step_k=50)])
def test_remedies_off_are_plain_training_bit_for_bit(unet, name, spec):
    """Input perturbation 0 and self-step probability 0 give the pre-remedy loss and gradients exactly, and draw
    nothing more from the step's generator (so every later draw, and a resumed run, is unchanged)."""
    obj, x0 = objective(name), x0_batch()
    ours, theirs = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    unet.zero_grad()
    loss, _ = diffusion_loss(unet, x0, CONTEXT, obj, spec, ours)
    loss.backward()
    grads = [p.grad.clone() for p in unet.parameters()]
    unet.zero_grad()
    expected = plain_diffusion_loss(unet, x0, CONTEXT, obj, spec, theirs)
    expected.backward()
    assert torch.equal(loss, expected)
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, unet.parameters()))
    assert torch.equal(torch.rand(4, generator=ours), torch.rand(4, generator=theirs))


@pytest.mark.parametrize("name", ["epsilon", "flow"])
def test_input_perturbation_changes_the_input_and_not_the_target(name):
    """DDPM-IP, Eq. (9)-(10), Ning et al. 2023: the input is made with eps + gamma xi (xi the next draw after the
    noise); the target stays eps (flow: the path's noise end is perturbed, the target stays eps - x0)."""
    obj, x0, gamma = objective(name), x0_batch(), 0.1
    model = Recorder()  # predicts 0: the loss is the target's own size, whatever the input
    loss, per_sample = diffusion_loss(model, x0, CONTEXT, obj, LossSpec(input_perturbation=gamma),
                                      torch.Generator().manual_seed(5))
    replay = torch.Generator().manual_seed(5)
    t = obj.sample_timesteps(SHAPE[0], replay)
    noise = torch.randn(SHAPE, generator=replay)
    xi = torch.randn(SHAPE, generator=replay)
    if name == "flow":
        s = t.reshape(-1, 1, 1, 1)
        x_t, target = (1 - s) * x0 + s * (noise + gamma * xi), noise - x0
    else:
        a = obj.schedule.alpha_bar[t].float().reshape(-1, 1, 1, 1)
        x_t, target = a.sqrt() * x0 + (1 - a).sqrt() * (noise + gamma * xi), noise
    (seen, grad_mode), = model.calls
    torch.testing.assert_close(seen, x_t)
    torch.testing.assert_close(per_sample, target.pow(2).flatten(1).mean(1))
    # a model that reads its input sees the perturbation: the loss differs from the unperturbed one
    args = (x0, CONTEXT, obj)
    plain = diffusion_loss(Recorder(0.5), *args, LossSpec(), torch.Generator().manual_seed(5))[0]
    perturbed = diffusion_loss(Recorder(0.5), *args, LossSpec(input_perturbation=gamma),
                               torch.Generator().manual_seed(5))[0]
    assert abs(plain.item() - perturbed.item()) > 1e-4


@pytest.mark.parametrize("name", ["epsilon", "v_prediction", "sample"])
def test_self_step_of_an_exact_model_is_the_forward_x_t_and_the_plain_loss(name):
    """With p = 1, a model exact in its DDIM step lands on the forward-process x_t (Eq. (12), Song et al. 2021, is
    exact for the true eps), so the trained input, the target and the loss are the plain ones; a model that errs in
    that step trains on another x_t, toward the noise that maps that x_t back to x0."""
    obj, x0 = objective(name), x0_batch()
    error = 0.3 * torch.randn(SHAPE, generator=torch.Generator().manual_seed(11))
    spec = LossSpec(self_step_prob=1.0, self_step_k=40)
    plain_model, self_model = StandIn(obj, x0, error), StandIn(obj, x0, error)
    plain = diffusion_loss(plain_model, x0, CONTEXT, obj, LossSpec(), torch.Generator().manual_seed(2))[1]
    ours = diffusion_loss(self_model, x0, CONTEXT, obj, spec, torch.Generator().manual_seed(2))[1]
    assert len(self_model.inputs) == 2  # x_{t+k}'s step, then the trained prediction at the model's x_t
    torch.testing.assert_close(self_model.inputs[1], plain_model.inputs[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours, plain, atol=1e-4, rtol=1e-3)
    wrong = StandIn(obj, x0, error, error_everywhere=True)
    drifted = diffusion_loss(wrong, x0, CONTEXT, obj, spec, torch.Generator().manual_seed(2))[1]
    assert (wrong.inputs[1] - plain_model.inputs[0]).abs().max() > 1e-2
    # the target is the noise that maps this drifted x_t back to x0, which a model knowing x0 predicts up to its
    # error: the loss is still the error's alone (toward the original eps it would not be)
    torch.testing.assert_close(drifted, plain, atol=1e-4, rtol=1e-3)


def test_self_step_trains_toward_the_noise_that_maps_the_model_x_t_back_to_x0():
    """Closed form with a model that predicts eps = 0: the DDIM step from x_{t+k} gives x_t = sqrt(a_t / a_{t+k})
    x_{t+k}; the target is eps = (x_t - sqrt(a_t) x0) / sqrt(1 - a_t). Only the chosen rows (rand < p, the draw after
    the noise) take the self step, under no_grad; the trained call is the only one with gradients."""
    obj, x0, k, p = objective("epsilon"), x0_batch(), 25, 0.5
    model = Recorder()
    per_sample = diffusion_loss(model, x0, CONTEXT, obj, LossSpec(self_step_prob=p, self_step_k=k),
                                torch.Generator().manual_seed(4))[1]
    replay = torch.Generator().manual_seed(4)
    t = obj.sample_timesteps(SHAPE[0], replay)
    noise = torch.randn(SHAPE, generator=replay)
    chosen = torch.rand(SHAPE[0], generator=replay) < p
    assert 0 < chosen.sum() < SHAPE[0]  # this seed picks some rows, not all
    alpha_bar = obj.schedule.alpha_bar.float()
    a_t, a_next = (alpha_bar[u].reshape(-1, 1, 1, 1) for u in (t, (t + k).clamp(max=999)))
    x_next = a_next.sqrt() * x0 + (1 - a_next).sqrt() * noise
    x_self = (a_t / a_next).sqrt() * x_next
    x_t = torch.where(chosen.reshape(-1, 1, 1, 1), x_self, a_t.sqrt() * x0 + (1 - a_t).sqrt() * noise)
    target = torch.where(chosen.reshape(-1, 1, 1, 1), (x_self - a_t.sqrt() * x0) / (1 - a_t).sqrt(), noise)
    assert [grad for _, grad in model.calls] == [False, True]
    assert model.calls[0][0].shape[0] == chosen.sum()  # the self step runs on the chosen rows only
    torch.testing.assert_close(model.calls[0][0], x_next[chosen])
    torch.testing.assert_close(model.calls[1][0], x_t, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(per_sample, target.pow(2).flatten(1).mean(1), atol=1e-5, rtol=1e-4)


def test_self_step_sends_gradients_through_the_last_prediction_only(unet):
    """On the tiny UNet: the loss's gradient equals the gradient of the plain eps-MSE at the self-step x_t and its
    target, both taken as constants, so nothing flows back through the step that made x_t."""
    obj, x0, k = objective("epsilon"), x0_batch(), 30
    inputs = []
    hook = unet.register_forward_pre_hook(lambda m, args, kw: inputs.append(
        (args[0] if args else kw["sample"]).detach().clone()), with_kwargs=True)
    try:
        unet.zero_grad()
        spec = LossSpec(self_step_prob=1.0, self_step_k=k)
        diffusion_loss(unet, x0, CONTEXT, obj, spec, torch.Generator().manual_seed(9))[0].backward()
    finally:
        hook.remove()
    grads = [p.grad.clone() for p in unet.parameters()]
    t = obj.sample_timesteps(SHAPE[0], torch.Generator().manual_seed(9))
    a_t = obj.schedule.alpha_bar[t].float().reshape(-1, 1, 1, 1)
    x_self = inputs[1]  # (B, 4, 8, 8), the model's own x_t
    target = (x_self - a_t.sqrt() * x0) / (1 - a_t).sqrt()
    unet.zero_grad()
    (unet(x_self, t, CONTEXT).sample - target).pow(2).mean().backward()
    for ours, expected in zip(grads, (p.grad for p in unet.parameters())):
        torch.testing.assert_close(ours, expected, atol=1e-6, rtol=1e-4)
    assert not torch.allclose(x_self, obj.noised(x0, torch.randn(SHAPE, generator=torch.Generator().manual_seed(9)), t))
    with pytest.raises(ValueError, match="self_step_prob applies to the diffusion objectives"):
        diffusion_loss(unet, x0, CONTEXT, objective("flow"), spec, torch.Generator().manual_seed(9))


def test_settings_are_flags_with_ranges_and_flow_takes_only_input_perturbation():
    cfg = parse_config(TrainLDMConfig, ["--input-perturbation", "0.1", "--self-step-prob", "0.25",
                                        "--self-step-k", "20", "--weighting", "vlb", "--loss", "huber"])
    assert LossSpec.from_config(cfg) == LossSpec(loss="huber", input_perturbation=0.1, self_step_prob=0.25,
                                                 self_step_k=20)
    assert parse_config(TrainLDMConfig, ["--prediction-type", "flow", "--input-perturbation", "0.1"])
    for argv, message in ((["--input-perturbation", "1.5"], "input_perturbation=1.5 is outside"),
                          (["--self-step-prob", "-0.1"], "self_step_prob=-0.1 is outside"),
                          (["--self-step-k", "0"], "self_step_k=0 is outside"),
                          (["--self-step-k", "100", "--num-train-timesteps", "100"], "must be below"),
                          (["--self-step-prob", "0.5", "--prediction-type", "flow"], "needs a diffusion objective")):
        with pytest.raises(ValueError, match=message):
            parse_config(TrainLDMConfig, argv)


def test_vlb_weighting_and_huber_loss_are_reachable_from_ldm_train_flags():
    """The package's existing answers to "would the VLB weights or a Huber loss help": `--weighting vlb` (the
    ELBO's weights, Eq. (12), Ho et al. 2020, mean 1) and `--loss huber --huber-c C` (pseudo-Huber), from the flags
    to the loss, closed form with a model that predicts 0 (the per-sample loss is the target's)."""
    cfg = parse_config(TrainLDMConfig, ["--weighting", "vlb", "--loss", "huber", "--huber-c", "0.5"])
    obj = make_objective("epsilon", NoiseSchedule.from_config(cfg), ObjectiveSettings.from_config(cfg))
    x0 = x0_batch()
    loss, per_sample = diffusion_loss(Recorder(), x0, CONTEXT, obj, LossSpec.from_config(cfg),
                                      torch.Generator().manual_seed(1))
    replay = torch.Generator().manual_seed(1)
    t, noise = obj.sample_timesteps(SHAPE[0], replay), torch.randn(SHAPE, generator=replay)
    torch.testing.assert_close(per_sample, ((noise ** 2 + 0.25).sqrt() - 0.5).flatten(1).mean(1))
    betas = obj.schedule.betas
    alpha_bar = torch.cumprod(1 - betas, 0)
    sigma2 = torch.cat([betas[:1], (1 - alpha_bar[:-1]) / (1 - alpha_bar[1:]) * betas[1:]])  # beta_tilde, beta_0
    lam = betas ** 2 / (2 * sigma2 * (1 - betas) * (1 - alpha_bar))
    torch.testing.assert_close(loss, ((lam / lam.mean())[t].float() * per_sample).mean())


def test_resume_with_the_remedies_on_reproduces_the_uninterrupted_run(tmp_path):
    """Input perturbation and the self step draw from the step's generator: a resumed run matches the straight one,
    and the run's config records the settings."""
    base = dict(model="tiny", data="shapes:48@32", resolution=32, batch_size=8, learning_rate=2e-3, lr_warmup_steps=0,
                checkpoint_every=1000, validation_every=1000, num_validation_prompts=0, val_loss_samples=4,
                report_to="none", log_every=1, use_ema=False, input_perturbation=0.1, self_step_prob=0.5,
                self_step_k=50)

    def run(folder, **overrides):
        cfg = TrainLDMConfig(**{**base, "output_dir": str(tmp_path / folder), **overrides})
        cfg.validate()
        return train_ldm.main(cfg)

    straight = run("a", max_steps=4, checkpoint_every=2)
    run("b", max_steps=2)
    resumed = run("b", max_steps=4, resume="latest")
    assert list(resumed["losses"]) == [3, 4]
    for n in (3, 4):
        assert abs(resumed["losses"][n] - straight["losses"][n]) <= 1e-6
    a = load_file(os.path.join(straight["checkpoint"], "accelerate", "model.safetensors"))
    b = load_file(os.path.join(resumed["checkpoint"], "accelerate", "model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    saved = yaml.safe_load(open(tmp_path / "b" / "config.yaml"))
    assert (saved["input_perturbation"], saved["self_step_prob"], saved["self_step_k"]) == (0.1, 0.5, 50)
    assert json.load(open(os.path.join(resumed["checkpoint"], "trainer_state.json")))["step"] == 4


def test_finetune_trains_with_the_remedies_too(tiny_folder, art, tmp_path, monkeypatch):
    """`ldm finetune` shares the settings and the loss: each training loss gets them (and flow would be refused)."""
    specs, original = [], step.diffusion_loss
    monkeypatch.setattr(step, "diffusion_loss", lambda *a, **k: (specs.append(a[4]), original(*a, **k))[1])
    result = finetune_run(tiny_folder, art, tmp_path, max_steps=2, input_perturbation=0.1, self_step_prob=0.5,
                          self_step_k=20)
    assert result["steps"] == 2 and all(torch.isfinite(torch.tensor(list(result["losses"].values()))))
    training = [s for s in specs if s.self_step_prob]  # validation losses are plain ones
    assert len(training) == 2 and {(s.input_perturbation, s.self_step_prob, s.self_step_k) for s in training} == {
        (0.1, 0.5, 20)}
