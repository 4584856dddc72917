"""The Gaussian reference: when x0 ~ N(mu, Sigma), the optimal noise predictor has a closed form.

Forward process (Ho et al. 2020, Eq. 4): x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps, so
    x_t ~ N(sqrt(alpha_bar_t) mu, S_t),   S_t = alpha_bar_t Sigma + (1 - alpha_bar_t) I,
and since eps and x_t are jointly Gaussian with Cov(eps, x_t) = sqrt(1 - alpha_bar_t) I, the MMSE predictor is
    eps*(x_t, t) = E[eps | x_t] = sqrt(1 - alpha_bar_t) S_t^{-1} (x_t - sqrt(alpha_bar_t) mu).
With Sigma = U diag(lambda) U^T, S_t^{-1} = U diag(1 / (alpha_bar_t lambda + 1 - alpha_bar_t)) U^T.

For any data with mean mu and covariance Sigma this is also the best *linear* denoiser (the Wiener filter), which
makes it a baseline a trained model should beat. Used (a) as a stand-in UNet to test the sampling loop: the
samplers must return N(mu, Sigma); with guidance scale w and two means, eps_uncond + w (eps_cond - eps_uncond) is
the optimal predictor for N(mu_uncond + w (mu_cond - mu_uncond), Sigma), so guided sampling has a closed form too;
(b) in `ldm diagnose timesteps --gaussian-reference`.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from ldm.diffusion import alpha_bar_at


def gaussian_optimal_eps(x_t: torch.Tensor, alpha_bar_t: torch.Tensor, mu: torch.Tensor, eigvals: torch.Tensor,
                         eigvecs: torch.Tensor) -> torch.Tensor:
    """Returns eps*(x_t) = sqrt(1 - a) S_t^{-1} (x_t - sqrt(a) mu), (B, D), for x_t (B, D) and alpha_bar_t (B,).

    mu: (D,) or one mean per row (B, D). Sigma = eigvecs diag(eigvals) eigvecs^T (from torch.linalg.eigh).
    """
    a = alpha_bar_t.to(x_t.dtype)[:, None]                                # (B, 1)
    centred = (x_t - a.sqrt() * mu) @ eigvecs                             # (B, D) in Sigma's eigenbasis
    scaled = centred / (a * eigvals + (1 - a))                            # S_t^{-1}, diagonal in that basis
    return (1 - a).sqrt() * (scaled @ eigvecs.T)                          # (B, D)


def gaussian_marginal(mu: torch.Tensor, sigma: torch.Tensor, alpha_bar_t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (mean, covariance) of x_t when x0 ~ N(mu, Sigma): (sqrt(a) mu, a Sigma + (1 - a) I)."""
    a = float(alpha_bar_t)
    return a ** 0.5 * mu, a * sigma + (1 - a) * torch.eye(len(mu), dtype=sigma.dtype)


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


class GaussianEpsModel(nn.Module):
    """A stand-in for UNet2DConditionModel returning eps* for x0 ~ N(mu_cond or mu_uncond, Sigma).

    Rows whose text context averages above 0.5 are conditional (see `gaussian_prompt_embeds`), the rest
    unconditional. The pipeline feeds it scale_model_input(x), which for every diffusers scheduler is the
    variance-preserving x_t, so the closed form above applies as written.
    """

    def __init__(self, mu_cond: torch.Tensor, sigma: torch.Tensor, alphas_cumprod: torch.Tensor,
                 latent_shape: tuple[int, int, int], mu_uncond: torch.Tensor | None = None, bias: float = 0.0):
        super().__init__()
        c, h, w = latent_shape
        if mu_cond.numel() != c * h * w or sigma.shape != (c * h * w, c * h * w):
            raise ValueError(f"mu {tuple(mu_cond.shape)} and Sigma {tuple(sigma.shape)} do not fit latents {latent_shape}")
        eigvals, eigvecs = torch.linalg.eigh(sigma.double())
        self.register_buffer("mu_cond", mu_cond.double().flatten())
        self.register_buffer("mu_uncond", (mu_cond if mu_uncond is None else mu_uncond).double().flatten())
        self.register_buffer("eigvals", eigvals.clamp(min=0))
        self.register_buffer("eigvecs", eigvecs)
        self.register_buffer("alphas_cumprod", alphas_cumprod.double())
        self.latent_shape = latent_shape
        self.bias = bias  # added to eps*: a deliberately biased predictor for tests
        self.config = SimpleNamespace(in_channels=c, out_channels=c, sample_size=h, time_cond_proj_dim=None)
        self._anchor = nn.Parameter(torch.zeros(()), requires_grad=False)  # gives the module a dtype and device

    @property
    def dtype(self) -> torch.dtype:
        return self._anchor.dtype

    @property
    def device(self) -> torch.device:
        return self._anchor.device

    def predict(self, x_t: torch.Tensor, t, conditional: torch.Tensor | None = None) -> torch.Tensor:
        """Returns eps* (B, C, h, w) for x_t (B, C, h, w) at timestep(s) t; conditional: (B,) bool or None (all)."""
        b = x_t.shape[0]
        t = torch.as_tensor(t, dtype=torch.float64).cpu().flatten().expand(b) if torch.as_tensor(t).numel() == 1 \
            else torch.as_tensor(t, dtype=torch.float64).cpu()
        alpha_bar_t = alpha_bar_at(self.alphas_cumprod.cpu(), t).to(x_t.device)          # (B,)
        cond = torch.ones(b, dtype=torch.bool) if conditional is None else conditional.cpu()
        mu = torch.where(cond[:, None], self.mu_cond.cpu(), self.mu_uncond.cpu()).to(x_t.device)  # (B, D)
        x = x_t.reshape(b, -1).double()                                                  # (B, D)
        eps = gaussian_optimal_eps(x, alpha_bar_t, mu, self.eigvals, self.eigvecs)
        return (eps + self.bias).reshape(x_t.shape).to(x_t.dtype)

    def forward(self, latents, time, text_context=None, pooled_text=None, **kwargs):
        """The denoiser interface (ldm.models.denoiser): returns eps* (B, C, h, w)."""
        conditional = None
        if text_context is not None:
            conditional = text_context.flatten(1).float().mean(1) > 0.5  # (B,)
        return self.predict(latents, time, conditional)


def gaussian_prompt_embeds(batch: int, seq_len: int = 77, dim: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (prompt_embeds of ones, negative_prompt_embeds of zeros), each (B, L, D): what GaussianEpsModel reads
    as conditional and unconditional."""
    return torch.ones(batch, seq_len, dim), torch.zeros(batch, seq_len, dim)


def gaussian_pipeline(model: GaussianEpsModel, schedule_config: dict, scheduler: str = "ddim"):
    """Returns an ldm.Pipeline whose UNet is `model` (tiny random VAE and text encoder, unused with
    output_type="latent" and prompt_embeds), sampling with the named scheduler over the given noise schedule."""
    from ldm.pipelines import Pipeline
    from ldm.models.presets import build_components
    from ldm.pipelines.schedulers import make_scheduler

    components = build_components("tiny")
    components["unet"] = model
    components["scheduler"] = make_scheduler(scheduler, {**components["scheduler"].config, **schedule_config})
    return Pipeline(**components)
