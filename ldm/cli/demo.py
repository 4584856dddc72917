"""`ldm demo`: train a text-to-image model on the built-in shapes data on this machine, then grade it.

Every field of DemoConfig (ldm/training/demo.py) is a flag, e.g. `ldm demo --out runs/demo --minutes 15
--vae-steps 300 --ldm-steps 600 --timestep-sampling logit_normal`, plus `--config FILE.yaml`;
`ldm demo --help` lists them with their defaults.
"""
from __future__ import annotations

import os

from ldm.cli.train import config_command


def use_cpu_if_asked(cfg) -> None:
    """--device cpu: keeps Accelerate off a visible GPU (it reads this when the demo's Accelerator starts)."""
    if cfg.device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "true"


add_arguments, run = config_command("ldm.training.demo", "DemoConfig", "ldm.training.demo", "run_demo",
                                    before=use_cpu_if_asked)
