"""Fine-tune on a folder of your own images: `accelerate launch train/finetune.py --model DIR --data FOLDER --out DIR`.

Every setting and its default: ldm/training/finetune_config.py. The loop: ldm/training/finetune.py.
"""
import sys

from ldm.training.config import parse_config
from ldm.training.finetune import main
from ldm.training.finetune_config import FinetuneConfig

if __name__ == "__main__":
    main(parse_config(FinetuneConfig, sys.argv[1:]))
