"""Latent diffusion training with Accelerate: the body of train/train_ldm.py and `ldm train`.

    accelerate launch train/train_ldm.py --config configs/sd15.yaml --data /data/laion --resume latest

Reads top to bottom: build the models, the objective and the data (`setup`), then hand the trainer to the shared
loop (ldm.training.loop: accumulation, guard, validation, checkpoints, resume, stops). `LDMTrainer` supplies the
loss of a batch (ldm.training.step.batch_loss), EMA, the validation (loss per timestep bin and a prompt grid) and
the inference folder each checkpoint holds.
"""
from __future__ import annotations

import json
import os

import torch
from accelerate.utils import set_seed
from diffusers import AutoencoderKL
from diffusers.training_utils import EMAModel

from ldm.data.captions import CaptionSpec
from ldm.models.denoiser import denoiser_of
from ldm.models.presets import MODEL_PRESETS, build_components
from ldm.objectives import ObjectiveSettings, make_objective
from ldm.objectives.base import NoiseSchedule
from ldm.pipelines.editing import refuse_inpainting_training
from ldm.training import loop
from ldm.training.checkpoint import where_written
from ldm.training.fsdp import unsharded_class
from ldm.training.config import config_to_dict, format_config, save_config
from ldm.training.ldm_config import TrainLDMConfig
from ldm.training.step import LossSpec, TextEmbedder, batch_loss, step_generator
from ldm.training.stream import BatchStream
from ldm.training.validation import (draw_prompts, first_samples, inference_pipeline, make_val_set, sample_grid,
                                     validation_loss)


def build_models(cfg: TrainLDMConfig) -> dict:
    """Returns {"unet" or "transformer", "vae", "text_encoder", "tokenizer", "scheduler"} (SDXL: and
    "text_encoder_2", "tokenizer_2"): a preset (random init) or a folder."""
    if cfg.model in MODEL_PRESETS:
        parts = build_components(cfg.model, seed=cfg.seed)
    elif os.path.isdir(cfg.model):
        from ldm.pipelines.loading import load_components

        parts = load_components(cfg.model)
    else:
        raise ValueError(f"model {cfg.model!r} is neither a preset ({', '.join(MODEL_PRESETS)}) nor a pipeline folder")
    refuse_inpainting_training(parts, "train")
    if cfg.vae:
        parts["vae"] = AutoencoderKL.from_pretrained(cfg.vae, local_files_only=True)
    if cfg.text_encoder:  # e.g. trained contrastively by `ldm train-text-encoder`; train_text_encoder: frozen or not
        from ldm.training.train_text_encoder import check_text_width, load_text_encoder

        parts["text_encoder"], tokenizer = load_text_encoder(cfg.text_encoder)
        parts["tokenizer"] = tokenizer or parts["tokenizer"]
        check_text_width(parts["text_encoder"], denoiser_of(parts), cfg.text_encoder)
    if cfg.max_token_length:  # short prompts: fewer padding tokens to attend over; inference reads it from tokenizer/
        for name in ("tokenizer", "tokenizer_2"):
            if parts.get(name) is not None:
                parts[name].model_max_length = cfg.max_token_length
    if parts.get("text_encoder_2") is not None and (cfg.train_text_encoder or cfg.text_encoder):
        raise ValueError("`ldm train` keeps SDXL's two text encoders frozen: drop --train_text_encoder / "
                         "--text_encoder (`ldm finetune --train-text-encoder` trains LoRA on both)")
    return parts


def open_training_data(cfg: TrainLDMConfig, rank: int, world_size: int, dataset=None, accelerator=None, parts=None):
    """Returns (training data, validation data): `dataset` itself, the latent cache of cfg.data at
    cfg.latent_cache (built by the main process on first use, rebuilt when stale), or ldm.data's for cfg.data."""
    if dataset is not None:
        return dataset, dataset
    from ldm.data import ensure_latent_cache, open_dataset

    masks = dict(masks=True, mask_dir=cfg.mask_dir or None) if cfg.masked_loss else {}  # ldm.data.masks
    remote = dict(shard_timeout=cfg.shard_timeout, shard_retries=cfg.shard_retries)  # ldm.data.remote
    if cfg.latent_cache:
        kwargs = dict(resolution=cfg.resolution, center_crop=cfg.center_crop, aspect_buckets=cfg.aspect_buckets,
                      device=accelerator.device, **masks, **remote)
        if accelerator.is_main_process:
            ensure_latent_cache(cfg.data, parts["vae"], parts["tokenizer"], cfg.latent_cache, **kwargs)
        accelerator.wait_for_everyone()  # the other ranks read the finished cache, never a half-built one
        cache, _ = ensure_latent_cache(cfg.data, parts["vae"], parts["tokenizer"], cfg.latent_cache, **kwargs)
        return cache, cache

    common = dict(resolution=cfg.resolution, center_crop=cfg.center_crop, aspect_buckets=cfg.aspect_buckets,
                  seed=cfg.seed, **remote)
    train = open_dataset(cfg.data, random_flip=cfg.random_flip, rank=rank, world_size=world_size, **common, **masks)
    return train, open_dataset(cfg.data, shuffle=False, **common)


def distributed_notes(distributed_type: str, cfg: TrainLDMConfig, fsdp_version: int = 2) -> list[str]:
    """Returns the lines to print at start for this Accelerate distributed type ("FSDP", "DEEPSPEED", "MULTI_GPU",
    ...); raises ValueError for a combination that cannot train correctly."""
    if distributed_type == "FSDP" and cfg.use_ema and fsdp_version != 2:
        # the sharded EMA (ldm.training.fsdp.ShardedEMA) reads FSDP2's DTensor shards; FSDP1 flattens them
        raise ValueError("use_ema under FSDP needs FSDP2: set fsdp_version: 2 in the Accelerate config "
                         "(configs/accelerate/fsdp.yaml), or train with --use-ema false")
    if distributed_type == "FSDP" and cfg.train_text_encoder:
        raise ValueError("train_text_encoder does not work under FSDP (Accelerate's FSDP2 prepares one model, the "
                         "UNet); train with --train-text-encoder false, or DDP (configs/accelerate/multi_gpu.yaml)")
    if distributed_type == "FSDP":
        return [f"FSDP{fsdp_version}: the UNet's parameters, gradients and optimizer states are sharded across ranks"
                + ("; each rank keeps the EMA of its own shard" if cfg.use_ema else "")]
    if distributed_type == "DEEPSPEED":
        return ["DeepSpeed: the non-finite-loss guard (max_nonfinite_steps) is off: DeepSpeed clips gradients "
                "(gradient_clipping in its config, not max_grad_norm) and steps the optimiser inside backward, "
                "before the guard could skip a non-finite update; its fp16 loss scaler skips overflowing steps, "
                "bf16 and fp32 steps are not checked"]
    return []


class LDMTrainer(loop.Trainer):
    """`ldm train`'s part of the loop: the diffusion loss of a batch, EMA, validation and the pipeline folder."""

    def __init__(self, cfg: TrainLDMConfig, accelerator, parts: dict, objective, embed: TextEmbedder, stream,
                 val_set: dict | None = None, ema=None):
        self.cfg, self.accelerator, self.parts, self.objective, self.embed = cfg, accelerator, parts, objective, embed
        self.stream, self.batches, self.val_set, self.ema = stream, iter(stream), val_set, ema
        self.spec, self.caption_spec = LossSpec.from_config(cfg), CaptionSpec.from_config(cfg)
        self.scheduler = objective.scheduler(dict(parts["scheduler"].config))  # saved with the model
        self.has_mask: dict[str, bool] = {}  # masked loss: each image this process trained on -> had a mask
        self.sharded = accelerator.distributed_type.value == "FSDP"  # the weights are FSDP2 shards (DTensors)
        self.denoiser_cls, self.gathered = unsharded_class(denoiser_of(parts)), None

    def micro_loss(self, step: int, micro: int):
        batch, rank = next(self.batches), self.accelerator.process_index
        if step == 0 and micro == 0 and "key" in batch:  # shows which part of the data each rank reads
            print(f"[rank {rank}] first batch keys: {list(batch['key'])}", flush=True)
        if "has_mask" in batch:
            self.has_mask.update(zip(batch["key"], batch["has_mask"].tolist()))
        loss = batch_loss(self.accelerator, self.model, batch, self.parts["vae"], self.embed, self.objective,
                          self.spec, step_generator(self.cfg.seed, step, micro, rank), self.cfg.caption_dropout,
                          self.cfg.channels_last, self.caption_spec)
        return loss, {}

    def after_update(self, state: dict) -> None:
        if self.ema is not None and state["nonfinite_in_a_row"] == 0:
            self.ema.step(self.accelerator.unwrap_model(self.model).parameters())

    def validate(self, state: dict) -> dict:
        """Logs the deterministic validation loss (training weights) and writes a prompt grid (saved weights)."""
        cfg, step, model = self.cfg, state["step"], self.accelerator.unwrap_model(self.model)
        model.eval()
        report = validation_loss(model, self.val_set, self.objective, cfg.val_loss_bins)
        model.train()
        self.accelerator.log(report, step=step)
        prompts = [] if cfg.num_validation_prompts == 0 else (
            list(cfg.validation_prompts) or draw_prompts(self.val_set["caption"], cfg.num_validation_prompts, cfg.seed))
        if prompts:
            self.gather_weights()  # FSDP: a collective, before the main process samples alone
        if self.accelerator.is_main_process and prompts:
            samples = os.path.join(cfg.output_dir, "samples")
            pipe = self.pipeline()
            sample_grid(pipe, prompts, os.path.join(samples, f"step-{step:08d}.png"), cfg.validation_steps,
                        cfg.validation_guidance, seed=cfg.seed, method=cfg.validation_guidance_method)
            with open(os.path.join(samples, "prompts.txt"), "w", encoding="utf-8") as f:  # the grid's, left to right
                f.write("".join(p.replace("\n", " ") + "\n" for p in prompts))
            self.accelerator.print(f"step {step}: val_loss {report['val_loss']:.4f}")
        return {**report, "step": step, "prompts": prompts}

    def pipeline(self):
        """Returns the inference pipeline of the current weights (EMA weights when EMA is on); under FSDP, of the
        weights the last `gather_weights` collected (main process)."""
        if self.sharded:
            return inference_pipeline(self.parts, self.gathered, self.scheduler)
        return inference_pipeline(self.parts, self.accelerator.unwrap_model(self.model), self.scheduler, ema=self.ema)

    def gather_weights(self) -> None:
        """FSDP (every rank calls it): keeps in self.gathered, on the main process, a plain denoiser holding the
        whole weights (the EMA's when EMA is on), for the pipeline; a no-op otherwise."""
        if not self.sharded:
            return
        whole = self.ema.gathered() if self.ema is not None else self.accelerator.get_state_dict(self.model)
        if self.accelerator.is_main_process:
            self.gathered = self.denoiser_cls.from_config(self.accelerator.unwrap_model(self.model).config)
            self.gathered.load_state_dict(whole)

    def before_checkpoint(self, state: dict) -> None:
        self.gather_weights()

    def write_extra(self, folder: str, state: dict) -> None:
        self.pipeline().save_pretrained(os.path.join(folder, "pipeline"))
        save_config(self.cfg, os.path.join(folder, "config.yaml"))

    def data_position(self):
        return self.stream.position()

    def seek(self, position) -> None:
        self.stream.seek(position)


def prepare_models(cfg: TrainLDMConfig, accelerator, parts: dict) -> tuple[list, object]:
    """Freezes what is not trained, moves the models to the device and returns (trainable params, EMA or None)."""
    unet, vae, text_encoder = denoiser_of(parts), parts["vae"], parts["text_encoder"]
    vae.requires_grad_(False).eval().to(accelerator.device)
    text_encoder.requires_grad_(cfg.train_text_encoder).train(cfg.train_text_encoder)
    if cfg.train_text_encoder and not cfg.train_token_embeddings:
        text_encoder.get_input_embeddings().requires_grad_(False)
    unet.train().to(accelerator.device)  # on the device before the optimiser: the fused kernel checks there
    text_encoder.to(accelerator.device)
    if parts.get("text_encoder_2") is not None:  # SDXL's second encoder: frozen (build_models refuses otherwise)
        parts["text_encoder_2"].requires_grad_(False).eval().to(accelerator.device)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if cfg.channels_last:
        unet.to(memory_format=torch.channels_last)
    params = [p for model in (unet, text_encoder) for p in model.parameters() if p.requires_grad]
    sharded = accelerator.distributed_type.value == "FSDP"  # its EMA is built on the shards, after prepare
    ema = EMAModel(unet.parameters(), decay=cfg.ema_decay, model_cls=type(unet),
                   model_config=unet.config) if cfg.use_ema and not sharded else None
    if cfg.compile:  # in place: parameter names, checkpoints and EMA stay those of the plain module
        unet.compile()
    return params, ema


def shard_params_and_ema(cfg: TrainLDMConfig, accelerator, unet) -> tuple[list, object]:
    """FSDP: returns (the prepared UNet's parameters, its sharded EMA or None) and prints each rank's share."""
    from ldm.training.fsdp import ShardedEMA, register_sharded_ema, shard_sizes

    local, whole = shard_sizes(unet)
    print(f"[rank {accelerator.process_index}] FSDP: holds {local} of the UNet's {whole} parameters", flush=True)
    ema = ShardedEMA(unet, cfg.ema_decay) if cfg.use_ema else None
    if ema is not None:
        register_sharded_ema(accelerator, ema)
    # what clip_grad_norm_ and the optimizer see: fully_shard replaced the parameters by DTensors
    return list(unet.parameters()), ema


def setup(cfg: TrainLDMConfig, accelerator, dataset=None, val_dataset=None) -> LDMTrainer:
    """Builds the models, objective, optimiser and data, prepares them with Accelerate; returns the trainer."""
    rank, world = accelerator.process_index, accelerator.num_processes
    parts = build_models(cfg)
    params, ema = prepare_models(cfg, accelerator, parts)
    optimizer = loop.make_optimizer(params, cfg.learning_rate, accelerator.device, (cfg.adam_beta1, cfg.adam_beta2),
                                    cfg.weight_decay, cfg.adam_epsilon, cfg.optimizer, cfg.lr_warmup_steps,
                                    cfg.prodigy_d_coef)
    lr_scheduler = loop.make_lr_scheduler(cfg.lr_scheduler, optimizer, cfg.lr_warmup_steps, cfg.max_steps, world)
    unet, text_encoder = denoiser_of(parts), parts["text_encoder"]
    if cfg.train_text_encoder:
        unet, text_encoder, optimizer, lr_scheduler = accelerator.prepare(unet, text_encoder, optimizer, lr_scheduler)
    else:
        unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    if ema is not None:
        ema.to(accelerator.device)
        accelerator.register_for_checkpointing(ema)
    if accelerator.distributed_type.value == "FSDP":
        params, ema = shard_params_and_ema(cfg, accelerator, unet)
    objective = make_objective(cfg.prediction_type, NoiseSchedule.from_config(cfg), ObjectiveSettings.from_config(cfg))
    embed = TextEmbedder(text_encoder, parts["tokenizer"], cfg.cache_text_embeddings, parts.get("text_encoder_2"),
                         parts.get("tokenizer_2"))
    train_data, val_data = open_training_data(cfg, rank, world, dataset, accelerator, parts)
    val_data = val_data if val_dataset is None else val_dataset
    stream = BatchStream(train_data, cfg.batch_size, rank, world, cfg.seed, cfg.num_workers,
                         pin_memory=accelerator.device.type == "cuda")
    val_set = make_val_set(first_samples(val_data, cfg.val_loss_samples), parts["vae"], embed, 10, objective,
                           accelerator.device)
    trainer = LDMTrainer(cfg, accelerator, parts, objective, embed, stream, val_set, ema)
    trainer.model, trainer.params = unet, params
    trainer.optimizer, trainer.lr_scheduler = optimizer, lr_scheduler
    return trainer


def main(cfg: TrainLDMConfig, dataset=None, val_dataset=None) -> dict:
    """Trains and returns {"step", "losses": {step: loss}, "val": [...], "checkpoint", "stopped_by",
    "nonfinite_total"}. `dataset` replaces cfg.data; `val_dataset` (same sample format) replaces the images the
    validation loss is measured on (default: the first val_loss_samples of the training data)."""
    accelerator = loop.make_accelerator(cfg, cfg.output_dir, log_with=None if cfg.report_to == "none" else cfg.report_to)
    fsdp_version = 2 if accelerator.is_fsdp2 else 1
    for line in distributed_notes(accelerator.distributed_type.value, cfg, fsdp_version):  # refuses before any work
        accelerator.print(line)
    if accelerator.is_main_process:
        os.makedirs(cfg.output_dir, exist_ok=True)
        save_config(cfg, os.path.join(cfg.output_dir, "config.yaml"))
        print(f"train_ldm config ({accelerator.num_processes} process(es)):\n{format_config(cfg)}", flush=True)
    set_seed(cfg.seed)
    trainer = setup(cfg, accelerator, dataset, val_dataset)
    if accelerator.is_main_process and cfg.report_to != "none":
        accelerator.init_trackers("train_ldm", config={k: str(v) if isinstance(v, (list, tuple)) else v
                                                       for k, v in config_to_dict(cfg).items()})
    result = loop.train(accelerator, trainer, loop.LoopSettings.from_config(cfg, name="train_ldm"))
    if accelerator.is_main_process and result["checkpoint"]:
        _write_losses(cfg.output_dir, result["losses"])
    accelerator.end_training()
    pipeline = os.path.join(result["checkpoint"], "pipeline") if result["checkpoint"] else None
    accelerator.print(where_written("train_ldm", "pipeline folder (ldm generate --model PATH)", pipeline,
                                    cfg.output_dir))
    skipped = trainer.stream.skipped()  # ldm.data streams: bad samples, unreachable shards, ... of this run
    if skipped.total:
        print(f"train_ldm: rank {accelerator.process_index}: {skipped.report()}", flush=True)
    masked = mask_report(trainer.has_mask) if cfg.masked_loss else None
    if masked:
        accelerator.print(f"train_ldm: masked loss: {masked['with_mask']} of {masked['images']} images trained on "
                          f"(this process) had a mask; the others counted every pixel")
    return {"step": result["step"], "losses": result["losses"], "val": result["history"],
            "checkpoint": result["checkpoint"], "stopped_by": result["stopped_by"],
            "nonfinite_total": result["nonfinite_total"], "masked_images": masked, "skipped": dict(skipped.counts)}


def mask_report(has_mask: dict[str, bool]) -> dict:
    """Returns {"images": how many distinct images, "with_mask": how many of them had a mask of their own}."""
    return {"images": len(has_mask), "with_mask": sum(has_mask.values())}


def _write_losses(output_dir: str, losses: dict) -> None:
    with open(os.path.join(output_dir, "losses.jsonl"), "a", encoding="utf-8") as f:
        for step, loss in losses.items():
            f.write(json.dumps({"step": step, "loss": loss}) + "\n")
