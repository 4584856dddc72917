"""Counts the host-device synchronisations inside a denoising call, ours against diffusers' StableDiffusionPipeline.

Each sync makes the CPU wait for the GPU, so it cannot queue the next step's kernels (or CUDA-graph replay)
while the GPU works: with a compiled UNet they cost throughput. Both pipelines share one `tiny` model and get
the same scheduler; each call gets the prompt embeddings and returns latents, so only the loop is counted.
PyTorch's sync debug mode reports CUDA syncs only, so on a CPU it counts 0. What it catches can be counted on any
device, though: a sync happens where the host reads a tensor's value (`.item()`, `bool(t)`, `int(t)`: the
`aten._local_scalar_dense` op) or asks for a data-dependent shape (`nonzero`). `count_host_reads` counts those
ops with a TorchDispatchMode, so the CPU run (and the smoke test) measures the same thing: reads per call, and
whether they grow with the number of steps.

    python benchmarks/count_syncs.py                       # on a GPU
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import warnings

import torch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--schedulers", nargs="+", default=["ddim", "lms", "euler", "dpm++"])
    return p.parse_args(argv)


def count_syncs(pipe, call: dict, device: str) -> tuple[int, list[str]]:
    """Returns (number of syncs, the distinct places they happened) in one call of pipe(**call), after a warm-up call."""
    pipe(**call)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            pipe(**call)
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    return len(syncs), sorted({f"{w.filename.split('site-packages/')[-1]}:{w.lineno}" for w in syncs})


class _HostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the ops that make the host wait for a tensor's value on any device."""

    OPS = ("aten._local_scalar_dense", "aten.nonzero", "aten.is_nonzero", "aten.equal")

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(str(func.overloadpacket).endswith(op.split(".")[1]) and str(func).startswith(op) for op in self.OPS):
            self.count += 1
        return func(*args, **(kwargs or {}))


def count_host_reads(pipe, call: dict) -> int:
    """Returns how many tensor values the host reads in one call of pipe(**call) (each one a sync on a GPU)."""
    pipe(**call)
    with _HostReads() as mode:
        pipe(**call)
    return mode.count


def main(argv=None) -> int:
    from diffusers import StableDiffusionPipeline

    from ldm import Pipeline
    from ldm.models.presets import build_components

    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        Pipeline(**build_components("tiny", seed=0)).save_pretrained(folder)
        ours = Pipeline.from_pretrained(folder).to(args.device)
        theirs = StableDiffusionPipeline(vae=ours.vae, text_encoder=ours.text_encoder, tokenizer=ours.tokenizer,
                                         unet=ours.unet, scheduler=ours.scheduler, safety_checker=None,
                                         feature_extractor=None, requires_safety_checker=False)
        cond, uncond = ours.encode_prompt(["a red circle"], None, 1, True, device=args.device)
        call = dict(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=args.steps,
                    output_type="latent")
        print(f"host-device syncs in one {args.steps}-step call on {args.device} (guidance 7.5, tiny model):")
        for name in args.schedulers:
            ours.set_scheduler(name)
            theirs.scheduler = type(ours.scheduler).from_config(ours.scheduler.config)
            counts, reads = {}, {}
            for who, pipe in (("ours", ours), ("diffusers", theirs)):
                pipe.set_progress_bar_config(disable=True)
                counts[who], where = count_syncs(pipe, call, args.device)
                reads[who] = count_host_reads(pipe, call)
                print(f"  {name:7s} {who:10s} syncs {counts[who]:4d}  host reads {reads[who]:4d}  {', '.join(where[:6])}")
            print(f"syncs_{name}: ours {counts['ours']} diffusers {counts['diffusers']}")
            print(f"host_reads_{name}: ours {reads['ours']} diffusers {reads['diffusers']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
