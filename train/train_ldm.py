"""Train a text-to-image latent diffusion model: `accelerate launch train/train_ldm.py --config C.yaml --key value`.

Every setting and its default: ldm/training/ldm_config.py. The loop: ldm/training/train_ldm.py.
"""
import sys

from ldm.training.config import parse_config
from ldm.training.ldm_config import TrainLDMConfig
from ldm.training.train_ldm import main

if __name__ == "__main__":
    main(parse_config(TrainLDMConfig, sys.argv[1:]))
