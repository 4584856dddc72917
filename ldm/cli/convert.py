"""`ldm convert --model SRC --out DST`: a model folder to one original-layout .safetensors file, and back.

    ldm convert --model models/demo --out demo.safetensors --dtype float16    # folder -> single file
    ldm convert --model demo.safetensors --out models/demo-again              # single file -> folder

The direction follows --out: a name ending in .safetensors gets a single file (the layout A1111, ComfyUI and
diffusers' from_single_file read), anything else a diffusers folder. Reading a single file is offline: the
architecture comes from --architecture, else the file's metadata (files ldm wrote), else SD 1.x/2.x or SDXL base
detected from its keys. SDXL folders and files (sd_xl_base_1.0's layout: conditioner.embedders.*) convert both ways.
"""
from __future__ import annotations

DTYPES = ("float32", "float16", "bfloat16")


def add_arguments(p) -> None:
    from ldm.pipelines.single_file import PREDICTION_TYPES

    p.add_argument("--model", required=True, help="a model folder (diffusers layout), or a single-file checkpoint "
                                                  "(.safetensors; .ckpt with --allow-pickle)")
    p.add_argument("--out", required=True, help="DST.safetensors for a single file, any other name for a folder")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="store the weights in this precision (default: as they are); float16 halves a single file")
    p.add_argument("--architecture", default=None,
                   help="single file -> folder: its architecture, a preset (sd15, sd21, sdxl, tiny, ...) or a local "
                        "diffusers folder (configs suffice); default: the file's metadata, else detected")
    p.add_argument("--prediction-type", choices=PREDICTION_TYPES, default=None,
                   help="single file -> folder: what the UNet predicts (default: the metadata's, else epsilon for "
                        "SD 1.x and inpainting, v_prediction for SD 2.x 768 px)")
    p.add_argument("--allow-pickle", action="store_true", help="read .ckpt/.bin weights (can run code)")


def run(args) -> int:
    import os

    import torch

    from ldm import Pipeline

    dtype = getattr(torch, args.dtype) if args.dtype else None
    to_file = args.out.endswith(".safetensors")
    source_is_file = os.path.isfile(args.model)
    if source_is_file == to_file:
        raise ValueError(f"--model {args.model} and --out {args.out} are both "
                         f"{'single files' if to_file else 'folders'}; convert a folder to DST.safetensors, or a "
                         "single file to a folder")
    if to_file:
        if args.architecture or args.prediction_type:
            raise ValueError("--architecture and --prediction-type describe a single file being read; a folder already "
                             "holds its configs")
        pipe = Pipeline.from_pretrained(args.model, allow_pickle=args.allow_pickle)
        print(f"wrote {pipe.save_single_file(args.out, dtype=dtype)}")
        return 0
    pipe = Pipeline.from_single_file(args.model, config=args.architecture, prediction_type=args.prediction_type,
                                     allow_pickle=args.allow_pickle, torch_dtype=dtype)
    pipe.save_pretrained(args.out)
    print(f"wrote {args.out} ({pipe.scheduler.config.prediction_type} prediction, "
          f"{pipe.unet.config.in_channels}-channel UNet)")
    return 0
