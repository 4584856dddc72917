"""Prompt adherence of shapes-demo images, graded by pixel analysis (no learned model, no download).

    parse_prompt("a red circle on the left")  -> {"colour": "red", "shape": "circle", "position": "left"}
    grade_image(image, prompt)                -> {"colour": bool, "shape": bool, "position": bool, "all": bool}
    adherence_report(images, prompts)         -> {"colour": frac, "shape": frac, "position": frac, "all": frac, "n": int}

Grading finds the dominant non-background blob and measures it:
  colour:   the blob's median colour, nearest of ldm.data.shapes.COLOURS in CIELAB (perceptual distances);
  shape:    the best-fitting template: a square, a circle and an upright triangle, each of the blob's area and
            centred on its centroid; the one with the highest overlap (IoU) with the blob wins. A stray pixel or
            a softened corner moves the IoU a little, where it moved the bounding-box fill ratio used before
            across a threshold (7 of 120 VAE round trips of true renders, all squares, read as circles);
  position: the blob's bounding-box centre in the left/right third, else the top/bottom third, else center.
Templates and thresholds at half contrast keep it robust to blur.

Two-shape prompts ("a red circle above a blue square", pair_report) are graded on the two largest blobs (the
second at least a fifth of the first): colours (the two asked for, in either blob), shapes (each colour's blob has
its shape) and relation (the subject's blob lies in the asked direction of the other's, along the dominant axis).
"""
from __future__ import annotations

import re

import numpy as np
from PIL import Image
from scipy import ndimage

from ldm.data.shapes import COLOURS, POSITIONS, SHAPES

POSITION_WORDS = {"left": "left", "right": "right", "top": "top", "upper": "top", "bottom": "bottom",
                  "lower": "bottom", "center": "center", "centre": "center", "middle": "center"}
RELATION_WORDS = ("above", "below", "left of", "right of", " and ")
TEMPLATE_SUPERSAMPLE = 4  # templates are rasterised at 4x and averaged: fractional pixel coverage


def parse_prompt(prompt: str) -> dict:
    """Returns {"colour", "shape", "position"} named by a single-shape prompt such as "a red circle on the left"."""
    text = " " + re.sub(r"[^a-z ]", " ", prompt.lower()) + " "
    if any(word in text for word in RELATION_WORDS):
        raise ValueError(f"{prompt!r} relates two shapes; parse_prompt grades single-shape prompts only "
                         f"(e.g. 'a red circle on the left')")
    words = text.split()
    found = {"colour": [w for w in words if w in COLOURS], "shape": [w for w in words if w in SHAPES],
             "position": [POSITION_WORDS[w] for w in words if w in POSITION_WORDS]}
    for attribute, hits in found.items():
        if len(set(hits)) != 1:
            raise ValueError(f"{prompt!r} must name exactly one {attribute}, found {hits or 'none'}; "
                             f"write e.g. 'a red circle on the left'")
    return {attribute: hits[0] for attribute, hits in found.items()}


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """Returns CIELAB (D65) of sRGB values in [0, 255], shape (..., 3) -> (..., 3)."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)  # IEC 61966-2-1
    xyz = linear @ np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]).T
    xyz = xyz / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1)


_PALETTE_NAMES = list(COLOURS)
_PALETTE_LAB = srgb_to_lab(np.array([COLOURS[n] for n in _PALETTE_NAMES]))  # (6, 3)


def largest_blobs(pixels: np.ndarray, count: int) -> list[np.ndarray]:
    """Returns the boolean masks (H, W) of up to `count` largest regions that differ from the border colour,
    largest first (none when nothing stands out)."""
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])  # (4W, 3) roughly
    background = np.median(border, axis=0)
    distance = np.linalg.norm(pixels - background, axis=-1)  # (H, W)
    peak = np.percentile(distance, 99.5)
    if peak < 30:  # nothing stands out from the background
        return []
    labels, found = ndimage.label(distance > 0.5 * peak)  # half contrast: blur moves edges little
    sizes = ndimage.sum(np.ones_like(labels), labels, index=range(1, found + 1))
    return [labels == (int(i) + 1) for i in np.argsort(-np.asarray(sizes), kind="stable")[:count]]


def dominant_blob(pixels: np.ndarray) -> np.ndarray | None:
    """Returns the boolean mask (H, W) of the largest region that differs from the border colour, or None."""
    blobs = largest_blobs(pixels, 1)
    return blobs[0] if blobs else None


def template_iou(mask: np.ndarray, shape: str) -> float:
    """Returns the IoU of `mask` (H, W) with the upright `shape` of the same area centred on the mask's centroid.

    The centroid of an upright isosceles triangle lies 2/3 of its height below the apex (side = height,
    area = h^2 / 2, as ldm.data.shapes draws it); a square's and a circle's lie at their centres.
    """
    area = float(mask.sum())
    ys, xs = np.nonzero(mask)
    cy, cx = ys.mean() + 0.5, xs.mean() + 0.5  # pixel centres
    height, width = mask.shape
    k = TEMPLATE_SUPERSAMPLE
    gy, gx = np.meshgrid((np.arange(height * k) + 0.5) / k, (np.arange(width * k) + 0.5) / k, indexing="ij")
    if shape == "square":
        half = np.sqrt(area) / 2
        inside = (np.abs(gy - cy) <= half) & (np.abs(gx - cx) <= half)
    elif shape == "circle":
        inside = (gy - cy) ** 2 + (gx - cx) ** 2 <= area / np.pi
    elif shape == "triangle":
        h = np.sqrt(2 * area)
        top = cy - 2 * h / 3
        depth = gy - top  # 0 at the apex, h at the base; the half width grows as depth / 2
        inside = (depth >= 0) & (depth <= h) & (np.abs(gx - cx) <= depth / 2)
    else:
        raise ValueError(f"unknown shape {shape!r}; choose one of {SHAPES}")
    coverage = inside.reshape(height, k, width, k).mean(axis=(1, 3))  # (H, W) in [0, 1]
    m = mask.astype(np.float64)
    return float(np.minimum(m, coverage).sum() / np.maximum(m, coverage).sum())


def classify_blob(pixels: np.ndarray, mask: np.ndarray) -> dict:
    """Returns {"colour", "shape", "position"} measured from the blob `mask` of `pixels` (H, W, 3)."""
    core = ndimage.binary_erosion(mask, iterations=1)
    colour_pixels = pixels[core if core.sum() >= 4 else mask]  # the interior: edges mix with the background
    lab = srgb_to_lab(np.median(colour_pixels, axis=0))
    colour = _PALETTE_NAMES[int(np.argmin(np.linalg.norm(_PALETTE_LAB - lab, axis=-1)))]
    ys, xs = np.nonzero(mask)
    box_area = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    fill = mask.sum() / box_area
    overlaps = {name: template_iou(mask, name) for name in SHAPES}
    shape = max(overlaps, key=overlaps.get)
    height, width = mask.shape
    # The bounding-box centre, not the centroid: a triangle's centroid sits 1/6 of its height below it.
    cx, cy = (xs.min() + xs.max() + 1) / 2 / width, (ys.min() + ys.max() + 1) / 2 / height
    if cx < 1 / 3 or cx > 2 / 3:
        position = "left" if cx < 1 / 3 else "right"
    elif cy < 1 / 3 or cy > 2 / 3:
        position = "top" if cy < 1 / 3 else "bottom"
    else:
        position = "center"
    return {"colour": colour, "shape": shape, "position": position, "fill": float(fill),
            "iou": {name: round(value, 4) for name, value in overlaps.items()}}


def describe_image(image: Image.Image) -> dict | None:
    """Returns the measured {"colour", "shape", "position", "fill"} of the image's dominant blob, or None."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    mask = dominant_blob(pixels)
    return None if mask is None else classify_blob(pixels, mask)


def grade_image(image: Image.Image, prompt: str) -> dict:
    """Returns {"colour", "shape", "position", "all"}: whether the image shows what the prompt asks for."""
    wanted = parse_prompt(prompt)
    seen = describe_image(image)
    grades = {key: seen is not None and seen[key] == wanted[key] for key in ("colour", "shape", "position")}
    return {**grades, "all": all(grades.values())}


def adherence_report(images: list[Image.Image], prompts: list[str]) -> dict:
    """Returns the fraction of images right in colour, shape, position and all three, plus their number n."""
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images but {len(prompts)} prompts; pass one prompt per image")
    if not images:
        raise ValueError("adherence_report needs at least one image")
    grades = [grade_image(image, prompt) for image, prompt in zip(images, prompts)]
    keys = ("colour", "shape", "position", "all")
    return {**{k: float(np.mean([g[k] for g in grades])) for k in keys}, "n": len(grades)}


PAIR_PROMPT = re.compile(r"^an? (\w+) (\w+) (above|below|to the left of|to the right of) an? (\w+) (\w+)$")
RELATION_AXES = {"above": (1, -1), "below": (1, 1), "to the left of": (0, -1), "to the right of": (0, 1)}


def parse_pair_prompt(prompt: str) -> dict:
    """Returns {"subject": (colour, shape), "relation": str, "other": (colour, shape)} of a two-shape prompt such
    as "a red circle above a blue square" (the shapes data set's two-shape wording)."""
    match = PAIR_PROMPT.match(" ".join(prompt.lower().split()))
    if not match or not {match[1], match[4]} <= set(COLOURS) or not {match[2], match[5]} <= set(SHAPES) \
            or match[1] == match[4]:
        raise ValueError(f"{prompt!r} is not a two-shape prompt of two different colours; write e.g. "
                         f"'a red circle above a blue square' (relations: {', '.join(RELATION_AXES)})")
    return {"subject": (match[1], match[2]), "relation": match[3], "other": (match[4], match[5])}


def grade_pair(image: Image.Image, prompt: str) -> dict:
    """Returns {"colours", "shapes", "relation", "all"}: whether the image shows the two-shape prompt's scene."""
    wanted = parse_pair_prompt(prompt)
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    blobs = largest_blobs(pixels, 2)
    if len(blobs) < 2 or blobs[1].sum() < 0.2 * blobs[0].sum():
        return {"colours": False, "shapes": False, "relation": False, "all": False}
    seen = [classify_blob(pixels, mask) for mask in blobs]
    by_colour = {s["colour"]: (s, mask) for s, mask in zip(seen, blobs)}
    colours = set(by_colour) == {wanted["subject"][0], wanted["other"][0]}
    shapes = colours and all(by_colour[c][0]["shape"] == shape for c, shape in (wanted["subject"], wanted["other"]))
    relation = False
    if colours:
        (ys, xs), (yo, xo) = (np.nonzero(by_colour[wanted[k][0]][1]) for k in ("subject", "other"))
        delta = (xs.mean() - xo.mean(), ys.mean() - yo.mean())  # subject minus other, (x, y), y downwards
        axis, sign = RELATION_AXES[wanted["relation"]]
        relation = bool(sign * delta[axis] > 0 and abs(delta[axis]) > abs(delta[1 - axis]))
    return {"colours": colours, "shapes": bool(shapes), "relation": relation,
            "all": bool(colours and shapes and relation)}


def pair_report(images: list[Image.Image], prompts: list[str]) -> dict:
    """Returns the fraction of images right in colours, shapes, relation and all three, plus their number n."""
    if len(images) != len(prompts) or not images:
        raise ValueError(f"pass one prompt per image and at least one image, got {len(images)} images and "
                         f"{len(prompts)} prompts")
    grades = [grade_pair(image, prompt) for image, prompt in zip(images, prompts)]
    keys = ("colours", "shapes", "relation", "all")
    return {**{k: float(np.mean([g[k] for g in grades])) for k in keys}, "n": len(grades)}


__all__ = ["parse_prompt", "grade_image", "adherence_report", "describe_image", "template_iou", "POSITIONS",
           "parse_pair_prompt", "grade_pair", "pair_report"]
