"""`ldm train-vae`: train the VAE (the same as `accelerate launch train/train_vae.py`).

Every `--key value` of ldm/training/train_vae.py is accepted, plus `--config FILE.yaml`.
"""
from ldm.cli.train import config_command

add_arguments, run = config_command("ldm.training.train_vae", "TrainVAEConfig", "ldm.training.train_vae")
