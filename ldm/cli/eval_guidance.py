"""`ldm eval-guidance --model DIR --prompts digits --reference digits:test@32 --out DIR [--save]`: guidance methods
and scales compared on prompt adherence against distribution distance (ldm.evaluation.guidance_sweep).

    ldm eval-guidance --model runs/digits/pipeline --prompts digits --reference digits:test@32 \\
        --images-per-prompt 20 --out runs/guidance_digits --save
writes sweep.json, tradeoff.png and grid_<method>.png in --out, and the recommended setting as guidance.json: in
--out always, and with --save in the model folder too, where Pipeline.from_pretrained and `ldm generate` use it
whenever no guidance scale is given.
"""
from __future__ import annotations

import argparse
import os
import shutil

from ldm.ranges import float_in


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ldm.evaluation.guidance_sweep import FEATURES, METHODS, SweepConfig

    defaults = SweepConfig()
    p.add_argument("--model", required=True, help="model folder")
    p.add_argument("--prompts", required=True,
                   help="shapes (the demo's 90 canonical prompts), digits (the ten 'a handwritten digit N') or a "
                        "text file, one prompt per line")
    p.add_argument("--reference", required=True,
                   help="real images for the distance: a data spec (digits:test@32, shapes:1000@32, a folder, ...); "
                        "the first --num-reference are used (built-in shapes: single shapes only)")
    p.add_argument("--out", required=True, help="output folder: sweep.json, tradeoff.png, grid_<method>.png")
    p.add_argument("--save", action="store_true",
                   help="also write the recommended setting into the model folder as guidance.json, the model's "
                        "default guidance (else it goes to --out only)")
    p.add_argument("--guidance-methods", nargs="+", dest="methods", deprecated=["--methods"],
                   default=list(defaults.methods), metavar="METHOD",
                   help=f"guidance methods: {', '.join(METHODS)} (default: all)")
    p.add_argument("--guidance-scales", nargs="+", dest="scales", deprecated=["--scales"], type=float,
                   default=list(defaults.scales), metavar="W",
                   help="guidance scales swept for every method (<= 1: no guidance)")
    p.add_argument("--images-per-prompt", type=int, default=defaults.images_per_prompt)
    p.add_argument("--steps", type=int, default=defaults.steps, help="sampling steps, the same for every setting")
    p.add_argument("--scheduler", default=None, help="sampler name (default: the folder's)")
    p.add_argument("--seed", type=int, default=defaults.seed, help="image k starts from the noise of seed + k")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size, help="images per pipeline call")
    p.add_argument("--grader", default=defaults.grader,
                   help="adherence: auto (shapes or digits, from the prompts), shapes, digits or MODULE:FUNCTION, a "
                        "function (images, prompts) -> {'all': fraction, ...}")
    p.add_argument("--num-reference", type=int, default=defaults.num_reference)
    p.add_argument("--features", choices=FEATURES, default=defaults.features,
                   help="distance feature space: pixels (box-averaged, no weights), tiny or inception (local weights)")
    p.add_argument("--feature-size", type=int, default=defaults.feature_size, help="pixels: side after averaging")
    p.add_argument("--feature-weights", default=None, help="tiny / inception: local weights file")
    p.add_argument("--guidance-interval", nargs=2, dest="interval", deprecated=["--interval"], type=float,
                   default=None, metavar=("T_LO", "T_HI"),
                   help="the interval method's band in the sampler's timesteps (default: sigma in (0.28, 5.42], "
                        "Kynkaanniemi et al. 2024, mapped to the model's schedule)")
    p.add_argument("--apg-norm-threshold", type=float_in("[0, inf)"), default=defaults.apg.norm_threshold,
                   help="the apg method's cap r on the update's L2 norm over the whole latent (0 = none); the "
                        "default is the paper's for 128x128x4 latents: scale it with the square root of the size")
    p.add_argument("--guidance-rescale", dest="rescale", deprecated=["--rescale"], type=float_in("[0, 1]"),
                   default=defaults.rescale,
                   help="the rescale method's phi (Lin et al. 2023)")
    p.add_argument("--tolerance", type=float_in("[0, 1]"), default=defaults.tolerance,
                   help="recommend the lowest FID among settings within this of the best adherence")
    p.add_argument("--grid-guidance-scale", dest="grid_scale", deprecated=["--grid-scale"], type=float,
                   default=defaults.grid_scale,
                   help="each method's sample grid shows the swept scale nearest this")
    p.add_argument("--device", default=None)


def config_from_args(args):
    from ldm.evaluation.guidance_sweep import SweepConfig
    from ldm.pipelines.guidance import APGSettings

    return SweepConfig(prompts=args.prompts, images_per_prompt=args.images_per_prompt, methods=tuple(args.methods),
                       scales=tuple(args.scales), steps=args.steps, seed=args.seed, batch_size=args.batch_size,
                       grader=args.grader, reference=args.reference, num_reference=args.num_reference,
                       features=args.features, feature_size=args.feature_size, feature_weights=args.feature_weights,
                       interval=tuple(args.interval) if args.interval else None, rescale=args.rescale,
                       apg=APGSettings(norm_threshold=args.apg_norm_threshold),
                       tolerance=args.tolerance, grid_scale=args.grid_scale)


def run(args: argparse.Namespace) -> int:
    from ldm.diagnostics.render import load_pipeline
    from ldm.evaluation.guidance_sweep import check_inputs, format_table, run_sweep, write_recommendation
    from ldm.pipelines.recommended import GUIDANCE_FILE

    cfg = config_from_args(args)
    check_inputs(cfg)  # before loading the model
    pipe = load_pipeline(args.model, args.device)
    if args.scheduler:
        pipe.set_scheduler(args.scheduler)
    report = run_sweep(pipe, cfg, args.out)
    print(format_table(report))
    written = write_recommendation(args.out, report)
    if args.save:
        shutil.copyfile(written, os.path.join(args.model, GUIDANCE_FILE))
        print(f"saved the recommendation as {os.path.join(args.model, GUIDANCE_FILE)}: Pipeline.from_pretrained and "
              "`ldm generate` now use it when no guidance scale is given")
    else:
        print(f"wrote the recommendation to {written}; to make it the model's default guidance, rerun with --save "
              f"or copy it into {args.model}")
    return 0
