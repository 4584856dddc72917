"""Handwritten digits: scikit-learn's copy of the UCI optical digits (`sklearn.datasets.load_digits`), a real data set
that ships inside the scikit-learn wheel (1797 grey 8x8 images of 0-9, nothing to download).

Each 8x8 image (ink 0..16) is drawn as dark ink on white paper, upscaled bilinearly to R x R px RGB (32 by default),
and captioned "a handwritten digit 7" (the canonical wording; with canonical_captions=False also "a handwritten 7",
"the digit 7" or "a handwritten seven", drawn per image, deterministically).

The split is fixed by index, with no seed: within each class, every fifth image in load_digits order (the 5th, 10th,
...) is `test` (355 images, 34-36 per class), the others `train` (1442); `all` is both. Generated images are graded
against the train split's classifier and test images (ldm.evaluation.digits), never seen in training.

`DigitsDataset(split, resolution)[i]` yields {"image": PIL RGB (R x R), "caption": str, "key": "digits-<index>"},
the raw sample of every ldm.data source; `open_dataset("digits")`, "digits:test" or "digits:train@32" wraps it.
"""
from __future__ import annotations

import functools
import random
import re

import numpy as np
from PIL import Image

SPLITS = ("train", "test", "all")
DEFAULT_RESOLUTION = 32
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATES = ("a handwritten digit {d}", "a handwritten {d}", "the digit {d}", "a handwritten {word}")
TEST_EVERY = 5   # every fifth image of each class is held out


def require_sklearn():
    """Returns sklearn.datasets, or raises ImportError saying how to install scikit-learn."""
    try:
        import sklearn.datasets
    except ImportError as error:
        raise ImportError("the digits data set is scikit-learn's load_digits: pip install scikit-learn "
                          "(it is in the dev extra)") from error
    return sklearn.datasets


@functools.lru_cache(maxsize=1)
def _load() -> tuple[np.ndarray, np.ndarray]:
    digits = require_sklearn().load_digits()
    return digits.images.astype(np.float32), digits.target.astype(np.int64)  # (1797, 8, 8) in 0..16, (1797,)


def split_indices(split: str) -> np.ndarray:
    """Returns the load_digits indices of a split, ascending: test is every fifth image of each class."""
    if split not in SPLITS:
        raise ValueError(f"unknown digits split {split!r}; choose one of {SPLITS}")
    labels = _load()[1]
    test = np.zeros(len(labels), dtype=bool)
    for digit in range(10):
        test[np.flatnonzero(labels == digit)[TEST_EVERY - 1::TEST_EVERY]] = True
    keep = {"train": ~test, "test": test, "all": np.ones_like(test)}[split]
    return np.flatnonzero(keep)


def load_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Returns (images (N, 8, 8) float32 ink in 0..16, labels (N,) int64) of a split."""
    images, labels = _load()
    index = split_indices(split)
    return images[index], labels[index]


def render_digit(ink: np.ndarray, resolution: int = DEFAULT_RESOLUTION) -> Image.Image:
    """Returns an 8x8 ink image (0..16) as a PIL RGB image of resolution x resolution px: dark ink on white,
    upscaled bilinearly."""
    if resolution < 8:
        raise ValueError(f"resolution must be at least 8 px, got {resolution}")
    grey = np.clip(255.0 * (1.0 - ink / 16.0), 0, 255).round().astype(np.uint8)  # (8, 8)
    return Image.fromarray(grey, "L").resize((resolution, resolution), Image.Resampling.BILINEAR).convert("RGB")


def caption_digit(digit: int, rng: random.Random | None = None) -> str:
    """Returns the canonical caption "a handwritten digit 7", or with `rng` one of TEMPLATES (the canonical one
    half of the time)."""
    template = TEMPLATES[0] if rng is None or rng.random() < 0.5 else rng.choice(TEMPLATES[1:])
    return template.format(d=digit, word=NUMBER_WORDS[digit])


def parse_digits(spec: str) -> tuple[str, int | None]:
    """Returns (split, resolution or None) of "digits", "digits:SPLIT", "digits@R" or "digits:SPLIT@R"."""
    match = re.fullmatch(r"digits(?::(\w+))?(?:@(\d+))?", spec.strip())
    if match is None or (match.group(1) or "train") not in SPLITS:
        raise ValueError(f"bad digits spec {spec!r}; write digits, digits:SPLIT or digits:SPLIT@R with SPLIT one of "
                         f"{SPLITS}, e.g. digits:train@32")
    return match.group(1) or "train", int(match.group(2)) if match.group(2) else None


class DigitsDataset:
    """Map-style: item i is {"image": PIL RGB, "caption": str, "key": "digits-<load_digits index>"}; `labels` (N,)
    holds each item's digit."""

    def __init__(self, split: str = "train", resolution: int = DEFAULT_RESOLUTION, canonical_captions: bool = False):
        self.split, self.resolution, self.canonical_captions = split, resolution, canonical_captions
        self.indices = split_indices(split)
        self.images, self.labels = load_split(split)
        if resolution < 8:
            raise ValueError(f"resolution must be at least 8 px, got {resolution}")

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} digits ({self.split})")
        index, digit = int(self.indices[i]), int(self.labels[i])
        rng = None if self.canonical_captions else random.Random(f"digits/{index}")  # str seeds hash stably
        return {"image": render_digit(self.images[i], self.resolution), "caption": caption_digit(digit, rng),
                "key": f"digits-{index:04d}"}
