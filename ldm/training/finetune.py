"""Fine-tuning on a folder of one's own images: the body of train/finetune.py and `ldm finetune`.

    accelerate launch train/finetune.py --model models/base --data my-art/ --out runs/my-art \
        --instance-prompt "a painting in the style of sks"

Steps: 1. read the folder into memory (5 to 200 images) and hold part of it out; 2. with --class-prompt, draw
the class images with the base model (cached); 3. add LoRA adapters (or unfreeze the UNet); 4. train with the
step helpers of ldm.training.step and the guarded, accumulated optimiser step of ldm.training.loop (as
`ldm train`); every `validation_every` steps log the per-timestep-bin loss of training and held-out images,
sample the instance prompt and check the samples for near-copies (ldm.memorization); every `checkpoint_every`
steps, and on SIGTERM/Ctrl-C or after max_minutes, write a checkpoint (`--resume latest` continues exactly);
5. write pytorch_lora_weights.safetensors (+ the web-UI file) or a pipeline folder, and report.json.
"""
from __future__ import annotations

import json
import os
import random
import time
from dataclasses import asdict, dataclass

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from ldm import diffusion
from ldm.data.buckets import batch_plan
from ldm.memorization import generalization_gap, holdout_split, loss_gap_warning, memorization_report
from ldm.training.checkpoint import read_state, resolve_resume, save_checkpoint
from ldm.training.config import every, format_config, save_config
from ldm.training.finetune_config import FinetuneConfig, resolve_defaults
from ldm.training.loop import accumulated_step, new_state, stop_if_nonfinite
from ldm.training.signals import StopRequest, agreed_stop_reason
from ldm.training.step import NoiseSchedule, TextEmbedder, batch_latents, diffusion_loss, step_generator
from ldm.training.validation import image_grid, make_val_set, validation_loss

NO_CAPTION = "\u0000no-caption\u0000"   # what the folder source returns for an image without a caption
GUARD_FILE = "memorization_guard.safetensors"   # in a checkpoint: the weights an early stop would restore


@dataclass
class LossSettings:
    """The loss fields ldm.training.step.diffusion_loss reads: plain epsilon/v MSE, as DreamBooth trains."""
    prediction_type: str = "epsilon"
    loss: str = "mse"
    huber_c: float = 0.1
    weighting: str = "uniform"
    snr_gamma: float = 5.0
    offset_noise: float = 0.0


def join_caption(caption: str, instance_prompt: str) -> str:
    """Returns the training caption: the instance prompt, the folder's caption, or "instance, caption"."""
    if caption == NO_CAPTION or not caption.strip():
        if not instance_prompt:
            raise ValueError("an image has no caption (no metadata.jsonl, NAME.txt): pass --instance-prompt "
                             "'a painting in the style of sks' to caption the whole folder")
        return instance_prompt
    return f"{instance_prompt}, {caption}" if instance_prompt else caption


def read_images(cfg: FinetuneConfig, resolution: int) -> list[dict]:
    """Returns every image of cfg.data as {"pixel_values": (3,H,W) in [-1,1], "caption", "key"}, sorted by key."""
    from ldm.data import open_dataset

    dataset = open_dataset(cfg.data, resolution=resolution, caption=NO_CAPTION, aspect_buckets=cfg.aspect_buckets,
                           shuffle=False, seed=cfg.seed)
    samples = [{**s, "caption": join_caption(s["caption"], cfg.instance_prompt)} for s in dataset]
    if not samples:
        raise ValueError(f"no usable images in {cfg.data}; see the skipped-input report above")
    return sorted(samples, key=lambda s: s["key"])


@torch.no_grad()
def class_images(cfg: FinetuneConfig, pipe, resolution: int) -> list[dict]:
    """Returns cfg.num_class_images samples of cfg.class_prompt from the base model, cached in OUT/class_images.

    The cache is reused while the model, prompt, size, steps, guidance and seed are the same; more images
    than cached are drawn on top of the cached ones.
    """
    from PIL import Image

    from ldm.data.transforms import to_tensor

    folder = os.path.join(cfg.out, "class_images")
    manifest = {"model": os.path.abspath(cfg.model), "prompt": cfg.class_prompt, "resolution": resolution,
                "steps": cfg.class_sample_steps, "guidance": cfg.validation_guidance, "seed": cfg.seed}
    manifest_path = os.path.join(folder, "manifest.json")
    cached = _read_json(manifest_path)
    if {k: cached.get(k) for k in manifest} != manifest:
        cached = {**manifest, "count": 0}
    os.makedirs(folder, exist_ok=True)
    for start in range(cached["count"], cfg.num_class_images, 8):
        count = min(8, cfg.num_class_images - start)
        generator = [torch.Generator().manual_seed(cfg.seed * 100_003 + start + i) for i in range(count)]
        images = pipe([cfg.class_prompt] * count, height=resolution, width=resolution, generator=generator,
                      num_inference_steps=cfg.class_sample_steps, guidance_scale=cfg.validation_guidance).images
        for i, image in enumerate(images):
            image.save(os.path.join(folder, f"{start + i:05d}.png"))
        cached["count"] = start + count
        with open(manifest_path, "w", encoding="utf-8") as f:
            json.dump(cached, f, indent=2)
    return [{"pixel_values": to_tensor(Image.open(os.path.join(folder, f"{i:05d}.png")).convert("RGB")),
             "caption": cfg.class_prompt, "key": f"class/{i:05d}"} for i in range(cfg.num_class_images)]


def _read_json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@torch.no_grad()
def encode_posteriors(samples: list[dict], vae, device) -> list[dict]:
    """Adds "latent_mean" and "latent_logvar" (4, h, w) to each sample: every image goes through the VAE once."""
    for s in samples:
        moments = vae.encode(s["pixel_values"][None].to(device, vae.dtype)).latent_dist
        s["latent_mean"], s["latent_logvar"] = moments.mean[0].float().cpu(), moments.logvar[0].float().cpu()
    return samples


def batches_forever(samples: list[dict], batch_size: int, seed: int, flip: bool):
    """Yields batches {"latent_mean", "latent_logvar": (B, 4, h, w), "caption": [str]} forever."""
    epoch = 0
    while True:
        for indices in batch_plan(samples, batch_size, seed, epoch):
            mean = torch.stack([samples[i]["latent_mean"] for i in indices])      # (B, 4, h, w)
            logvar = torch.stack([samples[i]["latent_logvar"] for i in indices])  # (B, 4, h, w)
            if flip and random.Random(seed + epoch * 31 + indices[0]).random() < 0.5:
                mean, logvar = mean.flip(-1), logvar.flip(-1)  # flipping latents ~ flipping pixels (a conv VAE)
            yield {"latent_mean": mean, "latent_logvar": logvar, "caption": [samples[i]["caption"] for i in indices]}
        epoch += 1


def noise_schedule(scheduler_config: dict) -> NoiseSchedule:
    """Returns the base model's own training schedule, read from its scheduler config (trained_betas included)."""
    from diffusers import DDPMScheduler

    betas = DDPMScheduler.from_config(scheduler_config).betas.double()
    return NoiseSchedule(betas, diffusion.alphas_cumprod(betas), scheduler_config.get("beta_schedule", "custom"), False)


@torch.no_grad()
def grouped_validation_loss(unet, samples: list[dict], vae, embed, schedule, prediction_type, bins, device) -> dict:
    """Returns validation_loss over samples of possibly different sizes: per size group, averaged by count."""
    groups: dict[tuple, list[dict]] = {}
    for s in samples:
        groups.setdefault(tuple(s["latent_mean"].shape), []).append(s)
    total, reports = sum(len(g) for g in groups.values()), []
    for group in groups.values():
        batch = {"latent_mean": torch.stack([s["latent_mean"] for s in group]),  # (n, 4, h, w)
                 "caption": [s["caption"] for s in group]}
        val = make_val_set(batch, vae, embed, max(10, 40 // len(group)), schedule.num_train_timesteps, device)
        reports.append((len(group) / total, validation_loss(unet, val, schedule.alpha_bar.to(device), prediction_type,
                                                            bins)))
    return {k: sum(w * r[k] for w, r in reports) for k in reports[0][1]}


def trainable_parameters(cfg: FinetuneConfig, unet, text_encoder) -> list[torch.nn.Parameter]:
    """Returns the weights to train: LoRA adapters (B = 0 at first) or the whole UNet (+ text encoder)."""
    from ldm.lora import LoraSettings, add_lora

    if cfg.method == "lora":
        settings = LoraSettings(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.train_text_encoder)
        return add_lora(unet, text_encoder, settings)
    unet.requires_grad_(True)
    text_encoder.requires_grad_(cfg.train_text_encoder)
    return list(unet.parameters()) + (list(text_encoder.parameters()) if cfg.train_text_encoder else [])


def sampling_pipeline(parts: dict, unet, text_encoder):
    """Returns an ldm.Pipeline over the weights being trained (adapters active), progress bar off."""
    from diffusers import DDIMScheduler

    from ldm.pipelines import Pipeline

    pipe = Pipeline(vae=parts["vae"], text_encoder=text_encoder, tokenizer=parts["tokenizer"], unet=unet,
                    scheduler=DDIMScheduler.from_config(parts["scheduler"].config))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def finetune_loss(cfg, accelerator, unet, vae, embed, schedule, loss_settings, batch: dict, prior_batch: dict | None,
                  step: int, micro: int) -> torch.Tensor:
    """Returns the loss of one micro-batch of optimiser step `step` (1-based).

    With a prior batch: L_instance + w * L_prior, DreamBooth's prior preservation (Ruiz et al. 2023, Eq. 2).
    """
    device = accelerator.device
    generator = step_generator(cfg.seed, step, micro)
    with accelerator.autocast():  # the VAE and text encoder in the mixed-precision dtype too, as in train_ldm
        latents = batch_latents(batch, vae, generator, device)  # (B, 4, h, w)
        captions = diffusion.drop_captions(list(batch["caption"]), cfg.caption_dropout, generator)
        context = embed(captions, device)  # (B, 77, D)
    loss, _ = diffusion_loss(unet, latents, context, schedule, loss_settings, generator)
    if prior_batch is not None:
        with accelerator.autocast():
            prior_latents = batch_latents(prior_batch, vae, generator, device)  # (B', 4, h, w)
            prior_context = embed(list(prior_batch["caption"]), device)
        prior_loss, _ = diffusion_loss(unet, prior_latents, prior_context, schedule, loss_settings, generator)
        loss = loss + cfg.prior_loss_weight * prior_loss
    return loss


def finetune_step(cfg, accelerator, unet, vae, embed, schedule, loss_settings, optimizer, lr_scheduler, params,
                  batches, prior_batches, state: dict) -> float:
    """Runs one optimiser step over gradient_accumulation_steps micro-batches (skipped if not finite, see
    ldm.training.loop); returns the mean loss. Counts the batches drawn in state["batches_drawn"]."""
    def micro_loss(micro: int) -> torch.Tensor:
        state["batches_drawn"] += 1
        return finetune_loss(cfg, accelerator, unet, vae, embed, schedule, loss_settings, next(batches),
                             next(prior_batches) if prior_batches else None, state["step"] + 1, micro)

    return accumulated_step(accelerator, unet, micro_loss, cfg.gradient_accumulation_steps, params, cfg.max_grad_norm,
                            optimizer, lr_scheduler, state)


def sample_prompts(cfg: FinetuneConfig, train: list[dict]) -> list[str]:
    """Returns the prompts of the validation samples: given ones, the instance prompt, or the first captions."""
    prompts = list(cfg.validation_prompts) or ([cfg.instance_prompt] if cfg.instance_prompt else [])
    prompts = prompts or [s["caption"] for s in train]
    return [prompts[i % len(prompts)] for i in range(cfg.num_validation_samples)]


@torch.no_grad()
def validate(cfg, step: int, pipe, unet, vae, embed, schedule, prediction_type, train, held) -> dict:
    """Returns this step's record: per-bin loss of training vs held-out images, samples and the near-copy check."""
    unet.eval()
    device = pipe.device
    args = (vae, embed, schedule, prediction_type, cfg.val_loss_bins, device)
    val_train, val_held = grouped_validation_loss(unet, train, *args), grouped_validation_loss(unet, held, *args)
    prompts = sample_prompts(cfg, train)
    generators = [torch.Generator().manual_seed(cfg.seed + i) for i in range(len(prompts))]
    images = pipe(prompts, generator=generators, height=cfg.resolution, width=cfg.resolution, output_type="pt",
                  num_inference_steps=cfg.validation_sample_steps, guidance_scale=cfg.validation_guidance).images
    unet.train()
    path = os.path.join(cfg.out, "samples", f"step-{step:06d}.png")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pil = pipe.image_processor.numpy_to_pil(pipe.image_processor.pt_to_numpy(images))
    image_grid(pil, columns=len(prompts)).save(path)
    report = memorization_report(images.cpu() * 2 - 1, [s["pixel_values"] for s in train], cfg.near_copy_ratio)
    gap = generalization_gap(val_train, val_held)
    memorization = report.to_dict()
    gap_message = loss_gap_warning(gap, cfg.max_loss_gap)
    if gap_message and not report.warning:
        memorization.update(warning=True, message=gap_message + f"; samples: {report.message}")
    return {"step": step, "val_train": val_train, "val_heldout": val_held, "gap": gap,
            "memorization": memorization, "samples": path}


def save_weights(cfg: FinetuneConfig, parts: dict, unet, text_encoder, folder: str) -> dict:
    """Writes FOLDER/pytorch_lora_weights.safetensors (LoRA) or FOLDER/pipeline (full); returns {"lora", "pipeline"}."""
    from ldm.lora import save_lora

    if cfg.method == "full":
        path = os.path.join(folder, "pipeline")
        sampling_pipeline(parts, unet, text_encoder).save_pretrained(path)
        return {"lora": None, "pipeline": path}
    return {"lora": save_lora(folder, unet, text_encoder), "pipeline": None}


def write_outputs(cfg: FinetuneConfig, parts: dict, unet, text_encoder) -> dict:
    """Writes the LoRA file(s) or the pipeline folder; returns {"lora", "webui", "pipeline"} paths (or None)."""
    from ldm.lora import merge_lora, save_webui_lora

    outputs = {"webui": None, **save_weights(cfg, parts, unet, text_encoder, cfg.out)}
    if cfg.method == "full":
        return outputs
    if cfg.export_webui:
        info = {"ss_output_name": os.path.basename(os.path.abspath(cfg.out)), "ss_max_train_steps": str(cfg.max_steps),
                "ss_resolution": str(cfg.resolution), "ss_tag_frequency": json.dumps({"instance": cfg.instance_prompt}),
                "ss_learning_rate": str(cfg.learning_rate)}
        outputs["webui"] = save_webui_lora(os.path.join(cfg.out, "lora_webui.safetensors"), unet, text_encoder, info)
    if cfg.save_pipeline:
        outputs["pipeline"] = merge_lora(cfg.model, outputs["lora"], os.path.join(cfg.out, "pipeline"))
    return outputs


def write_checkpoint(cfg: FinetuneConfig, accelerator, parts: dict, unet, text_encoder, state: dict,
                     snapshot: list[torch.Tensor] | None) -> str:
    """Writes OUT/checkpoints/checkpoint-<step> (ldm.training.checkpoint): Accelerate state (weights, optimiser, lr
    schedule, RNG), the weights as `save_weights` writes them, config.yaml, the memorisation guard's snapshot
    and trainer_state.json (step, batches drawn, losses, validation history, non-finite counters)."""
    from safetensors.torch import save_file

    def extra(folder: str) -> None:
        save_weights(cfg, parts, unet, text_encoder, folder)
        save_config(cfg, os.path.join(folder, "config.yaml"))
        if snapshot is not None:
            save_file({str(i): p.cpu().contiguous() for i, p in enumerate(snapshot)}, os.path.join(folder, GUARD_FILE))

    return save_checkpoint(accelerator, cfg.out, state["step"], state, extra, cfg.checkpoints_total_limit)


def load_checkpoint(checkpoint: str, accelerator, params) -> tuple[dict, list[torch.Tensor] | None]:
    """Loads a checkpoint of write_checkpoint into the prepared models, optimiser and lr schedule; returns the
    trainer state and the memorisation guard's snapshot (None if the checkpoint has none)."""
    from safetensors.torch import load_file

    accelerator.load_state(os.path.join(checkpoint, "accelerate"))
    state = read_state(checkpoint)
    state["losses"] = {int(step): loss for step, loss in state["losses"].items()}  # JSON keys are strings
    path = os.path.join(checkpoint, GUARD_FILE)
    if not os.path.exists(path):
        return state, None
    saved = load_file(path)
    return state, [saved[str(i)].to(p.device, p.dtype) for i, p in enumerate(params)]


def main(cfg: FinetuneConfig) -> dict:
    """Fine-tunes and returns the report (also written to OUT/report.json)."""
    from diffusers.optimization import get_scheduler

    from ldm.pipelines.loading import load_components

    # 1. Accelerator, base model, images and the held-out split
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=cfg.device == "cpu",
                              gradient_accumulation_steps=cfg.gradient_accumulation_steps)
    set_seed(cfg.seed)
    if not os.path.isdir(cfg.model):
        raise FileNotFoundError(f"base model folder {cfg.model} does not exist; pass --model DIR, a pipeline folder "
                                "(model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)")
    parts = load_components(cfg.model)
    unet, vae, text_encoder = parts["unet"], parts["vae"], parts["text_encoder"]
    native = unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1)
    images = read_images(cfg, cfg.resolution or native)
    train_idx, held_idx = holdout_split([s["key"] for s in images], cfg.holdout_fraction, cfg.seed)
    cfg = resolve_defaults(cfg, len(train_idx), native)
    checkpoint = resolve_resume(cfg.resume, cfg.out)  # before any work: a bad --resume path fails at once
    os.makedirs(cfg.out, exist_ok=True)
    save_config(cfg, os.path.join(cfg.out, "config.yaml"))
    accelerator.print(f"finetune: {len(train_idx)} training + {len(held_idx)} held-out images\n{format_config(cfg)}")
    device = accelerator.device
    for module in (unet, vae, text_encoder):
        module.to(device).requires_grad_(False).eval()

    # 2. Class images from the base model (before any adapter), then every image through the VAE once
    pipe = sampling_pipeline(parts, unet, text_encoder)
    prior = class_images(cfg, pipe, cfg.resolution) if cfg.class_prompt else []
    train = encode_posteriors([images[i] for i in train_idx], vae, device)
    held = encode_posteriors([images[i] for i in held_idx], vae, device)
    prior = encode_posteriors(prior, vae, device)

    # 3. Trainable weights, optimiser, accelerator.prepare (the text encoder too when trained: it is checkpointed)
    params = trainable_parameters(cfg, unet, text_encoder)
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=1e-2 if cfg.method == "full" else 0.0)
    world = accelerator.num_processes  # the prepared schedule steps once per process, as in train_ldm
    lr_scheduler = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=cfg.lr_warmup_steps * world,
                                 num_training_steps=cfg.max_steps * world)
    if cfg.train_text_encoder:
        unet, text_encoder, optimizer, lr_scheduler = accelerator.prepare(unet, text_encoder, optimizer, lr_scheduler)
    else:
        unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    unet.train()
    text_encoder.train(cfg.train_text_encoder)
    schedule = noise_schedule(dict(parts["scheduler"].config))
    loss_settings = LossSettings(prediction_type=parts["scheduler"].config.get("prediction_type", "epsilon"))
    embed = TextEmbedder(text_encoder, parts["tokenizer"], cache=not cfg.train_text_encoder)
    plain_unet, plain_text_encoder = accelerator.unwrap_model(unet), accelerator.unwrap_model(text_encoder)
    pipe = sampling_pipeline(parts, plain_unet, plain_text_encoder)

    # 4. Resume: weights, optimiser, lr schedule and RNG from Accelerate; step, data position, guard from us
    state, snapshot = new_state(batches_drawn=0, losses={}, history=[]), None
    if checkpoint:
        state, snapshot = load_checkpoint(checkpoint, accelerator, params)
        accelerator.print(f"resumed from {checkpoint} at step {state['step']}")
    # the memorisation guard restores the weights of the last check without a warning (at first: these)
    snapshot = (snapshot or [p.detach().clone() for p in params]) if cfg.early_stop_on_memorization else None
    batches = batches_forever(train, cfg.batch_size, cfg.seed, cfg.random_flip)
    prior_batches = batches_forever(prior, cfg.batch_size, cfg.seed + 1, cfg.random_flip) if prior else None
    for _ in range(state["batches_drawn"]):  # the streams are pure functions of the seed: replay to the position
        next(batches)
        if prior_batches:
            next(prior_batches)

    # 5. Training loop with validation, the memorisation guard, checkpoints and stops
    losses, history, last_checkpoint, stopped_by = state["losses"], state["history"], checkpoint, None
    started = time.time()
    with StopRequest() as stop:
        while state["step"] < cfg.max_steps:
            step = state["step"] + 1
            losses[step] = finetune_step(cfg, accelerator, unet, vae, embed, schedule, loss_settings, optimizer,
                                         lr_scheduler, params, batches, prior_batches, state)
            state["step"] = step
            stop_if_nonfinite(state, cfg.max_nonfinite_steps)
            if every(step, cfg.validation_every) or step == cfg.max_steps:
                record = validate(cfg, step, pipe, plain_unet, vae, embed, schedule, loss_settings.prediction_type,
                                  train, held)
                recent = [losses[k] for k in range(max(1, step - cfg.validation_every + 1), step + 1)]
                record["train_loss"] = sum(recent) / len(recent)
                history.append(record)
                accelerator.print(_format_record(record))
                if record["memorization"]["warning"] and cfg.early_stop_on_memorization:
                    with torch.no_grad():
                        for p, saved in zip(params, snapshot):
                            p.copy_(saved)
                    stopped_by = "memorization"  # no checkpoint: its step would not match the restored weights
                    accelerator.print(f"early stop at step {step}: restored the weights of the last check without "
                                      "a warning")
                    break
                if snapshot is not None and not record["memorization"]["warning"]:
                    snapshot = [p.detach().clone() for p in params]
            stopped_by = agreed_stop_reason(accelerator, stop, started, cfg.max_minutes)
            if every(step, cfg.checkpoint_every) or stopped_by:
                last_checkpoint = write_checkpoint(cfg, accelerator, parts, plain_unet, plain_text_encoder, state,
                                                   snapshot)
            if stopped_by:
                accelerator.print(f"stopped by {stopped_by} at step {step}; checkpoint {last_checkpoint} (with the "
                                  "weights so far); continue with --resume latest")
                break

    # 6. Outputs (not after a signal or max_minutes: the run goes on with --resume) and the report
    finished = stopped_by in (None, "memorization")
    outputs = (write_outputs(cfg, parts, plain_unet, plain_text_encoder) if finished
               else {"lora": None, "webui": None, "pipeline": None})
    warnings = [r["memorization"]["message"] for r in history if r["memorization"]["warning"]]
    report = {"steps": state["step"], "stopped_by": stopped_by, "num_train_images": len(train),
              "num_heldout_images": len(held), "num_class_images": len(prior), "outputs": outputs,
              "checkpoint": last_checkpoint, "nonfinite_total": state["nonfinite_total"],
              "memorization_warning": bool(warnings), "warnings": warnings, "history": history,
              "losses": losses, "config": asdict(cfg)}
    with open(os.path.join(cfg.out, "report.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    accelerator.print(f"wrote {', '.join(p for p in outputs.values() if p) or 'no weights'} and {cfg.out}/report.json")
    return report


def _format_record(record: dict) -> str:
    bins = " ".join(f"{k}:{record['val_train'][f'val_loss_{k}']:.3f}/{record['val_heldout'][f'val_loss_{k}']:.3f}"
                    for k in record["gap"])
    return (f"step {record['step']}: loss {record['train_loss']:.4f}; val loss train/held-out "
            f"{record['val_train']['val_loss']:.4f}/{record['val_heldout']['val_loss']:.4f} by timestep bin [{bins}]; "
            f"{record['memorization']['message']}")
