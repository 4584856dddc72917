"""Train a CLIP text encoder contrastively: `accelerate launch train/train_text_encoder.py --config C.yaml --key value`.

Every setting and its default: ldm/training/train_text_encoder.py.
"""
import sys

from ldm.training.config import parse_config
from ldm.training.train_text_encoder import TrainTextEncoderConfig
from ldm.training.train_text_encoder import main

if __name__ == "__main__":
    main(parse_config(TrainTextEncoderConfig, sys.argv[1:]))
