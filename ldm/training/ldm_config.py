"""TrainLDMConfig: every setting of train/train_ldm.py (`ldm train`), with its default."""
from __future__ import annotations

from dataclasses import dataclass, field

from ldm.diffusion import BETA_SCHEDULES, TIMESTEP_SAMPLING, WEIGHTINGS
from ldm.objectives import OBJECTIVES
from ldm.ranges import check_ranges

LOSSES = ("mse", "huber", "l1")
OPTIMIZERS = ("adamw", "adamw_8bit")
MIXED_PRECISION = ("no", "fp16", "bf16")


@dataclass
class TrainLDMConfig:
    # data
    data: str = "shapes:2000"             # any ldm.data spec: folder, shards, parquet, COCO json, hf folder, shapes:N
    resolution: int = 64                   # image side; must be divisible by the VAE's downsampling factor
    center_crop: bool = True
    random_flip: bool = False
    aspect_buckets: bool = False           # mixed aspect ratios keep most of each image: each goes to the bucket of
                                           # nearest aspect (about resolution^2 px, sides multiples of 8 up to 2:1;
                                           # ldm.data.transforms.make_buckets); each batch one size, every image
                                           # once per epoch (a bucket's last batch may be smaller); latent cache too
    num_workers: int = 0
    latent_cache: str = ""                 # a folder: VAE latents + token ids cached there on first use, reused
                                           # while VAE and transforms match (ldm.data.ensure_latent_cache)
    # model
    model: str = "tiny"                    # a preset name (tiny, small, sd15, sd21) or a pipeline folder to continue
    vae: str = ""                          # a VAE folder (from train_vae.py); "" = the model folder's / preset's
    text_encoder: str = ""                 # a folder with text_encoder/ (and tokenizer/) from `ldm train-text-encoder`
                                           # (its output_dir: the newest checkpoint; or a checkpoint or model folder);
                                           # "" = the preset's / model folder's. Its width must be the denoiser's
                                           # cross-attention width
    train_text_encoder: bool = False       # False: frozen (and its embeddings cached per caption)
    cache_text_embeddings: bool = False    # frozen encoder only: keep each caption's embedding (few distinct captions)
    train_token_embeddings: bool = True    # with train_text_encoder: false freezes the token table (49408 rows; a
                                           # from-scratch encoder still learns, and the optimiser skips most weights)
    max_token_length: int = 0              # >0: pad/truncate prompts to this many tokens (saved with the tokenizer)
    # noise schedule (saved with the model as its scheduler config)
    noise_schedule: str = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    num_train_timesteps: int = 1000
    zero_terminal_snr: bool = False        # Lin et al. 2023 rescale (use with v_prediction)
    prediction_type: str = "epsilon"       # the objective (ldm/objectives/): epsilon, v_prediction, sample or flow
                                           # (flow matching: the noise schedule settings above do not apply)
    # loss
    loss: str = "mse"
    huber_c: float = 0.1
    weighting: str = "uniform"             # uniform (L_simple), min_snr, vlb (Ho et al. 2020 eq. 12)
    snr_gamma: float = 5.0
    timestep_sampling: str = "uniform"     # uniform, or logit_normal (SD3): t/T = sigmoid(N(timestep_mean, timestep_std))
    timestep_mean: float = 0.0
    timestep_std: float = 1.0
    timestep_mode_scale: float = 1.29      # timestep_sampling mode's scale s (SD3 Eq. 20); 0 = uniform
    flow_shift: float = 1.0                # prediction_type flow: the timestep shift (SD3 Eq. 23), saved with the
                                           # scheduler; 1 = none, >1 more noise; 0 = resolution / 256 (SD3 Sec. 5.3.2)
    offset_noise: float = 0.0
    caption_dropout: float = 0.1           # p_uncond for classifier-free guidance (after the tag settings below)
    # tag captions ("sks style, 1girl, red hair"), each time a caption is used (ldm.data.captions)
    shuffle_tags: bool = False             # shuffle the tags after the first keep_tags (kohya's shuffle_caption)
    keep_tags: int = 0                     # the first N tags stay in place and are never dropped (kohya's keep_tokens)
    tag_dropout: float = 0.0               # drop each other tag with this probability; 0 = off (a caption keeps a tag)
    tag_separator: str = ","               # what separates tags; changed captions are never cached as embeddings
    # optimiser
    learning_rate: float = 1e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0             # 0 = no clipping
    lr_scheduler: str = "constant_with_warmup"   # any diffusers.optimization name (cosine, linear, constant ...)
    lr_warmup_steps: int = 100             # 0 = no warm-up
    batch_size: int = 16                   # per process
    gradient_accumulation_steps: int = 1
    optimizer: str = "adamw"               # adamw (PyTorch's fused kernel) or adamw_8bit (needs bitsandbytes)
    mixed_precision: str = "no"
    compile: bool = False                  # torch.compile the UNet (works on the CPU too; the first steps compile)
    channels_last: bool = False            # UNet and latents in channels_last memory format (faster convs on GPUs)
    gradient_checkpointing: bool = False
    use_ema: bool = True
    ema_decay: float = 0.999
    max_steps: int = 1000
    max_minutes: float = 0.0               # >0: stop (with a checkpoint) after this much training time; 0 = no limit
    # checkpoints, logging, validation
    output_dir: str = "runs/ldm"
    checkpoint_every: int = 500            # 0 = only at the end (max_steps, max_minutes or a signal)
    checkpoints_total_limit: int = 3       # 0 = keep every checkpoint
    resume: str = ""                       # "", "latest" or a checkpoint folder
    max_nonfinite_steps: int = 10          # stop after this many non-finite losses in a row
    log_every: int = 10                    # 0 = off (no tracker logging)
    validation_every: int = 500            # sample validation_prompts into a PNG grid; 0 = off (not even at the end)
    validation_prompts: list[str] = field(default_factory=list)  # [] = num_validation_prompts captions of the
                                           # validation images, picked by seed (samples/prompts.txt lists them)
    num_validation_prompts: int = 4        # with validation_prompts []: how many captions; 0 = no grid at all
    validation_steps: int = 25             # DDIM steps for the validation grid
    validation_guidance: float = 4.0
    validation_guidance_method: str = "cfg"  # or interval, apg, cfg_zero_star, rescale (`ldm eval-guidance`'s)
    val_loss_samples: int = 16             # fixed images x fixed noise and timesteps
    val_loss_bins: int = 5
    report_to: str = "tensorboard"         # "tensorboard" or "none"
    seed: int = 0

    # Allowed values of every int/float field (ldm.ranges.check_ranges); 0 is allowed where it means "off".
    RANGES = {
        "resolution": "[8, 8192]", "num_workers": "[0, 256]", "max_token_length": "[0, 77]",
        "beta_start": "(0, 1)", "beta_end": "(0, 1)", "num_train_timesteps": "[2, 100000]",
        "huber_c": "(0, 100]", "snr_gamma": "(0, 1e4]", "timestep_mean": "[-10, 10]", "timestep_std": "(0, 10]",
        "timestep_mode_scale": "[-1, 1.75]", "flow_shift": "[0, 100]",
        "offset_noise": "[0, 1]", "caption_dropout": "[0, 1)", "keep_tags": "[0, 1000]", "tag_dropout": "[0, 1)",
        "learning_rate": "(0, 1]", "adam_beta1": "[0, 1)", "adam_beta2": "[0, 1)", "weight_decay": "[0, 10]",
        "adam_epsilon": "(0, 1]", "max_grad_norm": "[0, 1e6]", "lr_warmup_steps": "[0, 1e9]",
        "batch_size": "[1, 65536]", "gradient_accumulation_steps": "[1, 65536]", "ema_decay": "[0, 1)",
        "max_steps": "[1, 1e9]", "max_minutes": "[0, 1e7]",
        "checkpoint_every": "[0, 1e9]", "checkpoints_total_limit": "[0, 1e6]", "max_nonfinite_steps": "[1, 1e9]",
        "log_every": "[0, 1e9]", "validation_every": "[0, 1e9]", "validation_steps": "[1, 1000]",
        "validation_guidance": "[0, 100]", "val_loss_samples": "[1, 1e6]", "val_loss_bins": "[1, 1000]",
        "num_validation_prompts": "[0, 64]",
        "seed": "[0, 4294967295]",
    }

    def validate(self) -> None:
        """Raises ValueError naming the first bad setting."""
        check_ranges(self)
        choices = {"noise_schedule": BETA_SCHEDULES, "prediction_type": tuple(OBJECTIVES), "loss": LOSSES,
                   "weighting": WEIGHTINGS, "mixed_precision": MIXED_PRECISION,
                   "optimizer": OPTIMIZERS,
                   "timestep_sampling": TIMESTEP_SAMPLING, "report_to": ("tensorboard", "none")}
        from ldm.pipelines.guidance import GUIDANCE_METHODS as METHODS

        choices["validation_guidance_method"] = tuple(METHODS)
        for key, options in choices.items():
            if getattr(self, key) not in options:
                raise ValueError(f"{key}={getattr(self, key)!r} is not one of {options}")
        if self.resolution % 8:
            raise ValueError(f"resolution must be divisible by 8, got {self.resolution}")
        from ldm.models.presets import MODEL_PRESETS

        if self.vae and self.model in MODEL_PRESETS:  # a VAE whose latents the new denoiser cannot take
            from ldm.models.vae import check_vae_folder

            check_vae_folder(self.vae, self.model, self.resolution)
        if not self.tag_separator:
            raise ValueError("tag_separator must not be empty: pass --tag_separator ',' (the usual one)")
        if self.cache_text_embeddings and self.train_text_encoder:
            raise ValueError("cache_text_embeddings needs a frozen text encoder (train_text_encoder: false)")
        if self.prediction_type == "flow":
            self._validate_flow()
        if self.zero_terminal_snr and self.prediction_type == "epsilon":
            raise ValueError("zero_terminal_snr needs prediction_type v_prediction or sample: eps cannot be "
                             "predicted at SNR 0 (Lin et al. 2023, Sec. 3.2)")

    def _validate_flow(self) -> None:
        """Raises ValueError for settings that do not apply to flow matching, saying what to use instead."""
        if self.zero_terminal_snr:
            raise ValueError("zero_terminal_snr does not apply to prediction_type flow: its path already ends in pure "
                             "noise at sigma = 1; drop --zero_terminal_snr (or train v_prediction with it)")
        if self.weighting != "uniform":
            raise ValueError(f"weighting {self.weighting} is a weighting of noise-prediction losses (SNR-based) and does "
                             "not apply to prediction_type flow; keep --weighting uniform and choose the density of "
                             "training times instead: --timestep_sampling logit_normal, mode or cosmap (SD3 Sec. 3.1)")
