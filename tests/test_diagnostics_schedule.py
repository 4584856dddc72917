"""Schedule math: parity with diffusers, and the VLB weights against their closed form (Ho et al. 2020, Eq. 12)."""
import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from ldm.diagnostics.schedule_report import schedule_table, visited_timesteps
from ldm.diffusion import (alpha_bar_at, make_betas, posterior_mean_coefs, posterior_variance, snr,
                           vlb_weights)
from ldm.diffusion import alphas_cumprod as alpha_bar

T = 1000


def linear_closed_form():
    """The linear schedule and its VLB weights written out in numpy, independently of ldm."""
    beta = np.linspace(1e-4, 0.02, T, dtype=np.float64)
    alpha = 1 - beta
    a_bar = np.cumprod(alpha)
    a_bar_prev = np.concatenate([[1.0], a_bar[:-1]])
    beta_tilde = (1 - a_bar_prev) / (1 - a_bar) * beta
    sigma2 = beta_tilde.copy()
    sigma2[0] = beta[0]
    return beta, a_bar, beta_tilde, beta ** 2 / (2 * sigma2 * alpha * (1 - a_bar))


def test_vlb_weights_equal_closed_form_linear():
    beta, a_bar, beta_tilde, weights = linear_closed_form()
    betas = make_betas("linear", T, 1e-4, 0.02)
    np.testing.assert_allclose(alpha_bar(betas).numpy(), a_bar, rtol=1e-6)  # betas from diffusers, in float32
    np.testing.assert_allclose(posterior_variance(betas).numpy(), beta_tilde, rtol=1e-5, atol=1e-30)
    np.testing.assert_allclose(vlb_weights(betas).numpy(), weights, rtol=1e-5)
    # at t = 0 (sigma^2 = beta_0, 1 - alpha_bar_0 = beta_0): lambda_0 = 1 / (2 (1 - beta_0))
    assert vlb_weights(betas)[0].item() == pytest.approx(1 / (2 * (1 - 1e-4)), rel=1e-7)


def test_vlb_weight_is_the_kl_between_gaussian_posteriors():
    # L_{t-1} = KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)) = ||mu_tilde(x_t, x0) - mu_tilde(x_t, x0_pred)||^2 / (2 sigma_t^2)
    betas = make_betas("linear", T, 1e-4, 0.02)
    a_bar, (c0, _) = alpha_bar(betas), posterior_mean_coefs(betas)
    sigma2, weights = posterior_variance(betas), vlb_weights(betas)
    g = torch.Generator().manual_seed(0)
    for t in (1, 10, 250, 999):
        x0, eps, eps_pred = (torch.randn(64, generator=g, dtype=torch.float64) for _ in range(3))
        x_t = a_bar[t].sqrt() * x0 + (1 - a_bar[t]).sqrt() * eps
        x0_pred = (x_t - (1 - a_bar[t]).sqrt() * eps_pred) / a_bar[t].sqrt()
        kl = (c0[t] * (x0 - x0_pred)).pow(2).sum() / (2 * sigma2[t])
        assert kl.item() == pytest.approx((weights[t] * (eps - eps_pred).pow(2).sum()).item(), rel=1e-8)


@pytest.mark.parametrize("name, prediction_type", [("linear", "epsilon"), ("scaled_linear", "epsilon"),
                                                   ("squaredcos_cap_v2", "v_prediction")])
def test_diagnose_schedule_plots_exactly_the_weights_training_uses(tmp_path, name, prediction_type):
    # `ldm diagnose schedule` (schedule.json/csv) and `ldm train --weighting vlb` read the one vlb_weights function
    import csv

    from ldm import diffusion
    from ldm.diagnostics.schedule_report import diagnose_schedule

    diagnose_schedule([name], str(tmp_path), schedulers=["ddim"], num_inference_steps=5)
    with open(tmp_path / f"schedule_{name}.csv") as f:
        plotted = torch.tensor([float(row["vlb_weight_normalised_t"]) for row in csv.DictReader(f)], dtype=torch.float64)
    betas = make_betas(name, T, *{"scaled_linear": (0.00085, 0.012)}.get(name, (1e-4, 0.02)))
    t = torch.arange(T)
    trained = diffusion.loss_weights(t, betas, "vlb", prediction_type).double()  # per-sample weights of the MSE
    factor = diffusion.eps_loss_factor(diffusion.snr(alpha_bar(betas), t), prediction_type).double()
    torch.testing.assert_close(trained / factor, plotted, rtol=1e-5, atol=0)


def test_schedule_table_fields_and_snr():
    table = schedule_table(make_betas("scaled_linear", T, 0.00085, 0.012))
    assert set(table) == {"t", "beta_t", "alpha_bar_t", "snr_t", "log_snr_t", "posterior_variance_t",
                          "vlb_weight_t", "vlb_weight_normalised_t"}
    assert all(len(v) == T for v in table.values())
    assert torch.all(table["snr_t"][1:] < table["snr_t"][:-1])  # SNR decreases monotonically
    assert table["vlb_weight_normalised_t"].mean().item() == pytest.approx(1.0)
    assert torch.allclose(snr(table["alpha_bar_t"]), table["alpha_bar_t"] / (1 - table["alpha_bar_t"]))


def test_alpha_bar_at_interpolates_like_lms():
    from diffusers import LMSDiscreteScheduler

    scheduler = LMSDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    scheduler.set_timesteps(7)
    a = alpha_bar_at(scheduler.alphas_cumprod, scheduler.timesteps)
    sigma = ((1 - a) / a).sqrt()
    assert torch.allclose(sigma.float(), scheduler.sigmas[:-1].float(), rtol=1e-4)
    assert alpha_bar_at(scheduler.alphas_cumprod, 10).item() == pytest.approx(scheduler.alphas_cumprod[10].item(), rel=1e-6)


def test_visited_timesteps_per_spacing():
    config = dict(num_train_timesteps=T, beta_schedule="linear", steps_offset=0)
    visited = visited_timesteps(["ddim", "lms"], config, 10)
    assert visited["ddim"]["leading"] == list(range(900, -1, -100))
    assert visited["ddim"]["trailing"] == list(range(999, 0, -100))
    assert visited["lms"]["linspace"][0] == 999 and visited["lms"]["linspace"][-1] == 0
    assert all(len(v) == 10 for by in visited.values() for v in by.values())
