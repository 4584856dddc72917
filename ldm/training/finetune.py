"""Fine-tuning on a folder of one's own images: the body of train/finetune.py and `ldm finetune`.

    accelerate launch train/finetune.py --model models/base --data my-art/ --out runs/my-art \
        --instance-prompt "a painting in the style of sks"

Steps: 1. read the folder into memory (5 to 200 images) and hold part of it out; 2. with --class-prompt, draw
the class images with the base model (cached); 3. add LoRA adapters (or unfreeze the UNet); 4. train with the
shared loop of ldm.training.loop (as `ldm train`: accumulation, the non-finite guard, stops, checkpoints,
exact resume), whose loss is ldm.training.step.batch_loss (+ DreamBooth's prior term); every `validation_every` steps log the per-timestep-bin loss of training and held-out images,
sample the instance prompt and check the samples for near-copies (ldm.evaluation.memorization); every `checkpoint_every`
steps, and on SIGTERM/Ctrl-C or after max_minutes, write a checkpoint (`--resume latest` continues exactly);
5. write pytorch_lora_weights.safetensors (+ the web-UI file) or a pipeline folder, and report.json.
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import asdict

import torch
from accelerate.utils import set_seed

from ldm.data.buckets import batch_plan
from ldm.data.captions import CaptionSpec
from ldm.data.masks import latent_mask, masked_count
from ldm.data.transforms import size_and_crop
from ldm.evaluation.memorization import generalization_gap, holdout_split, loss_gap_warning, memorization_report
from ldm.images import image_grid
from ldm.models.denoiser import denoiser_of
from ldm.models.vae import encode_posterior
from ldm.objectives import objective_for
from ldm.training import loop
from ldm.training.config import format_config, save_config
from ldm.training.finetune_config import FinetuneConfig, resolve_defaults
from ldm.training.checkpoint import keep_only_trainable, resolve_resume
from ldm.training.step import LossSpec, TextEmbedder, batch_loss, step_generator
from ldm.training.validation import inference_pipeline, make_val_set, validation_loss

NO_CAPTION = "\u0000no-caption\u0000"   # what the folder source returns for an image without a caption
GUARD_FILE = "memorization_guard.safetensors"   # in a checkpoint: the weights an early stop would restore


def join_caption(caption: str, instance_prompt: str) -> str:
    """Returns the training caption: the instance prompt, the folder's caption, or "instance, caption"."""
    if caption == NO_CAPTION or not caption.strip():
        if not instance_prompt:
            raise ValueError("an image has no caption (no metadata.jsonl, NAME.txt): pass --instance-prompt "
                             "'a painting in the style of sks' to caption the whole folder")
        return instance_prompt
    return f"{instance_prompt}, {caption}" if instance_prompt else caption


def read_images(cfg: FinetuneConfig, resolution: int) -> list[dict]:
    """Returns every image of cfg.data as {"pixel_values": (3,H,W) in [-1,1], "caption", "key"} (+ "mask" (1,H,W),
    "has_mask" with cfg.masked_loss), sorted by key."""
    from ldm.data import open_dataset

    masks = dict(masks=True, mask_dir=cfg.mask_dir or None) if cfg.masked_loss else {}  # + "mask", "has_mask"
    dataset = open_dataset(cfg.data, resolution=resolution, caption=NO_CAPTION, aspect_buckets=cfg.aspect_buckets,
                           shuffle=False, seed=cfg.seed, **masks)
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


def encode_posteriors(samples: list[dict], vae) -> list[dict]:
    """Adds "latent_mean" and "latent_logvar" (4, h, w) to each sample, and "latent_mask" (1, h, w) to one with a
    pixel "mask" (area-averaged, ldm.data.masks.latent_mask): every image goes through the VAE once."""
    for s in samples:
        mean, logvar = encode_posterior(vae, s["pixel_values"][None])
        s["latent_mean"], s["latent_logvar"] = mean[0].cpu(), logvar[0].cpu()
        if "mask" in s:
            s["latent_mask"] = latent_mask(s["mask"], tuple(mean.shape[-2:]))  # (1, h, w)
    return samples


def batches_forever(samples: list[dict], batch_size: int, seed: int, flip: bool):
    """Yields batches {"latent_mean", "latent_logvar": (B, 4, h, w), "caption": [str]} forever, with each image's
    "original_size" and "crop_top_left" (B, 2) when the samples have them (SDXL's micro-conditioning) and
    "latent_mask" (B, 1, h, w) when they have loss masks (flipped with the latents)."""
    epoch = 0
    names = ("latent_mean", "latent_logvar") + (("latent_mask",) if "latent_mask" in samples[0] else ())
    while True:
        for indices in batch_plan(samples, batch_size, seed, epoch):
            batch = {name: torch.stack([samples[i][name] for i in indices]) for name in names}  # (B, C, h, w)
            flipped = flip and random.Random(seed + epoch * 31 + indices[0]).random() < 0.5
            if flipped:  # flipping latents ~ flipping pixels (a conv VAE)
                batch = {name: tensor.flip(-1) for name, tensor in batch.items()}
            batch["caption"] = [samples[i]["caption"] for i in indices]
            yield {**batch, **size_and_crop([samples[i] for i in indices], flipped)}
        epoch += 1


@torch.no_grad()
def grouped_validation_loss(unet, samples: list[dict], vae, embed, objective, bins, device) -> dict:
    """Returns validation_loss over samples of possibly different sizes: per size group, averaged by count."""
    groups: dict[tuple, list[dict]] = {}
    for s in samples:
        groups.setdefault(tuple(s["latent_mean"].shape), []).append(s)
    total, reports = sum(len(g) for g in groups.values()), []
    for group in groups.values():
        batch = {"latent_mean": torch.stack([s["latent_mean"] for s in group]),  # (n, 4, h, w)
                 "caption": [s["caption"] for s in group], **size_and_crop(group)}
        val = make_val_set(batch, vae, embed, max(10, 40 // len(group)), objective, device)
        reports.append((len(group) / total, validation_loss(unet, val, objective, bins)))
    return {k: sum(w * r[k] for w, r in reports) for k in reports[0][1]}


def trainable_parameters(cfg: FinetuneConfig, unet, text_encoder, text_encoder_2=None) -> list[torch.nn.Parameter]:
    """Returns the weights to train: LoRA adapters (B = 0 at first) or the whole UNet (+ the text encoder, and
    SDXL's second, with train_text_encoder)."""
    from ldm.models.lora import LoraSettings, add_lora

    if cfg.method == "lora":
        settings = LoraSettings(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.train_text_encoder,
                                cfg.lora_type, cfg.lora_conv_rank, cfg.lora_conv_alpha)
        return add_lora(unet, text_encoder, settings, text_encoder_2=text_encoder_2)
    encoders = [text_encoder] + ([text_encoder_2] if text_encoder_2 is not None else [])
    unet.requires_grad_(True)
    for encoder in encoders:
        encoder.requires_grad_(cfg.train_text_encoder)
    return list(unet.parameters()) + [p for e in encoders if cfg.train_text_encoder for p in e.parameters()]


def sample_prompts(cfg: FinetuneConfig, train: list[dict]) -> list[str]:
    """Returns the prompts of the validation samples: given ones, the instance prompt, or the first captions."""
    prompts = list(cfg.validation_prompts) or ([cfg.instance_prompt] if cfg.instance_prompt else [])
    prompts = prompts or [s["caption"] for s in train]
    return [prompts[i % len(prompts)] for i in range(cfg.num_validation_samples)]


@torch.no_grad()
def validation_samples(cfg, pipe, prompts: list[str]) -> torch.Tensor:
    """Returns (N, 3, H, W) images in [0, 1], one per prompt from seed + i, with the validation guidance scale and
    method (ldm.evaluation.guidance_sweep.method_params, as `ldm train`'s validation grid)."""
    from ldm.evaluation.guidance_sweep import method_params

    generators = [torch.Generator().manual_seed(cfg.seed + i) for i in range(len(prompts))]
    return pipe(prompts, generator=generators, height=cfg.resolution, width=cfg.resolution, output_type="pt",
                num_inference_steps=cfg.validation_sample_steps, guidance_scale=cfg.validation_guidance,
                **method_params(cfg.validation_guidance_method, pipe.scheduler)).images


@torch.no_grad()
def validate(cfg, step: int, pipe, unet, vae, embed, objective, train, held) -> dict:
    """Returns this step's record: per-bin loss of training vs held-out images, samples and the near-copy check."""
    unet.eval()
    device = pipe.device
    args = (vae, embed, objective, cfg.val_loss_bins, device)
    val_train, val_held = grouped_validation_loss(unet, train, *args), grouped_validation_loss(unet, held, *args)
    prompts = sample_prompts(cfg, train)
    images = validation_samples(cfg, pipe, prompts)
    unet.train()
    gap = generalization_gap(val_train, val_held)
    path = os.path.join(cfg.out, "samples", f"step-{step:06d}.png")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pil = pipe.image_processor.numpy_to_pil(pipe.image_processor.pt_to_numpy(images))
    image_grid(pil, len(prompts)).save(path)
    report = memorization_report(images.cpu() * 2 - 1, [s["pixel_values"] for s in train], cfg.near_copy_ratio)
    memorization = report.to_dict()
    gap_message = loss_gap_warning(gap, cfg.max_loss_gap)
    if gap_message and not report.warning:
        memorization.update(warning=True, message=gap_message + f"; samples: {report.message}")
    return {"step": step, "val_train": val_train, "val_heldout": val_held, "gap": gap,
            "memorization": memorization, "samples": path}


def save_weights(cfg: FinetuneConfig, parts: dict, unet, text_encoder, folder: str, text_encoder_2=None) -> dict:
    """Writes FOLDER/pytorch_lora_weights.safetensors (LoRA) or FOLDER/pipeline (full); returns {"lora", "pipeline"}."""
    from ldm.models.lora import save_lora

    if cfg.method == "full":
        path = os.path.join(folder, "pipeline")
        pipe = inference_pipeline(parts, unet, parts["sampler"], text_encoder, text_encoder_2=text_encoder_2)
        pipe.save_pretrained(path)
        return {"lora": None, "pipeline": path}
    return {"lora": save_lora(folder, unet, text_encoder, text_encoder_2), "pipeline": None}



def write_outputs(cfg: FinetuneConfig, parts: dict, unet, text_encoder, text_encoder_2=None) -> dict:
    """Writes the LoRA file(s) or the pipeline folder; returns {"lora", "webui", "pipeline"} paths (or None)."""
    from ldm.models.lora import save_webui_lora
    from ldm.pipelines.lora import merge_lora

    outputs = {"webui": None, **save_weights(cfg, parts, unet, text_encoder, cfg.out, text_encoder_2)}
    if cfg.method == "full":
        return outputs
    if cfg.export_webui:
        info = {"ss_output_name": os.path.basename(os.path.abspath(cfg.out)), "ss_max_train_steps": str(cfg.max_steps),
                "ss_resolution": str(cfg.resolution), "ss_tag_frequency": json.dumps({"instance": cfg.instance_prompt}),
                "ss_learning_rate": str(cfg.learning_rate)}
        outputs["webui"] = save_webui_lora(os.path.join(cfg.out, "lora_webui.safetensors"), unet, text_encoder, info,
                                           text_encoder_2=text_encoder_2)
    if cfg.save_pipeline:
        outputs["pipeline"] = merge_lora(cfg.model, outputs["lora"], os.path.join(cfg.out, "pipeline"))
    return outputs


class FinetuneTrainer(loop.Trainer):
    """`ldm finetune`'s part of the loop: the instance (+ prior) loss, validation with the memorisation guard, and
    the LoRA file or pipeline folder (and the guard's snapshot) in each checkpoint."""

    def __init__(self, cfg: FinetuneConfig, accelerator, parts: dict, objective, embed, data: dict):
        self.cfg, self.accelerator, self.parts, self.objective, self.embed = cfg, accelerator, parts, objective, embed
        self.train, self.held, self.prior = data["train"], data["held"], data["prior"]
        # plain MSE, as DreamBooth trains; masked by each image's loss mask with cfg.masked_loss; the exposure-bias
        # remedies as `ldm train` has them (the base model's objective decides whether the self step applies)
        cfg.check_exposure_bias(objective.name, objective.schedule.num_train_timesteps)
        self.spec = LossSpec(masked_loss=cfg.masked_loss, masked_loss_floor=cfg.masked_loss_floor,
                             input_perturbation=cfg.input_perturbation, self_step_prob=cfg.self_step_prob,
                             self_step_k=cfg.self_step_k)
        self.batches_drawn, self.snapshot = 0, None
        self.caption_spec = CaptionSpec.from_config(cfg)  # the instance captions' tags; class prompts stay as written
        self.seek(0)

    def micro_loss(self, step: int, micro: int):
        cfg, self.batches_drawn = self.cfg, self.batches_drawn + 1
        generator = step_generator(cfg.seed, step, micro, self.accelerator.process_index)
        args = (self.parts["vae"], self.embed, self.objective, self.spec, generator)
        loss = batch_loss(self.accelerator, self.model, next(self.batches), *args, caption_dropout=cfg.caption_dropout,
                          caption_spec=self.caption_spec)
        if self.prior_batches is not None:  # L_instance + w * L_prior: DreamBooth (Ruiz et al. 2023, Eq. 2)
            loss = loss + cfg.prior_loss_weight * batch_loss(self.accelerator, self.model, next(self.prior_batches),
                                                             *args)
        return loss, {}

    def validate(self, state: dict) -> dict:
        cfg, step = self.cfg, state["step"]
        plain = self.accelerator.unwrap_model(self.model)
        pipe = inference_pipeline(self.parts, plain, self.parts["sampler"], self.text_encoder,
                                  text_encoder_2=self.text_encoder_2)
        record = validate(cfg, step, pipe, plain, self.parts["vae"], self.embed, self.objective, self.train, self.held)
        recent = [state["losses"][k] for k in range(max(1, step - cfg.validation_every + 1), step + 1)]
        record["train_loss"] = sum(recent) / len(recent)
        self.accelerator.print(_format_record(record))
        if record["memorization"]["warning"] and cfg.early_stop_on_memorization:
            with torch.no_grad():
                for p, saved in zip(self.params, self.snapshot):
                    p.copy_(saved)
            self.stop_reason = "memorization"  # no checkpoint: its step would not match the restored weights
            self.accelerator.print(f"early stop at step {step}: restored the weights of the last check without a "
                                   "warning")
        elif self.snapshot is not None and not record["memorization"]["warning"]:
            self.snapshot = [p.detach().clone() for p in self.params]
        return record

    def write_extra(self, folder: str, state: dict) -> None:
        from safetensors.torch import save_file

        save_weights(self.cfg, self.parts, self.accelerator.unwrap_model(self.model), self.text_encoder, folder,
                     self.text_encoder_2)
        save_config(self.cfg, os.path.join(folder, "config.yaml"))
        if self.snapshot is not None:
            save_file({str(i): p.cpu().contiguous() for i, p in enumerate(self.snapshot)},
                      os.path.join(folder, GUARD_FILE))

    def load_extra(self, checkpoint: str, state: dict) -> None:
        from safetensors.torch import load_file

        path = os.path.join(checkpoint, GUARD_FILE)
        if self.snapshot is not None and os.path.exists(path):  # the weights an early stop would restore
            saved = load_file(path)
            self.snapshot = [saved[str(i)].to(p.device, p.dtype) for i, p in enumerate(self.params)]

    def data_position(self) -> int:
        return self.batches_drawn

    def seek(self, position) -> None:
        """The streams are pure functions of the seed: replays them to `position` batches drawn."""
        cfg, self.batches_drawn = self.cfg, position or 0
        self.batches = batches_forever(self.train, cfg.batch_size, cfg.seed, cfg.random_flip)
        self.prior_batches = (batches_forever(self.prior, cfg.batch_size, cfg.seed + 1, cfg.random_flip)
                              if self.prior else None)
        for _ in range(self.batches_drawn):
            next(self.batches)
            if self.prior_batches:
                next(self.prior_batches)


def load_data(cfg: FinetuneConfig, accelerator, parts: dict) -> tuple[FinetuneConfig, dict]:
    """Reads the folder, holds part of it out, draws the class images and encodes every image once; returns the
    config with its folder-scaled defaults resolved and {"train", "held", "prior"} (samples with posteriors)."""
    unet, vae, text_encoder = denoiser_of(parts), parts["vae"], parts["text_encoder"]
    native = unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1)
    images = read_images(cfg, cfg.resolution or native)
    train_idx, held_idx = holdout_split([s["key"] for s in images], cfg.holdout_fraction, cfg.seed)
    cfg = resolve_defaults(cfg, len(train_idx), native)
    for module in (unet, vae, text_encoder, parts.get("text_encoder_2")):
        if module is not None:  # SDXL's text_encoder_2 too
            module.to(accelerator.device).requires_grad_(False).eval()
    # class images from the base model, before any adapter
    parts["sampler"] = objective_for(parts["scheduler"]).scheduler(dict(parts["scheduler"].config))
    prior = (class_images(cfg, inference_pipeline(parts, unet, parts["sampler"]), cfg.resolution)
             if cfg.class_prompt else [])
    return cfg, {"train": encode_posteriors([images[i] for i in train_idx], vae),
                 "held": encode_posteriors([images[i] for i in held_idx], vae), "prior": encode_posteriors(prior, vae)}


def setup(cfg: FinetuneConfig, accelerator, parts: dict, data: dict) -> FinetuneTrainer:
    """Adds the adapters (or unfreezes the UNet), builds the optimiser and prepares them; returns the trainer."""
    unet, text_encoder, text_encoder_2 = denoiser_of(parts), parts["text_encoder"], parts.get("text_encoder_2")
    params = trainable_parameters(cfg, unet, text_encoder, text_encoder_2)
    optimizer = loop.make_optimizer(params, cfg.learning_rate, accelerator.device,
                                    weight_decay=1e-2 if cfg.method == "full" else 0.0, kind=cfg.optimizer,
                                    warmup_steps=cfg.lr_warmup_steps, d_coef=cfg.prodigy_d_coef)
    lr_scheduler = loop.make_lr_scheduler("constant_with_warmup", optimizer, cfg.lr_warmup_steps, cfg.max_steps,
                                          accelerator.num_processes)
    if cfg.method == "lora":  # checkpoints hold the adapters, not a copy of the frozen UNet
        keep_only_trainable(accelerator)
    if cfg.train_text_encoder and text_encoder_2 is not None:  # SDXL: both encoders prepared and checkpointed
        unet, text_encoder, text_encoder_2, optimizer, lr_scheduler = accelerator.prepare(
            unet, text_encoder, text_encoder_2, optimizer, lr_scheduler)
    elif cfg.train_text_encoder:  # prepared (and so checkpointed) when trained
        unet, text_encoder, optimizer, lr_scheduler = accelerator.prepare(unet, text_encoder, optimizer, lr_scheduler)
    else:
        unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    unet.train()
    for encoder in (text_encoder, text_encoder_2):
        if encoder is not None:
            encoder.train(cfg.train_text_encoder)
    embed = TextEmbedder(text_encoder, parts["tokenizer"], not cfg.train_text_encoder, text_encoder_2,
                         parts.get("tokenizer_2"))
    trainer = FinetuneTrainer(cfg, accelerator, parts, objective_for(parts["scheduler"]), embed, data)
    trainer.model, trainer.params, trainer.text_encoder = unet, params, accelerator.unwrap_model(text_encoder)
    trainer.text_encoder_2 = None if text_encoder_2 is None else accelerator.unwrap_model(text_encoder_2)
    trainer.optimizer, trainer.lr_scheduler = optimizer, lr_scheduler
    # the memorisation guard restores the weights of the last check without a warning (at first: these)
    trainer.snapshot = [p.detach().clone() for p in params] if cfg.early_stop_on_memorization else None
    return trainer


def main(cfg: FinetuneConfig) -> dict:
    """Fine-tunes and returns the report (also written to OUT/report.json)."""
    from ldm.pipelines.editing import refuse_inpainting_training
    from ldm.pipelines.loading import load_components

    if not os.path.isdir(cfg.model):
        raise FileNotFoundError(f"base model folder {cfg.model} does not exist; pass --model DIR, a pipeline folder "
                                "(model_index.json, unet/ or transformer/, vae/, text_encoder/, tokenizer/, scheduler/)")
    resolve_resume(cfg.resume, cfg.out)  # before any work: a bad --resume path fails at once
    accelerator = loop.make_accelerator(cfg, cfg.out, cpu=cfg.device == "cpu")
    set_seed(cfg.seed)
    parts = load_components(cfg.model)
    refuse_inpainting_training(parts, "finetune")
    cfg, data = load_data(cfg, accelerator, parts)
    os.makedirs(cfg.out, exist_ok=True)
    save_config(cfg, os.path.join(cfg.out, "config.yaml"))
    masked = masked_count(data["train"] + data["held"])
    accelerator.print(f"finetune: {len(data['train'])} training + {len(data['held'])} held-out images"
                      + (f"; masked loss: {masked} of them have a mask (the others count every pixel)"
                         if cfg.masked_loss else "") + f"\n{format_config(cfg)}")
    trainer = setup(cfg, accelerator, parts, data)
    settings = loop.LoopSettings.from_config(cfg, output_dir=cfg.out, checkpoint_at_end=False, keep_losses=True,
                                             name="finetune")
    result = loop.train(accelerator, trainer, settings)
    return write_report(cfg, parts, trainer, data, result)


def write_report(cfg: FinetuneConfig, parts: dict, trainer: FinetuneTrainer, data: dict, result: dict) -> dict:
    """Writes the outputs (not after a signal or max_minutes: the run goes on with --resume) and OUT/report.json;
    returns the report."""
    finished = result["stopped_by"] in (None, "memorization")
    plain = trainer.accelerator.unwrap_model(trainer.model)
    outputs = (write_outputs(cfg, parts, plain, trainer.text_encoder, trainer.text_encoder_2) if finished
               else {"lora": None, "webui": None, "pipeline": None})
    history = result["history"]
    warnings = [r["memorization"]["message"] for r in history if r["memorization"]["warning"]]
    report = {"steps": result["step"], "stopped_by": result["stopped_by"], "num_train_images": len(data["train"]),
              "num_heldout_images": len(data["held"]), "num_class_images": len(data["prior"]),
              "num_masked_images": masked_count(data["train"] + data["held"]), "outputs": outputs,
              "checkpoint": result["checkpoint"], "nonfinite_total": result["nonfinite_total"],
              "memorization_warning": bool(warnings), "warnings": warnings, "history": history,
              "losses": result["losses"], "config": asdict(cfg)}
    with open(os.path.join(cfg.out, "report.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    trainer.accelerator.print(f"wrote {', '.join(p for p in outputs.values() if p) or 'no weights'} and "
                              f"{cfg.out}/report.json")
    return report

def _format_record(record: dict) -> str:
    bins = " ".join(f"{k}:{record['val_train'][f'val_loss_{k}']:.3f}/{record['val_heldout'][f'val_loss_{k}']:.3f}"
                    for k in record["gap"])
    return (f"step {record['step']}: loss {record['train_loss']:.4f}; val loss train/held-out "
            f"{record['val_train']['val_loss']:.4f}/{record['val_heldout']['val_loss']:.4f} by timestep bin [{bins}]; "
            f"{record['memorization']['message']}")
