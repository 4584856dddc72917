"""ldm.diffusion: closed-form identities and parity with diffusers' schedulers."""
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr as diffusers_rescale

from ldm import diffusion


@pytest.mark.parametrize("schedule", diffusion.BETA_SCHEDULES)
def test_schedules_match_diffusers(schedule):
    betas = diffusion.make_betas(schedule, 1000, 0.00085, 0.012)
    reference = DDPMScheduler(num_train_timesteps=1000, beta_schedule=schedule, beta_start=0.00085, beta_end=0.012)
    assert betas.shape == (1000,) and (betas > 0).all() and (betas < 1).all()
    torch.testing.assert_close(diffusion.alphas_cumprod(betas).float(), reference.alphas_cumprod, rtol=1e-5, atol=1e-6)


def test_zero_terminal_snr_matches_diffusers_and_zeroes_the_last_snr():
    betas = diffusion.make_betas("scaled_linear")
    rescaled = diffusion.rescale_zero_terminal_snr(betas)
    torch.testing.assert_close(rescaled.float(), diffusers_rescale(betas.float()), rtol=1e-4, atol=1e-4)
    alpha_bar = diffusion.alphas_cumprod(rescaled)
    assert alpha_bar[-1] == 0 and torch.isclose(alpha_bar[0], diffusion.alphas_cumprod(betas)[0])
    assert diffusion.snr(alpha_bar, torch.tensor([999]))[0] == 0


def test_add_noise_and_v_target_match_diffusers():
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    alpha_bar = diffusion.alphas_cumprod(diffusion.make_betas("scaled_linear"))
    x0, noise, t = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8), torch.tensor([0, 10, 500, 999])
    torch.testing.assert_close(diffusion.add_noise(x0, noise, t, alpha_bar), scheduler.add_noise(x0, noise, t))
    torch.testing.assert_close(diffusion.training_target(x0, noise, t, alpha_bar, "v_prediction"),
                               scheduler.get_velocity(x0, noise, t))
    assert diffusion.training_target(x0, noise, t, alpha_bar, "epsilon") is noise
    assert diffusion.training_target(x0, noise, t, alpha_bar, "sample") is x0


def test_weightings_agree_across_prediction_types():
    """A given x0 error weighs the same whichever of eps / v / x0 the network predicts (Hang et al. 2023)."""
    betas = diffusion.make_betas("scaled_linear")
    alpha_bar = diffusion.alphas_cumprod(betas)
    x0, noise, t = torch.randn(6, 4, 4, 4), torch.randn(6, 4, 4, 4), torch.tensor([0, 3, 50, 300, 700, 999])
    x_t = diffusion.add_noise(x0, noise, t, alpha_bar)
    x0_pred = x0 + 0.1 * torch.randn_like(x0)
    a = alpha_bar[t].float().reshape(-1, 1, 1, 1)
    eps_pred = (x_t - a.sqrt() * x0_pred) / (1 - a).sqrt()
    preds = {"sample": x0_pred, "epsilon": eps_pred, "v_prediction": a.sqrt() * eps_pred - (1 - a).sqrt() * x0_pred}
    for weighting in ("min_snr", "vlb"):
        weighted = {}
        for kind, pred in preds.items():
            target = diffusion.training_target(x0, noise, t, alpha_bar, kind)
            w = diffusion.loss_weights(t, betas, weighting, kind, gamma=5.0)
            weighted[kind] = w * diffusion.per_sample_loss(pred, target, "mse")
        torch.testing.assert_close(weighted["sample"], weighted["epsilon"], rtol=2e-3, atol=1e-6)
        torch.testing.assert_close(weighted["v_prediction"], weighted["epsilon"], rtol=2e-3, atol=1e-6)


def test_min_snr_is_min_snr_over_snr_for_eps():
    alpha_bar = diffusion.alphas_cumprod(diffusion.make_betas("linear", beta_start=1e-4, beta_end=0.02))
    t = torch.arange(0, 1000, 37)
    s = diffusion.snr(alpha_bar, t)
    torch.testing.assert_close(diffusion.min_snr_weight(s, 5.0, "epsilon"), torch.clamp(s, max=5.0) / s)
    assert torch.allclose(diffusion.min_snr_weight(s, 5.0, "sample"), torch.clamp(s, max=5.0))


def test_vlb_weight_is_ho_eq_12_normalised():
    betas = diffusion.make_betas("linear", beta_start=1e-4, beta_end=0.02).double()
    t = torch.arange(1000)
    weights = diffusion.vlb_weight(t, betas, "epsilon").double()
    alphas, alpha_bar = 1 - betas, torch.cumprod(1 - betas, 0)
    alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
    sigma2 = (1 - alpha_bar_prev) / (1 - alpha_bar) * betas  # sigma_t^2 = beta_tilde_t, Eq. (7) (DDPM's sampler)
    sigma2[0] = betas[0]  # beta_tilde_0 = 0: the decoder term takes beta_0
    lam = betas ** 2 / (2 * sigma2 * alphas * (1 - alpha_bar))  # Eq. (12)
    torch.testing.assert_close(weights, lam / lam.mean(), rtol=1e-5, atol=1e-7)
    assert abs(weights.mean().item() - 1) < 1e-5 and weights[0] > weights[500]


def test_losses_offset_noise_and_caption_dropout():
    a, b = torch.zeros(3, 4, 2, 2), torch.full((3, 4, 2, 2), 0.5)
    torch.testing.assert_close(diffusion.per_sample_loss(a, b, "mse"), torch.full((3,), 0.25))
    torch.testing.assert_close(diffusion.per_sample_loss(a, b, "l1"), torch.full((3,), 0.5))
    huber = diffusion.per_sample_loss(a, b, "huber", huber_c=0.1)
    assert torch.allclose(huber, torch.full((3,), (0.25 + 0.01) ** 0.5 - 0.1))
    noise = torch.randn(8, 4, 5, 5)
    assert diffusion.offset_noise(noise, 0.0) is noise
    shifted = diffusion.offset_noise(noise, 0.3, torch.Generator().manual_seed(0)) - noise
    assert torch.allclose(shifted, shifted[..., :1, :1].expand_as(shifted))  # one constant per sample and channel
    captions = [f"c{i}" for i in range(1000)]
    assert diffusion.drop_captions(captions, 0.0) == captions
    dropped = diffusion.drop_captions(captions, 0.1, torch.Generator().manual_seed(0))
    assert 60 < dropped.count("") < 140 and all(d in ("", c) for d, c in zip(dropped, captions))
    assert dropped == diffusion.drop_captions(captions, 0.1, torch.Generator().manual_seed(0))


def test_timestep_helpers_and_errors():
    t = diffusion.stratified_timesteps(10, 1000)
    assert t[0] == 0 and t[-1] == 999 and len(t.unique()) == 10
    assert diffusion.timestep_bins(torch.tensor([0, 199, 200, 999]) / 1000, 5).tolist() == [0, 0, 1, 4]
    with pytest.raises(ValueError, match="unknown noise schedule"):
        diffusion.make_betas("cosine")
    with pytest.raises(ValueError, match="unknown prediction type"):
        diffusion.training_target(t, t, t, t, "score")
    with pytest.raises(ValueError, match="unknown timestep weighting"):
        diffusion.loss_weights(t, diffusion.make_betas("linear"), "p2", "epsilon")


def test_timestep_sampling_uniform_and_logit_normal():
    g = torch.Generator().manual_seed(0)
    uniform = diffusion.sample_timesteps(20000, 1000, g)
    assert uniform.min() == 0 and uniform.max() == 999 and abs(uniform.float().mean() - 499.5) < 10
    middle = diffusion.sample_timesteps(20000, 1000, g, "logit_normal")  # sigmoid(N(0, 1)): a bump at T/2
    assert middle.dtype == torch.int64 and 0 <= middle.min() and middle.max() <= 999
    in_middle = lambda t: ((t >= 250) & (t < 750)).float().mean()  # noqa: E731
    assert in_middle(middle) > 0.7 > 0.55 > in_middle(uniform)      # 0.73 vs 0.50
    noisier = diffusion.sample_timesteps(20000, 1000, g, "logit_normal", mean=1.0)
    assert noisier.float().mean() > middle.float().mean() + 100
    with pytest.raises(ValueError, match="logit_normal"):
        diffusion.sample_timesteps(4, 1000, g, "cosine")


def test_alpha_bar_at_is_exact_and_finite_at_zero_terminal_snr():
    alpha_bar = diffusion.alphas_cumprod(diffusion.rescale_zero_terminal_snr(diffusion.make_betas("scaled_linear")))
    values = diffusion.alpha_bar_at(alpha_bar, torch.tensor([0.0, 500.0, 998.0, 998.5, 999.0]))
    assert not values.isnan().any() and values[-1] == 0 and values[-2] == 0
    assert torch.allclose(values[[0, 1, 2]], alpha_bar[[0, 500, 998]])
