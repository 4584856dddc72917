"""The Generate form: its fields build a GenerateRequest for the generate service (ldm.pipelines.generate), the
one `ldm generate` calls, so a page's image is the image `ldm generate` makes with the same parameters, bit for
bit, with the same PNG metadata. For img2img and inpainting the form also carries the image to edit and the
painted mask as data URLs (ldm.ui.uploads), decoded into the request's init_image and mask."""
from __future__ import annotations

import io
import os
import threading
import typing

import PIL.Image

from ldm.pipelines.generate import GenerateRequest, flag, generate_with, prepare
from ldm.ui.jobs import Job
from ldm.ui.models import ModelCache
from ldm.ui.uploads import UPLOADS, decode_uploads, save_uploads

# The form's fields besides the prompt: GenerateRequest fields, each the `ldm generate` flag of the same name
FIELDS = ("negative_prompt", "scheduler", "steps", "guidance_scale", "guidance_rescale", "seed", "height", "width",
          "num_images", "lora", "lora_scale", "model", "strength", "mask_blur", "masked_content", "paste_back",
          "prompt_syntax", "long_prompts")
TRUE, FALSE = ("true", "1", "on", "yes"), ("false", "0", "off", "no")
# Bounds of the page beyond the command's: a request that would run for hours or exhaust memory is refused
MAX_SIDE = 2048
MAX_IMAGES = 16
_SAVE_LOCK = threading.Lock()  # two tabs uploading the same image must not write its file at once


def _field_value(name: str, text):
    """Returns a form value as the request field's type (bool, int, float or str); raises ValueError naming the
    field."""
    hint = typing.get_type_hints(GenerateRequest)[name]
    if hint is bool:
        word = str(text).strip().lower()
        if word not in TRUE + FALSE:
            raise ValueError(f"{name} ({flag(name)}): wants true or false, got {text!r}")
        return word in TRUE
    kind = next(k for k in (int, float, str) if k is hint or k in typing.get_args(hint))
    if kind is str:
        return str(text)
    try:
        return kind(str(text).strip())
    except ValueError:
        raise ValueError(f"{name} ({flag(name)}): wants {'an integer' if kind is int else 'a number'}, "
                         f"got {text!r}") from None


def parse_form(form: dict, default_model: str | None) -> GenerateRequest:
    """Returns the request of a form ({field: value}, empty values meaning the default), checked with the
    request's own ranges and the page's limits; raises ValueError (or FileNotFoundError) with a message for the
    page when a field is wrong."""
    prompt = str(form.get("prompt") or "").strip()
    if not prompt:
        raise ValueError("prompt: empty; type what to draw")
    unknown = set(form) - set(FIELDS) - {"prompt", *UPLOADS}
    if unknown:
        raise ValueError(f"unknown fields {sorted(unknown)}; the form has {['prompt', *FIELDS, *UPLOADS]}")
    values = {"model": default_model, **{k: v for k, v in form.items() if k in FIELDS and v not in (None, "")}}
    if not values["model"]:
        raise ValueError("model: no model folder; start `ldm ui --model DIR` or fill in the model field")
    request = GenerateRequest(prompt, **{k: _field_value(k, v) for k, v in values.items()},
                              **decode_uploads(form)).validate()
    check_limits(request)
    return request


def check_limits(request: GenerateRequest) -> None:
    """Raises ValueError/FileNotFoundError for what the page refuses beyond the request's own ranges."""
    for name in ("height", "width"):
        if (getattr(request, name) or 0) > MAX_SIDE:
            raise ValueError(f"{name}: {getattr(request, name)} is above the page's limit of {MAX_SIDE} pixels; use "
                             "`ldm generate` for larger images")
    if request.num_images > MAX_IMAGES:
        raise ValueError(f"num_images: {request.num_images} is above the page's limit of {MAX_IMAGES}")
    if request.lora and not os.path.isfile(request.lora):
        raise FileNotFoundError(f"lora: no file {request.lora!r}; pass a .safetensors written by `ldm finetune`")


def read_png_form(data: bytes) -> dict:
    """Returns the form fields stored in a PNG that `ldm generate` or the page wrote (its "ldm" text chunk)."""
    import PIL.Image

    from ldm.images import read_png_params

    try:
        params = read_png_params(io.BytesIO(data))
    except PIL.UnidentifiedImageError as e:
        raise ValueError("the dropped file is not a PNG image") from e
    except (KeyError, ValueError) as e:
        raise ValueError("this PNG carries no ldm parameters (it was not written by `ldm generate` or this page)") from e
    return {k: params[k] for k in ("prompt", *FIELDS) if params.get(k) is not None}


def generate(form: dict | GenerateRequest, cache: ModelCache, out_dir: str, job: Job | None = None,
             default_model: str | None = None, inside_dir: str | None = None) -> dict:
    """Generates the form's images (or a request parse_form made of it) into out_dir as `ldm generate --out
    out_dir` would; returns {"images": [{"path", "seed", "width", "height"}], "params", "inside"} where "inside"
    (ldm.ui.inside) looks inside the sampler for the first image (written under inside_dir; None: not recorded)."""
    import dataclasses

    job = job or Job("0", "generate")
    request = form if isinstance(form, GenerateRequest) else parse_form(form, default_model)
    uploads = {k: getattr(request, k) for k in UPLOADS if isinstance(getattr(request, k), PIL.Image.Image)}
    with _SAVE_LOCK:  # the uploads as files in OUT/inputs: the images' metadata names them
        request = dataclasses.replace(request, **save_uploads(uploads, os.path.join(out_dir, "inputs")))
    prepared = prepare(dataclasses.replace(request, out=out_dir))
    request = prepared.request
    job.update(0.0, "loading the model")
    loaded = cache.get(request.model, prepared.device, prepared.dtype, request.lora, request.lora_scale)
    job.update(0.0, "waiting for the model (another generation is running)")
    with loaded.use(request.scheduler) as pipe:
        result = generate_with(pipe, prepared, progress=job.update, trace=inside_dir is not None)
        inside = None
        if inside_dir is not None:
            from ldm.ui.inside import inside_report

            job.update(1.0, "decoding the x0 prediction of every step")
            inside = inside_report(pipe, result.trace, {**result.params, "seed": result.seeds[0]}, inside_dir)
    return {"images": [dataclasses.asdict(image) for image in result.images], "params": result.params,
            "inside": inside}
