"""Memorisation guard for fine-tuning on a few images: are samples near-copies of training images?

For each sample, d_nn = its distance to the nearest training image; the yardstick is the typical distance
between training images, d_train = the median over training images of the distance to their nearest
*other* training image. ratio = d_nn / d_train. A model that generalises draws new pictures in the
folder's style, about as far from each training image as those are from each other (ratio ~ 1 or more);
a model that memorised reproduces training images (ratio -> 0). This is the "copy detection" idea of
Somepalli et al. 2023 (arXiv:2212.03860) and Carlini et al. 2023 (arXiv:2301.13188), with a yardstick
taken from the folder itself so that one threshold works for any style.

Distances are root-mean-square pixel differences of images area-downsampled to `side` px, so that a
slightly blurred copy (a small model's sample) still counts as a copy.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

NEAR_COPY_RATIO = 0.35     # a sample closer than this fraction of d_train to a training image is a near-copy
WARN_FRACTION = 0.5        # warn when at least this fraction of the samples are near-copies
MAX_LOSS_GAP = 1.5         # warn when held-out images' low-noise loss exceeds the training images' by this factor


def image_features(images, side: int = 16) -> torch.Tensor:
    """Returns (N, 3*side*side) features: images (N, 3, H, W) or a list of (3, H_i, W_i), area-downsampled.

    Pass every image in the same range ([-1, 1] as training tensors are).
    """
    images = list(images) if not isinstance(images, torch.Tensor) else list(images.unbind(0))
    if not images or any(i.ndim != 3 or i.shape[0] != 3 for i in images):
        raise ValueError("expected a non-empty batch of RGB images shaped (3, H, W)")
    small = [F.interpolate(i[None].float(), size=(side, side), mode="area") for i in images]  # (1, 3, side, side)
    return torch.cat(small).flatten(1)  # (N, 3*side*side)


def pairwise_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Returns (N, M) RMS distances between feature rows of a (N, F) and b (M, F)."""
    return torch.cdist(a.double(), b.double()).float() / a.shape[1] ** 0.5


def typical_training_distance(train_features: torch.Tensor) -> float:
    """Returns the median distance from each training image to its nearest other training image."""
    if train_features.shape[0] < 2:
        raise ValueError("the memorisation check needs at least 2 training images to measure their typical distance")
    distances = pairwise_distances(train_features, train_features)
    distances.fill_diagonal_(float("inf"))
    return float(distances.min(dim=1).values.median())


@dataclass
class MemorizationReport:
    d_train: float                 # typical distance between training images
    ratios: list[float]            # per sample: distance to the nearest training image / d_train
    nearest: list[int]             # per sample: index of that training image
    near_copy_ratio: float
    near_copies: int
    warning: bool
    message: str

    def to_dict(self) -> dict:
        return asdict(self)


def memorization_report(samples, train_images, near_copy_ratio: float = NEAR_COPY_RATIO,
                        warn_fraction: float = WARN_FRACTION, side: int = 16) -> MemorizationReport:
    """Returns the near-copy report of samples (N, 3, H, W) against the training images (M, 3, H', W')."""
    train = image_features(train_images, side)
    d_train = max(typical_training_distance(train), 1e-6)
    distances = pairwise_distances(image_features(samples, side), train)  # (N, M)
    d_nn, nearest = distances.min(dim=1)
    ratios = (d_nn / d_train).tolist()
    copies = sum(r < near_copy_ratio for r in ratios)
    warning = copies >= max(1, warn_fraction * len(ratios))
    median = sorted(ratios)[len(ratios) // 2]
    message = (f"{copies}/{len(ratios)} samples are near-copies of training images (distance to the nearest "
               f"training image < {near_copy_ratio:g} x the typical distance between training images; median ratio "
               f"{median:.2f})")
    if warning:
        message = ("MEMORISATION WARNING: " + message + ". The model reproduces its training images: use fewer steps "
                   "or a lower learning rate, add images, lower --lora-rank, or pass --early-stop-on-memorization")
    return MemorizationReport(d_train, ratios, nearest.tolist(), near_copy_ratio, copies, warning, message)


def holdout_split(keys: list[str], fraction: float = 0.1, seed: int = 0) -> tuple[list[int], list[int]]:
    """Returns (train indices, held-out indices): a `fraction` held out (at least 1), leave-one-out below 10 images.

    Deterministic by seed and by the sorted keys, so the same folder gives the same split every run.
    """
    if len(keys) < 2:
        raise ValueError(f"fine-tuning needs at least 2 images to hold one out for the memorisation check, got "
                         f"{len(keys)}; add images to the folder (5 or more is better)")
    order = sorted(range(len(keys)), key=lambda i: keys[i])
    permutation = torch.randperm(len(keys), generator=torch.Generator().manual_seed(seed)).tolist()
    shuffled = [order[p] for p in permutation]
    held = 1 if len(keys) < 10 else max(1, round(fraction * len(keys)))
    return sorted(shuffled[held:]), sorted(shuffled[:held])


def generalization_gap(train_loss: dict, heldout_loss: dict) -> dict:
    """Returns {"bin0": heldout/train, ...}: per timestep bin, how much worse held-out images are than training ones.

    A ratio growing well above 1 in the low-noise bins, while the training loss keeps falling, is the loss-side
    sign of memorisation (the model denoises its own images better than new ones in the same style).
    """
    gap = {}
    for key, value in train_loss.items():
        if key.startswith("val_loss_bin") and key in heldout_loss and value > 0:
            gap[key.replace("val_loss_", "")] = heldout_loss[key] / value
    return gap


def loss_gap_warning(gap: dict, max_gap: float = MAX_LOSS_GAP) -> str | None:
    """Returns a warning when the two lowest-noise bins' held-out/training loss ratio averages above max_gap, else None.

    Low noise is where a model that stores its images gains most over one that learned the style: it
    denoises its own pictures from little noise far better than unseen pictures of the same style.
    """
    low = [gap[k] for k in ("bin0", "bin1") if k in gap]
    if not low or sum(low) / len(low) <= max_gap:
        return None
    return (f"MEMORISATION WARNING: held-out images' loss at low noise is {sum(low) / len(low):.2f}x the training "
            f"images' (more than {max_gap:g}x): the model fits its own images, not the style. Use fewer steps or a "
            "lower learning rate, add images, lower --lora-rank, or pass --early-stop-on-memorization")
