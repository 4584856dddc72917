"""DiT training and sampling throughput with cached latents, and its model-FLOP utilisation (MFU).

A training step is what `ldm train` runs on cached latents and cached text embeddings: the objective's noising
(ldm.objectives), the denoiser call through ldm.models.denoiser.denoise, the MSE, backward and AdamW, under
autocast in --precision. The reference, timed in the same process on the same batch, is diffusers'
class-conditional DiTTransformer2DModel of the same depth and width (DiT-XL/2 for dit-xl-2), stepped the same
way. FLOPs are counted by PyTorch's FlopCounterMode (benchmarks/flops.py); MFU = counted FLOPs per second / the
device's peak (--peak-tflops; 989 dense bf16 TFLOP/s is taken for an H100/H200). Sampling: denoiser calls per
second for --sample-batch images with classifier-free guidance (2 rows each), as the pipeline runs them.

    python benchmarks/bench_dit.py --preset dit-xl-2 --device cuda --batch-size 64 --compile            # GPU
    python benchmarks/bench_dit.py --preset dit-tiny --device cpu --batch-size 2 --steps 2               # smoke
The last lines are `images_per_s_<who>: X`, `mfu_<who>: X`, `ratio_train_ours_vs_diffusers_dit: X` and
`sampling_steps_per_s: X`.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from flops import count_flops, seconds_per_call

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16/fp16 tensor-core peaks


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="dit-xl-2")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--sample-batch", type=int, default=8, help="images per sampling call (2 CFG rows each)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (median)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's dense peak for --precision")
    p.add_argument("--no-reference", action="store_true", help="skip diffusers' DiTTransformer2DModel")
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def reference_dit(spec):
    """diffusers' class-conditional DiT of the spec's size (1000 classes, as DiT's ImageNet models)."""
    from diffusers import DiTTransformer2DModel

    c = spec.transformer
    return DiTTransformer2DModel(num_attention_heads=c["num_attention_heads"],
                                 attention_head_dim=c["attention_head_dim"], in_channels=4, out_channels=4,
                                 num_layers=c["num_layers"], sample_size=c["sample_size"], patch_size=c["patch_size"],
                                 num_embeds_ada_norm=1000)


class Runner:
    """A model, its optimiser, a fixed batch and one training step on it."""

    def __init__(self, model, batch: dict, args, call):
        from ldm.models.presets import build_scheduler, get_spec
        from ldm.objectives import objective_for

        self.objective = objective_for(build_scheduler(get_spec(args.preset)))  # the preset's (epsilon) schedule
        self.model = model.to(args.device).train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=args.device == "cuda")
        self.batch, self.call, self.args = batch, call, args
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.precision]
        self.forward = torch.compile(self.call) if args.compile else self.call

    def step(self) -> None:
        objective = self.objective
        x0, noise, t = self.batch["latents"], self.batch["noise"], self.batch["t"]
        with torch.autocast(self.args.device, dtype=self.dtype, enabled=self.args.precision != "fp32"):
            pred = self.forward(self.model, objective.noised(x0, noise, t), objective.model_time(t), self.batch)
        loss = (pred.float() - objective.target(x0, noise, t)).pow(2).mean()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def ours_call(model, x, t, batch):
    from ldm.models.denoiser import denoise

    return denoise(model, x, t, batch["text"])


def reference_call(model, x, t, batch):
    return model(x, timestep=t, class_labels=batch["labels"], return_dict=False)[0]


def make_batch(spec, args, size: int) -> dict:
    g = torch.Generator().manual_seed(0)
    c = spec.transformer
    latent = (size, 4, c["sample_size"], c["sample_size"])
    batch = {"latents": torch.randn(latent, generator=g), "noise": torch.randn(latent, generator=g),
             "t": torch.randint(0, 1000, (size,), generator=g), "labels": torch.randint(0, 1000, (size,), generator=g),
             "text": torch.randn(size, 77, c["cross_attention_dim"], generator=g)}
    return {k: v.to(args.device) for k, v in batch.items()}


def measure_training(name: str, runner: Runner, args) -> dict:
    sync = torch.cuda.synchronize if args.device == "cuda" else None
    runner.step()  # compile / allocate before counting
    flops = count_flops(runner.step)
    seconds = seconds_per_call(runner.step, args.steps, args.warmup, sync)
    images = args.batch_size / seconds
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if args.device == "cuda"
                                     and k in torch.cuda.get_device_name()), None)
    mfu = flops / seconds / (peak * 1e12) if peak else None
    print(f"{name}: {images:.1f} images/s, {flops / args.batch_size / 1e9:.1f} GFLOPs per image, "
          f"MFU {mfu:.1%}" if mfu else f"{name}: {images:.1f} images/s", flush=True)
    return {"images_per_s": images, "train_flops_per_image": flops / args.batch_size, "mfu": mfu}


@torch.inference_mode()
def measure_sampling(model, spec, args) -> float:
    """Returns guided sampling steps per second (one denoiser call on 2 x sample_batch rows each)."""
    from ldm.models.denoiser import denoise

    model.eval()
    batch = make_batch(spec, args, 2 * args.sample_batch)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.precision]
    call = torch.compile(denoise) if args.compile else denoise

    def step():
        with torch.autocast(args.device, dtype=dtype, enabled=args.precision != "fp32"):
            call(model, batch["latents"], batch["t"], batch["text"])

    seconds = seconds_per_call(step, args.steps, args.warmup, torch.cuda.synchronize if args.device == "cuda" else None)
    return 1.0 / seconds


def main(argv=None) -> int:
    from ldm.models.presets import build_denoiser, count_parameters, get_spec

    args = parse_args(argv)
    spec = get_spec(args.preset)
    if spec.backbone != "transformer":
        raise SystemExit(f"{args.preset} is not a transformer preset; try dit-xl-2")
    torch.manual_seed(0)
    batch = make_batch(spec, args, args.batch_size)
    ours = Runner(build_denoiser(spec), batch, args, ours_call)
    print(f"{args.preset}: {count_parameters(ours.model):,} parameters, batch {args.batch_size}, {args.precision}, "
          f"{args.device}{' compiled' if args.compile else ''}", flush=True)
    result = {"preset": args.preset, "ours": measure_training("ours", ours, args)}
    result["sampling_steps_per_s"] = measure_sampling(ours.model, spec, args)
    del ours
    if not args.no_reference:
        reference = Runner(reference_dit(spec), batch, args, reference_call)
        result["diffusers_dit"] = measure_training("diffusers DiTTransformer2DModel", reference, args)
    for who in ("ours", "diffusers_dit"):
        if who in result:
            print(f"images_per_s_{who}: {result[who]['images_per_s']:.2f}")
            print(f"mfu_{who}: {result[who]['mfu'] if result[who]['mfu'] is not None else 'n/a'}")
    if "diffusers_dit" in result:
        print(f"ratio_train_ours_vs_diffusers_dit: "
              f"{result['ours']['images_per_s'] / result['diffusers_dit']['images_per_s']:.3f}")
    print(f"sampling_steps_per_s: {result['sampling_steps_per_s']:.2f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
