"""Loss masks: where each training image's loss counts (masked loss; `--masked-loss`).

A mask is a greyscale picture the size of its image: white (255) = learn, black (0) = ignore, grey = a weight
in between (128 ~ 0.5). For an image DIR/NAME.EXT it is, first found:
  1. a sidecar DIR/NAME.mask.EXT2 beside the image (any image suffix EXT2);
  2. MASK_DIR/NAME.EXT2 (the same relative path and stem, any image suffix) when a mask folder is given;
  3. the image's own alpha channel (opaque = learn, transparent = ignore), when it has one.
An image without any of these counts as fully masked-in (all ones). Conventions as kohya's sd-scripts
(`--masked_loss`: a mask folder `conditioning_data_dir` with the images' file names, white learns, grey weighs,
or `--alpha_mask`) and OneTrainer (`NAME-masklabel.png` beside the image); we read the mask as luminance
("L": kohya reads the R channel, the same for grey masks) and name sidecars `.mask.` to keep them apart
from images.

The mask goes through the image's resize, crop and flip (ldm.data.transforms), then `latent_mask` averages it
over each latent cell (area downsampling, as kohya's `apply_masked_loss` interpolates with mode="area").
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from ldm.data.skips import BadSample

MASK_TAG = ".mask"  # NAME.mask.png beside NAME.png


def is_mask_file(path: str) -> bool:
    """Returns whether `path` is a sidecar mask (NAME.mask.EXT): the folder source does not train on these."""
    return os.path.splitext(os.path.splitext(os.path.basename(path))[0])[1].lower() == MASK_TAG


def find_mask(root: str, relative: str, mask_dir: str | None, extensions: tuple[str, ...]) -> str | None:
    """Returns the path of image `relative` (under `root`)'s mask file, by the precedence in the module
    docstring (sidecar, then mask folder), or None (the alpha channel, if any, is read with the image)."""
    stem = os.path.splitext(relative)[0]
    candidates = [os.path.join(root, stem + MASK_TAG + ext) for ext in extensions]
    if mask_dir:
        candidates += [os.path.join(mask_dir, stem + ext) for ext in extensions]
    return next((c for c in candidates if os.path.isfile(c)), None)


def alpha_mask(image: Image.Image) -> Image.Image | None:
    """Returns the upright image's alpha channel as an "L" mask (opaque = learn), or None when it has none or it
    is opaque everywhere (many PNGs carry an unused alpha channel: they count as images without a mask)."""
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode not in ("RGBA", "LA", "La", "RGBa", "PA"):
        return None
    alpha = ImageOps.exif_transpose(image).getchannel("A")
    return None if alpha.getextrema() == (255, 255) else alpha


def check_mask_size(mask: Image.Image, image_size: tuple[int, int], key: str) -> None:
    """Raises BadSample("mask_size_mismatch") when the mask's (width, height) is not the upright image's."""
    if mask.size != image_size:
        raise BadSample("mask_size_mismatch", f"{key}: mask {mask.size[0]}x{mask.size[1]} px, image "
                                              f"{image_size[0]}x{image_size[1]} px")


def mask_tensor(mask: Image.Image) -> torch.Tensor:
    """Returns a (1, H, W) float32 tensor in [0, 1] from an "L" mask."""
    return torch.frombuffer(bytearray(mask.tobytes()), dtype=torch.uint8).reshape(1, mask.height, mask.width).float() / 255


def latent_mask(mask: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
    """Returns pixel masks (B, 1, H, W) (or (1, H, W)) averaged over each latent cell: (B, 1, h, w) (or (1, h, w)).

    Area downsampling: a cell's weight is the mean of its H/h x W/w pixels (kohya: F.interpolate(mode="area"))."""
    if tuple(mask.shape[-2:]) == tuple(latent_size):
        return mask
    squeeze = mask.ndim == 3
    pooled = F.adaptive_avg_pool2d(mask[None] if squeeze else mask, latent_size)  # (B, 1, h, w)
    return pooled[0] if squeeze else pooled


def loss_weight(mask: torch.Tensor, floor: float) -> torch.Tensor:
    """Returns the per-pixel loss weight w = floor + (1 - floor) * mask: 1 where the mask is 1, `floor` where 0."""
    return floor + (1.0 - floor) * mask


def masked_count(samples: list[dict]) -> int | None:
    """Returns how many samples had a loss mask of their own ("has_mask"; None when masks are off)."""
    return sum(bool(s["has_mask"]) for s in samples) if samples and "has_mask" in samples[0] else None
