"""`ldm train-vae`: train the VAE (the same as `accelerate launch train/train_vae.py`).

Every field of TrainVAEConfig (ldm/training/train_vae.py) is a flag, plus `--config FILE.yaml`;
`ldm train-vae --help` lists them with their defaults.
"""
from ldm.cli.train import config_command

add_arguments, run = config_command("ldm.training.train_vae", "TrainVAEConfig", "ldm.training.train_vae")
