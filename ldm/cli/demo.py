"""`ldm demo`: train a text-to-image model on the built-in shapes data on this machine, then grade it."""
from __future__ import annotations

import os

from ldm.training.config import float_in, int_in


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="runs/demo", help="output folder (pipeline/, report.json, PNG grids)")
    parser.add_argument("--minutes", type=float_in("(0, 1e5]"), default=15.0,
                        help="time budget; training stops early to keep it")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--seed", type=int_in("[0, 4294967295]"), default=0)
    parser.add_argument("--ldm-steps", type=int_in("[1, 1e7]"), default=None,
                        help="LDM optimiser steps (default: the preset's)")
    parser.add_argument("--vae-steps", type=int_in("[1, 1e7]"), default=None, help="VAE optimiser steps")


def run(args) -> int:
    from dataclasses import replace

    if args.device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "true"  # Accelerate would otherwise take a visible GPU
    from ldm.training.demo import DemoConfig, run_demo

    cfg = replace(DemoConfig(), out=args.out, minutes=args.minutes, device=args.device, seed=args.seed)
    if args.ldm_steps is not None:
        cfg = replace(cfg, ldm_steps=args.ldm_steps)
    if args.vae_steps is not None:
        cfg = replace(cfg, vae_steps=args.vae_steps)
    run_demo(cfg)
    return 0
