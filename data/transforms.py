"""Image transforms: any PIL image -> {"pixel_values": (3,H,W) float in [-1,1], "caption": str, "key": str,
"original_size": (2,) int64 (h, w) before any resize, "crop_top_left": (2,) int64 (top, left) of the crop in the
resized (and, when flipped, flipped) image}: the size and crop SDXL is conditioned on (ldm.models.sdxl.time_ids).
With `masks` on, also "mask": (1,H,W) float32 in [0,1], the sample's loss mask (ldm.data.masks) put through the
very same resize, crop and flip (all ones when the image has none), and "has_mask": () bool.

Steps: EXIF orientation, any mode to RGB (alpha composited on white), resize the shorter side, centre or
random crop, optional horizontal flip (off by default: it swaps "left" and "right" in captions), and
optional aspect-ratio buckets (SDXL-style: each image goes to the bucket whose aspect is nearest, so
mixed sizes keep their framing; Podell et al. 2023, arXiv:2307.01952, Sec. 2.3 / NovelAI bucketing).
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image, ImageOps

from ldm.data.masks import alpha_mask, check_mask_size, mask_tensor


def to_rgb(image: Image.Image) -> Image.Image:
    """Returns an upright RGB image: EXIF rotation applied, alpha on white, 16-bit and CMYK converted."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        scale = 65535.0 if array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / scale * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode == "F":
        image = Image.fromarray(np.clip(np.asarray(image) * 255 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA")  # palette transparency becomes alpha
    if image.mode in ("RGBA", "LA", "La", "RGBa", "PA"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def default_bucket_step(resolution: int) -> int:
    """Returns the bucket side step for `resolution`: resolution / 8 in multiples of the VAE factor 8, at most 64
    (64 at 512 px and above, as SDXL and kohya's trainer use; 8 at 64 px, where a 64 step leaves one bucket)."""
    return min(64, max(8, resolution // 64 * 8))


def make_buckets(resolution: int, step: int = 64, max_aspect: float = 2.0) -> list[tuple[int, int]]:
    """Returns (width, height) buckets of about resolution^2 pixels, sides multiples of `step`."""
    step = min(step, resolution)
    buckets = {(resolution, resolution)}
    width = resolution
    while True:
        width += step
        height = (resolution * resolution // width) // step * step
        if height < step or width / height > max_aspect:
            break
        buckets |= {(width, height), (height, width)}
    return sorted(buckets)


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """Returns the bucket whose log aspect ratio is nearest the image's."""
    aspect = np.log(width / height)
    return min(buckets, key=lambda b: abs(np.log(b[0] / b[1]) - aspect))


def resized_size(width: int, height: int, size: tuple[int, int]) -> tuple[int, int]:
    """Returns the (width, height) an image of width x height is resized to before it is cropped to `size`
    (width, height): the smallest scaling that covers `size`."""
    target_w, target_h = size
    scale = max(target_w / width, target_h / height)
    return max(target_w, round(width * scale)), max(target_h, round(height * scale))


def crop_box(image: Image.Image, size: tuple[int, int], center_crop: bool,
             rng: random.Random) -> tuple[Image.Image, tuple[int, int]]:
    """Returns (`image` resized to cover `size` (width, height) and cropped to it (centre or random), the crop's
    top-left (top, left) in the resized image's pixels: SDXL's c_crop, Podell et al. 2023, Sec. 2.2)."""
    target_w, target_h = size
    new_w, new_h = resized_size(image.width, image.height, size)
    if center_crop:
        top_left = (new_h - target_h) // 2, (new_w - target_w) // 2
    else:
        left, top = rng.randint(0, new_w - target_w), rng.randint(0, new_h - target_h)
        top_left = top, left
    return crop_at(image, size, top_left, Image.Resampling.BICUBIC), top_left


def crop_at(image: Image.Image, size: tuple[int, int], top_left: tuple[int, int],
            resample: Image.Resampling) -> Image.Image:
    """Returns `image` resized to cover `size` (width, height) with `resample` and cropped to it at `top_left`
    (top, left): crop_box's geometry, so a loss mask (bilinear: no overshoot past 0 and 1) follows its image."""
    new_w, new_h = resized_size(image.width, image.height, size)
    if (new_w, new_h) != image.size:
        image = image.resize((new_w, new_h), resample, reducing_gap=3.0)
    top, left = top_left
    return image.crop((left, top, left + size[0], top + size[1]))


def resize_and_crop(image: Image.Image, size: tuple[int, int], center_crop: bool, rng: random.Random) -> Image.Image:
    """Returns `image` resized to cover `size` (width, height) and cropped to it (centre or random)."""
    return crop_box(image, size, center_crop, rng)[0]


def flipped_crop_top_left(crop_top_left: tuple[int, int], original_size: tuple[int, int],
                          target_size: tuple[int, int]) -> tuple[int, int]:
    """Returns the crop's top-left (top, left) after a horizontal flip of the cropped image, all sizes (h, w).

    Measured in the flipped resized image, as diffusers' train_text_to_image_sdxl.py (which flips before it
    crops) and kohya's sd-scripts record it: left' = resized width - left - crop width.
    """
    resized_w = resized_size(original_size[1], original_size[0], (target_size[1], target_size[0]))[0]
    return crop_top_left[0], resized_w - crop_top_left[1] - target_size[1]


def to_tensor(image: Image.Image) -> torch.Tensor:
    """Returns a (3, H, W) float32 tensor in [-1, 1] from an RGB image."""
    array = np.asarray(image, dtype=np.uint8)  # (H, W, 3)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)  # (3, H, W)


def size_and_crop(samples: list[dict], flipped: bool = False) -> dict:
    """Returns {"original_size", "crop_top_left": (B, 2)} of samples that record them (ImageTransform), the
    crop measured in the flipped image when `flipped`; {} for samples without them (class images)."""
    if "original_size" not in samples[0]:
        return {}
    crops = [s["crop_top_left"] for s in samples]
    if flipped:
        crops = [torch.tensor(flipped_crop_top_left(tuple(s["crop_top_left"].tolist()),
                                                    tuple(s["original_size"].tolist()), s["pixel_values"].shape[-2:]))
                 for s in samples]
    return {"original_size": torch.stack([s["original_size"] for s in samples]),  # (B, 2)
            "crop_top_left": torch.stack(crops)}  # (B, 2)


def sample_mask(sample: dict) -> Image.Image | None:
    """Returns the raw sample's loss mask: its mask file's ("mask"), else its alpha channel, else None."""
    return sample["mask"] if sample.get("mask") is not None else alpha_mask(sample["image"])


@dataclass(frozen=True)
class ImageTransform:
    """Raw sample -> training sample. `settings()` is part of the latent cache key."""
    resolution: int = 64
    center_crop: bool = True
    random_flip: bool = False
    aspect_buckets: bool = False
    bucket_step: int = 0               # bucket sides in multiples of this; 0: default_bucket_step(resolution)
    masks: bool = False                # also yield each sample's loss mask (ldm.data.masks)

    def __post_init__(self):
        if self.resolution < 8:
            raise ValueError(f"resolution must be at least 8 px, got {self.resolution}")
        if self.bucket_step == 0:  # resolved here, so settings() (part of the latent cache key) holds the number
            object.__setattr__(self, "bucket_step", default_bucket_step(self.resolution))

    def settings(self) -> dict:
        settings = asdict(self)
        if not self.masks:  # caches built before masks existed keep their key
            del settings["masks"]
        return settings

    def target_size(self, image: Image.Image) -> tuple[int, int]:
        if not self.aspect_buckets:
            return self.resolution, self.resolution
        return nearest_bucket(image.width, image.height, make_buckets(self.resolution, self.bucket_step))

    def __call__(self, sample: dict, rng: random.Random) -> dict:
        mask = sample_mask(sample) if self.masks else None  # upright "L" or None
        image = to_rgb(sample["image"])
        original_size = (image.height, image.width)  # (h, w) before any resize: SDXL's c_size
        if mask is not None:
            check_mask_size(mask, image.size, sample["key"])
        size = self.target_size(image)
        image, crop_top_left = crop_box(image, size, self.center_crop, rng)
        mask = crop_at(mask, size, crop_top_left, Image.Resampling.BILINEAR) if mask is not None else None
        if self.random_flip and rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            mask = mask.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if mask is not None else None
            crop_top_left = flipped_crop_top_left(crop_top_left, original_size, (image.height, image.width))
        out = {"pixel_values": to_tensor(image), "caption": sample["caption"], "key": sample["key"],
               "original_size": torch.tensor(original_size), "crop_top_left": torch.tensor(crop_top_left)}  # (2,)
        if self.masks:  # no mask: fully masked-in
            out["mask"] = mask_tensor(mask) if mask is not None else torch.ones(1, image.height, image.width)
            out["has_mask"] = torch.tensor(mask is not None)
        return out
