"""The `ldm` command: one subcommand per module in ldm.cli, loaded only when used (so --help is instant).

Each module defines `add_arguments(parser)` and `run(args) -> int | None`. Every parser is an ldm.flags.FlagParser:
dashed flags with hidden underscore aliases, former names as deprecated aliases, a misspelt flag refused with the
command's own usage.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from ldm.flags import FlagParser

# name -> (module, one-line help). Order is the order `ldm --help` shows.
COMMANDS = {
    "generate": ("ldm.cli.generate", "generate images from a prompt with a model folder"),
    "create-model": ("ldm.cli.create_model", "write a randomly initialised model folder from a preset"),
    "demo": ("ldm.cli.demo", "train a text-to-image model on the built-in shapes data, on this machine"),
    "train": ("ldm.cli.train", "train a latent diffusion model (same as train/train_ldm.py)"),
    "train-vae": ("ldm.cli.train_vae", "train the VAE (same as train/train_vae.py)"),
    "train-text-encoder": ("ldm.cli.train_text_encoder", "train a CLIP text encoder on image-caption pairs"),
    "finetune": ("ldm.cli.finetune", "fine-tune on a folder of your own images (LoRA or full)"),
    "merge-lora": ("ldm.cli.merge_lora", "fuse a LoRA file into a model folder"),
    "convert": ("ldm.cli.convert", "a model folder to one original-layout .safetensors file (A1111, ComfyUI), "
                                   "and back"),
    "prepare-data": ("ldm.cli.prepare_data", "pack any image source into webdataset or parquet shards"),
    "cache-latents": ("ldm.cli.cache_latents", "encode a data set to VAE latents and token ids on disk"),
    "diagnose": ("ldm.cli.diagnose", "per-timestep, sampling and schedule diagnostics, as plots and JSON"),
    "eval": ("ldm.cli.eval", "prompt adherence, FID/KID, CLIP score and memorisation of a model"),
    "eval-guidance": ("ldm.cli.eval_guidance", "guidance methods and scales: adherence against distance, the "
                                               "recommended setting"),
    "ui": ("ldm.cli.ui", "a local web page: generate, inside the sampler, training runs, diagnose"),
}


def available_commands() -> dict:
    """Returns the commands whose module is present in this install."""
    return {n: v for n, v in COMMANDS.items() if importlib.util.find_spec(v[0]) is not None}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = FlagParser(prog="ldm", description="Text-to-image latent diffusion: train, sample, diagnose.")
    parser.add_argument("--version", action="version", version=f"ldm {__import__('ldm').__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = argv[0] if argv and not argv[0].startswith("-") else None
    for name, (module, help_text) in available_commands().items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == wanted:  # import only the command being run
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        return int(module.run(args) or 0)
    except (ValueError, FileNotFoundError) as e:  # user errors: a clear message, no traceback
        print(f"ldm {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
