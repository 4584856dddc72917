"""Safe decoding of one record: image bytes -> PIL image, caption bytes -> str, or BadSample(reason).

A record, as readers yield it, is {"key": str, "caption": str | bytes | list | None} plus one of
"image" (PIL), "image_bytes" (bytes) or "image_path" (str), and optionally "mask_path" (str: its loss mask,
ldm.data.masks). `decode_record` returns the raw sample {"image": PIL (fully loaded, original mode), "caption":
str, "key": str} (+ "mask": PIL "L", upright, when the record names a mask file) that transforms consume.
"""
from __future__ import annotations

import io
import random
import warnings

from PIL import Image, ImageFile, ImageOps

from ldm.data.skips import BadSample

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file must fail, not decode as grey
MIN_SIDE = 8
MAX_PIXELS = 16384 * 16384  # 268 M pixels; PIL's own guard (89 M) warns below this, we decide here


def open_image(data: bytes | str, min_side: int = MIN_SIDE, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Returns the fully decoded image from bytes or a path, or raises BadSample naming why not."""
    if isinstance(data, str):
        try:
            with open(data, "rb") as f:
                data = f.read()
        except OSError as e:
            raise BadSample("unreadable_shard", str(e)) from None
    if len(data) == 0:
        raise BadSample("empty_file")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as e:
            raise BadSample("too_large", str(e)) from None
        except Exception as e:  # noqa: BLE001 - PIL raises many types for unidentifiable bytes
            raise BadSample("not_an_image", str(e)) from None
        width, height = image.size  # read from the header, before any pixels are decoded
        if width * height > max_pixels:
            raise BadSample("too_large", f"{width}x{height} > {max_pixels} pixels")
        if min(width, height) < min_side:
            raise BadSample("too_small", f"{width}x{height} < {min_side} px")
        try:
            image.load()
        except Exception as e:  # noqa: BLE001 - truncated or corrupt pixel data
            raise BadSample("corrupt_image", str(e)) from None
    return image


def open_mask(path: str) -> Image.Image:
    """Returns a loss mask file (ldm.data.masks) as an upright "L" image, or raises BadSample("bad_mask")."""
    try:
        image = open_image(path)
    except BadSample as e:
        raise BadSample("bad_mask", f"{path}: {e}") from None
    return ImageOps.exif_transpose(image).convert("L")


def decode_caption(caption, rng: random.Random | None = None) -> str:
    """Returns the caption as a stripped str (one of a list picked by `rng`), or raises BadSample."""
    if isinstance(caption, (list, tuple)):
        options = [c for c in caption if c is not None and str(c).strip()] if caption else []
        if not options:
            raise BadSample("missing_caption")
        caption = (rng or random).choice(options)
    if isinstance(caption, (bytes, bytearray)):
        try:
            caption = bytes(caption).decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadSample("bad_caption_encoding", str(e)) from None
    if caption is None or not str(caption).strip():
        raise BadSample("missing_caption")
    return str(caption).strip()


def decode_record(record: dict, rng: random.Random | None = None, min_side: int = MIN_SIDE,
                  max_pixels: int = MAX_PIXELS) -> dict:
    """Returns {"image": PIL, "caption": str, "key": str} from a reader's record, or raises BadSample."""
    caption = decode_caption(record.get("caption"), rng)  # cheap check first
    if "image" in record and isinstance(record["image"], Image.Image):
        image = record["image"]
    elif record.get("image_bytes") is not None:
        image = open_image(record["image_bytes"], min_side, max_pixels)
    elif record.get("image_path") is not None:
        image = open_image(record["image_path"], min_side, max_pixels)
    else:
        raise BadSample("missing_image")
    if record.get("mask_path") is not None:
        return {"image": image, "caption": caption, "key": record["key"], "mask": open_mask(record["mask_path"])}
    return {"image": image, "caption": caption, "key": record["key"]}
