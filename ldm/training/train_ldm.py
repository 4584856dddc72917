"""Latent diffusion training with Accelerate: the body of train/train_ldm.py and `ldm train`.

    accelerate launch train/train_ldm.py --config configs/sd15.yaml --data /data/laion --resume latest

Reads top to bottom: parse config, build, accelerator.prepare, loop with accelerator.accumulate, checkpoint.
"""
from __future__ import annotations

import json
import os
import time

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel

from ldm import diffusion
from ldm.presets import MODEL_PRESETS, build_components
from ldm.training.checkpoint import read_state, resolve_resume, save_checkpoint
from ldm.training.config import config_to_dict, every, format_config, save_config
from ldm.training.ldm_config import TrainLDMConfig
from ldm.training.loop import accumulated_step, new_state, stop_if_nonfinite
from ldm.training.signals import StopRequest, agreed_stop_reason
from ldm.training.step import NoiseSchedule, TextEmbedder, batch_latents, diffusion_loss, step_generator
from ldm.training.stream import BatchStream
from ldm.training.validation import draw_prompts, first_samples, make_val_set, sample_grid, validation_loss


def cpu_only_multiprocess() -> bool:
    """Returns True for several processes on a machine without GPUs (`accelerate launch --multi_gpu` on a CPU
    box): Accelerate then needs cpu=True to join them with gloo instead of running each alone."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def build_models(cfg: TrainLDMConfig) -> dict:
    """Returns {"unet", "vae", "text_encoder", "tokenizer", "scheduler"}: a preset (random init) or a folder."""
    if cfg.model in MODEL_PRESETS:
        parts = build_components(cfg.model, seed=cfg.seed)
    elif os.path.isdir(cfg.model):
        from ldm.pipelines.loading import load_components

        parts = load_components(cfg.model)
    else:
        raise ValueError(f"model {cfg.model!r} is neither a preset ({', '.join(MODEL_PRESETS)}) nor a pipeline folder")
    if cfg.vae:
        parts["vae"] = AutoencoderKL.from_pretrained(cfg.vae, local_files_only=True)
    if cfg.max_token_length:  # short prompts: fewer padding tokens to attend over; inference reads it from tokenizer/
        parts["tokenizer"].model_max_length = cfg.max_token_length
    return parts


def open_training_data(cfg: TrainLDMConfig, rank: int, world_size: int, dataset=None, accelerator=None, parts=None):
    """Returns (training data, validation data): `dataset` itself, the latent cache of cfg.data at
    cfg.latent_cache (built by the main process on first use, rebuilt when stale), or ldm.data's for cfg.data."""
    if dataset is not None:
        return dataset, dataset
    from ldm.data import ensure_latent_cache, open_dataset

    if cfg.latent_cache:
        kwargs = dict(resolution=cfg.resolution, center_crop=cfg.center_crop, aspect_buckets=cfg.aspect_buckets,
                      device=accelerator.device)
        if accelerator.is_main_process:
            ensure_latent_cache(cfg.data, parts["vae"], parts["tokenizer"], cfg.latent_cache, **kwargs)
        accelerator.wait_for_everyone()  # the other ranks read the finished cache, never a half-built one
        cache, _ = ensure_latent_cache(cfg.data, parts["vae"], parts["tokenizer"], cfg.latent_cache, **kwargs)
        return cache, cache

    common = dict(resolution=cfg.resolution, center_crop=cfg.center_crop, aspect_buckets=cfg.aspect_buckets,
                  seed=cfg.seed)
    train = open_dataset(cfg.data, random_flip=cfg.random_flip, rank=rank, world_size=world_size, **common)
    return train, open_dataset(cfg.data, shuffle=False, **common)


def inference_pipeline(parts: dict, unet, ema, scheduler_config: dict):
    """Returns an ldm.Pipeline of the current weights (EMA weights when EMA is on) for saving or sampling."""
    from ldm.pipelines import Pipeline

    if ema is not None:
        unet = UNet2DConditionModel.from_config(unet.config)
        ema.copy_to(unet.parameters())
    pipe = Pipeline(vae=parts["vae"], text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"], unet=unet,
                    scheduler=DDIMScheduler.from_config(scheduler_config))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def distributed_notes(distributed_type: str, cfg: TrainLDMConfig) -> list[str]:
    """Returns the lines to print at start for this Accelerate distributed type ("FSDP", "DEEPSPEED", "MULTI_GPU",
    ...); raises ValueError for a combination that cannot train correctly."""
    if distributed_type == "FSDP" and cfg.use_ema:
        # EMAModel keeps full copies of the UNet's parameters, while FSDP hands each rank only its shard of them.
        raise ValueError("use_ema does not work under FSDP (each rank holds only a shard of the UNet's weights); "
                         "train with --use_ema false, or DDP/DeepSpeed (configs/accelerate/multi_gpu.yaml or "
                         "deepspeed_zero2.yaml)")
    if distributed_type == "DEEPSPEED":
        return ["DeepSpeed: the non-finite-loss guard (max_nonfinite_steps) is off: DeepSpeed clips gradients "
                "(gradient_clipping in its config, not max_grad_norm) and steps the optimiser inside backward, "
                "before the guard could skip a non-finite update; its fp16 loss scaler skips overflowing steps, "
                "bf16 and fp32 steps are not checked"]
    return []


def main(cfg: TrainLDMConfig, dataset=None) -> dict:
    """Trains and returns {"step", "losses": {step: loss}, "val": [...], "checkpoint", "stopped_by"}."""
    # 1. Accelerator and config
    accelerator = Accelerator(cpu=cpu_only_multiprocess(), gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                              mixed_precision=cfg.mixed_precision,
                              log_with=None if cfg.report_to == "none" else cfg.report_to,
                              project_config=ProjectConfiguration(project_dir=cfg.output_dir,
                                                                  logging_dir=os.path.join(cfg.output_dir, "logs")))
    for line in distributed_notes(accelerator.distributed_type.value, cfg):  # refuses before any work
        accelerator.print(line)
    rank, world = accelerator.process_index, accelerator.num_processes
    if accelerator.is_main_process:
        os.makedirs(cfg.output_dir, exist_ok=True)
        save_config(cfg, os.path.join(cfg.output_dir, "config.yaml"))
        print(f"train_ldm config ({world} process(es)):\n{format_config(cfg)}", flush=True)
    set_seed(cfg.seed)

    # 2. Models, noise schedule, optimiser
    parts = build_models(cfg)
    unet, vae, text_encoder = parts["unet"], parts["vae"], parts["text_encoder"]
    schedule = NoiseSchedule.from_config(cfg)
    scheduler_config = schedule.scheduler_config(parts["scheduler"].config, cfg.prediction_type, cfg.beta_start,
                                                 cfg.beta_end)
    vae.requires_grad_(False).eval()
    text_encoder.requires_grad_(cfg.train_text_encoder).train(cfg.train_text_encoder)
    if cfg.train_text_encoder and not cfg.train_token_embeddings:
        text_encoder.get_input_embeddings().requires_grad_(False)
    unet.train().to(accelerator.device)  # on the device before the optimiser: the fused kernel checks there
    text_encoder.to(accelerator.device)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if cfg.channels_last:
        unet.to(memory_format=torch.channels_last)
    params = [p for model in (unet, text_encoder) for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(cfg, params, accelerator.device)
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps * world,
                                 num_training_steps=cfg.max_steps * world)
    ema = EMAModel(unet.parameters(), decay=cfg.ema_decay, model_cls=UNet2DConditionModel,
                   model_config=unet.config) if cfg.use_ema else None

    if cfg.compile:  # in place: parameter names, checkpoints and EMA stay those of the plain module
        unet.compile()

    # 3. accelerator.prepare
    if cfg.train_text_encoder:
        unet, text_encoder, optimizer, lr_scheduler = accelerator.prepare(unet, text_encoder, optimizer, lr_scheduler)
    else:
        unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
        text_encoder.to(accelerator.device)
    vae.to(accelerator.device)
    if ema is not None:
        ema.to(accelerator.device)
        accelerator.register_for_checkpointing(ema)
    embed = TextEmbedder(text_encoder, parts["tokenizer"], cache=cfg.cache_text_embeddings)
    train_data, val_data = open_training_data(cfg, rank, world, dataset, accelerator, parts)
    stream = BatchStream(train_data, cfg.batch_size, rank, world, cfg.seed, cfg.num_workers,
                         pin_memory=accelerator.device.type == "cuda")
    val_set = make_val_set(first_samples(val_data, cfg.val_loss_samples), vae, embed, 10,
                           schedule.num_train_timesteps, accelerator.device)
    if accelerator.is_main_process and cfg.report_to != "none":
        accelerator.init_trackers("train_ldm", config={k: str(v) if isinstance(v, (list, tuple)) else v
                                                       for k, v in config_to_dict(cfg).items()})

    # 4. Resume: weights, optimiser, lr schedule, EMA and RNG from Accelerate; step and data position from us
    state = new_state(data=stream.position())
    checkpoint = resolve_resume(cfg.resume, cfg.output_dir)
    if checkpoint:
        accelerator.load_state(os.path.join(checkpoint, "accelerate"))
        state = read_state(checkpoint)
        stream.seek(state["data"][rank] if isinstance(state["data"], list) else state["data"])
        accelerator.print(f"resumed from {checkpoint} at step {state['step']}")

    def write_checkpoint() -> str:
        positions = accelerator.gather_for_metrics([stream.position()], use_gather_object=True)
        extra = lambda tmp: write_inference_folder(tmp, cfg, parts, accelerator.unwrap_model(unet), ema,  # noqa: E731
                                                   scheduler_config)
        return save_checkpoint(accelerator, cfg.output_dir, state["step"], {**state, "data": positions}, extra,
                               cfg.checkpoints_total_limit)

    # 5. Training loop
    losses, val_history, last_checkpoint, stopped_by = {}, [], checkpoint, None
    batches, started = iter(stream), time.time()
    progress = _progress(accelerator, state["step"], cfg.max_steps)
    with StopRequest() as stop:
        while state["step"] < cfg.max_steps:
            loss = train_step(cfg, accelerator, unet, embed, vae, schedule, optimizer, lr_scheduler, batches,
                              params, state, rank)
            if ema is not None and state["nonfinite_in_a_row"] == 0:
                ema.step(accelerator.unwrap_model(unet).parameters())
            state["step"] += 1
            state["data"] = stream.position()
            losses[state["step"]] = loss
            progress.update(1)
            progress.set_postfix(loss=f"{loss:.4f}")
            stop_if_nonfinite(state, cfg.max_nonfinite_steps)
            if every(state["step"], cfg.log_every):
                accelerator.log({"loss": loss, "lr": lr_scheduler.get_last_lr()[0],
                                 "nonfinite_total": state["nonfinite_total"]}, step=state["step"])
            if every(state["step"], cfg.validation_every) or (cfg.validation_every and state["step"] == cfg.max_steps):
                val_history.append(run_validation(cfg, accelerator, unet, ema, parts, val_set, schedule,
                                                  scheduler_config, state["step"]))
            stopped_by = agreed_stop_reason(accelerator, stop, started, cfg.max_minutes)
            if every(state["step"], cfg.checkpoint_every) or state["step"] == cfg.max_steps or stopped_by:
                last_checkpoint = write_checkpoint()
            if stopped_by:
                accelerator.print(f"stopped by {stopped_by} at step {state['step']}; checkpoint {last_checkpoint}; "
                                  f"continue with --resume latest")
                break
    progress.close()

    # 6. The final model, ready for Pipeline.from_pretrained
    if accelerator.is_main_process and last_checkpoint:
        _write_losses(cfg.output_dir, losses)
    accelerator.end_training()
    return {"step": state["step"], "losses": losses, "val": val_history, "checkpoint": last_checkpoint,
            "stopped_by": stopped_by, "nonfinite_total": state["nonfinite_total"]}


def make_optimizer(cfg, params, device) -> torch.optim.Optimizer:
    """Returns AdamW over `params`: PyTorch's fused kernel on CUDA and CPU (4-5x faster steps than the per-tensor
    loop on the CPU: 2.7 ms against 14 ms for the `small` UNet), or bitsandbytes' 8-bit AdamW when asked."""
    kwargs = dict(lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay,
                  eps=cfg.adam_epsilon)
    if cfg.optimizer == "adamw_8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as error:
            raise ImportError("optimizer adamw_8bit needs bitsandbytes (pip install bitsandbytes; CUDA GPUs); "
                              "or use --optimizer adamw") from error
        return bnb.optim.AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, fused=True if torch.device(device).type in ("cuda", "cpu") else None, **kwargs)


def train_step(cfg, accelerator, unet, embed, vae, schedule, optimizer, lr_scheduler, batches, params, state,
               rank) -> float:
    """Runs one optimiser step (gradient_accumulation_steps micro-batches); returns the mean loss over ranks."""
    def micro_loss(micro: int) -> torch.Tensor:
        batch = next(batches)
        if state["step"] == 0 and micro == 0 and "key" in batch:  # shows which part of the data each rank reads
            print(f"[rank {rank}] first batch keys: {list(batch['key'])}", flush=True)
        generator = step_generator(cfg.seed, state["step"], micro, rank)
        # The frozen VAE and text encoder run in the mixed-precision dtype too (diffusers' script casts their
        # weights; autocast leaves the stored weights in float32): in fp32 the VAE encode of a batch at 512 px
        # costs more than the UNet's step on a GPU.
        with accelerator.autocast():
            latents = batch_latents(batch, vae, generator, accelerator.device)  # (B, 4, h, w), float32
            captions = diffusion.drop_captions(list(batch["caption"]), cfg.caption_dropout, generator)
            context = embed(captions, accelerator.device)  # (B, 77, D)
        if cfg.channels_last:
            latents = latents.contiguous(memory_format=torch.channels_last)
        return diffusion_loss(unet, latents, context, schedule, cfg, generator)[0]

    return accumulated_step(accelerator, unet, micro_loss, cfg.gradient_accumulation_steps, params, cfg.max_grad_norm,
                            optimizer, lr_scheduler, state)


def run_validation(cfg, accelerator, unet, ema, parts, val_set, schedule, scheduler_config, step) -> dict:
    """Logs the deterministic validation loss (training weights) and writes a prompt grid (saved weights)."""
    model = accelerator.unwrap_model(unet)
    model.eval()
    report = validation_loss(model, val_set, schedule.alpha_bar, cfg.prediction_type, cfg.val_loss_bins)
    model.train()
    accelerator.log(report, step=step)
    prompts = [] if cfg.num_validation_prompts == 0 else (
        list(cfg.validation_prompts) or draw_prompts(val_set["caption"], cfg.num_validation_prompts, cfg.seed))
    if accelerator.is_main_process and prompts:
        samples = os.path.join(cfg.output_dir, "samples")
        sample_grid(inference_pipeline(parts, model, ema, scheduler_config), prompts,
                    os.path.join(samples, f"step-{step:08d}.png"), cfg.validation_steps, cfg.validation_guidance,
                    seed=cfg.seed)
        with open(os.path.join(samples, "prompts.txt"), "w", encoding="utf-8") as f:  # the grid's, left to right
            f.write("".join(p.replace("\n", " ") + "\n" for p in prompts))
        accelerator.print(f"step {step}: val_loss {report['val_loss']:.4f}")
    return {**report, "step": step, "prompts": prompts}


def write_inference_folder(folder: str, cfg, parts, unet, ema, scheduler_config) -> None:
    """Writes pipeline/ (EMA weights when on) and config.yaml into a checkpoint folder."""
    inference_pipeline(parts, unet, ema, scheduler_config).save_pretrained(os.path.join(folder, "pipeline"))
    save_config(cfg, os.path.join(folder, "config.yaml"))


def _progress(accelerator, start: int, total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc="train_ldm", disable=not accelerator.is_local_main_process)


def _write_losses(output_dir: str, losses: dict) -> None:
    with open(os.path.join(output_dir, "losses.jsonl"), "a", encoding="utf-8") as f:
        for step, loss in losses.items():
            f.write(json.dumps({"step": step, "loss": loss}) + "\n")
