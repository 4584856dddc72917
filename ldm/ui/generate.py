"""The Generate form: its fields build a GenerateRequest for the generate service (ldm.pipelines.generate), the
one `ldm generate` calls, so a page's image is the image `ldm generate` makes with the same parameters, bit for
bit, with the same PNG metadata."""
from __future__ import annotations

import io
import os
import typing

from ldm.pipelines.generate import GenerateRequest, flag, generate_with, prepare
from ldm.ui.jobs import Job
from ldm.ui.models import ModelCache

# The form's fields besides the prompt: GenerateRequest fields, each the `ldm generate` flag of the same name
FIELDS = ("negative_prompt", "scheduler", "steps", "guidance_scale", "guidance_rescale", "seed", "height", "width",
          "num_images", "lora", "lora_scale", "model")
# Bounds of the page beyond the command's: a request that would run for hours or exhaust memory is refused
MAX_SIDE = 2048
MAX_IMAGES = 16


def _field_value(name: str, text):
    """Returns a form value as the request field's type (int, float or str); raises ValueError naming the field."""
    hint = typing.get_type_hints(GenerateRequest)[name]
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
    unknown = set(form) - set(FIELDS) - {"prompt"}
    if unknown:
        raise ValueError(f"unknown fields {sorted(unknown)}; the form has {['prompt', *FIELDS]}")
    values = {"model": default_model, **{k: v for k, v in form.items() if k != "prompt" and v not in (None, "")}}
    if not values["model"]:
        raise ValueError("model: no model folder; start `ldm ui --model DIR` or fill in the model field")
    request = GenerateRequest(prompt, **{k: _field_value(k, v) for k, v in values.items()}).validate()
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


def generate(form: dict, cache: ModelCache, out_dir: str, job: Job | None = None, default_model: str | None = None,
             inside_dir: str | None = None) -> dict:
    """Generates the form's images into out_dir as `ldm generate --out out_dir` would; returns {"images": [{"path",
    "seed", "width", "height"}], "params", "inside"} where "inside" (ldm.ui.inside) looks inside the sampler for
    the first image (written under inside_dir; None: not recorded)."""
    import dataclasses

    job = job or Job("0", "generate")
    prepared = prepare(dataclasses.replace(parse_form(form, default_model), out=out_dir))
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
