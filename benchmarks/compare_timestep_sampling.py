"""Uniform against logit-normal timestep sampling on the shortened demo recipe (as tests/conftest.py runs it,
without the dark VAE scenes: 400 VAE and 600 LDM steps at 32 px, 30 prompts graded with DDIM at 25 steps),
one run per mode and seed.

Prints, per run, the validation loss (fixed images, noise and timesteps, so comparable across modes) overall
and per timestep bin, and the prompt adherence at guidance 1 and 4 (its run time: docs/src/guides/train.md).

    python benchmarks/compare_timestep_sampling.py --seeds 0 1 --out runs/timestep_sampling
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch


def run(mode: str, seed: int, out: str, vae_steps: int = 400, ldm_steps: int = 600, num_prompts: int = 30) -> dict:
    from ldm.diagnostics.training_heatmap import read_history
    from ldm.training import demo

    # minutes only caps each phase's time; at 60 the step counts decide, so a busy machine changes nothing
    cfg = demo.DemoConfig(out=os.path.join(out, f"{mode}_{seed}"), minutes=60.0, num_samples=2000, vae_steps=vae_steps,
                          ldm_steps=ldm_steps, num_prompts=num_prompts, sample_steps=25, threads=1, seed=seed,
                          timestep_sampling=mode)
    report = demo.run_demo(cfg, samplers=("ddim",))
    last = read_history(os.path.join(cfg.out, "ldm_run", "logs"))[-1]
    bins = sorted((k for k in last if k.startswith("val_loss_bin")), key=lambda k: int(k[len("val_loss_bin"):]))
    return {"mode": mode, "seed": seed, "val_loss": report["val_loss_history"][-1][1],
            "val_loss_bins": [last[k] for k in bins],
            "all_three": {g: r["all"] for g, r in report["adherence"]["ddim"].items()}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", nargs="+", default=["uniform", "logit_normal"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--out", default="runs/timestep_sampling")
    p.add_argument("--vae-steps", type=int, default=400)
    p.add_argument("--ldm-steps", type=int, default=600)
    p.add_argument("--num-prompts", type=int, default=30)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    results = [run(mode, seed, args.out, args.vae_steps, args.ldm_steps, args.num_prompts)
               for seed in args.seeds for mode in args.modes]
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print()
    for r in results:
        bins = " ".join(f"{v:.4f}" for v in r["val_loss_bins"])
        adherence = " ".join(f"g{g}={v:.0%}" for g, v in r["all_three"].items())
        print(f"{r['mode']:13s} seed {r['seed']}: val_loss {r['val_loss']:.4f}  bins [{bins}]  all three {adherence}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
