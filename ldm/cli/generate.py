"""`ldm generate "PROMPT" --model DIR`: text to PNG files that record every generation parameter.

Image i uses seed + i with its own CPU generator, so any single image can be remade with --seed S+i
--num-images 1, on any device.
"""
from __future__ import annotations

import os
import random
import time

from ldm.ranges import float_in, int_in

DTYPES = ("auto", "float32", "float16", "bfloat16")


def add_arguments(p):
    from ldm.pipelines.checks import CALL_RANGES as R
    from ldm.pipelines.schedulers import SCHEDULERS

    p.add_argument("prompt", help="what to draw")
    p.add_argument("--model", required=True, help="a model folder (diffusers layout)")
    p.add_argument("--scheduler", choices=list(SCHEDULERS), default=None, help="sampler (default: the folder's)")
    p.add_argument("--steps", type=int_in(R["num_inference_steps"]), default=50, help="denoising steps")
    p.add_argument("--guidance-scale", type=float_in(R["guidance_scale"]), default=None,
                   help="classifier-free guidance; <= 1 turns it off (default: the model folder's guidance.json, "
                        "written by `ldm eval-guidance --save`, else 7.5)")
    p.add_argument("--guidance-rescale", type=float_in(R["guidance_rescale"]), default=0.0,
                   help="Lin et al. 2023 rescale, 0..1")
    add_guidance_method_arguments(p)
    p.add_argument("--negative-prompt", default=None, help="what to steer away from")
    p.add_argument("--seed", type=int_in("[0, 4294967295]"), default=None,
                   help="seed of the first image (default: random, recorded)")
    p.add_argument("--num-images", type=int_in("[1, 100000]"), default=1, help="how many images")
    p.add_argument("--batch-size", type=int_in(R["num_images_per_prompt"]), default=4,
                   help="images per pipeline call")
    p.add_argument("--height", type=int_in(R["height"]), default=None,
                   help="pixels (default: the model's native size)")
    p.add_argument("--width", type=int_in(R["width"]), default=None,
                   help="pixels (default: the model's native size)")
    p.add_argument("--eta", type=float_in(R["eta"]), default=0.0, help="DDIM eta")
    p.add_argument("--clip-skip", type=int_in(R["clip_skip"]), default=None,
                   help="use the text encoder's k-th layer from the end")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps (default: cuda if available)")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="auto: float16 on cuda, float32 elsewhere")
    p.add_argument("--out", default="outputs", help="a folder, or a file name ending in .png")
    p.add_argument("--allow-pickle", action="store_true", help="load .bin/.ckpt weights (can run code)")
    p.add_argument("--lora", default=None, help="a LoRA .safetensors (from `ldm finetune`, or a web-UI LoRA)")
    p.add_argument("--lora-scale", type=float_in(R["lora_scale"]), default=1.0,
                   help="LoRA strength: 0 = the base model, 1 = as trained")


def add_guidance_method_arguments(p):
    from ldm.pipelines.checks import CALL_RANGES as R
    from ldm.pipelines.guidance import APGSettings

    p.add_argument("--guidance-interval", nargs=2, type=float_in(R["guidance_interval"]), default=None,
                   metavar=("T_LO", "T_HI"),
                   help="guide only at timesteps T_LO <= t <= T_HI (the sampler's timesteps, 0..1000; sigma * 1000 "
                        "for flow models); other steps run the conditional branch alone, at half the cost")
    p.add_argument("--apg", action="store_true", help="adaptive projected guidance (Sadat et al. 2024) instead of CFG")
    p.add_argument("--apg-eta", type=float_in(R["apg_eta"]), default=None,
                   help=f"APG: weight of the update's part parallel to the prediction (default {APGSettings.eta})")
    p.add_argument("--apg-norm-threshold", type=float_in(R["apg_norm_threshold"]), default=None,
                   help=f"APG: cap on the update's norm, 0 = none (default {APGSettings.norm_threshold})")
    p.add_argument("--apg-momentum", type=float_in(R["apg_momentum"]), default=None,
                   help=f"APG: reverse momentum beta, 0 = none (default {APGSettings.momentum})")
    p.add_argument("--cfg-zero-star", action="store_true", help="CFG-Zero*'s optimized scale (Fan et al. 2025)")
    p.add_argument("--cfg-zero-init-steps", type=int_in(R["cfg_zero_init_steps"]), default=0,
                   help="CFG-Zero*'s zero-init: the first K steps predict 0 (for flow models)")


def guidance_methods(args) -> dict:
    """Returns the pipeline call's guidance-method keywords from the flags; raises ValueError for --apg-* without
    --apg."""
    from ldm.pipelines.guidance import APGSettings

    tuning = {k: getattr(args, f"apg_{k}") for k in ("eta", "norm_threshold", "momentum")}
    tuning = {k: v for k, v in tuning.items() if v is not None}
    if tuning and not args.apg:
        flags = ", ".join(f"--apg-{k.replace('_', '-')}" for k in tuning)
        raise ValueError(f"{flags} set adaptive projected guidance, which is off; add --apg")
    methods = dict(guidance_interval=tuple(args.guidance_interval) if args.guidance_interval else None,
                   apg=APGSettings(**tuning) if args.apg else None, cfg_zero_star=args.cfg_zero_star,
                   cfg_zero_init_steps=args.cfg_zero_init_steps)
    return with_recommended_guidance(args, methods)


def with_recommended_guidance(args, methods: dict) -> dict:
    """Returns the methods after setting args.guidance_scale when --guidance-scale is not given: from the model
    folder's guidance.json (whose method parameters then fill the flags left off, as Pipeline.__call__ does with
    guidance_scale=None; args.guidance_source records it), else 7.5."""
    from ldm.pipelines.recommended import RECOMMENDED_SOURCE, read_recommended_guidance, resolve_guidance

    recommended = read_recommended_guidance(args.model) if args.guidance_scale is None else None
    if recommended is not None:
        args.guidance_source = RECOMMENDED_SOURCE
    args.guidance_scale, methods = resolve_guidance(recommended, args.guidance_scale,
                                                    {**methods, "guidance_rescale": args.guidance_rescale})
    args.guidance_rescale = methods.pop("guidance_rescale")
    if isinstance(methods["apg"], dict):  # guidance.json stores the call's keywords as JSON
        from ldm.pipelines.guidance import APGSettings

        methods["apg"] = APGSettings(**methods["apg"])
    if methods["guidance_interval"] is not None:
        methods["guidance_interval"] = tuple(methods["guidance_interval"])
    return methods


def recorded_methods(methods: dict) -> dict:
    """Returns the guidance methods in use as PNG metadata entries; none when every method is off."""
    import dataclasses

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
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA device is available; use --device cpu")
    if dtype == "auto":
        dtype = "float16" if device.startswith("cuda") else "float32"
    return device, getattr(torch, dtype)


def output_paths(out: str, seeds: list[int]) -> list[str]:
    """Returns one new PNG path per image: OUT itself (or OUT-i.png) for a .png name, else OUT/NNNN-SEED.png."""
    if out.lower().endswith(".png"):
        stem = out[:-4]
        return [out] if len(seeds) == 1 else [f"{stem}-{i}.png" for i in range(len(seeds))]
    os.makedirs(out, exist_ok=True)
    start = len([f for f in os.listdir(out) if f.endswith(".png")])
    return [os.path.join(out, f"{start + i:04d}-{seed}.png") for i, seed in enumerate(seeds)]


def load_pipeline(args, device: str, dtype, scheduler: str | None):
    """Returns the model folder's Pipeline on `device` with `scheduler` (None: the folder's) and --lora applied."""
    from ldm import Pipeline

    pipe = Pipeline.from_pretrained(args.model, scheduler=scheduler, torch_dtype=dtype,
                                    allow_pickle=args.allow_pickle).to(device)
    if args.lora:
        from ldm.models.lora import lora_path

        pipe.load_lora_weights(lora_path(args.lora), scale=args.lora_scale)
    return pipe


def generation_params(args, pipe, device: str, dtype, methods: dict) -> dict:
    """Returns what every image's PNG records (its seed and time added per image): the flags, resolved."""
    from ldm import __version__
    from ldm.pipelines.schedulers import scheduler_name

    native = pipe.denoiser.config.sample_size * pipe.vae_scale_factor
    return dict(prompt=args.prompt, negative_prompt=args.negative_prompt, model=os.path.abspath(args.model),
                scheduler=scheduler_name(pipe.scheduler), steps=args.steps, guidance_scale=args.guidance_scale,
                guidance_rescale=args.guidance_rescale, eta=args.eta, clip_skip=args.clip_skip,
                height=args.height or native, width=args.width or native,
                device=device, dtype=str(dtype).removeprefix("torch."), ldm_version=__version__,
                **recorded_methods(methods),
                **({"guidance_source": args.guidance_source} if getattr(args, "guidance_source", None) else {}),
                **({"lora": os.path.abspath(args.lora), "lora_scale": args.lora_scale} if args.lora else {}))


def sample(pipe, params: dict, methods: dict, seeds: list[int], callback=None, trace: bool = False):
    """Returns the PipelineOutput of one pipeline call: one image per seed, each drawn with its own CPU generator
    (so an image depends on its seed alone). callback: the pipeline's callback_on_step_end."""
    import torch

    return pipe(params["prompt"], negative_prompt=params["negative_prompt"], num_inference_steps=params["steps"],
                guidance_scale=params["guidance_scale"], guidance_rescale=params["guidance_rescale"],
                eta=params["eta"], clip_skip=params["clip_skip"], height=params["height"], width=params["width"],
                num_images_per_prompt=len(seeds), **methods, callback_on_step_end=callback, trace=trace,
                generator=[torch.Generator("cpu").manual_seed(s) for s in seeds])


def run(args) -> int:
    from ldm.images import save_png
    from ldm.pipelines.checks import check_guidance

    if args.num_images < 1 or args.batch_size < 1:
        raise ValueError("--num-images and --batch-size must be >= 1")
    methods = guidance_methods(args)
    check_guidance(args.guidance_scale, args.guidance_rescale, **methods, steps=args.steps)  # before loading
    device, dtype = resolve_device_dtype(args.device, args.dtype)
    pipe = load_pipeline(args, device, dtype, args.scheduler)
    first = args.seed if args.seed is not None else random.randrange(2**31)
    seeds = [first + i for i in range(args.num_images)]
    paths = output_paths(args.out, seeds)
    params = generation_params(args, pipe, device, dtype, methods)
    for start in range(0, len(seeds), args.batch_size):
        chunk = seeds[start: start + args.batch_size]
        began = time.perf_counter()
        images = sample(pipe, params, methods, chunk).images
        seconds = (time.perf_counter() - began) / len(chunk)
        for seed, image, path in zip(chunk, images, paths[start:]):
            save_png(image, path, {**params, "seed": seed, "seconds": round(seconds, 3)})
            print(f"wrote {path}")
    return 0
