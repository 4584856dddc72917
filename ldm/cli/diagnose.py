"""`ldm diagnose timesteps|sampling|schedule|training|all`: diagnostics as PNG plots, JSON and CSV.

    ldm diagnose timesteps --model DIR --data shapes:64 --out diag/ [--gaussian-reference]
    ldm diagnose sampling --model DIR --prompt "a red circle" --schedulers ddpm ddim lms --steps 25 --out diag/
    ldm diagnose schedule --noise-schedule linear scaled_linear --out diag/
    ldm diagnose training --history run/val_loss.jsonl --out diag/
    ldm diagnose all --model DIR --out benchmarks/figures/   # every figure of docs/src/guides/diagnostics.md

A flow-matching model (its scheduler a FlowMatch one) is diagnosed in its own terms: the loss and bias of the
predicted velocity per sigma bin, the samplers euler and heun by default, its shifted sigma schedule.
"""
from __future__ import annotations

import argparse
import os

from ldm.flags import SplitCommas
from ldm.ranges import float_in, int_in


def _add_timesteps(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model folder")
    p.add_argument("--data", required=True, help="probe images: a folder, shards or shapes:N (first --num-images)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--num-images", type=int_in("[1, 1e5]"), default=8)
    p.add_argument("--bins", type=int_in("[1, 1000]"), default=10, help="timestep bins")
    p.add_argument("--per-bin", type=int_in("[1, 1000]"), default=4, help="probe timesteps per bin")
    p.add_argument("--seed", type=int_in("[0, 4294967295]"), default=0, help="noise seed of the probe set")
    p.add_argument("--z-threshold", type=float_in("(0, 1e6]"), default=5.0,
                   help="flag channels whose |bias| exceeds this many s.e.")
    p.add_argument("--gaussian-reference", action="store_true",
                   help="compare with the optimal predictor for a Gaussian fitted to the data's latents")
    p.add_argument("--reference-images", type=int_in("[1, 1e6]"), default=64,
                   help="images to fit the Gaussian reference on")
    p.add_argument("--device", default=None)


def _add_sampling(p: argparse.ArgumentParser) -> None:
    from ldm.cli.generate import add_drift_arguments

    p.add_argument("--model", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--schedulers", nargs="+", action=SplitCommas, default=None, metavar="NAME",
                   help="sampler names, space-separated (default: ddpm ddim lms, or for a flow model euler heun)")
    p.add_argument("--steps", type=int_in("[1, 1000]"), default=25)
    p.add_argument("--seed", type=int_in("[0, 4294967295]"), default=0)
    p.add_argument("--guidance-scale", type=float_in("[0, 100]"), default=7.5)
    p.add_argument("--guidance-rescale", type=float_in("[0, 1]"), default=0.0)
    p.add_argument("--strip", type=int_in("[1, 1000]"), default=6,
                   help="decoded x0 predictions per sampler in the strip image")
    p.add_argument("--num-images", type=int_in("[1, 1e5]"), default=4,
                   help="samples pooled into the per-step statistics")
    p.add_argument("--data", default=None, help="data source whose latent mean/std define the forward marginal "
                   "(default: mean 0, std 1 per channel)")
    p.add_argument("--device", default=None)
    add_drift_arguments(p)  # the same remedy flags as ldm generate, applied to every sampler of the run


def _add_schedule(p: argparse.ArgumentParser) -> None:
    from ldm.diffusion import BETA_SCHEDULES

    p.add_argument("--noise-schedule", nargs="+", dest="beta_schedule", deprecated=["--beta-schedule"],
                   default=["linear", "scaled_linear", "squaredcos_cap_v2"],
                   choices=BETA_SCHEDULES, metavar="NAME", help=f"one or more of {', '.join(BETA_SCHEDULES)}")
    p.add_argument("--out", required=True)
    p.add_argument("--num-train-timesteps", type=int_in("[2, 100000]"), default=1000)
    p.add_argument("--beta-start", type=float_in("(0, 1)"), default=None, help="default: the schedule's usual value")
    p.add_argument("--beta-end", type=float_in("(0, 1)"), default=None)
    p.add_argument("--schedulers", nargs="+", action=SplitCommas, default=["ddpm", "ddim", "lms"], metavar="NAME",
                   help="sampler names, space-separated")
    p.add_argument("--steps", type=int_in("[1, 1000]"), default=20,
                   help="inference steps for the visited-timesteps table")
    p.add_argument("--variance", choices=["posterior", "beta"], default="posterior",
                   help="reverse-process variance in the VLB weights: beta_tilde_t or beta_t")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="diagnostic", metavar="DIAGNOSTIC", required=True)
    _add_timesteps(sub.add_parser("timesteps", help="loss and prediction bias per timestep bin on a fixed probe set"))
    _add_sampling(sub.add_parser("sampling", help="per-step drift, x0 predictions and guidance for several samplers"))
    _add_schedule(sub.add_parser("schedule", help="alpha_bar, SNR, posterior variance, VLB weights, visited timesteps"))
    p = sub.add_parser("training", help="heatmap of per-bin validation loss over training steps")
    p.add_argument("--history", required=True, help="the run's TensorBoard folder (RUN/logs), or validation reports "
                   "as .jsonl (one per line) / .json list")
    p.add_argument("--out", required=True)
    p = sub.add_parser("all", help="every diagnostic of one model (the figures of the diagnostics guide)")
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--data", default="shapes:64")
    p.add_argument("--prompt", default="a red circle on the left")
    p.add_argument("--steps", type=int_in("[1, 1000]"), default=25)
    p.add_argument("--num-images", type=int_in("[1, 1e5]"), default=8, help="probe images for the timestep diagnostics")
    p.add_argument("--history", default=None, help="validation history for the training heatmap (optional)")
    p.add_argument("--device", default=None)


def _timesteps(args) -> dict:
    from ldm.diagnostics.render import load_pipeline
    from ldm.diagnostics.timesteps import diagnose_timesteps

    report = diagnose_timesteps(load_pipeline(args.model, args.device), args.data, args.out, args.num_images, args.bins,
                                args.per_bin, args.seed, args.z_threshold, args.gaussian_reference, args.reference_images)
    print(f"biased bins (|bias| > {args.z_threshold} s.e.): {report['biased_bins'] or 'none'}")
    return report


def _sampling(args) -> dict:
    from ldm.cli.generate import drift_values
    from ldm.diagnostics.probe import latent_channel_stats
    from ldm.diagnostics.render import load_pipeline
    from ldm.diagnostics.sampling_report import diagnose_sampling
    from ldm.pipelines.drift import recorded_drift

    pipe = load_pipeline(args.model, args.device)
    mean, std = latent_channel_stats(pipe, args.data) if args.data else (None, None)
    remedies = recorded_drift(drift_values(args))
    return diagnose_sampling(pipe, args.prompt, args.out, args.schedulers, args.steps, args.seed, args.guidance_scale,
                             args.guidance_rescale, args.strip, mean, std, args.num_images, remedies)


def _schedule(args) -> dict:
    from ldm.diagnostics.schedule_report import diagnose_schedule

    return diagnose_schedule(args.beta_schedule, args.out, args.num_train_timesteps, args.beta_start, args.beta_end,
                             args.schedulers, args.steps, args.variance)


def _training(args) -> dict:
    from ldm.diagnostics.training_heatmap import training_heatmap

    return {"files": [training_heatmap(args.history, os.path.join(args.out, "training_heatmap.png"))]}


def _all(args) -> dict:
    from ldm.diagnostics.render import render_all

    index = render_all(args.model, args.out, args.data, args.prompt, steps=args.steps, history=args.history,
                       num_images=args.num_images, device=args.device)
    return {"files": [os.path.join(args.out, f) for f in index["files"]]}


RUNNERS = {"timesteps": _timesteps, "sampling": _sampling, "schedule": _schedule, "training": _training, "all": _all}


def run(args: argparse.Namespace) -> int:
    report = RUNNERS[args.diagnostic](args)
    for path in report["files"]:
        print(path)
    return 0
