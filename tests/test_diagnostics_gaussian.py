"""The Gaussian reference model: closed-form optimal eps and exact velocity, used to check the sampling loops and
the bias report.

Tolerance: with x0 ~ N(mu, Sigma) in 16 dimensions (4x2x2 latents) and N = 4000 samples, every coordinate of
the sample mean must lie within 5 standard errors sqrt(Sigma_ii / N) of the analytic mean, and every entry of
the sample covariance within 5 standard errors sqrt((Sigma_ii Sigma_jj + Sigma_ij^2) / N) of Sigma. With
guidance scale w the analytic target is N(mu_uncond + w (mu_cond - mu_uncond), Sigma) (see ldm.diagnostics.gaussian).

Flow samplers (euler, heun) with the exact velocity field: each step is affine in x, so the output of N steps is
exactly Gaussian, N(m_N, C_N) (flow_sampler_gaussian). The pipeline's samples must lie within 5 standard errors
of N(m_N, C_N) (the standard errors of C_N as above), for N = 4, 10 and 50, guided or not. The exact ODE ends at
N(target, Sigma); the discretisation leaves the mean exact (the mean path (1 - s) m is straight, which Euler and
Heun integrate without error) and moves the covariance by gap(N) = max_ij |C_N - Sigma|_ij, stated by FLOW_GAPS
below (asserted, so it cannot go stale) and bounded by c / N (Euler) or c / N^2 (Heun) plus 2 s_min^2, where
s_min is the last sigma before 0 (both samplers take a plain Euler step from s_min into 0). So the samples must
also lie within 5 standard errors + gap(N) of N(target, Sigma); at N = 4 Euler's gap is many standard errors
wide: the exact target alone would reject those samples, and the closed form is what the test compares with.
"""
import pytest
import torch

from ldm.diagnostics.bias import per_bin_report
from ldm.diagnostics.gaussian import (GaussianEpsModel, GaussianFlowModel, flow_sampler_gaussian, flow_sampler_sigmas,
                                      gaussian_flow_marginal, gaussian_marginal, gaussian_optimal_eps,
                                      gaussian_velocity_gain,
                                      gaussian_optimal_velocity, gaussian_pipeline, gaussian_prompt_embeds,
                                      random_gaussian, sample_moments)
from ldm.diagnostics.probe import build_probe
from ldm.diffusion import alphas_cumprod as alpha_bar, flow_noised, flow_velocity, make_betas

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


# gap(N) = max_ij |C_N - Sigma|_ij of the exact N-step output, per (sampler, shift), from flow_sampler_gaussian on
# random_gaussian(16, seed=0) and diffusers' sigma grids; the mean's gap is 0 at every N
FLOW_GAPS = {
    ("euler", 1.0): {4: 0.4558, 10: 0.1928, 50: 0.03956, 200: 0.009937, 1000: 0.001991},
    ("euler", 3.0): {4: 0.5913, 10: 0.2686, 50: 0.05777, 200: 0.01471, 1000: 0.003017},
    ("heun", 1.0): {4: 0.02793, 10: 0.001850, 50: 8.661e-5, 200: 4.567e-6, 1000: 9.151e-7},
    ("heun", 3.0): {4: 0.2447, 10: 0.03099, 50: 0.001023, 200: 1.366e-4, 1000: 8.333e-5},
}
# the bound c / N^order + 2 s_min^2 on gap(N): (order, c) per (sampler, shift)
GAP_BOUND = {("euler", 1.0): (1, 2.1), ("euler", 3.0): (1, 3.2), ("heun", 1.0): (2, 0.5), ("heun", 3.0): (2, 4.2)}


def _gap_bound(method, shift, steps):
    order, c = GAP_BOUND[(method, shift)]
    s_min = float(flow_sampler_sigmas(method, steps, shift)[-2])
    return c / steps ** order + 2 * s_min ** 2


def _z_scores(latents, mean, cov):
    """Returns the largest |sample - analytic| of the mean and of the covariance, in standard errors."""
    n = len(latents)
    emp_mean, emp_cov = sample_moments(latents)
    d = cov.diagonal()
    mean_z = ((emp_mean - mean).abs() / (d / n).sqrt()).max()
    cov_se = ((d[:, None] * d[None, :] + cov ** 2) / n).sqrt()
    return float(mean_z), float(((emp_cov - cov).abs() / cov_se).max()), emp_cov, cov_se


@pytest.mark.parametrize("sigma_value", [0.1, 0.5, 0.9])
def test_exact_velocity_matches_monte_carlo_regression(gaussian, sigma_value):
    # E[eps - x0 | x_s] is affine in x_s: a least-squares fit of v = eps - x0 on (x_s, 1) recovers it
    mu, _, sigma, _ = gaussian
    g = torch.Generator().manual_seed(5)
    x0 = mu + torch.randn(200_000, 16, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(sigma).T
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    s = torch.full((len(x0),), sigma_value, dtype=torch.float64)
    x_s, v = flow_noised(x0, eps, s), flow_velocity(x0, eps)
    mean, cov = gaussian_flow_marginal(mu, sigma, sigma_value)
    emp_mean, emp_cov = sample_moments(x_s)
    assert torch.allclose(emp_mean, mean, atol=0.01) and torch.allclose(emp_cov, cov, atol=0.02)
    eigvals, eigvecs = torch.linalg.eigh(sigma)
    v_star = gaussian_optimal_velocity(x_s, s, mu, eigvals, eigvecs)
    design = torch.cat([x_s, torch.ones(len(x_s), 1, dtype=torch.float64)], 1)
    coef = torch.linalg.lstsq(design, v).solution                       # (17, 16): slope rows, then intercept
    # the closed form's slope U diag(g_s) U^T and intercept -(1 - s) U diag(g_s) U^T mu - mu
    gain = gaussian_velocity_gain(torch.tensor(sigma_value, dtype=torch.float64), eigvals)
    slope = eigvecs @ torch.diag(gain) @ eigvecs.T
    assert torch.allclose(coef[:16], slope, atol=0.03)
    assert torch.allclose(coef[16], -(1 - sigma_value) * slope @ mu - mu, atol=0.03)
    fitted = design @ coef
    assert (fitted - v_star).pow(2).mean().sqrt() < 0.02
    # and no affine predictor does better out of sample: a fit on the first half loses to v* on the second
    half = len(v) // 2
    held_out = design[half:] @ torch.linalg.lstsq(design[:half], v[:half]).solution
    assert (v_star[half:] - v[half:]).pow(2).mean() <= (held_out - v[half:]).pow(2).mean()


def test_exact_velocity_at_the_ends():
    # s = 1: x_1 = eps, so v* = x - mu; s -> 0: x_0 = x0, so v* = -x (E[eps | x0] = 0)
    mu, sigma = random_gaussian(16, seed=0)
    eigvals, eigvecs = torch.linalg.eigh(sigma)
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    one, tiny = torch.ones(5, dtype=torch.float64), torch.full((5,), 1e-9, dtype=torch.float64)
    assert torch.allclose(gaussian_optimal_velocity(x, one, mu, eigvals, eigvecs), x - mu, atol=1e-12)
    assert torch.allclose(gaussian_optimal_velocity(x, tiny, mu, eigvals, eigvecs), -x, atol=1e-6)


@pytest.mark.parametrize("method,shift", list(FLOW_GAPS))
def test_flow_closed_form_converges_to_the_exact_distribution(method, shift):
    mu, sigma = random_gaussian(16, seed=0)
    gaps = {}
    for steps, stated in FLOW_GAPS[(method, shift)].items():
        mean, cov = flow_sampler_gaussian(flow_sampler_sigmas(method, steps, shift), mu, sigma, method)
        assert (mean - mu).abs().max() < 1e-12, "Euler and Heun integrate the straight mean path exactly"
        gaps[steps] = float((cov - sigma).abs().max())
        assert gaps[steps] == pytest.approx(stated, rel=0.01), (steps, gaps[steps])
        assert gaps[steps] <= _gap_bound(method, shift, steps), (steps, gaps[steps])
    # the order: halving the error takes twice the steps for Euler, sqrt(2) times for Heun (away from the floor)
    ratio = gaps[10] / gaps[50]
    assert (4 < ratio < 6) if method == "euler" else ratio > 15, ratio


@pytest.mark.parametrize("steps", [4, 10, 50])
@pytest.mark.parametrize("method", ["euler", "heun"])
@pytest.mark.parametrize("guidance_scale,shift", [(1.0, 1.0), (3.0, 3.0)])
def test_flow_samplers_match_the_closed_form(gaussian, method, steps, guidance_scale, shift):
    mu, mu_uncond, sigma, _ = gaussian
    pipe = gaussian_pipeline(GaussianFlowModel(mu, sigma, SHAPE, mu_uncond=mu_uncond), {"shift": shift}, method)
    pipe.set_progress_bar_config(disable=True)
    cond, uncond = gaussian_prompt_embeds(N, seq_len=1, dim=4)
    latents = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, height=16, width=16, num_inference_steps=steps,
                   guidance_scale=guidance_scale, output_type="latent", generator=torch.Generator().manual_seed(0)).images
    assert latents.shape == (N, *SHAPE)
    target = mu_uncond + guidance_scale * (mu - mu_uncond) if guidance_scale > 1 else mu
    mean_n, cov_n = flow_sampler_gaussian(flow_sampler_sigmas(method, steps, shift), target, sigma, method)
    mean_z, cov_z, emp_cov, _ = _z_scores(latents, mean_n, cov_n)
    assert mean_z < Z, f"{method}@{steps}: sample mean is {mean_z:.1f} s.e. from the N-step closed form"
    assert cov_z < Z, f"{method}@{steps}: sample covariance is {cov_z:.1f} s.e. from the N-step closed form"
    # against the exact ODE's N(target, Sigma): 5 s.e. plus the stated discretisation gap
    mean_z, _, _, cov_se = _z_scores(latents, target, sigma)
    assert mean_z < Z
    gap = _gap_bound(method, shift, steps)
    assert ((emp_cov - sigma).abs() <= Z * cov_se + gap).all()
    if gap > 4 * Z * float(cov_se.max()):  # the gap is visible: the exact target alone rejects these samples
        assert ((emp_cov - sigma).abs() / cov_se).max() > Z
