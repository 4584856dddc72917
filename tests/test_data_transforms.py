"""Transforms: EXIF orientation, every PIL mode to RGB, resize + crop, flip, aspect buckets."""
import random

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.data import make_dataloader, open_dataset
from ldm.data.transforms import ImageTransform, make_buckets, nearest_bucket, to_rgb


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "I", "F", "1", "RGB"])
def test_every_mode_becomes_rgb(mode):
    image = Image.new(mode, (10, 12))
    assert to_rgb(image).mode == "RGB" and to_rgb(image).size == (10, 12)


def test_alpha_is_composited_on_white_and_16_bit_is_scaled():
    transparent = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert to_rgb(transparent).getpixel((0, 0)) == (255, 255, 255)
    sixteen = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    assert to_rgb(sixteen).getpixel((0, 0)) == (255, 255, 255)


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (30, 10), (0, 0, 0))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    rotated = Image.open(_saved(image, exif))
    assert to_rgb(rotated).size == (10, 30)


def _saved(image, exif):
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    buffer.seek(0)
    return buffer


def test_resize_shorter_side_and_centre_crop():
    left_red = Image.new("RGB", (64, 32), (0, 0, 255))
    left_red.paste((255, 0, 0), (0, 0, 16, 32))  # a red band on the far left, cut by a centre crop
    out = ImageTransform(16)({"image": left_red, "caption": "c", "key": "k"}, random.Random(0))
    assert out["pixel_values"].shape == (3, 16, 16)
    assert out["pixel_values"][0, :, 2:].max() < -0.99  # no red left (column 0 only sees bicubic bleed)
    assert out["pixel_values"].min() >= -1 and out["pixel_values"].max() <= 1


def test_flip_is_off_by_default_and_random_when_on():
    image = Image.new("RGB", (16, 16), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 8, 16))
    sample = {"image": image, "caption": "c", "key": "k"}
    assert all(ImageTransform(16)(sample, random.Random(s))["pixel_values"][0, 0, 0] > 0 for s in range(10))
    flipped = [ImageTransform(16, random_flip=True)(sample, random.Random(s))["pixel_values"][0, 0, 0] < 0
               for s in range(20)]
    assert 0 < sum(flipped) < 20


def test_buckets_keep_area_and_aspect():
    buckets = make_buckets(256, step=64)
    assert (256, 256) in buckets and (320, 192) in buckets and (192, 320) in buckets
    assert all(w * h <= 256 * 256 and w % 64 == 0 and h % 64 == 0 for w, h in buckets)
    assert nearest_bucket(1600, 900, buckets) == (320, 192)
    assert nearest_bucket(500, 510, buckets) == (256, 256)


def test_bucketed_loader_yields_one_size_per_batch(tmp_path):
    for i, size in enumerate([(96, 48)] * 3 + [(48, 96)] * 2 + [(64, 64)] * 3):
        Image.new("RGB", size, (i * 20, 0, 0)).save(tmp_path / f"img{i}.png")
    dataset = open_dataset(str(tmp_path), resolution=32, aspect_buckets=True, caption="x")
    dataset.transform = ImageTransform(32, aspect_buckets=True, bucket_step=8)
    batches = list(make_dataloader(dataset, batch_size=2))
    shapes = sorted(tuple(b["pixel_values"].shape[2:]) for b in batches for _ in b["key"])
    assert shapes.count((32, 32)) == 3 and len(shapes) == 8
    assert {s for s in shapes if s != (32, 32)} == {(24, 40), (40, 24)}
    assert all(isinstance(b["pixel_values"], torch.Tensor) for b in batches)
