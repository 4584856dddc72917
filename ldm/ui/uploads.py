"""The images the page uploads for img2img and inpainting: the image to edit and the mask painted over it (white =
repaint), sent in the generate form's JSON as base64 data URLs (`data:image/png;base64,...`, what a file read by
the browser's FileReader and a canvas's toDataURL give). They are decoded to PIL images here, where they enter;
a file too large, of another type or that is not an image is refused with a message for the page. Before a
generation they are saved as PNGs in the output folder (save_uploads), so that each image's metadata names the
files it was made from, and `ldm generate --init-image FILE --mask FILE` remakes it."""
from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os

import PIL.Image
import PIL.ImageOps

# The page's bounds on an upload: a file's bytes and its pixels (a small PNG can hold a huge blank image)
MAX_UPLOAD_BYTES = 16 * 2**20
MAX_UPLOAD_PIXELS = 4096 * 4096
# The whole JSON body of a generate request: two files, base64 (4/3 of their bytes), and the form's text
MAX_BODY_BYTES = 2 * (MAX_UPLOAD_BYTES * 4 // 3 + 1024) + 2**20
IMAGE_TYPES = {"image/png": "PNG", "image/jpeg": "JPEG", "image/webp": "WEBP"}
UPLOADS = ("init_image", "mask")


def too_large_message(size: int | None = None) -> str:
    """Returns what the page says for a request body over MAX_BODY_BYTES."""
    got = f" ({size / 2**20:.1f} MiB)" if size else ""
    return (f"the upload is too large{got}: the page takes images of at most {MAX_UPLOAD_BYTES // 2**20} MiB each; "
            "upload a smaller image, or use `ldm generate --init-image` for large files")


def decode_image(value, name: str) -> PIL.Image.Image:
    """Returns the uploaded image of a data URL: RGB for the image to edit, L (grey) for the mask; raises
    ValueError naming the field when it is not a PNG, JPEG or WebP data URL, too large, or not an image."""
    if not isinstance(value, str) or not value.startswith("data:") or "," not in value:
        raise ValueError(f"{name}: not an uploaded image; send the file as a data URL (data:image/png;base64,...), "
                         "as the page does")
    header, payload = value[5:].split(",", 1)
    media = header.split(";")[0].lower()
    if media not in IMAGE_TYPES or not header.endswith(";base64"):
        raise ValueError(f"{name}: a file of type {media or 'unknown'!r} is not an image the page takes; upload a "
                         f"PNG, JPEG or WebP image")
    if len(payload) * 3 // 4 > MAX_UPLOAD_BYTES:
        raise ValueError(f"{name}: " + too_large_message(len(payload) * 3 // 4))
    try:
        data = base64.b64decode(payload, validate=True)
    except binascii.Error:
        raise ValueError(f"{name}: the upload is not valid base64; upload the image again") from None
    try:
        with PIL.Image.open(io.BytesIO(data), formats=[IMAGE_TYPES[media]]) as image:
            if image.width * image.height > MAX_UPLOAD_PIXELS:
                raise ValueError(f"{name}: {image.width}x{image.height} pixels is above the page's limit of "
                                 f"{MAX_UPLOAD_PIXELS} pixels; scale the image down first")
            # upright as the browser shows it (a phone's JPEG records its rotation in EXIF), so that the mask
            # painted over the page's preview has the image's size
            return PIL.ImageOps.exif_transpose(image).convert("L" if name == "mask" else "RGB")
    except PIL.Image.DecompressionBombError:
        raise ValueError(f"{name}: the image has too many pixels (above the page's limit of {MAX_UPLOAD_PIXELS}); "
                         "scale the image down first") from None
    except (PIL.UnidentifiedImageError, OSError, SyntaxError):
        raise ValueError(f"{name}: the file is not a readable {IMAGE_TYPES[media]} image (damaged, or another kind "
                         "of file); upload a PNG, JPEG or WebP image") from None


def decode_uploads(form: dict) -> dict:
    """Returns {"init_image": RGB image, "mask": L image} for the uploads the form holds (none: {}); raises
    ValueError for a bad file, a mask without an image, or a mask of another size than the image."""
    images = {name: decode_image(form[name], name) for name in UPLOADS if form.get(name) not in (None, "")}
    if "mask" in images and "init_image" not in images:
        raise ValueError("mask: a mask needs the image it is painted on; upload an image to edit (init_image)")
    if "mask" in images and images["mask"].size != images["init_image"].size:
        raise ValueError(f"mask: {images['mask'].width}x{images['mask'].height} pixels, but the image is "
                         f"{images['init_image'].width}x{images['init_image'].height}; paint the mask on the page's "
                         "canvas, which has the image's size")
    return images


def save_uploads(images: dict, folder: str) -> dict:
    """Returns {name: path} after saving each uploaded image as folder/SHA-NAME.png (SHA: the first 16 hex digits
    of its pixels' SHA-256, so an image uploaded again is stored once)."""
    os.makedirs(folder, exist_ok=True)
    paths = {}
    for name, image in images.items():
        digest = hashlib.sha256(f"{image.mode}{image.size}".encode() + image.tobytes()).hexdigest()[:16]
        paths[name] = os.path.join(folder, f"{digest}-{name}.png")
        if not os.path.isfile(paths[name]):
            image.save(paths[name])
    return paths
