"""`ldm train-text-encoder`: train a CLIP text encoder from nothing, contrastively, on the data's (image, caption)
pairs (the same as `accelerate launch train/train_text_encoder.py`); `ldm train --text-encoder OUT` then uses it.

Every field of TrainTextEncoderConfig (ldm/training/train_text_encoder.py) is a flag, plus `--config FILE.yaml`;
`ldm train-text-encoder --help` lists them with their defaults.
"""
from ldm.cli.train import config_command

add_arguments, run = config_command("ldm.training.train_text_encoder", "TrainTextEncoderConfig",
                                    "ldm.training.train_text_encoder")
