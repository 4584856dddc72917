"""FID and KID as pure functions of feature matrices (any feature extractor; Inception's pool3 for the standard).

FID: Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium",
arXiv:1706.08500, Eq. (6):  d^2 = ||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^{1/2}).
KID: Binkowski et al. 2018, "Demystifying MMD GANs", arXiv:1801.01401, Sec. 4: the unbiased MMD^2 estimate with
the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3, averaged over random subsets.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy import linalg


def feature_statistics(features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Returns (mean (d,), covariance (d, d)) of features (N, d) in float64."""
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"need features of shape (N >= 2, d), got {tuple(features.shape)}; use at least two images")
    x = features.double().cpu().numpy()
    return x.mean(0), np.cov(x, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Returns the Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (Heusel et al. 2017, Eq. 6).

    Tr((S_1 S_2)^{1/2}) is computed as the sum of sqrt(eig(S_1^{1/2} S_2 S_1^{1/2})), a symmetric PSD matrix with
    the same eigenvalues as S_1 S_2: two symmetric eigendecompositions instead of scipy's sqrtm (a general,
    complex Schur-based square root), stable when the covariances are singular (fewer images than features).
    """
    diff = mu1 - mu2
    w, v = linalg.eigh(sigma1)
    sqrt_sigma1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    middle = sqrt_sigma1 @ sigma2 @ sqrt_sigma1
    trace_sqrt = np.sqrt(np.clip(linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    return float(max(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt, 0.0))


def fid_from_features(features_1: torch.Tensor, features_2: torch.Tensor) -> float:
    """Returns FID between two feature sets (N1, d) and (N2, d)."""
    return frechet_distance(*feature_statistics(features_1), *feature_statistics(features_2))


def polynomial_mmd2(x: torch.Tensor, y: torch.Tensor) -> float:
    """Returns the unbiased MMD^2 between samples x (m, d) and y (n, d) with k(a, b) = (a.b / d + 1)^3."""
    d = x.shape[1]
    k_xx, k_yy, k_xy = ((x @ x.T) / d + 1) ** 3, ((y @ y.T) / d + 1) ** 3, ((x @ y.T) / d + 1) ** 3
    m, n = len(x), len(y)
    term_xx = (k_xx.sum() - k_xx.diagonal().sum()) / (m * (m - 1))
    term_yy = (k_yy.sum() - k_yy.diagonal().sum()) / (n * (n - 1))
    return float(term_xx + term_yy - 2 * k_xy.mean())


def kernel_inception_distance(features_1: torch.Tensor, features_2: torch.Tensor, subsets: int = 10,
                              subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Returns (KID mean, std) over `subsets` random subsets of min(subset_size, N1, N2) rows of each set."""
    x, y = features_1.double().cpu(), features_2.double().cpu()
    size = min(subset_size, len(x), len(y))
    if size < 2:
        raise ValueError(f"KID needs at least two images in each set, got {len(x)} and {len(y)}")
    g = torch.Generator().manual_seed(seed)
    values = [polynomial_mmd2(x[torch.randperm(len(x), generator=g)[:size]], y[torch.randperm(len(y), generator=g)[:size]])
              for _ in range(subsets)]
    return float(np.mean(values)), float(np.std(values))
