"""Prompt adherence of generated handwritten digits, graded by a classifier of the digits train split (no download).

    parse_digit("a handwritten digit 7")      -> 7   (numerals or number words)
    classify_digits(images)                    -> (N,) predicted digits
    adherence_report(images, prompts)          -> {"all": frac, "n": int, "confusions": {"7->1": count, ...}}
    grader_ceiling(resolution)                 -> {"test_8x8": acc, "test_rendered": acc, "n": int}

The classifier is scikit-learn's RBF support-vector machine (SVC, gamma 0.001: the one of scikit-learn's digits
example) fitted on the 8x8 ink images of the train split (ldm.data.digits) at first use and kept in memory. An
image is graded by turning it into what the classifier knows: grey, ink = 16 * (1 - brightness), box-averaged to
8x8. The ceiling is the classifier's accuracy on the held-out test split, both on the 8x8 originals and on the
same images rendered at R px (as the model is trained on them) and brought back to 8x8 like a generated image.
"""
from __future__ import annotations

import functools
import re

import numpy as np
from PIL import Image

from ldm.data.digits import NUMBER_WORDS, load_split, render_digit, require_sklearn


def parse_digit(prompt: str) -> int:
    """Returns the digit a prompt names ("a handwritten digit 7", "a handwritten seven"); raises ValueError unless
    it names exactly one."""
    words = re.findall(r"[a-z]+|\d+", prompt.lower())
    found = {int(w) for w in words if w.isdigit() and len(w) == 1} | {NUMBER_WORDS.index(w) for w in words
                                                                      if w in NUMBER_WORDS}
    if len(found) != 1:
        raise ValueError(f"{prompt!r} names {len(found)} digits; a digits prompt names one, e.g. "
                         "'a handwritten digit 7'")
    return found.pop()


@functools.lru_cache(maxsize=1)
def digit_classifier():
    """Returns the SVC fitted on the train split's 8x8 ink images (fitted once per process)."""
    require_sklearn()
    from sklearn.svm import SVC

    images, labels = load_split("train")
    return SVC(gamma=0.001).fit(images.reshape(len(images), 64), labels)  # (N, 64) ink in 0..16


def to_ink(images: list[Image.Image]) -> np.ndarray:
    """Returns (N, 64) ink features in 0..16: each image grey, box-averaged to 8x8, dark = ink."""
    grey = [np.asarray(image.convert("L").resize((8, 8), Image.Resampling.BOX), dtype=np.float32)
            for image in images]
    return 16.0 * (1.0 - np.stack(grey).reshape(len(images), 64) / 255.0)


def classify_digits(images: list[Image.Image]) -> np.ndarray:
    """Returns the digit the classifier reads in each image, (N,) int."""
    return digit_classifier().predict(to_ink(images)).astype(np.int64)


def adherence_report(images: list[Image.Image], prompts: list[str]) -> dict:
    """Returns {"all": fraction of images read as their prompt's digit, "n": int, "confusions": {"prompted->read":
    count}} (the key "all" as in ldm.evaluation.adherence, one attribute here)."""
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images for {len(prompts)} prompts; pass one prompt per image")
    wanted = np.array([parse_digit(p) for p in prompts])
    read = classify_digits(images)
    confusions: dict[str, int] = {}
    for w, r in zip(wanted, read):
        if w != r:
            confusions[f"{w}->{r}"] = confusions.get(f"{w}->{r}", 0) + 1
    return {"all": float((wanted == read).mean()), "n": len(images), "confusions": confusions}


def grader_ceiling(resolution: int) -> dict:
    """Returns {"test_8x8", "test_rendered": the classifier's accuracy on the held-out test split, as 8x8 originals
    and rendered at `resolution` px then graded like a generated image; "n": test images}."""
    images, labels = load_split("test")
    direct = digit_classifier().predict(images.reshape(len(images), 64))
    rendered = classify_digits([render_digit(ink, resolution) for ink in images])
    return {"test_8x8": float((direct == labels).mean()), "test_rendered": float((rendered == labels).mean()),
            "n": len(labels)}
