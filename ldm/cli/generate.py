"""`ldm generate "PROMPT" --model DIR`: text to PNG files that record every generation parameter.

The flags build a GenerateRequest for the generate service (ldm.pipelines.generate), which the web page calls
too. Image i uses seed + i with its own CPU generator, so any single image can be remade with --seed S+i
--num-images 1, on any device.
"""
from __future__ import annotations

import dataclasses

from ldm.ranges import float_in, int_in


def add_arguments(p):
    from ldm.pipelines.generate import DTYPES, GenerateRequest
    from ldm.pipelines.prompts import LONG_PROMPTS, PROMPT_SYNTAXES
    from ldm.pipelines.schedulers import SCHEDULERS

    R = GenerateRequest.RANGES  # the request's ranges, which are the Python call's (pipelines/checks.py)

    p.add_argument("prompt", help="what to draw")
    p.add_argument("--model", required=True, help="a model folder (diffusers layout) or a single-file checkpoint "
                                                  "(.safetensors, original Stable Diffusion layout)")
    p.add_argument("--scheduler", choices=list(SCHEDULERS), default=None, help="sampler (default: the folder's)")
    p.add_argument("--steps", type=int_in(R["steps"]), default=50, help="denoising steps")
    p.add_argument("--guidance-scale", type=float_in(R["guidance_scale"]), default=None,
                   help="classifier-free guidance; <= 1 turns it off (default: the model folder's guidance.json, "
                        "written by `ldm eval-guidance --save`, else 7.5)")
    p.add_argument("--guidance-rescale", type=float_in(R["guidance_rescale"]), default=0.0,
                   help="Lin et al. 2023 rescale, 0..1")
    add_guidance_method_arguments(p)
    p.add_argument("--negative-prompt", default=None, help="what to steer away from")
    p.add_argument("--seed", type=int_in(R["seed"]), default=None,
                   help="seed of the first image (default: random, recorded)")
    p.add_argument("--num-images", type=int_in(R["num_images"]), default=1, help="how many images")
    p.add_argument("--batch-size", type=int_in(R["batch_size"]), default=4,
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
    p.add_argument("--prompt-syntax", choices=PROMPT_SYNTAXES, default="a1111",
                   help="a1111: AUTOMATIC1111's (word:1.3), (word), [word] emphasis, \\( escapes and BREAK; "
                        "plain: the prompt taken literally")
    p.add_argument("--long-prompts", choices=LONG_PROMPTS, default="chunk",
                   help="chunk: a prompt past 75 tokens is encoded in 77-token windows, every word counts; "
                        "truncate: only the first 75 tokens, with a warning naming the words cut")
    add_edit_arguments(p)
    add_size_conditioning_arguments(p)
    add_drift_arguments(p)


def add_drift_arguments(p):
    """The sampling-drift remedies (ldm.pipelines.drift), each off by default."""
    from ldm.pipelines.checks import CALL_RANGES as R

    p.add_argument("--eps-scale", type=float_in(R["eps_scale"]), default=1.0,
                   help="epsilon scaling (Ning et al. 2024): the predicted noise is divided by "
                        "EPS_SCALE + EPS_SCALE_SLOPE * t before each step; 1 = off (epsilon-prediction models)")
    p.add_argument("--eps-scale-slope", type=float_in(R["eps_scale_slope"]), default=0.0,
                   help="epsilon scaling's slope per timestep (the paper's linear schedule k t + b); 0 = constant")
    p.add_argument("--dynamic-thresholding", nargs=2, type=float, default=None, metavar=("RATIO", "MAX_VALUE"),
                   help="dynamic thresholding of the x0 prediction (Saharia et al. 2022): s = the RATIO percentile "
                        "of |x0| clamped to [1, MAX_VALUE], x0 clipped to [-s, s] / s; latents need MAX_VALUE "
                        "above 1 (e.g. 4). Samplers ddim, ddpm, dpm++")
    p.add_argument("--restart", nargs=3, type=float, default=None, metavar=("T_MIN", "T_MAX", "K"),
                   help="Restart sampling (Xu et al. 2023): on reaching timestep T_MIN, add noise back to T_MAX and "
                        "run those steps again, K times; --scheduler ddim or euler")


def add_size_conditioning_arguments(p):
    from ldm.pipelines.generate import GenerateRequest

    pixels = int_in(GenerateRequest.SIZE_CONDITIONING_RANGE)
    p.add_argument("--original-size", nargs=2, type=pixels, default=None, metavar=("HEIGHT", "WIDTH"),
                   help="SDXL models: the original image size the model is told (default: --height --width)")
    p.add_argument("--crops-coords-top-left", nargs=2, type=pixels, default=None, metavar=("TOP", "LEFT"),
                   help="SDXL models: the crop's top-left corner the model is told (default: 0 0, uncropped)")
    p.add_argument("--target-size", nargs=2, type=pixels, default=None, metavar=("HEIGHT", "WIDTH"),
                   help="SDXL models: the target size the model is told (default: --height --width)")


def add_edit_arguments(p):
    from ldm.pipelines.editing import MASKED_CONTENT
    from ldm.pipelines.generate import GenerateRequest

    R = GenerateRequest.RANGES
    p.add_argument("--init-image", default=None, metavar="PATH",
                   help="img2img: start from this image (PNG/JPEG; the output takes its size unless --height/--width)")
    d = GenerateRequest  # its defaults; a flag left out is None here, so that one given without its image is refused
    p.add_argument("--strength", type=float_in(R["strength"]), default=None,
                   help=f"with --init-image: how much to change it, 0 = not at all, 1 = drawn anew "
                        f"(default {d.strength})")
    p.add_argument("--mask", default=None, metavar="PATH",
                   help="inpainting, with --init-image: white pixels are repainted, black ones kept")
    p.add_argument("--mask-blur", type=int_in(R["mask_blur"]), default=None,
                   help=f"with --mask: pixels of Gaussian feathering of the mask's edge, 0 = off "
                        f"(default {d.mask_blur})")
    p.add_argument("--masked-content", choices=MASKED_CONTENT, default=None,
                   help="with --mask: what the masked area starts from, the re-noised image (original, the default) "
                        "or noise alone")
    p.add_argument("--no-paste-back", dest="paste_back", action="store_const", const=False, default=None,
                   help="with --mask: keep the model's pixels outside the mask too (default: the init image's are "
                        "pasted back)")


# request field -> (its flag, the field it acts on)
EDIT_FLAGS = {"strength": ("--strength", "init_image"), "mask_blur": ("--mask-blur", "mask"),
              "masked_content": ("--masked-content", "mask"), "paste_back": ("--no-paste-back", "mask")}


def edit_values(args) -> dict:
    """Returns the editing flags given, by request field; raises ValueError for one given without the image or
    mask it acts on (it would otherwise be ignored without a word)."""
    needs = {"init_image": "--init-image PATH", "mask": "--mask PATH"}
    for name, (flag, needed) in EDIT_FLAGS.items():
        if getattr(args, name) is not None and getattr(args, needed) is None:
            raise ValueError(f"{flag} acts on {needs[needed].split()[0]}, which is not given; add {needs[needed]} "
                             f"or drop {flag}")
    return {name: getattr(args, name) for name in EDIT_FLAGS if getattr(args, name) is not None}


def add_guidance_method_arguments(p):
    from ldm.pipelines.generate import GenerateRequest
    from ldm.pipelines.guidance import APGSettings

    R = {**GenerateRequest.RANGES, "guidance_interval": GenerateRequest.INTERVAL_RANGE}
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


def request_from_args(args):
    """Returns the GenerateRequest the flags describe: each flag's destination names the request's field."""
    from ldm.pipelines.generate import GenerateRequest

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(GenerateRequest) if f.name not in EDIT_FLAGS}
    values.update(edit_values(args))
    values.update(drift_values(args))
    for name in ("guidance_interval", "original_size", "crops_coords_top_left", "target_size"):
        if values[name] is not None:
            values[name] = tuple(values[name])
    return GenerateRequest(**values)


def drift_values(args) -> dict:
    """Returns the remedy flags' values (add_drift_arguments): the two-number and three-number ones as tuples,
    Restart's K as a count when it is whole."""
    values = {name: getattr(args, name) for name in ("eps_scale", "eps_scale_slope", "dynamic_thresholding", "restart")}
    for name in ("dynamic_thresholding", "restart"):
        if values[name] is not None:
            values[name] = tuple(values[name])
    if values["restart"] is not None and float(values["restart"][2]).is_integer():  # K is a count
        values["restart"] = (*values["restart"][:2], int(values["restart"][2]))
    return values


def run(args) -> int:
    from ldm.pipelines.generate import generate

    generate(request_from_args(args), on_image=lambda path: print(f"wrote {path}"))
    return 0
