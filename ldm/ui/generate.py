"""The Generate form: validated by `ldm generate`'s own argument parser, then run through its code path
(ldm.cli.generate: load_pipeline, generation_params, sample, save_png), so a page's image is the image
`ldm generate` makes with the same parameters, bit for bit, with the same PNG metadata."""
from __future__ import annotations

import argparse
import io
import os
import random
import threading
import time

from ldm.ui.jobs import Job
from ldm.ui.models import ModelCache

# form field -> `ldm generate` flag; the prompt is the positional argument
FLAGS = {"negative_prompt": "--negative-prompt", "scheduler": "--scheduler", "steps": "--steps",
         "guidance_scale": "--guidance-scale", "guidance_rescale": "--guidance-rescale", "seed": "--seed",
         "height": "--height", "width": "--width", "num_images": "--num-images", "lora": "--lora",
         "lora_scale": "--lora-scale", "model": "--model"}
# Bounds of the page beyond the command's: a request that would run for hours or exhaust memory is refused
MAX_SIDE = 2048
MAX_IMAGES = 16
_SAVE_LOCK = threading.Lock()  # output_paths numbers the files: two jobs must not pick the same name


class _Parser(argparse.ArgumentParser):
    """`ldm generate`'s parser, raising ValueError where the command would print usage and exit."""

    def error(self, message):
        raise ValueError(message.replace("argument ", "", 1))


def parse_form(form: dict, default_model: str | None) -> argparse.Namespace:
    """Returns `ldm generate`'s arguments for a form ({field: value}, empty values meaning the default); raises
    ValueError (or FileNotFoundError) with a message for the page when a field is wrong."""
    from ldm.cli.generate import add_arguments

    prompt = str(form.get("prompt") or "").strip()
    if not prompt:
        raise ValueError("prompt: empty; type what to draw")
    unknown = set(form) - set(FLAGS) - {"prompt"}
    if unknown:
        raise ValueError(f"unknown fields {sorted(unknown)}; the form has {['prompt', *FLAGS]}")
    values = {"model": default_model, **{k: v for k, v in form.items() if v not in (None, "")}}
    argv = [f"{flag}={values[key]}" for key, flag in FLAGS.items() if values.get(key) is not None]
    parser = _Parser(prog="ldm ui", add_help=False)
    add_arguments(parser)
    args = parser.parse_args([*argv, "--", prompt])
    check_limits(args)
    return args


def check_limits(args) -> None:
    """Raises ValueError/FileNotFoundError for what the page refuses beyond the command's own ranges."""
    if not args.model:
        raise ValueError("model: no model folder; start `ldm ui --model DIR` or fill in the model field")
    for name in ("height", "width"):
        if (getattr(args, name) or 0) > MAX_SIDE:
            raise ValueError(f"{name}: {getattr(args, name)} is above the page's limit of {MAX_SIDE} pixels; use "
                             "`ldm generate` for larger images")
    if args.num_images > MAX_IMAGES:
        raise ValueError(f"num_images: {args.num_images} is above the page's limit of {MAX_IMAGES}")
    if args.lora and not os.path.isfile(args.lora):
        raise FileNotFoundError(f"lora: no file {args.lora!r}; pass a .safetensors written by `ldm finetune`")


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
    return {k: params[k] for k in ("prompt", *FLAGS) if params.get(k) is not None}


def generate(form: dict, cache: ModelCache, out_dir: str, job: Job | None = None, default_model: str | None = None,
             inside_dir: str | None = None) -> dict:
    """Generates the form's images into out_dir as `ldm generate --out out_dir` would; returns {"images": [{"path",
    "seed", "width", "height"}], "params", "inside"} where "inside" (ldm.ui.inside) looks inside the sampler for
    the first image (written under inside_dir; None: not recorded)."""
    from ldm.cli.generate import generation_params, guidance_methods, resolve_device_dtype
    from ldm.pipelines.checks import check_guidance

    job = job or Job("0", "generate")
    args = parse_form(form, default_model)
    methods = guidance_methods(args)
    check_guidance(args.guidance_scale, args.guidance_rescale, **methods, steps=args.steps)
    device, dtype = resolve_device_dtype(args.device, args.dtype)
    job.update(0.0, "loading the model")
    loaded = cache.get(args.model, device, dtype, args.lora, args.lora_scale)
    job.update(0.0, "waiting for the model (another generation is running)")
    with loaded.use(args.scheduler) as pipe:
        params = generation_params(args, pipe, device, dtype, methods)
        first = args.seed if args.seed is not None else random.randrange(2**31)
        seeds = [first + i for i in range(args.num_images)]
        images, trace = _sample_and_save(pipe, params, methods, seeds, args.batch_size, out_dir, job,
                                         inside_dir is not None)
        inside = None
        if inside_dir is not None:
            from ldm.ui.inside import inside_report

            job.update(1.0, "decoding the x0 prediction of every step")
            inside = inside_report(pipe, trace, {**params, "seed": seeds[0]}, inside_dir)
    return {"images": images, "params": params, "inside": inside}


def _sample_and_save(pipe, params: dict, methods: dict, seeds: list[int], batch_size: int, out_dir: str, job: Job,
                     trace: bool) -> tuple[list[dict], list | None]:
    """Returns ([{"path", "seed", "width", "height"}], the first call's trace): the images in batches of
    batch_size, as `ldm generate` makes them, each saved with its metadata as soon as its batch is done."""
    from ldm.cli.generate import output_paths, sample
    from ldm.images import save_png

    images, first_trace, total = [], None, len(seeds) * params["steps"]
    for start in range(0, len(seeds), batch_size):
        chunk = seeds[start: start + batch_size]

        def progress(_pipe, i, _t, _tensors, done=start * params["steps"], n=len(chunk)):
            job.update((done + (i + 1) * n) / total, f"images {start + 1}-{start + n} of {len(seeds)}: "
                                                     f"step {i + 1}/{params['steps']}")
            return {}

        began = time.perf_counter()
        out = sample(pipe, params, methods, chunk, callback=progress, trace=trace and start == 0)
        seconds = (time.perf_counter() - began) / len(chunk)
        first_trace = first_trace or out.trace
        for seed, image in zip(chunk, out.images):
            with _SAVE_LOCK:
                path = save_png(image, output_paths(out_dir, [seed])[0],
                                {**params, "seed": seed, "seconds": round(seconds, 3)})
            images.append({"path": os.path.abspath(path), "seed": seed, "width": image.width, "height": image.height})
    return images, first_trace
