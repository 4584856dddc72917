"""Each `--optimizer` on one preset's UNet (all weights trained): seconds per step, optimiser state size, and the loss
of one fixed batch before and after N steps, each at its recommended learning rate (ldm/training/optimizers.py).

    python benchmarks/bench_optimizers.py --preset sdxl-tiny --steps 30 [--json results/optimizers.json]

The batch (latents at the preset's latent size, noise, timesteps, text states) is fixed, so the loss is a function
of the weights alone; adamw_8bit runs only where CUDA and bitsandbytes are. Same loop as the trainers: ldm's
make_optimizer / make_lr_scheduler (constant, 2 warm-up steps) and schedule-free's eval mode for the final loss.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from ldm.models.presets import build_components
from ldm.training.loop import make_lr_scheduler, make_optimizer
from ldm.training.optimizers import OPTIMIZERS, set_mode

LEARNING_RATES = {"adamw": 1e-4, "adamw_8bit": 1e-4, "adafactor": 1e-4, "schedule_free_adamw": 1e-4, "prodigy": 1.0}


def fixed_batch(unet, batch_size: int, device) -> dict:
    """Returns the UNet's fixed inputs and target: seeded latents, noise, timesteps and text states."""
    g = torch.Generator().manual_seed(0)
    size, channels = unet.config.sample_size, unet.config.in_channels
    batch = dict(noisy=torch.randn(batch_size, channels, size, size, generator=g),  # (B, 4, h, w)
                 noise=torch.randn(batch_size, channels, size, size, generator=g),
                 t=torch.randint(0, 1000, (batch_size,), generator=g),
                 text=torch.randn(batch_size, 77, unet.config.cross_attention_dim, generator=g))  # (B, 77, D)
    if unet.config.addition_embed_type == "text_time":  # SDXL: pooled text and the six size numbers
        pooled = unet.add_embedding.linear_1.in_features - 6 * unet.config.addition_time_embed_dim
        batch["added"] = {"text_embeds": torch.randn(batch_size, pooled, generator=g),
                          "time_ids": torch.zeros(batch_size, 6)}
    return {k: v.to(device) if torch.is_tensor(v) else {n: x.to(device) for n, x in v.items()}
            for k, v in batch.items()}


def loss_of(unet, batch: dict) -> torch.Tensor:
    pred = unet(batch["noisy"], batch["t"], encoder_hidden_states=batch["text"],
                added_cond_kwargs=batch.get("added")).sample
    return F.mse_loss(pred, batch["noise"])


def state_mib(optimizer) -> float:
    """Returns the size of the optimiser's per-parameter state tensors in MiB."""
    return sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
               if torch.is_tensor(v) and v.dim() > 0) / 2**20


def measure(preset: str, kind: str, steps: int, batch_size: int, device) -> dict:
    """Returns {"optimizer", "s_per_step", "state_mib", "loss_before", "loss_after"} of `steps` steps."""
    unet = build_components(preset, seed=0)["unet"].to(device).train()
    batch = fixed_batch(unet, batch_size, device)
    optimizer = make_optimizer(list(unet.parameters()), LEARNING_RATES[kind], device, kind=kind, warmup_steps=2)
    scheduler = make_lr_scheduler("constant_with_warmup", optimizer, 2, steps, 1)
    set_mode(optimizer, training=True)
    with torch.no_grad():
        before = loss_of(unet, batch).item()
    started = time.perf_counter()
    for _ in range(steps):
        loss_of(unet, batch).backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - started) / steps
    set_mode(optimizer, training=False)
    with torch.no_grad():
        after = loss_of(unet, batch).item()
    return {"optimizer": kind, "s_per_step": seconds, "state_mib": state_mib(optimizer), "loss_before": before,
            "loss_after": after}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="sdxl-tiny")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS))
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kinds = [k for k in args.optimizers if k != "adamw_8bit" or device.type == "cuda"]
    rows = [measure(args.preset, kind, args.steps, args.batch_size, device) for kind in kinds]
    print(f"{args.preset}, {args.steps} steps, batch {args.batch_size}, {device.type}")
    print("| optimizer | s/step | state MiB | loss before | loss after |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['optimizer']} | {r['s_per_step']:.3f} | {r['state_mib']:.1f} | {r['loss_before']:.4f} | "
              f"{r['loss_after']:.4f} |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"preset": args.preset, "steps": args.steps, "device": device.type, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
