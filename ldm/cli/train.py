"""`ldm train`: train a latent diffusion model (the same as `accelerate launch train/train_ldm.py`).

Every field of ldm/training/ldm_config.py (and of the shared ldm/training/base_config.py) is a flag
(`--key-with-dashes value`; `--key_with_underscores` works too), plus `--config FILE.yaml`; `ldm train --help` lists
them with their defaults. The conventions (bools, lists, renamed flags) are in ldm/training/config.py's docstring.
"""
from __future__ import annotations

import importlib
from typing import Callable


def config_command(config_module: str, config_name: str, main_module: str, main_name: str = "main",
                   before: Callable | None = None, after: Callable | None = None):
    """Returns (add_arguments, run) for a command whose flags are the fields of a config dataclass.

    run builds the config from the flags (ldm.training.config.config_from_args: defaults, the YAML file of
    --config, the flags; validated), calls `before(cfg)`, then `main_module.main_name(cfg)`, then
    `after(cfg, result)`. Modules are imported only when used, so `ldm --help` stays instant."""
    def config_cls():
        return getattr(importlib.import_module(config_module), config_name)

    def add_arguments(parser) -> None:
        from ldm.training.config import add_config_arguments

        add_config_arguments(parser, config_cls())

    def run(args) -> int:
        from ldm.training.config import config_from_args

        cfg = config_from_args(config_cls(), args)
        if before is not None:
            before(cfg)
        result = getattr(importlib.import_module(main_module), main_name)(cfg)
        if after is not None:
            after(cfg, result)
        return 0

    return add_arguments, run


add_arguments, run = config_command("ldm.training.ldm_config", "TrainLDMConfig", "ldm.training.train_ldm")
