"""Image files: PNGs that record how they were made, and grids."""
from __future__ import annotations

import json
import math
import os

import PIL.Image
from PIL.PngImagePlugin import PngInfo


def save_png(image: PIL.Image.Image, path: str, params: dict) -> str:
    """Writes `image` to `path` with `params` as PNG text: "ldm" (JSON) and "parameters" (web-UI style line)."""
    info = PngInfo()
    info.add_text("ldm", json.dumps(params, sort_keys=True))
    summary = ", ".join(f"{k}: {v}" for k, v in params.items() if k not in ("prompt", "negative_prompt"))
    info.add_text("parameters", f"{params.get('prompt', '')}\nNegative prompt: {params.get('negative_prompt') or ''}\n{summary}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    image.save(path, pnginfo=info)
    return path


def read_png_params(path: str) -> dict:
    """Returns the generation parameters stored by save_png."""
    with PIL.Image.open(path) as image:
        return json.loads(image.text["ldm"])


def image_grid(images: list[PIL.Image.Image], cols: int | None = None) -> PIL.Image.Image:
    """Returns the images tiled row by row on one canvas (all the size of the first)."""
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = PIL.Image.new("RGB", (cols * w, rows * h), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % cols) * w, (i // cols) * h))
    return grid
