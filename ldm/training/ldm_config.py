"""TrainLDMConfig: every setting of train/train_ldm.py (`ldm train`), with its default."""
from __future__ import annotations

from dataclasses import dataclass

from ldm.diffusion import BETA_SCHEDULES, TIMESTEP_SAMPLING, WEIGHTINGS
from ldm.objectives import OBJECTIVES
from ldm.ranges import setting
from ldm.training.base_config import MIXED_PRECISION, CaptionTags, ExposureBias, MaskedLoss, TrainingConfig
from ldm.training.optimizers import OPTIMIZERS, check_schedule

LOSSES = ("mse", "huber", "l1")
__all__ = ["LOSSES", "MIXED_PRECISION", "OPTIMIZERS", "TrainLDMConfig"]


@dataclass
class TrainLDMConfig(ExposureBias, MaskedLoss, CaptionTags, TrainingConfig):
    # data, model, optimiser steps, checkpoints and seed: TrainingConfig; tag captions: CaptionTags; loss masks:
    # MaskedLoss; exposure-bias remedies: ExposureBias (base_config.py)
    center_crop: bool = True
    random_flip: bool = False
    aspect_buckets: bool = False           # mixed aspect ratios keep most of each image: each goes to the bucket of
                                           # nearest aspect (about resolution^2 px, sides multiples of 8 up to 2:1;
                                           # ldm.data.transforms.make_buckets); each batch one size, every image
                                           # once per epoch (a bucket's last batch may be smaller); latent cache too
    num_workers: int = setting(0, "[0, 256]")
    latent_cache: str = ""                 # a folder: VAE latents + token ids cached there on first use, reused
                                           # while VAE and transforms match (ldm.data.ensure_latent_cache)
    shard_timeout: float = setting(30.0, "(0, 86400]")  # http(s):// and pipe: shards: seconds without a byte
                                                        # before a retry (ldm.data.remote)
    shard_retries: int = setting(3, "[0, 100]")  # retries of a failing remote shard, each resumed at the byte
                                                 # reached, before it is skipped and counted
    # model
    vae: str = ""                          # a VAE folder (from train_vae.py); "" = the model folder's / preset's
    text_encoder: str = ""                 # a folder with text_encoder/ (and tokenizer/) from `ldm train-text-encoder`
                                           # (its output_dir: the newest checkpoint; or a checkpoint or model folder);
                                           # "" = the preset's / model folder's. Its width must be the denoiser's
                                           # cross-attention width
    train_text_encoder: bool = False       # False: frozen (and its embeddings cached per caption)
    cache_text_embeddings: bool = False    # frozen encoder only: keep each caption's embedding (few distinct captions)
    train_token_embeddings: bool = True    # with train_text_encoder: false freezes the token table (49408 rows; a
                                           # from-scratch encoder still learns, and the optimiser skips most weights)
    max_token_length: int = setting(0, "[0, 77]")  # >0: pad/truncate prompts to this many tokens (saved with
                                                   # the tokenizer)
    # noise schedule (saved with the model as its scheduler config)
    noise_schedule: str = "scaled_linear"
    beta_start: float = setting(0.00085, "(0, 1)")
    beta_end: float = setting(0.012, "(0, 1)")
    num_train_timesteps: int = setting(1000, "[2, 100000]")
    zero_terminal_snr: bool = False        # Lin et al. 2023 rescale (use with v_prediction)
    prediction_type: str = "epsilon"       # the objective (ldm/objectives/): epsilon, v_prediction, sample or flow
                                           # (flow matching: the noise schedule settings above do not apply)
    # loss
    loss: str = "mse"
    huber_c: float = setting(0.1, "(0, 100]")
    weighting: str = "uniform"             # uniform (L_simple), min_snr, vlb (Ho et al. 2020 eq. 12)
    snr_gamma: float = setting(5.0, "(0, 1e4]")
    timestep_sampling: str = "uniform"     # uniform, or logit_normal (SD3): t/T = sigmoid(N(timestep_mean,
                                           # timestep_std))
    timestep_mean: float = setting(0.0, "[-10, 10]")
    timestep_std: float = setting(1.0, "(0, 10]")
    timestep_mode_scale: float = setting(1.29, "[-1, 1.75]")  # timestep_sampling mode's scale s (SD3 Eq. 20);
                                                              # 0 = uniform
    flow_shift: float = setting(1.0, "[0, 100]")  # prediction_type flow: the timestep shift (SD3 Eq. 23), saved
                                                  # with the scheduler; 1 = none, >1 more noise; 0 = resolution / 256
                                                  # (SD3 Sec. 5.3.2)
    offset_noise: float = setting(0.0, "[0, 1]")
    caption_dropout: float = setting(0.1, "[0, 1)")  # p_uncond for classifier-free guidance (after the tag
                                                     # settings, CaptionTags)
    # optimiser
    adam_beta1: float = setting(0.9, "[0, 1)")
    adam_beta2: float = setting(0.999, "[0, 1)")
    weight_decay: float = setting(1e-2, "[0, 10]")
    adam_epsilon: float = setting(1e-8, "(0, 1]")
    lr_scheduler: str = "constant_with_warmup"   # any diffusers.optimization name (cosine, linear, constant ...)
    lr_warmup_steps: int = 100             # 0 = no warm-up
    compile: bool = False                  # torch.compile the UNet (works on the CPU too; the first steps compile)
    channels_last: bool = False            # UNet and latents in channels_last memory format (faster convs on GPUs)
    gradient_checkpointing: bool = False
    use_ema: bool = True
    ema_decay: float = setting(0.999, "[0, 1)")
    # checkpoints, logging, validation
    output_dir: str = setting("runs/ldm", flag="out")  # the run folder (checkpoints, samples, logs, the pipeline)
    checkpoints_total_limit: int = 3       # 0 = keep every checkpoint
    log_every: int = setting(10, "[0, 1e9]")  # 0 = off (no tracker logging)
    validation_every: int = setting(500, "[0, 1e9]")  # sample validation_prompts into a PNG grid; 0 = off (not
                                                      # even at the end)
    validation_prompts: list[str] = setting(factory=list)  # [] = num_validation_prompts captions of the
                                           # validation images, picked by seed (samples/prompts.txt lists them)
    num_validation_prompts: int = setting(4, "[0, 64]")  # with validation_prompts []: how many captions; 0 = no
                                                         # grid at all
    validation_steps: int = setting(25, "[1, 1000]")  # DDIM steps for the validation grid
    validation_guidance: float = setting(4.0, "[0, 100]", flag="validation_guidance_scale")
    validation_guidance_method: str = "cfg"  # or interval, apg, cfg_zero_star, rescale (`ldm eval-guidance`'s)
    val_loss_samples: int = setting(16, "[1, 1e6]", flag="num_validation_loss_images")  # fixed images x fixed
                                           # noise and timesteps
    val_loss_bins: int = setting(5, "[1, 1000]", flag="validation_loss_bins")  # timestep bins of the loss
    report_to: str = "tensorboard"         # "tensorboard" or "none"

    def validate(self) -> None:
        """Raises ValueError naming the first bad setting."""
        super().validate()
        choices = {"noise_schedule": BETA_SCHEDULES, "prediction_type": tuple(OBJECTIVES), "loss": LOSSES,
                   "weighting": WEIGHTINGS,
                   "timestep_sampling": TIMESTEP_SAMPLING, "report_to": ("tensorboard", "none")}
        from ldm.pipelines.guidance import GUIDANCE_METHODS as METHODS

        choices["validation_guidance_method"] = tuple(METHODS)
        for key, options in choices.items():
            if getattr(self, key) not in options:
                raise ValueError(f"{key}={getattr(self, key)!r} is not one of {options}")
        if self.resolution % 8:
            raise ValueError(f"resolution must be divisible by 8, got {self.resolution}")
        check_schedule(self.optimizer, self.lr_scheduler)
        from ldm.models.presets import MODEL_PRESETS

        if self.vae and self.model in MODEL_PRESETS:  # a VAE whose latents the new denoiser cannot take
            from ldm.models.vae import check_vae_folder

            check_vae_folder(self.vae, self.model, self.resolution)
        self.check_tags()
        self.check_masks()
        self.check_exposure_bias(self.prediction_type, self.num_train_timesteps)
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
