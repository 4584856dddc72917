"""FinetuneConfig: every setting of train/finetune.py (`ldm finetune`), with its default.

Zeros mean "scaled to the folder" (see `resolve_defaults`): a folder of 5 to 200 images gets a step count,
learning rate and validation interval that suit it without tuning.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

from ldm.ranges import setting
from ldm.training.base_config import CaptionTags, ExposureBias, MaskedLoss, TrainingConfig
from ldm.training.optimizers import recommended_learning_rate

METHODS = ("lora", "full")


@dataclass
class FinetuneConfig(ExposureBias, MaskedLoss, CaptionTags, TrainingConfig):
    # the shared settings: TrainingConfig, CaptionTags, MaskedLoss and ExposureBias (ldm/training/base_config.py;
    # the instance prompt is the first tag); 0 below means "scaled to the folder"
    # inputs and outputs
    model: str = ""                        # the base pipeline folder
    data: str = ""                         # a folder of images (captions optional), or any ldm.data spec
    out: str = "runs/finetune"
    instance_prompt: str = ""              # e.g. "a painting in the style of sks"; prepended to captions if any
    resolution: int = setting(0, "[0, 8192]")  # 0 = the model's native size
    aspect_buckets: bool = True            # mixed aspect ratios train at their own shape
    random_flip: bool = False
    # method
    method: str = "lora"                   # lora: adapters on attention projections; full: every UNet weight
    lora_rank: int = setting(8, "[1, 1024]")
    lora_alpha: float = setting(0.0, "[0, 1e4]")  # 0 = rank (scale 1)
    lora_dropout: float = setting(0.0, "[0, 1)")
    lora_type: str = "lora"                # lora | locon (LoRA on the convolutions too) | loha | lokr | dora
    lora_conv_rank: int = setting(0, "[0, 1024]")  # locon / loha / lokr: the convolutions' rank; 0 = lora_rank
    lora_conv_alpha: float = setting(0.0, "[0, 1e4]")  # 0 = the conv rank (scale 1)
    train_text_encoder: bool = False       # LoRA: adapters on the text encoder too; full: train it whole
    # DreamBooth prior preservation (Ruiz et al. 2023, arXiv:2208.12242, Eq. 2)
    class_prompt: str = ""                 # e.g. "a painting"; "" = no prior preservation
    num_class_images: int = setting(0, "[0, 1e5]")  # 0 = as many as training images (at least 8) when
                                                    # class_prompt is set
    prior_loss_weight: float = setting(1.0, "[0, 1e3]")
    class_sample_steps: int = setting(25, "[1, 1000]", flag="class_image_steps")  # sampling steps of the class
                                                                                  # images
    # optimisation (0 = scaled to the folder)
    max_steps: int = setting(0, "[0, 1e8]")
    repeats: int = setting(10, "[1, 1e4]")  # passes over each image per "epoch" (kohya's repeats)
    epochs: int = setting(10, "[1, 1e5]")
    learning_rate: float = setting(0.0, "[0, 1]")  # 0 = the method's (LoRA 1e-4, full 5e-6; Prodigy 1.0)
    batch_size: int = 4
    lr_warmup_steps: int = 0               # 0 = scaled to the folder
    caption_dropout: float = setting(0.0, "[0, 1)")  # DreamBooth trains without; > 0 also teaches the empty prompt
                                                     # the style
    # validation and the memorisation guard
    holdout_fraction: float = setting(0.1, "(0, 1)")  # held out for validation loss; leave-one-out below 10 images
    validation_every: int = setting(0, "[0, 1e8]")  # 0 = 4 times per run
    validation_prompts: list[str] = setting(factory=list)   # default: the instance prompt (or first captions)
    num_validation_samples: int = setting(4, "[1, 1000]")
    validation_sample_steps: int = setting(20, "[1, 1000]", flag="validation_steps")
    validation_guidance: float = setting(4.0, "[0, 100]", flag="validation_guidance_scale")
    validation_guidance_method: str = "cfg"  # or interval, apg, cfg_zero_star, rescale (`ldm eval-guidance`'s)
    val_loss_bins: int = setting(5, "[1, 1000]", flag="validation_loss_bins")
    near_copy_ratio: float = setting(0.35, "(0, 10]")  # a sample closer than this x the typical training-image
                                                       # distance is a copy
    max_loss_gap: float = setting(1.5, "(0, 1e3]")  # held-out / training loss at low noise above this warns too
    early_stop_on_memorization: bool = False
    # outputs
    export_webui: bool = False             # also write a kohya-format LoRA for AUTOMATIC1111 / ComfyUI
    save_pipeline: bool = False            # LoRA: also write the fused pipeline folder (full always writes one)
    # checkpoints (OUT/checkpoints/checkpoint-N: Accelerate state, weights, trainer_state.json)
    checkpoint_every: int = 500            # 0 = only when stopped by a signal or max_minutes (the end of the run
                                           # writes the LoRA / pipeline instead)
    device: str = "auto"

    def validate(self) -> None:
        """Raises ValueError naming the first bad setting and how to fix it."""
        super().validate()
        if not self.model:
            raise ValueError("no base model: pass --model DIR (a pipeline folder, e.g. from `ldm train` or SD 1.x)")
        if not self.data:
            raise ValueError("no images: pass --data FOLDER (5 to 200 pictures; captions optional)")
        from ldm.pipelines.guidance import GUIDANCE_METHODS

        from ldm.models.lora import LORA_TYPES

        for key, options in (("method", METHODS), ("validation_guidance_method", tuple(GUIDANCE_METHODS)),
                             ("lora_type", LORA_TYPES)):
            if getattr(self, key) not in options:
                raise ValueError(f"--{key.replace('_', '-')} {getattr(self, key)!r} is not one of {options}")
        if (self.lora_conv_rank or self.lora_conv_alpha) and self.lora_type not in ("locon", "loha", "lokr"):
            raise ValueError(f"--lora-conv-rank / --lora-conv-alpha set the convolutions' adapters, which --lora-type "
                             f"{self.lora_type} does not add; use --lora-type locon, loha or lokr, or drop them")
        if self.class_prompt and self.prior_loss_weight <= 0:
            raise ValueError("--prior-loss-weight must be > 0 with --class-prompt (1.0 is DreamBooth's)")
        if self.num_class_images and not self.class_prompt:
            raise ValueError("--num-class-images needs --class-prompt (e.g. --class-prompt 'a painting')")
        if self.resolution % 8:
            raise ValueError(f"--resolution must be divisible by 8, got {self.resolution}")
        self.check_tags()
        self.check_masks()

    def has_gpu(self) -> bool:
        """Returns whether the run will have a CUDA GPU: not with --device cpu."""
        return self.device != "cpu" and super().has_gpu()


def default_learning_rate(method: str) -> float:
    """Returns the usual starting point: 1e-4 for LoRA (diffusers' and kohya's default), 5e-6 for full weights."""
    return 1e-4 if method == "lora" else 5e-6


def auto_steps(num_images: int, batch_size: int, repeats: int, epochs: int) -> int:
    """Returns ceil(num_images * repeats / batch_size) * epochs, kept within [200, 3000] optimiser steps."""
    return min(3000, max(200, math.ceil(num_images * repeats / batch_size) * epochs))


def resolve_defaults(cfg: FinetuneConfig, num_train_images: int, native_resolution: int) -> FinetuneConfig:
    """Returns a copy with every 0 ("scaled to the folder") replaced by its value for this folder and model."""
    steps = cfg.max_steps or auto_steps(num_train_images, cfg.batch_size * cfg.gradient_accumulation_steps,
                                        cfg.repeats, cfg.epochs)
    class_images = cfg.num_class_images or (max(8, num_train_images) if cfg.class_prompt else 0)
    return replace(cfg, max_steps=steps, resolution=cfg.resolution or native_resolution,
                   learning_rate=cfg.learning_rate or recommended_learning_rate(cfg.optimizer,
                                                                                default_learning_rate(cfg.method)),
                   lora_alpha=cfg.lora_alpha or float(cfg.lora_rank), num_class_images=class_images,
                   validation_every=cfg.validation_every or max(1, steps // 4),
                   lr_warmup_steps=cfg.lr_warmup_steps or min(50, steps // 10))
