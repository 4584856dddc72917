"""TrainingConfig: the settings every trainer shares (`ldm train`, `train-vae`, `train-text-encoder`, `finetune`),
each declared once here with its range and its help (the trailing comment); CaptionTags: the tag-caption settings
of the two text-to-image trainers (`ldm train`, `ldm finetune`); MaskedLoss: their loss-mask settings.

A command's config is one dataclass below these that adds only its own settings; where a command wants
another default it sets the field again with that default alone (the range and help stay these), or with a
range of its own where 0 means something there (finetune: "scaled to the folder").
"""
from __future__ import annotations

from dataclasses import dataclass

from ldm.ranges import check_ranges, setting
from ldm.training.optimizers import check_optimizer

MIXED_PRECISION = ("no", "fp16", "bf16")


@dataclass
class TrainingConfig:
    data: str = "shapes:2000"             # any ldm.data spec: folder, shards, parquet, COCO json, hf folder, shapes:N
    resolution: int = setting(64, "[8, 8192]")  # image side; must be divisible by the VAE's downsampling factor
    model: str = "tiny"                    # a preset name (tiny, small, sd15, sd21, ...; ldm.models.presets) or a
                                           # pipeline folder to continue
    learning_rate: float = setting(1e-4, "(0, 1]")
    optimizer: str = "adamw"               # adamw, adamw_8bit (CUDA + bitsandbytes), prodigy (learning rate 1.0),
                                           # adafactor, schedule_free_adamw (constant lr schedule); see
                                           # ldm/training/optimizers.py
    prodigy_d_coef: float = setting(1.0, "(0, 100]")  # optimizer prodigy: scales its step-size estimate d (0.5
                                                      # gentler, 2 bolder); the others ignore it
    lr_warmup_steps: int = setting(0, "[0, 1e9]")   # 0 = no warm-up
    batch_size: int = setting(16, "[1, 65536]")     # per process
    gradient_accumulation_steps: int = setting(1, "[1, 65536]")  # micro-batches per optimiser step
    max_grad_norm: float = setting(1.0, "[0, 1e6]")  # 0 = no clipping
    max_nonfinite_steps: int = setting(10, "[1, 1e9]")  # stop after this many non-finite losses in a row (each
                                                        # skips its update)
    mixed_precision: str = "no"            # no, fp16 or bf16
    max_steps: int = setting(1000, "[1, 1e9]")
    max_minutes: float = setting(0.0, "[0, 1e7]")  # >0: stop (with a checkpoint) after this much training time;
                                                   # 0 = no limit
    checkpoint_every: int = setting(500, "[0, 1e9]")  # 0 = only at the end (max_steps, max_minutes or a signal)
    checkpoints_total_limit: int = setting(2, "[0, 1e6]")  # keep the newest this many; 0 = keep every checkpoint
    resume: str = ""                       # "", "latest" or a checkpoint folder
    seed: int = setting(0, "[0, 4294967295]")
    ddp_timeout: float = setting(0.0, "[0, 1e7]")  # seconds a collective waits for a hung rank before the others
                                                   # stop (a dead one is seen at once); 0 = torch's default (30 min
                                                   # gloo, 10 min NCCL); above the longest validation or checkpoint

    def validate(self) -> None:
        """Raises ValueError naming the first shared setting out of its range or choices; a command's validate()
        calls this first, then checks its own."""
        check_ranges(self)
        check_optimizer(self.optimizer, self.learning_rate, self.has_gpu())
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision={self.mixed_precision!r} is not one of {MIXED_PRECISION}")

    def has_gpu(self) -> bool:
        """Returns whether the run will have a CUDA GPU (adamw_8bit needs one)."""
        import torch

        return torch.cuda.is_available()


@dataclass
class MaskedLoss:
    # masked loss (ldm.data.masks): learn only where each image's mask is white (`ldm train`, `ldm finetune`)
    masked_loss: bool = False              # weigh the loss by each image's mask: NAME.mask.png beside it, the same
                                           # name under mask_dir, or its alpha channel; no mask = every pixel counts
    masked_loss_floor: float = setting(0.0, "[0, 1]")  # the weight where the mask is black (0 = ignored there)
    mask_dir: str = ""                     # a folder of masks under the images' relative names (folder data only)

    def check_masks(self) -> None:
        """Raises ValueError for a mask setting given without --masked-loss (it would do nothing)."""
        if not self.masked_loss and (self.mask_dir or self.masked_loss_floor):
            raise ValueError("--mask-dir and --masked-loss-floor take effect with --masked-loss: add --masked-loss")


@dataclass
class CaptionTags:
    # tag captions ("sks style, 1girl, red hair"), each time a caption is used (ldm.data.captions)
    shuffle_tags: bool = False             # shuffle the tags after the first keep_tags (kohya's shuffle_caption)
    keep_tags: int = setting(0, "[0, 1000]")  # the first N tags stay in place and are never dropped (kohya's
                                              # keep_tokens)
    tag_dropout: float = setting(0.0, "[0, 1)")  # drop each other tag with this probability; 0 = off (a caption
                                                 # keeps a tag)
    tag_separator: str = ","               # what separates tags; changed captions are never cached as embeddings

    def check_tags(self) -> None:
        """Raises ValueError for a tag setting that cannot work (ranges: check_ranges)."""
        if not self.tag_separator:
            raise ValueError("--tag-separator must not be empty: pass --tag-separator ',' (the usual one)")


@dataclass
class ExposureBias:
    # exposure bias: training sees forward-process x_t, sampling feeds the model its own outputs (issue #35).
    # Each 0 = off (a run without them draws the same numbers as before); they change the input, not the target
    input_perturbation: float = setting(0.0, "[0, 1]")  # DDPM-IP's gamma (Ning et al. 2023, arXiv:2301.11706): the
                                                        # input's noise is eps + gamma xi, the target stays eps;
                                                        # 0.1 in the paper. Flow: the path's noise end is perturbed
    self_step_prob: float = setting(0.0, "[0, 1]")  # train this share of samples on an x_t made by the model's own
                                                    # DDIM step from x_{t+k} (no gradient through that step),
                                                    # toward the noise that maps it back to x0; not with flow
    self_step_k: int = setting(10, "[1, 100000]")  # with self_step_prob: k, the timesteps between x_{t+k} and x_t

    def check_exposure_bias(self, prediction_type: str, num_train_timesteps: int) -> None:
        """Raises ValueError for a self step that cannot work: flow matching, or k past the schedule."""
        if self.self_step_prob > 0 and prediction_type == "flow":
            raise ValueError("self_step_prob needs a diffusion objective (a DDIM step from x_{t+k}); prediction_type "
                             "flow has none: set --self-step-prob 0, or use --input-perturbation, which flow takes")
        if self.self_step_k >= num_train_timesteps:
            raise ValueError(f"self_step_k={self.self_step_k} must be below num_train_timesteps="
                             f"{num_train_timesteps}: pass a smaller --self-step-k")
