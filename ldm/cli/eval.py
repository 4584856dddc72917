"""`ldm eval --model DIR --prompts FILE --out DIR`: prompt adherence, FID/KID, CLIP score and memorisation.

    ldm eval --model models/demo --prompts prompts.txt --out eval/ \
        --reference real_images/ --feature-weights ~/.cache/ldm/inception_v3_google-0cc3c7bd.pth \
        --clip-model ViT-B-32 --clip-weights open_clip_model.safetensors --train-data train_images/
Every weights file is local; a missing one stops with what to download and where to put it.
"""
from __future__ import annotations

import argparse
import json

from ldm.ranges import float_in, int_in


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model folder")
    parser.add_argument("--prompts", required=True, help="text file, one prompt per line")
    parser.add_argument("--out", required=True, help="output folder (images/ and eval.json)")
    parser.add_argument("--reference", default=None, help="folder of real images: enables FID and KID")
    parser.add_argument("--features", choices=["inception", "tiny"], default="inception",
                        help="feature extractor for FID/KID")
    parser.add_argument("--feature-weights", deprecated=["--inception-weights"], default=None,
                        help="local weights file of the feature extractor (default: $LDM_INCEPTION_WEIGHTS or "
                             "~/.cache/ldm/inception_v3_google-0cc3c7bd.pth)")
    parser.add_argument("--clip-model", default=None, help="open_clip model name (with --clip-weights) or folder")
    parser.add_argument("--clip-weights", default=None, help="local open_clip weights file")
    parser.add_argument("--train-data", default=None, help="folder of training images: enables memorisation")
    parser.add_argument("--adherence", choices=["auto", "on", "off"], default="auto",
                        help="shapes-prompt adherence; auto: when every prompt is a shapes prompt")
    parser.add_argument("--images-per-prompt", type=int_in("[1, 1000]"), default=1)
    parser.add_argument("--steps", type=int_in("[1, 1000]"), default=25)
    parser.add_argument("--guidance-scale", type=float_in("[0, 100]"), default=7.5)
    parser.add_argument("--scheduler", default=None, help="sampler name (default: the folder's)")
    parser.add_argument("--seed", type=int_in("[0, 4294967295]"), default=0)
    parser.add_argument("--device", default=None)


def run(args: argparse.Namespace) -> int:
    from ldm.diagnostics.render import load_pipeline
    from ldm.evaluation.features import resolve_weights
    from ldm.evaluation.run import EvalConfig, evaluate_model

    cfg = EvalConfig(reference=args.reference, features=args.features, feature_weights=args.feature_weights,
                     clip_model=args.clip_model, clip_weights=args.clip_weights, train_data=args.train_data,
                     adherence=args.adherence, images_per_prompt=args.images_per_prompt, steps=args.steps,
                     guidance_scale=args.guidance_scale, seed=args.seed)
    cfg.validate()  # fail on bad settings and missing CLIP weights before loading or sampling anything
    if cfg.reference:  # fail on missing weights before sampling anything
        resolve_weights(cfg.features, cfg.feature_weights)
    pipe = load_pipeline(args.model, args.device)
    if args.scheduler:
        pipe.set_scheduler(args.scheduler)
    report = evaluate_model(pipe, args.prompts, args.out, cfg)
    print(json.dumps({k: v for k, v in report.items() if k not in ("clip_score", "memorisation")}, indent=1))
    return 0
