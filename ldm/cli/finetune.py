"""`ldm finetune --model DIR --data FOLDER --out DIR`: LoRA or full fine-tuning on a folder of your own images.

The same as `accelerate launch train/finetune.py ...`. Every field of ldm/training/finetune_config.py is a flag
(dashes or underscores), plus `--config FILE.yaml`; a bool flag alone means true, and a list takes its items
space-separated (`--validation-prompts "a red, round thing" "sks art"`), e.g.

    ldm finetune --model models/base --data my-art/ --out runs/my-art \
        --instance-prompt "a painting in the style of sks" --class-prompt "a painting" --export-webui

Checkpoints (--checkpoint-every, and on SIGTERM/Ctrl-C or --max-minutes) go to OUT/checkpoints/; the same
command with --resume latest continues the run exactly.
"""
from __future__ import annotations

from ldm.cli.train import config_command


def print_memorization_warning(cfg, report: dict) -> None:
    """Repeats the memorisation guard's last warning at the end of the run, where it is seen."""
    if report["memorization_warning"]:
        print("finetune: " + report["warnings"][-1])


add_arguments, run = config_command("ldm.training.finetune_config", "FinetuneConfig", "ldm.training.finetune",
                                    after=print_memorization_warning)
