"""`ldm merge-lora --model DIR --lora FILE --out DIR`: a pipeline folder with the LoRA fused into its weights.

The folder loads like any other (ldm.Pipeline, diffusers' StableDiffusionPipeline) and samples as the base
model with the LoRA at --scale, without adapter layers at run time.
"""
from __future__ import annotations

from ldm.ranges import float_in


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="the base pipeline folder the LoRA was trained on")
    p.add_argument("--lora", required=True, help="a LoRA .safetensors (diffusers or kohya / LyCORIS keys: lora, locon, loha, lokr, dora) or its folder")
    p.add_argument("--out", required=True, help="the pipeline folder to write")
    p.add_argument("--lora-scale", type=float_in("[-10, 10]"), default=1.0, deprecated=["--scale"], help="LoRA strength to fuse (1 = as trained)")


def run(args) -> int:
    from ldm.pipelines.lora import merge_lora

    print(f"wrote {merge_lora(args.model, args.lora, args.out, args.lora_scale)}")
    return 0
