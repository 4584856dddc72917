"""Reading a folder of images for evaluation: RGB, resized, as tensors in [0, 1]."""
from __future__ import annotations

import os

import torch
from PIL import Image

from ldm.data.transforms import to_tensor

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def list_images(folder: str) -> list[str]:
    """Returns the image paths under folder (recursive, sorted); raises when there are none."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"image folder {folder} does not exist; pass a folder of .png/.jpg images")
    paths = sorted(os.path.join(root, f) for root, _, files in os.walk(folder) for f in files
                   if f.lower().endswith(IMAGE_SUFFIXES))
    if not paths:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return paths


def to_unit_batch(images: list[Image.Image], size: int | None = None) -> torch.Tensor:
    """Returns images as one (N, 3, H, W) float32 batch in [0, 1] (what the feature extractors take), in RGB,
    resized to size x size (bicubic) when given; the pixels go through ldm.data.transforms.to_tensor."""
    out = []
    for image in images:
        image = image.convert("RGB")
        if size is not None and image.size != (size, size):
            image = image.resize((size, size), Image.BICUBIC)
        out.append(to_tensor(image))  # (3, H, W) in [-1, 1]
    return torch.stack(out).add_(1.0).div_(2.0)  # (N, 3, H, W) in [0, 1]


def load_image_folder(folder: str, size: int | None = None, limit: int | None = None) -> torch.Tensor:
    """Returns the folder's images as (N, 3, size, size) in [0, 1] (first `limit` in sorted order)."""
    paths = list_images(folder)[:limit]
    images = []
    for p in paths:
        with Image.open(p) as im:
            images.append(im.convert("RGB"))
    return to_unit_batch(images, size)
