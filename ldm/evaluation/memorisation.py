"""Memorisation: how close each generated image is to its nearest training image.

Following Carlini et al. 2023, "Extracting Training Data from Diffusion Models", arXiv:2301.13188, Sec. 4.1: the
distance to the nearest training image d_1 is compared with the mean distance to the k nearest, so that a generated
image counts as a copy only when it is much closer to one training image than to the others:
    ratio = d_1 / mean(d_1..d_k);   ratio < threshold flags a likely copy (identical copies give 0).
Distances are Euclidean in whatever space the rows live in (pixels downsampled to 32 px by default).
"""
from __future__ import annotations

import torch


def memorisation_distances(generated: torch.Tensor, training: torch.Tensor, k: int = 50,
                           threshold: float = 0.5) -> dict:
    """Returns {"nearest", "ratio", "nearest_index", "nearest_min", "nearest_median", "ratio_min", "flagged",
    "flagged_fraction"} for generated (N, ...) against training (M, ...) rows, per generated image where a list."""
    g = generated.reshape(len(generated), -1).double()                     # (N, D)
    t = training.reshape(len(training), -1).double()                       # (M, D)
    if g.shape[1] != t.shape[1]:
        raise ValueError(f"generated rows have {g.shape[1]} values but training rows {t.shape[1]}; resize both alike")
    d = torch.cdist(g, t)                                                  # (N, M)
    k = max(1, min(k, len(t)))
    nearest_k = d.topk(k, dim=1, largest=False).values                     # (N, k), ascending
    nearest = nearest_k[:, 0]
    ratio = nearest / nearest_k.mean(1).clamp(min=1e-12)
    flagged = ratio < threshold
    return {"nearest": nearest.tolist(), "ratio": ratio.tolist(), "nearest_index": d.argmin(1).tolist(),
            "nearest_min": float(nearest.min()), "nearest_median": float(nearest.median()),
            "ratio_min": float(ratio.min()), "threshold": threshold, "k": k,
            "flagged": [int(i) for i in torch.nonzero(flagged).flatten()],
            "flagged_fraction": float(flagged.double().mean())}
