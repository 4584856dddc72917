"""The Gaussian reference: when x0 ~ N(mu, Sigma), the optimal noise predictor and the exact velocity field have a
closed form, and so do the samplers' outputs.

Forward process (Ho et al. 2020, Eq. 4): x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps, so
    x_t ~ N(sqrt(alpha_bar_t) mu, S_t),   S_t = alpha_bar_t Sigma + (1 - alpha_bar_t) I,
and since eps and x_t are jointly Gaussian with Cov(eps, x_t) = sqrt(1 - alpha_bar_t) I, the MMSE predictor is
    eps*(x_t, t) = E[eps | x_t] = sqrt(1 - alpha_bar_t) S_t^{-1} (x_t - sqrt(alpha_bar_t) mu).
With Sigma = U diag(lambda) U^T, S_t^{-1} = U diag(1 / (alpha_bar_t lambda + 1 - alpha_bar_t)) U^T.

Flow matching (ldm.diffusion.flow_noised): x_s = (1 - s) x0 + s eps ~ N((1 - s) mu, V_s), V_s = (1 - s)^2 Sigma
+ s^2 I, with Cov(x0, x_s) = (1 - s) Sigma and Cov(eps, x_s) = s I, so by Gaussian conditioning
    E[x0 | x_s] = mu + (1 - s) Sigma V_s^{-1} (x_s - (1 - s) mu),   E[eps | x_s] = s V_s^{-1} (x_s - (1 - s) mu),
and the exact (marginal) velocity field v*(x_s) = E[eps - x0 | x_s] is affine in x_s, diagonal in Sigma's eigenbasis:
    v*(x_s) = U diag(g_s) U^T (x_s - (1 - s) mu) - mu,   g_s = (s - (1 - s) lambda) / ((1 - s)^2 lambda + s^2).
Its ODE dx/ds = v* carries x_1 ~ N(0, I) through the marginals to x_0 ~ N(mu, Sigma) (the marginal-preserving
property of rectified flow, Liu et al. 2022, Sec. 3): x_s = (1 - s) mu + V_s^{1/2} z solves it, since
d V_s^{1/2} / ds = U diag(g_s) U^T V_s^{1/2}. Each Euler or Heun step of a sampler is then an affine map of x, so
its N-step output from x_1 ~ N(0, I) is Gaussian too, with a mean and covariance that `flow_sampler_gaussian`
propagates exactly. The mean comes out exact at every N (the mean path (1 - s) mu is straight, and both methods
integrate a straight line without error); the covariance tends to Sigma as N grows (Euler's error O(1/N), Heun's
O(1/N^2)).

For any data with mean mu and covariance Sigma this is also the best *linear* denoiser (the Wiener filter), which
makes it a baseline a trained model should beat. Used (a) as a stand-in UNet to test the sampling loop: the
samplers must return N(mu, Sigma); with guidance scale w and two means, eps_uncond + w (eps_cond - eps_uncond) is
the optimal predictor for N(mu_uncond + w (mu_cond - mu_uncond), Sigma), and likewise for the velocity (v* is
affine in mu), so guided sampling has a closed form too; (b) in `ldm diagnose timesteps --gaussian-reference`.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from ldm.diffusion import alpha_bar_at, flow_marginal_moments


def gaussian_optimal_eps(x_t: torch.Tensor, alpha_bar_t: torch.Tensor, mu: torch.Tensor, eigvals: torch.Tensor,
                         eigvecs: torch.Tensor) -> torch.Tensor:
    """Returns eps*(x_t) = sqrt(1 - a) S_t^{-1} (x_t - sqrt(a) mu), (B, D), for x_t (B, D) and alpha_bar_t (B,).

    mu: (D,) or one mean per row (B, D). Sigma = eigvecs diag(eigvals) eigvecs^T (from torch.linalg.eigh).
    """
    a = alpha_bar_t.to(x_t.dtype)[:, None]                                # (B, 1)
    centred = (x_t - a.sqrt() * mu) @ eigvecs                             # (B, D) in Sigma's eigenbasis
    scaled = centred / (a * eigvals + (1 - a))                            # S_t^{-1}, diagonal in that basis
    return (1 - a).sqrt() * (scaled @ eigvecs.T)                          # (B, D)


def gaussian_velocity_gain(sigma: torch.Tensor, eigvals: torch.Tensor) -> torch.Tensor:
    """Returns g_s = (s - (1 - s) lambda) / ((1 - s)^2 lambda + s^2), the exact velocity field's slope along each
    eigenvector of Sigma; sigma (B, 1) or a number, eigvals (D,) -> (B, D) or (D,)."""
    kept = 1 - sigma                                                      # the weight of x0 in x_s
    return (sigma - kept * eigvals) / (kept ** 2 * eigvals + sigma ** 2)


def gaussian_optimal_velocity(x_t: torch.Tensor, sigma: torch.Tensor, mu: torch.Tensor, eigvals: torch.Tensor,
                              eigvecs: torch.Tensor) -> torch.Tensor:
    """Returns v*(x_s) = E[eps - x0 | x_s] = U diag(g_s) U^T (x_s - (1 - s) mu) - mu, (B, D), for x_s (B, D) on the
    flow path at sigma (B,); mu (D,) or (B, D). Sigma = eigvecs diag(eigvals) eigvecs^T. See the module docstring."""
    s = sigma.to(x_t.dtype)[:, None]                                      # (B, 1)
    centred = (x_t - (1 - s) * mu) @ eigvecs                              # (B, D) in Sigma's eigenbasis
    return (gaussian_velocity_gain(s, eigvals) * centred) @ eigvecs.T - mu


def gaussian_marginal(mu: torch.Tensor, sigma: torch.Tensor, alpha_bar_t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (mean, covariance) of x_t when x0 ~ N(mu, Sigma): (sqrt(a) mu, a Sigma + (1 - a) I)."""
    a = float(alpha_bar_t)
    return a ** 0.5 * mu, a * sigma + (1 - a) * torch.eye(len(mu), dtype=sigma.dtype)


def gaussian_flow_marginal(mu: torch.Tensor, sigma: torch.Tensor, s: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (mean, covariance) of x_s = (1 - s) x0 + s eps when x0 ~ N(mu, Sigma): ((1 - s) mu, V_s), the
    variance of ldm.diffusion.flow_marginal_moments taken along each eigenvector of Sigma."""
    eigvals, eigvecs = torch.linalg.eigh(sigma.double())
    mean, var = flow_marginal_moments(mu.double(), eigvals, float(s))
    return mean, eigvecs @ torch.diag(var) @ eigvecs.T


def _affine_velocity(state: torch.Tensor, s: float, m: torch.Tensor, eigvals: torch.Tensor) -> torch.Tensor:
    # y = state[0] z + state[1] in Sigma's eigenbasis; v*(y) = g_s (y - (1 - s) m) - m is again affine in z
    g = gaussian_velocity_gain(torch.tensor(s, dtype=torch.float64), eigvals)
    return torch.stack([g * state[0], g * (state[1] - (1 - s) * m) - m])


def flow_sampler_gaussian(sigmas, mu: torch.Tensor, sigma: torch.Tensor,
                          method: str = "euler") -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (mean (D,), covariance (D, D)) of what a flow sampler integrating the exact velocity field v* of
    x0 ~ N(mu, Sigma) returns from x_1 ~ N(0, I) over the grid `sigmas` (1 = s_0 > ... > s_N = 0), exactly.

    euler: x <- x + (s' - s) v*(x, s) (diffusers' FlowMatchEulerDiscreteScheduler);
    heun:  x <- x + (s' - s) (v*(x, s) + v*(x_e, s')) / 2 with x_e the Euler step, and a plain Euler step into
           s' = 0 (Karras et al. 2022, Algorithm 1; diffusers' FlowMatchHeunDiscreteScheduler).
    Each step is affine and diagonal in Sigma's eigenbasis, so x = U (P z + q) with z ~ N(0, I) throughout:
    the output is N(U q, U diag(P^2) U^T).
    """
    if method not in ("euler", "heun"):
        raise ValueError(f"unknown flow sampler {method!r}; choose euler or heun")
    eigvals, eigvecs = torch.linalg.eigh(sigma.double())
    eigvals = eigvals.clamp(min=0)
    m = eigvecs.T @ mu.double()                                            # (D,) the mean in the eigenbasis
    state = torch.stack([torch.ones_like(m), torch.zeros_like(m)])         # x_1 = z: P = 1, q = 0
    grid = [float(s) for s in sigmas]
    for s, s_next in zip(grid[:-1], grid[1:]):
        h = s_next - s
        slope = _affine_velocity(state, s, m, eigvals)
        if method == "heun" and s_next > 0:
            slope = (slope + _affine_velocity(state + h * slope, s_next, m, eigvals)) / 2
        state = state + h * slope
    return eigvecs @ state[1], eigvecs @ torch.diag(state[0] ** 2) @ eigvecs.T


def flow_sampler_sigmas(name: str, steps: int, shift: float = 1.0, num_train_timesteps: int = 1000) -> torch.Tensor:
    """Returns the grid of sigmas (float64, from 1 down to 0) that the named flow sampler ("euler", "heun") steps
    over at `steps` inference steps: the scheduler's own, with Heun's repeated entries merged."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from ldm.pipelines.schedulers import make_scheduler

    config = FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, shift=shift).config
    scheduler = make_scheduler(name, config)
    scheduler.set_timesteps(steps)
    return torch.unique_consecutive(scheduler.sigmas.double())


def sample_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns the sample mean (D,) and unbiased covariance (D, D) of x (N, ...) flattened to (N, D)."""
    x = x.reshape(len(x), -1).double()                                    # (N, D)
    mean = x.mean(0)
    centred = x - mean
    return mean, centred.T @ centred / (len(x) - 1)


def fit_gaussian(latents: torch.Tensor, shrinkage: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (mu (D,), Sigma (D, D)) fitted to latents (N, C, h, w); Sigma is shrunk toward its diagonal so
    that it stays well conditioned when N < D: Sigma = (1 - s) S + s diag(S)."""
    if not 0.0 <= shrinkage <= 1.0:
        raise ValueError(f"shrinkage={shrinkage} must be in [0, 1]")
    mu, cov = sample_moments(latents) if len(latents) > 1 else (latents.reshape(1, -1)[0].double(), None)
    if cov is None:
        cov = torch.eye(len(mu), dtype=torch.float64)
    return mu, (1 - shrinkage) * cov + shrinkage * torch.diag(cov.diagonal())


def random_gaussian(dim: int, seed: int = 0, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns a random (mu (D,), Sigma (D, D)) with eigenvalues spread over [0.1, 1] * scale^2, for tests."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    eigvals = torch.linspace(0.1, 1.0, dim, dtype=torch.float64) * scale ** 2
    mu = torch.randn(dim, generator=g, dtype=torch.float64) * 0.5
    return mu, q @ torch.diag(eigvals) @ q.T



class _GaussianDenoiser(nn.Module):
    """What GaussianEpsModel and GaussianFlowModel share: the conditional and unconditional means, Sigma's
    eigenbasis, and the denoiser interface (ldm.models.denoiser). Rows whose text context averages above 0.5 are
    conditional (see `gaussian_prompt_embeds`), the rest unconditional."""

    def __init__(self, mu_cond: torch.Tensor, sigma: torch.Tensor, latent_shape: tuple[int, int, int],
                 mu_uncond: torch.Tensor | None = None, bias: float = 0.0):
        super().__init__()
        c, h, w = latent_shape
        if mu_cond.numel() != c * h * w or sigma.shape != (c * h * w, c * h * w):
            raise ValueError(f"mu {tuple(mu_cond.shape)} and Sigma {tuple(sigma.shape)} do not fit latents {latent_shape}")
        eigvals, eigvecs = torch.linalg.eigh(sigma.double())
        self.register_buffer("mu_cond", mu_cond.double().flatten())
        self.register_buffer("mu_uncond", (mu_cond if mu_uncond is None else mu_uncond).double().flatten())
        self.register_buffer("eigvals", eigvals.clamp(min=0))
        self.register_buffer("eigvecs", eigvecs)
        self.latent_shape = latent_shape
        self.bias = bias  # added to the optimal prediction: a deliberately biased predictor for tests
        self.config = SimpleNamespace(in_channels=c, out_channels=c, sample_size=h, time_cond_proj_dim=None)
        self._anchor = nn.Parameter(torch.zeros(()), requires_grad=False)  # gives the module a dtype and device

    @property
    def dtype(self) -> torch.dtype:
        return self._anchor.dtype

    @property
    def device(self) -> torch.device:
        return self._anchor.device

    def _rows(self, x_t: torch.Tensor, t, conditional: torch.Tensor | None):
        """Returns (x (B, D) float64, t (B,) float64 on the CPU, mu (B, D)) for x_t (B, C, h, w) and a time t
        (one number or one per row)."""
        b = x_t.shape[0]
        t = torch.as_tensor(t, dtype=torch.float64).cpu().flatten()
        t = t.expand(b) if t.numel() == 1 else t
        cond = torch.ones(b, dtype=torch.bool) if conditional is None else conditional.cpu()
        mu = torch.where(cond[:, None], self.mu_cond.cpu(), self.mu_uncond.cpu()).to(x_t.device)  # (B, D)
        return x_t.reshape(b, -1).double(), t, mu

    def predict(self, x_t: torch.Tensor, t, conditional: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def time_of(self, model_time):
        """Returns the time `predict` takes for the denoiser's time input."""
        return model_time

    def forward(self, latents, time, text_context=None, pooled_text=None, **kwargs):
        """The denoiser interface (ldm.models.denoiser): returns the optimal prediction (B, C, h, w)."""
        conditional = None
        if text_context is not None:
            conditional = text_context.flatten(1).float().mean(1) > 0.5  # (B,)
        return self.predict(latents, self.time_of(time), conditional)


class GaussianEpsModel(_GaussianDenoiser):
    """A stand-in for UNet2DConditionModel returning eps* for x0 ~ N(mu_cond or mu_uncond, Sigma).

    The pipeline feeds it scale_model_input(x), which for every diffusers scheduler is the variance-preserving
    x_t, so the closed form above applies as written.
    """

    def __init__(self, mu_cond: torch.Tensor, sigma: torch.Tensor, alphas_cumprod: torch.Tensor,
                 latent_shape: tuple[int, int, int], mu_uncond: torch.Tensor | None = None, bias: float = 0.0):
        super().__init__(mu_cond, sigma, latent_shape, mu_uncond, bias)
        self.register_buffer("alphas_cumprod", alphas_cumprod.double())

    def predict(self, x_t: torch.Tensor, t, conditional: torch.Tensor | None = None) -> torch.Tensor:
        """Returns eps* (B, C, h, w) for x_t (B, C, h, w) at timestep(s) t; conditional: (B,) bool or None (all)."""
        x, t, mu = self._rows(x_t, t, conditional)
        alpha_bar_t = alpha_bar_at(self.alphas_cumprod.cpu(), t).to(x_t.device)          # (B,)
        eps = gaussian_optimal_eps(x, alpha_bar_t, mu, self.eigvals, self.eigvecs)
        return (eps + self.bias).reshape(x_t.shape).to(x_t.dtype)


class GaussianFlowModel(_GaussianDenoiser):
    """A stand-in flow-matching denoiser returning the exact velocity v* = E[eps - x0 | x_s] for
    x0 ~ N(mu_cond or mu_uncond, Sigma): what a perfectly trained flow model predicts for Gaussian data. Its time
    input is sigma * num_train_timesteps, as the flow samplers' timesteps are."""

    def __init__(self, mu_cond: torch.Tensor, sigma: torch.Tensor, latent_shape: tuple[int, int, int],
                 mu_uncond: torch.Tensor | None = None, bias: float = 0.0, num_train_timesteps: int = 1000):
        super().__init__(mu_cond, sigma, latent_shape, mu_uncond, bias)
        self.num_train_timesteps = num_train_timesteps

    def time_of(self, model_time):
        return torch.as_tensor(model_time, dtype=torch.float64).cpu() / self.num_train_timesteps

    def predict(self, x_t: torch.Tensor, sigma, conditional: torch.Tensor | None = None) -> torch.Tensor:
        """Returns v* (B, C, h, w) for x_s (B, C, h, w) at sigma(s) in (0, 1]; conditional: (B,) bool or None."""
        x, s, mu = self._rows(x_t, sigma, conditional)
        v = gaussian_optimal_velocity(x, s.to(x_t.device), mu, self.eigvals, self.eigvecs)
        return (v + self.bias).reshape(x_t.shape).to(x_t.dtype)

def gaussian_prompt_embeds(batch: int, seq_len: int = 77, dim: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (prompt_embeds of ones, negative_prompt_embeds of zeros), each (B, L, D): what GaussianEpsModel reads
    as conditional and unconditional."""
    return torch.ones(batch, seq_len, dim), torch.zeros(batch, seq_len, dim)


def gaussian_pipeline(model: _GaussianDenoiser, schedule_config: dict | None = None, scheduler: str | None = None):
    """Returns an ldm.Pipeline whose UNet is `model` (tiny random VAE and text encoder, unused with
    output_type="latent" and prompt_embeds), sampling with the named scheduler (default ddim, or euler for a
    GaussianFlowModel) over the given noise schedule, or for a flow model the given FlowMatchEulerDiscreteScheduler
    settings (e.g. {"shift": 3.0})."""
    from ldm.pipelines import Pipeline
    from ldm.models.presets import build_components
    from ldm.pipelines.schedulers import make_scheduler

    components = build_components("tiny")
    components["unet"] = model
    if isinstance(model, GaussianFlowModel):
        from diffusers import FlowMatchEulerDiscreteScheduler

        config = FlowMatchEulerDiscreteScheduler(num_train_timesteps=model.num_train_timesteps,
                                                 **(schedule_config or {})).config
        components["scheduler"] = make_scheduler(scheduler or "euler", config)
    else:
        config = {**components["scheduler"].config, **(schedule_config or {})}
        components["scheduler"] = make_scheduler(scheduler or "ddim", config)
    return Pipeline(**components)
