"""Real images without a download: scikit-image's sample photographs and drawings (inside its wheel) as random,
augmented crops, and a generated folder of dark, saturated and textured "art" that no VAE here trains on.

    PhotoCrops(4000, resolution=32)      map-style: item i is {"image": PIL RGB, "caption", "key"}, fixed by seed
    held_out_crops(32)                   (N, 3, 32, 32) in [-1, 1]: fixed crops of the HELD_OUT photographs
    art_images(12, 64)                   12 PIL images: dark backgrounds, saturated colours, textures
    write_art_folder("my-art", 12, 64)   the same as PNG files with a caption .txt each

Crops (PhotoCrops): a square of 15% to 100% of the image's short side at a random place, flipped half the time,
then brightness, contrast and saturation each scaled by a random factor (brightness down to 0.35, so dark
pictures are covered), with probability `recolour` (default 0.5) the hue rotated (grey images, camera, coins,
..., get a random two-colour tint instead), and resized to `resolution`: the VAE sees scales from texture to
whole scene, and colours that photographs rarely hold. The HELD_OUT photographs never enter PhotoCrops; their
crops measure how a VAE reconstructs photographs it never saw. `open_dataset("photos:N@R")` wraps PhotoCrops;
"shapes:N@R+photos:N@R" mixes both (data/open.py); `drawings:N@R` gives crops of the DRAWINGS (text, a
logo, a silhouette, ...), inverted half the time.
"""
from __future__ import annotations

import colorsys
import math
import os
import random

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageOps

# scikit-image's sample images (skimage/data/*.png|jpg, in the wheel). motorcycle_right is left out: it is
# motorcycle_left seen from a few centimetres away, so holding one out and training on the other would leak.
TRAIN_IMAGES = ("astronaut.png", "motorcycle_left.png", "hubble_deep_field.jpg", "ihc.png", "retina.jpg", "logo.png",
                "color.png", "camera.png", "coins.png", "moon.png", "page.png", "text.png", "brick.png", "grass.png",
                "gravel.png", "cell.png", "clock_motion.png")
HELD_OUT = ("chelsea.png", "coffee.png", "rocket.jpg")
# Drawings and line art in the same wheel: text, a logo, a silhouette, a phantom's ellipses, a chessboard. As
# `drawings:N@R` their crops are inverted half the time, so the VAE also sees thin bright lines on black.
DRAWINGS = ("page.png", "text.png", "logo.png", "horse.png", "phantom.png", "chessboard_RGB.png")
PHOTO_CAPTION, DRAWING_CAPTION = "a photograph", "a drawing"


def sample_image(name: str) -> Image.Image:
    """Returns scikit-image's sample image `name` (e.g. "coffee.png") as PIL RGB."""
    try:
        import skimage
    except ImportError as e:  # a core dependency; a broken install should say what is missing
        raise ImportError("real sample images need scikit-image: pip install -c configs/constraints.txt "
                          "scikit-image") from e
    path = os.path.join(os.path.dirname(skimage.__file__), "data", name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"scikit-image's sample image {path} is missing; reinstall scikit-image")
    with Image.open(path) as image:
        return image.convert("RGB")


def shrink(image: Image.Image, short_side: int) -> Image.Image:
    """Returns the image scaled down so that its short side is at most `short_side` (the smallest crop, 15% of
    it, still covers the output resolution when short_side = 8 x resolution); cropping then costs less."""
    scale = short_side / min(image.size)
    if scale >= 1:
        return image
    return image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.LANCZOS)


def _is_grey(image: Image.Image) -> bool:
    r, g, b = (np.asarray(c, dtype=np.int16) for c in image.split())
    return max(np.abs(r - g).max(), np.abs(g - b).max()) <= 8


def random_crop(image: Image.Image, rng: random.Random, resolution: int, min_scale: float = 0.15,
                recolour: float = 0.5, invert: float = 0.0) -> Image.Image:
    """Returns a random square crop (min_scale to 1 of the short side), maybe flipped, colour-jittered, with
    probability `invert` inverted (a negative), with probability `recolour` hue-rotated (a grey image: tinted)
    and resized to resolution x resolution."""
    short = min(image.size)
    side = max(8, round(short * rng.uniform(min_scale, 1.0)))
    left, top = rng.randint(0, image.width - side), rng.randint(0, image.height - side)
    crop = image.crop((left, top, left + side, top + side))
    if rng.random() < 0.5:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    crop = ImageEnhance.Brightness(crop).enhance(rng.uniform(0.35, 1.3))
    crop = ImageEnhance.Contrast(crop).enhance(rng.uniform(0.7, 1.4))
    crop = ImageEnhance.Color(crop).enhance(rng.uniform(0.5, 2.0))
    if invert and rng.random() < invert:  # no draw when invert = 0: photos:N@R crops stay what they were
        crop = ImageOps.invert(crop)
    if recolour and rng.random() < recolour and _is_grey(crop):  # a duotone: dark -> one colour, light -> another
        dark, light = (tuple(rng.randrange(256) for _ in range(3)) for _ in range(2))
        crop = ImageOps.colorize(crop.convert("L"), dark, light)
    elif recolour and rng.random() < recolour:  # a hue rotation: colours photographs rarely hold (magenta, cyan)
        h, s, v = crop.convert("HSV").split()
        shift = rng.randrange(256)
        crop = Image.merge("HSV", (h.point(lambda x: (x + shift) % 256), s, v)).convert("RGB")
    return crop.resize((resolution, resolution), Image.Resampling.LANCZOS if side > resolution
                       else Image.Resampling.BICUBIC)


class PhotoCrops:
    """Map-style: item i is {"image": PIL RGB crop, "caption": caption, "key": "NAME-SEED-i"}, the same crop for a
    given seed. The source images are read once and kept. `drawings()` gives the DRAWINGS, inverted half the time."""

    def __init__(self, num_samples: int, resolution: int = 64, seed: int = 0, images: tuple = TRAIN_IMAGES,
                 recolour: float = 0.5, invert: float = 0.0, caption: str = PHOTO_CAPTION, name: str = "photos"):
        if num_samples < 1:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        for label, p in (("recolour", recolour), ("invert", invert)):
            if not 0 <= p <= 1:
                raise ValueError(f"{label} is a probability in [0, 1], got {p}")
        self.num_samples, self.resolution, self.seed, self.recolour = num_samples, resolution, seed, recolour
        self.invert, self.caption, self.name = invert, caption, name
        self.images = [shrink(sample_image(name), 8 * resolution) for name in images]

    @classmethod
    def drawings(cls, num_samples: int, resolution: int = 64, seed: int = 0) -> "PhotoCrops":
        """Crops of the DRAWINGS, inverted with probability 0.5 and recoloured like photos (`drawings:N@R`)."""
        return cls(num_samples, resolution, seed, images=DRAWINGS, invert=0.5, caption=DRAWING_CAPTION,
                   name="drawings")

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        rng = random.Random(f"{self.name}/{self.seed}/{index}")  # str seeds hash stably across runs
        image = self.images[rng.randrange(len(self.images))]
        crop = random_crop(image, rng, self.resolution, recolour=self.recolour, invert=self.invert)
        return {"image": crop, "caption": self.caption, "key": f"{self.name}-{self.seed}-{index:08d}"}


def to_pixels(images: list[Image.Image]) -> torch.Tensor:
    """Returns PIL RGB images as one tensor (N, 3, H, W) in [-1, 1]."""
    arrays = np.stack([np.asarray(image.convert("RGB"), dtype=np.float32) for image in images])  # (N, H, W, 3)
    return torch.from_numpy(arrays).permute(0, 3, 1, 2) / 127.5 - 1


def held_out_crops(resolution: int, per_image: int = 16, seed: int = 0) -> torch.Tensor:
    """Returns per_image crops of each HELD_OUT photograph, without colour jitter: (N, 3, R, R) in [-1, 1]."""
    crops = []
    for name in HELD_OUT:
        image, rng = sample_image(name), random.Random(f"held-out/{seed}/{name}")
        for _ in range(per_image):
            side = round(min(image.size) * rng.uniform(0.25, 1.0))
            left, top = rng.randint(0, image.width - side), rng.randint(0, image.height - side)
            crop = image.crop((left, top, left + side, top + side))
            crops.append(crop.resize((resolution, resolution), Image.Resampling.LANCZOS))
    return to_pixels(crops)


def write_photo_folder(folder: str, count: int = 20, resolution: int = 32, image: str = "coffee.png",
                       seed: int = 0) -> list[str]:
    """Writes `count` uncaptioned square crops (25% to 100% of the short side, no colour jitter) of one
    photograph as folder/photo_NN.png: a small "personal" folder of real images with one look; returns the paths."""
    os.makedirs(folder, exist_ok=True)
    source, rng, paths = sample_image(image), random.Random(f"folder/{seed}/{image}"), []
    for i in range(count):
        side = round(min(source.size) * rng.uniform(0.25, 1.0))
        left, top = rng.randint(0, source.width - side), rng.randint(0, source.height - side)
        crop = source.crop((left, top, left + side, top + side)).resize((resolution, resolution),
                                                                       Image.Resampling.LANCZOS)
        paths.append(os.path.join(folder, f"photo_{i:02d}.png"))
        crop.save(paths[-1])
    return paths


def _value_noise(rng: np.random.Generator, size: int, octaves: int = 4) -> np.ndarray:
    """Returns (size, size) fractal value noise in [0, 1]: bilinear-upsampled random grids, halving in weight."""
    total = np.zeros((size, size))
    for octave in range(octaves):
        cells = 2 ** (octave + 2)
        grid = Image.fromarray((rng.random((cells, cells)) * 255).astype(np.uint8))
        total += np.asarray(grid.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float64) / 255 / 2 ** octave
    return (total - total.min()) / (np.ptp(total) + 1e-8)


def art_image(index: int, size: int = 64, seed: int = 0) -> Image.Image:
    """Returns one generated picture of four kinds, by index % 4: pink circles on a dark ground; saturated colour
    bands; a tinted fractal texture on a dark ground; bright strokes on near-black."""
    rng, nrng = random.Random(f"art/{seed}/{index}"), np.random.default_rng([seed, index])
    kind = index % 4
    dark = tuple(rng.randint(10, 40) for _ in range(3))
    if kind == 0:
        image = Image.new("RGB", (size, size), dark)
        draw = ImageDraw.Draw(image)
        for _ in range(rng.randint(1, 3)):
            r, cx, cy = size * rng.uniform(0.1, 0.25), size * rng.random(), size * rng.random()
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(rng.randint(220, 255), rng.randint(60, 130),
                                                                  rng.randint(150, 210)))
        return image
    if kind == 1:
        hues = [rng.random() for _ in range(3)]
        angle, period = rng.uniform(0, math.pi), size * rng.uniform(0.2, 0.5)
        y, x = np.mgrid[0:size, 0:size]
        band = ((x * math.cos(angle) + y * math.sin(angle)) // period).astype(int) % 3
        hsv = np.stack([np.take(hues, band), np.full((size, size), 0.95), np.full((size, size), 0.9)], -1)
        return Image.fromarray((hsv * 255).astype(np.uint8), "HSV").convert("RGB")
    if kind == 2:
        noise = _value_noise(nrng, size)[..., None]  # (S, S, 1)
        tint = np.array([rng.randint(80, 255), rng.randint(0, 120), rng.randint(60, 255)])
        return Image.fromarray((np.array(dark) + noise ** 1.5 * (tint - np.array(dark))).astype(np.uint8))
    image = Image.new("RGB", (size, size), tuple(c // 2 for c in dark))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(4, 9)):
        colour = tuple(int(c * 255) for c in colorsys.hsv_to_rgb(rng.random(), 0.9, 1.0))
        points = [(size * rng.random(), size * rng.random()) for _ in range(3)]
        draw.line(points, fill=colour, width=max(1, size // rng.randint(12, 30)))
    return image.filter(ImageFilter.SMOOTH)


def art_images(count: int = 12, size: int = 64, seed: int = 0) -> list[Image.Image]:
    """Returns `count` generated pictures (art_image 0..count-1)."""
    return [art_image(i, size, seed) for i in range(count)]


ART_CAPTIONS = ("pink circles on a dark background", "bands of saturated colour", "a glowing texture in the dark",
                "bright strokes on black")


def write_art_folder(folder: str, count: int = 12, size: int = 64, seed: int = 0) -> list[str]:
    """Writes art_images as folder/art_NN.png, each with a caption art_NN.txt; returns the PNG paths."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i, image in enumerate(art_images(count, size, seed)):
        path = os.path.join(folder, f"art_{i:02d}.png")
        image.save(path)
        with open(path[:-4] + ".txt", "w", encoding="utf-8") as f:
            f.write(ART_CAPTIONS[i % 4])
        paths.append(path)
    return paths


__all__ = ["PhotoCrops", "held_out_crops", "art_images", "write_art_folder", "write_photo_folder", "sample_image",
           "to_pixels", "TRAIN_IMAGES", "HELD_OUT", "DRAWINGS"]
