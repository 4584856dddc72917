"""Image files: PNGs that record how they were made, and grids."""
from __future__ import annotations

import json
import math
import os

import PIL.Image
from PIL.PngImagePlugin import PngInfo

# The sampler names of ldm.pipelines.schedulers -> the AUTOMATIC1111 web UI's, for the PNG "parameters" text.
WEBUI_NAMES = {"ddpm": "DDPM", "ddim": "DDIM", "lms": "LMS", "pndm": "PLMS", "euler": "Euler", "euler_a": "Euler a",
               "heun": "Heun", "dpm++": "DPM++ 2M"}


def _quote(value) -> str:
    """Returns value as the web UI writes it: as is, or JSON-quoted when it holds a comma, colon or newline."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def webui_parameters(params: dict) -> str:
    """Returns the AUTOMATIC1111 web UI's "parameters" text for generation parameters named as ldm generate
    records them (prompt, negative_prompt, steps, scheduler, guidance_scale, seed, width, height, model, ...):

        PROMPT (any number of lines)
        Negative prompt: NEGATIVE          (only when there is one)
        Steps: 20, Sampler: DDIM, CFG scale: 7.5, Seed: 1, Size: 64x64, Model: NAME, Clip skip: 2, ...

    Size is width x height; Model is the folder's name; further parameters follow as "Key name: value".
    """
    named = {"Steps": params.get("steps"), "Sampler": WEBUI_NAMES.get(params.get("scheduler"), params.get("scheduler")),
             "CFG scale": params.get("guidance_scale"), "Seed": params.get("seed"),
             "Size": f"{params['width']}x{params['height']}" if "width" in params and "height" in params else None,
             "Model": os.path.basename(os.path.normpath(params["model"])) if params.get("model") else None}
    written = {"prompt", "negative_prompt", "steps", "scheduler", "guidance_scale", "seed", "width", "height", "model"}
    named.update({k.replace("_", " ").capitalize(): v for k, v in params.items() if k not in written})
    line = ", ".join(f"{key}: {_quote(value)}" for key, value in named.items() if value is not None)
    negative = params.get("negative_prompt")
    return f"{params.get('prompt', '')}\n" + (f"Negative prompt: {negative}\n" if negative else "") + line


def save_png(image: PIL.Image.Image, path: str, params: dict) -> str:
    """Writes `image` to `path` with `params` as PNG text: "ldm" (JSON, read back by read_png_params) and
    "parameters" (the web UIs' format, webui_parameters)."""
    info = PngInfo()
    info.add_text("ldm", json.dumps(params, sort_keys=True))
    info.add_text("parameters", webui_parameters(params))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    image.save(path, pnginfo=info)
    return path


def read_png_params(path: str) -> dict:
    """Returns the generation parameters stored by save_png."""
    with PIL.Image.open(path) as image:
        return json.loads(image.text["ldm"])


def image_grid(images: list[PIL.Image.Image], columns: int | None = None) -> PIL.Image.Image:
    """Returns the images tiled row by row on one white canvas, `columns` wide (default: a near-square grid),
    each cell the size of the first image."""
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    w, h = images[0].size
    grid = PIL.Image.new("RGB", (columns * w, rows * h), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * w, (i // columns) * h))
    return grid
