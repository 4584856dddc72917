"""Train the VAE (AutoencoderKL): `accelerate launch train/train_vae.py --config C.yaml --key value`.

Every setting and its default: ldm/training/train_vae.py.
"""
import sys

from ldm.training.config import parse_config
from ldm.training.train_vae import TrainVAEConfig
from ldm.training.train_vae import main

if __name__ == "__main__":
    main(parse_config(TrainVAEConfig, sys.argv[1:]))
