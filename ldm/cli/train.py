"""`ldm train`: train a latent diffusion model (the same as `accelerate launch train/train_ldm.py`).

Every `--key value` of ldm/training/ldm_config.py is accepted, plus `--config FILE.yaml`.
"""
from __future__ import annotations

import importlib


def config_command(config_module: str, config_name: str, main_module: str):
    """Returns (add_arguments, run) for a command whose flags are a training config dataclass's fields."""
    def config_cls():
        return getattr(importlib.import_module(config_module), config_name)

    def add_arguments(parser) -> None:
        from ldm.training.config import add_config_arguments

        add_config_arguments(parser, config_cls())

    def run(args) -> int:
        from ldm.training.config import argv_from_args, parse_config

        importlib.import_module(main_module).main(parse_config(config_cls(), argv_from_args(args, config_cls())))
        return 0

    return add_arguments, run


add_arguments, run = config_command("ldm.training.ldm_config", "TrainLDMConfig", "ldm.training.train_ldm")
