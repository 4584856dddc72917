"""SDXL LoRA fine-tuning at 1024 px, the consumer-GPU recipe: peak memory and images/s, against a reference.

The recipe (issue #32): the `sdxl` preset's UNet (2.57 B parameters, random weights: sizes are what matters) with
its frozen weights stored in bf16, LoRA rank 16 on its attention projections (ldm.models.lora.add_lora, adapters
kept in fp32 as diffusers' cast_training_params does), bf16 autocast, gradient checkpointing, and cached latents
and text embeddings: each step takes precomputed latents (B, 4, 128, 128), context (B, 77, 2048), pooled text
(B, 1280) and time_ids (B, 6), so neither the VAE nor the two text encoders are on the GPU. The step is the trainers'
own (ldm.training.step.diffusion_loss with the preset's objective), then backward and the optimizer: bitsandbytes'
AdamW8bit when it is installed, else PyTorch's fused AdamW (ldm.training.loop.make_optimizer).

The reference, run after it in the same process on the same batches, differs in one thing (--reference):
"no-checkpointing" (the default) or "fp32" (frozen weights in fp32 under the same autocast, as `ldm finetune`
keeps them). Each variant builds its own UNet and is timed alone; peak memory is
torch.cuda.max_memory_allocated over its steps, weights included. The ratios are printed last, one
`ratio_<what>: X` line each, and everything goes to a JSON file (by default in benchmarks/results/).

    python benchmarks/bench_sdxl_lora.py --model sdxl --resolution 1024 --batch-size 1 --steps 10 --warmup 3  # GPU
    python benchmarks/bench_sdxl_lora.py --model sdxl-tiny --resolution 64 --steps 2                          # CPU
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import time

import torch

REFERENCES = ("no-checkpointing", "fp32")
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="sdxl", help="an SDXL preset: sdxl (base 1.0's sizes) or sdxl-tiny")
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha = rank)")
    p.add_argument("--reference", default="no-checkpointing", choices=REFERENCES)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None,
                   help="default: benchmarks/results/sdxl_lora_<model>_<resolution>_bs<batch>_<reference>.json")
    return p.parse_args(argv)


def variants(reference: str) -> dict[str, dict]:
    """Returns {name: settings} of the recipe and its reference."""
    recipe = dict(weights_dtype="bfloat16", gradient_checkpointing=True)
    changed = {"no-checkpointing": dict(gradient_checkpointing=False), "fp32": dict(weights_dtype="float32")}
    return {"recipe": recipe, "reference": {**recipe, **changed[reference]}}


def cached_batch(spec, batch: int, resolution: int, step: int, device) -> dict:
    """Returns what a cache of latents and SDXL text embeddings hands the step, drawn from `step` (CPU generator)."""
    from ldm.models.sdxl import time_ids

    unet_factor = 2 ** (len(spec.unet["block_out_channels"]) - 1)  # the UNet halves the latents per level
    if resolution % (spec.vae_scale_factor * unet_factor):
        raise ValueError(f"--resolution {resolution} must be a multiple of {spec.vae_scale_factor * unet_factor} (the "
                         f"VAE's factor {spec.vae_scale_factor} times the UNet's {unet_factor}); e.g. 1024")
    g = torch.Generator().manual_seed(step)
    side = resolution // spec.vae_scale_factor
    ids = time_ids((resolution, resolution), (0, 0), (resolution, resolution))  # (6,)
    tensors = dict(latents=torch.randn(batch, spec.unet["in_channels"], side, side, generator=g),  # (B, 4, h, w)
                   context=torch.randn(batch, 77, spec.unet["cross_attention_dim"], generator=g),  # (B, 77, D1 + D2)
                   pooled=torch.randn(batch, spec.text_encoder_2["projection_dim"], generator=g),  # (B, D2)
                   time_ids=ids.expand(batch, 6))  # (B, 6)
    return {k: v.to(device) for k, v in tensors.items()}


def build(spec, settings: dict, rank: int, device):
    """Returns (UNet with LoRA adapters, the optimizer, its name) for one variant."""
    from diffusers.training_utils import cast_training_params

    from ldm.models.lora import LoraSettings, add_lora
    from ldm.models.presets import build_text_encoder, build_unet
    from ldm.training.loop import make_optimizer

    torch.manual_seed(0)
    unet = build_unet(spec).to(device, getattr(torch, settings["weights_dtype"]))
    with torch.device("meta"):  # add_lora freezes a text encoder; the cached step never runs one
        text_encoder = build_text_encoder(spec)
    params = add_lora(unet, text_encoder, LoraSettings(rank=rank, alpha=float(rank)))
    cast_training_params(unet, dtype=torch.float32)  # adapters train in fp32 over the bf16 base
    if settings["gradient_checkpointing"]:
        unet.enable_gradient_checkpointing()
    unet.train()
    try:
        import bitsandbytes  # noqa: F401
        kind = "adamw_8bit" if torch.device(device).type == "cuda" else "adamw"
    except ImportError:
        kind = "adamw"
    return unet, make_optimizer(params, 1e-4, device, kind=kind), kind


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def run_variant(spec, settings: dict, args) -> dict:
    """Returns one variant's median images/s, peak CUDA memory (GiB; None on the CPU) and last loss."""
    from ldm.objectives import objective_for
    from ldm.training.step import LossSpec, diffusion_loss, step_generator

    device = torch.device(args.device)
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    unet, optimizer, optimizer_kind = build(spec, settings, args.rank, device)
    objective, loss_spec = objective_for(spec.scheduler), LossSpec()
    params = [p for p in unet.parameters() if p.requires_grad]
    seconds, loss = [], None
    for step in range(args.warmup + args.steps):
        batch = cached_batch(spec, args.batch_size, args.resolution, step, device)
        sync(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss, _ = diffusion_loss(unet, batch["latents"], batch["context"], objective, loss_spec,
                                     step_generator(0, step), pooled=batch["pooled"], time_ids=batch["time_ids"])
        loss.backward()
        if step == 0 and not all(p.grad is not None for p in params):
            raise RuntimeError("a LoRA parameter got no gradient: the step does not train the adapters")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        if step >= args.warmup:
            seconds.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    result = dict(settings, optimizer=optimizer_kind, lora_parameters=sum(p.numel() for p in params),
                  images_per_s=args.batch_size / statistics.median(seconds), peak_memory_gib=peak,
                  step_seconds=seconds, loss=float(loss.detach()))
    del unet, optimizer, params
    return result


def main(argv=None) -> dict:
    from ldm.models.presets import get_spec

    args = parse_args(argv)
    spec = get_spec(args.model)
    if not spec.is_sdxl:
        raise SystemExit(f"--model {args.model} is not an SDXL preset; use sdxl or sdxl-tiny")
    results = {name: run_variant(spec, settings, args) for name, settings in variants(args.reference).items()}
    recipe, reference = results["recipe"], results["reference"]
    ratios = {"ratio_images_per_s_recipe_over_reference": recipe["images_per_s"] / reference["images_per_s"]}
    if recipe["peak_memory_gib"] is not None:
        ratios["ratio_peak_memory_recipe_over_reference"] = recipe["peak_memory_gib"] / reference["peak_memory_gib"]
    cuda = torch.device(args.device).type == "cuda"
    meta = dict(model=args.model, resolution=args.resolution, batch_size=args.batch_size, steps=args.steps,
                warmup=args.warmup, rank=args.rank, reference=args.reference, device=str(args.device),
                device_name=torch.cuda.get_device_name() if cuda else platform.processor(),
                torch=torch.__version__, date=time.strftime("%Y-%m-%d"))
    name = f"sdxl_lora_{args.model}_{args.resolution}_bs{args.batch_size}_{args.reference}.json"
    path = args.json or os.path.join(RESULTS, name)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"meta": meta, "results": results, "ratios": ratios}, f, indent=2)
    for name, r in results.items():
        memory = "n/a (cpu)" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.2f} GiB"
        print(f"{name}: {r['images_per_s']:.3f} images/s, peak memory {memory}, weights {r['weights_dtype']}, "
              f"checkpointing {r['gradient_checkpointing']}, {r['optimizer']}, loss {r['loss']:.4f}")
    print(f"wrote {path}")
    for name, value in ratios.items():
        print(f"{name}: {value:.3f}")
    return {"meta": meta, "results": results, "ratios": ratios}


if __name__ == "__main__":
    main()
