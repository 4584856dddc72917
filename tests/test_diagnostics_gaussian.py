"""The Gaussian reference model: closed-form optimal eps, used to check the sampling loop and the bias report.

Tolerance: with x0 ~ N(mu, Sigma) in 16 dimensions (4x2x2 latents) and N = 4000 samples, every coordinate of
the sample mean must lie within 5 standard errors sqrt(Sigma_ii / N) of the analytic mean, and every entry of
the sample covariance within 5 standard errors sqrt((Sigma_ii Sigma_jj + Sigma_ij^2) / N) of Sigma. With
guidance scale w the analytic target is N(mu_uncond + w (mu_cond - mu_uncond), Sigma) (see ldm.diagnostics.gaussian).
"""
import pytest
import torch

from ldm.diagnostics.bias import per_bin_report
from ldm.diagnostics.gaussian import (GaussianEpsModel, gaussian_marginal, gaussian_optimal_eps, gaussian_pipeline,
                                      gaussian_prompt_embeds, random_gaussian, sample_moments)
from ldm.diagnostics.probe import build_probe
from ldm.diffusion import alphas_cumprod as alpha_bar, make_betas

LINEAR = dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, num_train_timesteps=1000)
SHAPE = (4, 2, 2)
N = 4000
Z = 5.0


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def gaussian():
    mu, sigma = random_gaussian(16, seed=0)
    mu_uncond = -0.3 * torch.ones(16, dtype=torch.float64)
    return mu, mu_uncond, sigma, alpha_bar(make_betas("linear", 1000, 1e-4, 0.02))  # LINEAR, DDPM's betas


def test_optimal_eps_matches_monte_carlo_regression(gaussian):
    # E[eps | x_t] is linear in x_t: a least-squares fit of eps on x_t recovers it.
    mu, _, sigma, a_bar = gaussian
    g = torch.Generator().manual_seed(1)
    a = a_bar[500]
    x0 = mu + torch.randn(200_000, 16, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(sigma).T
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    mean, cov = gaussian_marginal(mu, sigma, a)
    emp_mean, emp_cov = sample_moments(x_t)
    assert torch.allclose(emp_mean, mean, atol=0.01) and torch.allclose(emp_cov, cov, atol=0.02)
    eigvals, eigvecs = torch.linalg.eigh(sigma)
    eps_star = gaussian_optimal_eps(x_t, a.expand(len(x_t)), mu, eigvals, eigvecs)
    design = torch.cat([x_t, torch.ones(len(x_t), 1, dtype=torch.float64)], 1)
    coef = torch.linalg.lstsq(design, eps).solution
    assert torch.allclose(design @ coef, eps_star, atol=0.02)
    # and no predictor beats it: the MSE of eps* is below the regression's (both ~ equal) and below eps = 0
    assert (eps_star - eps).pow(2).mean() <= (design @ coef - eps).pow(2).mean() + 1e-4


@pytest.mark.parametrize("scheduler,steps", [("ddpm", 250), ("ddim", 100), ("lms", 50)])
@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_samplers_reproduce_gaussian(gaussian, scheduler, steps, guidance_scale):
    mu, mu_uncond, sigma, a_bar = gaussian
    model = GaussianEpsModel(mu, sigma, a_bar, SHAPE, mu_uncond=mu_uncond)
    pipe = gaussian_pipeline(model, LINEAR, scheduler)
    pipe.set_progress_bar_config(disable=True)
    cond, uncond = gaussian_prompt_embeds(N, seq_len=1, dim=4)
    latents = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, height=16, width=16, num_inference_steps=steps,
                   guidance_scale=guidance_scale, output_type="latent", generator=torch.Generator().manual_seed(0)).images
    assert latents.shape == (N, *SHAPE)
    mean, cov = sample_moments(latents)
    target = mu_uncond + guidance_scale * (mu - mu_uncond) if guidance_scale > 1 else mu
    d = sigma.diagonal()
    mean_z = ((mean - target).abs() / (d / N).sqrt()).max()
    cov_z = ((cov - sigma).abs() / ((d[:, None] * d[None, :] + sigma ** 2) / N).sqrt()).max()
    assert mean_z < Z, f"{scheduler}: sample mean is {mean_z:.1f} s.e. from the analytic mean"
    assert cov_z < Z, f"{scheduler}: sample covariance is {cov_z:.1f} s.e. from Sigma"


def _gaussian_probe(mu, sigma, a_bar, n=2000):
    g = torch.Generator().manual_seed(2)
    x0 = (mu + torch.randn(n, 16, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(sigma).T).float()
    return build_probe(x0.reshape(n, *SHAPE), torch.zeros(n, 1, 4), a_bar, n_bins=10, per_bin=1, seed=3)


def test_bias_report_zero_for_optimal_and_flags_biased(gaussian):
    mu, _, sigma, a_bar = gaussian
    probe = _gaussian_probe(mu, sigma, a_bar)
    reports = {}
    for bias in (0.0, 0.1):
        model = GaussianEpsModel(mu, sigma, a_bar, SHAPE, bias=bias)
        eps_pred = model.predict(probe.x_t, probe.timesteps.double()).float()
        reports[bias] = per_bin_report(eps_pred, probe.eps, probe.x0, probe.x_t, probe.timesteps, probe.alphas_cumprod,
                                       probe.n_bins, z_threshold=Z)
    assert len(reports[0.0]) == 10
    for row in reports[0.0]:  # the optimum: no bin flagged, |bias| within 5 s.e. on every channel
        assert not row["biased"], row
        assert max(row["bias_z"]) < Z
    for row in reports[0.1]:  # eps + 0.1: flagged at every timestep bin, on every channel
        assert row["biased"] and row["biased_channels"] == [0, 1, 2, 3], row
        assert all(abs(b - 0.1) < 5 * se for b, se in zip(row["bias"], row["bias_se"]))
    # the optimum has lower loss than the biased predictor in every bin, in every parameterisation
    for good, bad in zip(reports[0.0], reports[0.1]):
        for key in ("loss_eps", "loss_v", "loss_x0"):
            assert good[key] < bad[key]


def test_parameterisation_losses_follow_snr(gaussian):
    # mse_x0 = mse_eps / SNR and mse_v = mse_eps / alpha_bar for one timestep per bin
    mu, _, sigma, a_bar = gaussian
    probe = _gaussian_probe(mu, sigma, a_bar, n=200)
    eps_pred = probe.eps + 0.05 * torch.randn(probe.eps.shape, generator=torch.Generator().manual_seed(4))
    for row in per_bin_report(eps_pred, probe.eps, probe.x0, probe.x_t, probe.timesteps, probe.alphas_cumprod, 10):
        a = row["alpha_bar_mean"]
        assert row["loss_x0"] == pytest.approx(row["loss_eps"] * (1 - a) / a, rel=1e-4)
        assert row["loss_v"] == pytest.approx(row["loss_eps"] / a, rel=1e-4)
