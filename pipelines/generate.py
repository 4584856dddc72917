"""The generate service: a typed request in, PNG files that record every generation parameter out.

`ldm generate` (its flags build the request) and the web page's Generate form (its fields build the request)
both call it, so an image from the page is the image `ldm generate` makes with the same parameters, bit for bit,
with the same PNG metadata.

    request = GenerateRequest("a red circle on the left", model="models/demo", steps=30, seed=1, num_images=4)
    result = generate(request)          # result.images: [GeneratedImage(path, seed, width, height)]

Image i uses seed + i with its own CPU generator, so any single image can be remade with seed S+i and one image,
on any device. The steps of one request, in order: check the request (ranges, names), resolve the guidance (the
model folder's guidance.json when no scale is given), load the pipeline (+ LoRA), sample in batches, save each PNG.
"""
from __future__ import annotations

import dataclasses
import os
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from ldm.images import save_png
from ldm.ranges import in_interval, numeric_fields
from ldm.pipelines.checks import CALL_RANGES

DTYPES = ("auto", "float32", "float16", "bfloat16")
_SAVE_LOCK = threading.Lock()  # a folder's files are numbered: two generations must not pick the same name


@dataclass
class GenerateRequest:
    """One generation: every `ldm generate` flag, by its destination name (--guidance-scale -> guidance_scale).
    None means "the default the model decides": the folder's scheduler, its native size, its guidance.json."""
    prompt: str
    model: str
    scheduler: str | None = None          # a name of ldm.pipelines.schedulers.SCHEDULERS; None: the folder's
    steps: int = 50
    guidance_scale: float | None = None   # <= 1 turns guidance off; None: guidance.json, else 7.5
    guidance_rescale: float = 0.0         # Lin et al. 2023
    guidance_interval: tuple[float, float] | None = None   # guide only at timesteps lo <= t <= hi
    apg: bool = False                     # adaptive projected guidance (Sadat et al. 2024) instead of CFG
    apg_eta: float | None = None          # APG's tuning; None: APGSettings' default
    apg_norm_threshold: float | None = None
    apg_momentum: float | None = None
    cfg_zero_star: bool = False           # CFG-Zero*'s optimized scale (Fan et al. 2025)
    cfg_zero_init_steps: int = 0
    negative_prompt: str | None = None
    seed: int | None = None               # of the first image; None: random (recorded)
    num_images: int = 1
    batch_size: int = 4                   # images per pipeline call
    height: int | None = None             # pixels; None: the model's native size
    width: int | None = None
    eta: float = 0.0                      # DDIM eta
    clip_skip: int | None = None
    device: str = "auto"                  # auto: cuda if available
    dtype: str = "auto"                   # auto: float16 on cuda, float32 elsewhere
    out: str = "outputs"                  # a folder, or a file name ending in .png
    allow_pickle: bool = False            # load .bin/.ckpt weights (can run code)
    lora: str | None = None               # a LoRA .safetensors
    lora_scale: float = 1.0
    init_image: object = None             # img2img / inpainting: a path, or a PIL image (the web page's upload)
    mask: object = None                   # inpainting: a path or PIL image, white = repaint, black = keep
    strength: float = 0.75                # with init_image: 0 = the image unchanged, 1 = drawn anew
    mask_blur: int = 4                    # pixels of Gaussian feathering of the mask (0 = off)
    masked_content: str = "original"      # the masked area starts from the re-noised image, or "noise"
    paste_back: bool = True               # the final image keeps the init image's pixels outside the mask
    prompt_syntax: str = "a1111"          # "a1111": (word:1.3) emphasis and BREAK; "plain": the text as it is
    long_prompts: str = "chunk"           # "chunk": every token, in 77-token windows; "truncate": the first 75 tokens
    # SDXL's micro-conditioning (ldm.pipelines.sdxl), pixels; None: (height, width), (0, 0), (height, width)
    original_size: tuple[int, int] | None = None          # (height, width) of the "original image"
    crops_coords_top_left: tuple[int, int] | None = None  # (top, left) of its crop
    target_size: tuple[int, int] | None = None            # (height, width) being made
    # Sampling-drift remedies (ldm.pipelines.drift), off by default
    eps_scale: float = 1.0                # epsilon scaling (Ning et al. 2024): eps / (eps_scale + slope * t)
    eps_scale_slope: float = 0.0
    dynamic_thresholding: tuple[float, float] | None = None  # (ratio, max_value), Saharia et al. 2022
    restart: tuple[float, float, int] | None = None          # (t_min, t_max, K): Restart sampling, Xu et al. 2023

    # The allowed range of each number (ldm.ranges notation); `ldm generate`'s flags use the same ones.
    # The Python call's ranges (pipelines/checks.py), so the page, the CLI and pipe(...) refuse the same values;
    # seed and num_images are the request's own.
    RANGES = {**{name: CALL_RANGES[name] for name in (
                  "guidance_scale", "guidance_rescale", "apg_eta", "apg_norm_threshold", "apg_momentum",
                  "cfg_zero_init_steps", "height", "width", "eta", "clip_skip", "lora_scale", "strength",
                  "mask_blur", "eps_scale", "eps_scale_slope")},
              "steps": CALL_RANGES["num_inference_steps"], "batch_size": CALL_RANGES["num_images_per_prompt"],
              "seed": "[0, 4294967295]", "num_images": "[1, 100000]"}
    INTERVAL_RANGE = CALL_RANGES["guidance_interval"]           # each end of guidance_interval
    SIZE_CONDITIONING_RANGE = CALL_RANGES["size_conditioning"]  # each number of SDXL's micro-conditioning

    def validate(self) -> "GenerateRequest":
        """Returns the request after checking it; raises ValueError naming the field (and its flag) otherwise."""
        from ldm.pipelines.drift import check_remedies, drift_arguments, recorded_drift
        from ldm.pipelines.prompts import LONG_PROMPTS, PROMPT_SYNTAXES, parse_prompt_attention
        from ldm.pipelines.schedulers import SCHEDULERS

        if not str(self.prompt).strip():
            raise ValueError("prompt: empty; type what to draw")
        for name in numeric_fields(type(self)):
            value = getattr(self, name)
            if value is not None and not in_interval(float(value), self.RANGES[name]):
                raise ValueError(f"{name} ({flag(name)}): {value!r} is outside the allowed range {self.RANGES[name]}")
        if self.guidance_interval is not None and (
                len(self.guidance_interval) != 2 or not all(in_interval(float(t), self.INTERVAL_RANGE)
                                                            for t in self.guidance_interval)):
            raise ValueError(f"guidance_interval ({flag('guidance_interval')}): {self.guidance_interval!r} must be "
                             f"two timesteps T_LO T_HI, each in {self.INTERVAL_RANGE}")
        for name in SIZE_CONDITIONING:
            value = getattr(self, name)
            if value is not None and (len(value) != 2 or not all(
                    isinstance(v, int) and in_interval(float(v), self.SIZE_CONDITIONING_RANGE) for v in value)):
                raise ValueError(f"{name} ({flag(name)}): {value!r} must be two whole numbers of pixels, each in "
                                 f"{self.SIZE_CONDITIONING_RANGE}")
        for name, allowed in (("scheduler", SCHEDULERS), ("dtype", DTYPES), ("prompt_syntax", PROMPT_SYNTAXES),
                              ("long_prompts", LONG_PROMPTS)):
            if getattr(self, name) is not None and getattr(self, name) not in allowed:
                raise ValueError(f"{name} ({flag(name)}): {getattr(self, name)!r} is not one of {', '.join(allowed)}")
        if self.prompt_syntax == "a1111":  # a malformed weight fails here, before the model loads
            for text in (self.prompt, self.negative_prompt or ""):
                parse_prompt_attention(text)
        tuning = [n for n in ("apg_eta", "apg_norm_threshold", "apg_momentum") if getattr(self, n) is not None]
        if tuning and not self.apg:
            raise ValueError(f"{', '.join(flag(n) for n in tuning)} set adaptive projected guidance, which is off; "
                             "add --apg")
        self._validate_edit()
        try:
            check_remedies(None, **drift_arguments(recorded_drift(vars(self))))
        except (TypeError, ValueError) as e:  # TypeError: a tuple of the wrong length
            raise ValueError(f"{', '.join(flag(n) for n in recorded_drift(vars(self)))}: {e}") from e
        return self

    def _validate_edit(self) -> None:
        """Checks the img2img / inpainting fields: the images readable, a mask only with an init image."""
        from ldm.pipelines.editing import MASKED_CONTENT, check_edit_images

        if self.masked_content not in MASKED_CONTENT:
            raise ValueError(f"masked_content ({flag('masked_content')}): {self.masked_content!r} is not one of "
                             f"{', '.join(MASKED_CONTENT)}")
        if self.mask is not None and self.init_image is None:
            raise ValueError(f"mask ({flag('mask')}) needs an init image to repaint: add --init-image PATH")
        if self.init_image is not None:
            check_edit_images(self.init_image, self.mask)

    def denoising_steps(self) -> int:
        """Returns the steps each image runs: all of them, or with an init image those its strength picks."""
        if self.init_image is None:
            return self.steps
        from ldm.pipelines.editing import strength_steps

        return strength_steps(self.steps, self.strength)

    def edit_arguments(self) -> dict:
        """Returns the pipeline call's editing keywords (none without an init image)."""
        if self.init_image is None:
            return {}
        return dict(image=self.init_image, mask_image=self.mask, strength=self.strength, mask_blur=self.mask_blur,
                    masked_content=self.masked_content, paste_back=self.paste_back)


SIZE_CONDITIONING = ("original_size", "crops_coords_top_left", "target_size")  # SDXL's, as the call names them


def flag(name: str) -> str:
    """Returns the `ldm generate` flag of a request field: guidance_scale -> --guidance-scale."""
    return "--" + name.replace("_", "-")


@dataclass
class Guidance:
    """A request's guidance, resolved: the scale and rescale it runs with, the pipeline call's guidance-method
    keywords, and where the scale came from (RECOMMENDED_SOURCE, or None for the request's own)."""
    scale: float
    rescale: float
    methods: dict
    source: str | None = None


def resolve_request_guidance(request: GenerateRequest) -> Guidance:
    """Returns the request's guidance. Without a guidance_scale: the model folder's guidance.json (whose method
    parameters then fill the methods the request left off, as Pipeline.__call__ does with guidance_scale=None),
    else 7.5."""
    from ldm.pipelines.guidance import APGSettings
    from ldm.pipelines.recommended import RECOMMENDED_SOURCE, read_recommended_guidance, resolve_guidance

    tuning = {k: getattr(request, f"apg_{k}") for k in ("eta", "norm_threshold", "momentum")}
    methods = dict(guidance_interval=tuple(request.guidance_interval) if request.guidance_interval else None,
                   apg=APGSettings(**{k: v for k, v in tuning.items() if v is not None}) if request.apg else None,
                   cfg_zero_star=request.cfg_zero_star, cfg_zero_init_steps=request.cfg_zero_init_steps)
    recommended = read_recommended_guidance(request.model) if request.guidance_scale is None else None
    scale, methods = resolve_guidance(recommended, request.guidance_scale,
                                      {**methods, "guidance_rescale": request.guidance_rescale})
    rescale = methods.pop("guidance_rescale")
    if isinstance(methods["apg"], dict):  # guidance.json stores the call's keywords as JSON
        methods["apg"] = APGSettings(**methods["apg"])
    if methods["guidance_interval"] is not None:
        methods["guidance_interval"] = tuple(methods["guidance_interval"])
    return Guidance(scale, rescale, methods, RECOMMENDED_SOURCE if recommended is not None else None)


def recorded_methods(methods: dict) -> dict:
    """Returns the guidance methods in use as PNG metadata entries; none when every method is off."""
    record = {}
    if methods["guidance_interval"] is not None:
        record["guidance_interval"] = list(methods["guidance_interval"])
    if methods["apg"] is not None:
        record.update({f"apg_{k}": v for k, v in dataclasses.asdict(methods["apg"]).items()})
    if methods["cfg_zero_star"]:
        record["cfg_zero_star"] = True
    if methods["cfg_zero_init_steps"]:
        record["cfg_zero_init_steps"] = methods["cfg_zero_init_steps"]
    return record


def resolve_device_dtype(device: str, dtype: str):
    """Returns (device, torch dtype) for "auto" or named ones; raises ValueError for CUDA without a CUDA device."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA device is available; use --device cpu")
    if dtype == "auto":
        dtype = "float16" if device.startswith("cuda") else "float32"
    return device, getattr(torch, dtype)


@dataclass
class Prepared:
    """A checked request with its guidance, device and dtype resolved: what remains is loading and sampling."""
    request: GenerateRequest
    guidance: Guidance
    device: str
    dtype: object


def prepare(request: GenerateRequest) -> Prepared:
    """Returns the request checked and resolved, before any model is loaded; raises ValueError for bad input."""
    from ldm.pipelines.checks import check_guidance

    request.validate()
    guidance = resolve_request_guidance(request)
    check_guidance(guidance.scale, guidance.rescale, **guidance.methods, steps=request.steps)
    return Prepared(request, guidance, *resolve_device_dtype(request.device, request.dtype))


def load_pipeline(model: str, device: str, dtype, scheduler: str | None = None, allow_pickle: bool = False,
                  lora: str | None = None, lora_scale: float = 1.0):
    """Returns the model's Pipeline on `device` with `scheduler` (None: the model's) and the LoRA applied; the model
    is a folder or a single-file checkpoint (Pipeline.from_single_file)."""
    from ldm.models.lora import lora_path
    from ldm.pipelines.stable import Pipeline

    load = Pipeline.from_single_file if os.path.isfile(model) else Pipeline.from_pretrained
    pipe = load(model, scheduler=scheduler, torch_dtype=dtype, allow_pickle=allow_pickle).to(device)
    if lora:
        pipe.load_lora_weights(lora_path(lora), scale=lora_scale)
    return pipe


def generation_params(prepared: Prepared, pipe) -> dict:
    """Returns what every image's PNG records (its seed and time added per image): the request, resolved."""
    from ldm import __version__
    from ldm.pipelines.drift import recorded_drift
    from ldm.pipelines.schedulers import scheduler_name

    r, g = prepared.request, prepared.guidance
    native = pipe.denoiser.config.sample_size * pipe.vae_scale_factor
    if r.init_image is not None:  # an init image sets the default size: its own
        from ldm.pipelines.editing import default_size, open_image

        native_height, native_width = default_size(open_image(r.init_image, "init_image"), pipe.vae_scale_factor)
    else:
        native_height = native_width = native
    return dict(prompt=r.prompt, negative_prompt=r.negative_prompt, model=os.path.abspath(r.model),
                scheduler=scheduler_name(pipe.scheduler), steps=r.steps, guidance_scale=g.scale,
                guidance_rescale=g.rescale, eta=r.eta, clip_skip=r.clip_skip,
                height=r.height or native_height, width=r.width or native_width,
                device=prepared.device, dtype=str(prepared.dtype).removeprefix("torch."), ldm_version=__version__,
                **recorded_methods(g.methods), **({"guidance_source": g.source} if g.source else {}),
                **({"lora": os.path.abspath(r.lora), "lora_scale": r.lora_scale} if r.lora else {}),
                **recorded_edit(r), **prompt_options(r), **recorded_drift(vars(r)),
                **{name: list(getattr(r, name)) for name in SIZE_CONDITIONING if getattr(r, name) is not None})


def prompt_options(request: GenerateRequest) -> dict:
    """Returns the request's prompt_syntax and long_prompts where they are not the defaults (A1111's reading), as
    the PNG records them and the pipeline call takes them."""
    return {name: getattr(request, name) for name in ("prompt_syntax", "long_prompts")
            if getattr(request, name) != getattr(GenerateRequest, name)}


def recorded_edit(r: GenerateRequest) -> dict:
    """Returns the editing parameters as PNG metadata entries (images as absolute paths, or "uploaded" for a PIL
    image from the web page); none without an init image."""
    if r.init_image is None:
        return {}

    def source(image):
        return os.path.abspath(image) if isinstance(image, (str, os.PathLike)) else "uploaded"

    record = dict(init_image=source(r.init_image), strength=r.strength)
    if r.mask is not None:
        record.update(mask=source(r.mask), mask_blur=r.mask_blur, masked_content=r.masked_content,
                      paste_back=r.paste_back)
    return record


def sample(pipe, params: dict, methods: dict, seeds: list[int], callback=None, trace: bool = False,
           edit: dict | None = None):
    """Returns the PipelineOutput of one pipeline call: one image per seed, each drawn with its own CPU generator
    (so an image depends on its seed alone). callback: the pipeline's callback_on_step_end; edit: the call's
    img2img / inpainting keywords (GenerateRequest.edit_arguments)."""
    import torch

    from ldm.pipelines.drift import drift_arguments

    return pipe(params["prompt"], negative_prompt=params["negative_prompt"], num_inference_steps=params["steps"],
                guidance_scale=params["guidance_scale"], guidance_rescale=params["guidance_rescale"],
                eta=params["eta"], clip_skip=params["clip_skip"], height=params["height"], width=params["width"],
                num_images_per_prompt=len(seeds), **methods, **(edit or {}), callback_on_step_end=callback,
                trace=trace, generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
                **{k: params[k] for k in ("prompt_syntax", "long_prompts") if k in params},
                **{k: tuple(params[k]) for k in SIZE_CONDITIONING if k in params}, **drift_arguments(params))


def output_path(out: str, index: int, count: int, seed: int) -> str:
    """Returns the path of image `index` of `count`: OUT itself (or OUT-i.png) for a .png name, else a new
    OUT/NNNN-SEED.png numbered after the PNGs already there (call it under _SAVE_LOCK, and save before releasing)."""
    if out.lower().endswith(".png"):
        return out if count == 1 else f"{out[:-4]}-{index}.png"
    os.makedirs(out, exist_ok=True)
    start = len([f for f in os.listdir(out) if f.endswith(".png")])
    return os.path.join(out, f"{start:04d}-{seed}.png")


@dataclass
class GeneratedImage:
    path: str
    seed: int
    width: int
    height: int


@dataclass
class GenerateResult:
    images: list[GeneratedImage]
    params: dict                          # what each PNG records, less its seed and seconds
    trace: list | None = None             # the first pipeline call's trace (ldm.pipelines.StepRecord), if asked
    seeds: list[int] = field(default_factory=list)


def generate_with(pipe, prepared: Prepared, progress: Callable[[float, str], None] | None = None,
                  trace: bool = False, on_image: Callable[[str], None] | None = None) -> GenerateResult:
    """Generates the prepared request's images with a loaded `pipe` (its scheduler set as the request asks), in
    batches, each PNG saved with its metadata as soon as its batch is done. progress(fraction, message) is
    called after every denoising step; trace records the first call's steps; on_image(path) follows each save."""
    request = prepared.request
    params = generation_params(prepared, pipe)
    first = request.seed if request.seed is not None else random.randrange(2**31)
    seeds = [first + i for i in range(request.num_images)]
    steps = request.denoising_steps()
    images, first_trace, total = [], None, max(len(seeds) * steps, 1)
    for start in range(0, len(seeds), request.batch_size):
        chunk = seeds[start: start + request.batch_size]

        def on_step(_pipe, i, _t, _tensors, done=start * steps, n=len(chunk)):
            progress((done + (i + 1) * n) / total,
                     f"images {start + 1}-{start + n} of {len(seeds)}: step {i + 1}/{steps}")
            return {}

        began = time.perf_counter()
        out = sample(pipe, params, prepared.guidance.methods, chunk, callback=on_step if progress else None,
                     trace=trace and start == 0, edit=request.edit_arguments())
        seconds = (time.perf_counter() - began) / len(chunk)
        first_trace = first_trace or out.trace
        for index, (seed, image) in enumerate(zip(chunk, out.images), start):
            with _SAVE_LOCK:
                path = save_png(image, output_path(request.out, index, len(seeds), seed),
                                {**params, "seed": seed, "seconds": round(seconds, 3)})
            images.append(GeneratedImage(os.path.abspath(path), seed, image.width, image.height))
            if on_image:
                on_image(path)
    return GenerateResult(images, params, first_trace, seeds)


def generate(request: GenerateRequest, on_image: Callable[[str], None] | None = None) -> GenerateResult:
    """Checks the request, loads its pipeline (+ LoRA) and generates its images into request.out."""
    prepared = prepare(request)
    pipe = load_pipeline(request.model, prepared.device, prepared.dtype, request.scheduler, request.allow_pickle,
                         request.lora, request.lora_scale)
    return generate_with(pipe, prepared, on_image=on_image)
