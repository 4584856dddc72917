"""Reading a folder of images for evaluation: RGB, resized, as tensors in [0, 1]."""
from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

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


def to_tensor(images: list[Image.Image], size: int | None = None) -> torch.Tensor:
    """Returns images as (N, 3, H, W) float in [0, 1], resized to size x size (bicubic) when given."""
    out = []
    for image in images:
        image = image.convert("RGB")
        if size is not None and image.size != (size, size):
            image = image.resize((size, size), Image.BICUBIC)
        out.append(torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1))  # (3, H, W)
    return torch.stack(out)


def load_image_folder(folder: str, size: int | None = None, limit: int | None = None) -> torch.Tensor:
    """Returns the folder's images as (N, 3, size, size) in [0, 1] (first `limit` in sorted order)."""
    paths = list_images(folder)[:limit]
    images = []
    for p in paths:
        with Image.open(p) as im:
            images.append(im.convert("RGB"))
    return to_tensor(images, size)
