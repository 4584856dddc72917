"""`ldm finetune --model DIR --data FOLDER --out DIR`: LoRA or full fine-tuning on a folder of your own images.

The same as `accelerate launch train/finetune.py ...`. Every `--key value` of ldm/training/finetune_config.py
is accepted (dashes or underscores), plus `--config FILE.yaml`; a bool flag alone means true, e.g.

    ldm finetune --model models/base --data my-art/ --out runs/my-art \
        --instance-prompt "a painting in the style of sks" --class-prompt "a painting" --export-webui

Checkpoints (--checkpoint-every, and on SIGTERM/Ctrl-C or --max-minutes) go to OUT/checkpoints/; the same
command with --resume latest continues the run exactly.
"""
from __future__ import annotations

import dataclasses
import json


def add_arguments(parser) -> None:
    """One --flag per FinetuneConfig field (dashes for underscores); values are checked by the config parser."""
    from ldm.training.finetune_config import FinetuneConfig

    parser.add_argument("--config", default=None, help="a YAML file of settings; flags override it")
    for f in dataclasses.fields(FinetuneConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if f.type in (bool, "bool"):
            parser.add_argument(flag, dest=f.name, nargs="?", const="true", default=None,
                                help=f"true/false (default {str(default).lower()})")
        elif "list" in str(f.type):
            parser.add_argument(flag, dest=f.name, action="append", default=None, help="repeat for several")
        else:
            parser.add_argument(flag, dest=f.name, default=None, help=f"default: {default!r}")


def to_flags(args) -> list[str]:
    """Returns the given flags as `--key value` strings for ldm.training.config.parse_config."""
    from ldm.training.finetune_config import FinetuneConfig

    flags = ["--config", args.config] if args.config else []
    for f in dataclasses.fields(FinetuneConfig):
        value = getattr(args, f.name, None)
        if value is not None:
            flags += [f"--{f.name}", json.dumps(value) if isinstance(value, list) else str(value)]
    return flags


def run(args) -> int:
    from ldm.training.config import parse_config
    from ldm.training.finetune import main
    from ldm.training.finetune_config import FinetuneConfig

    report = main(parse_config(FinetuneConfig, to_flags(args)))
    if report["memorization_warning"]:
        print("finetune: " + report["warnings"][-1])
    return 0
