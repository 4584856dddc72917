"""AutoencoderKL training: the body of train/train_vae.py and `ldm train-vae`.

Loss = reconstruction (L1/L2) + kl_weight * KL [+ lpips_weight * LPIPS] [+ disc_weight * hinge GAN after
disc_start steps], as in Rombach et al. 2022 (arXiv:2112.10752, Appendix G). At every checkpoint the latent
scaling factor (1 / std of latents) is measured and stored in the VAE config; vae/ opens with
AutoencoderKL.from_pretrained. Reconstruction grids and PSNR go to output_dir/samples and the log.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers import AutoencoderKL
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from ldm.presets import MODEL_PRESETS, build_vae, get_spec
from ldm.training.checkpoint import read_state, resolve_resume, save_checkpoint
from ldm.training.config import format_config, save_config
from ldm.training.signals import StopRequest
from ldm.training.stream import BatchStream
from ldm.training.train_ldm import cpu_only_multiprocess
from ldm.training.validation import first_samples, image_grid
from ldm.training.vae_losses import (PatchDiscriminator, hinge_d_loss, hinge_g_loss, kl_loss, latent_scaling_factor,
                                     psnr, reconstruction_loss)


@dataclass
class TrainVAEConfig:
    data: str = "shapes:2000"
    resolution: int = 64
    model: str = "small"                 # a preset name, or an AutoencoderKL folder to continue
    rec_loss: str = "l1"                 # l1 or l2
    kl_weight: float = 1e-6
    lpips_weights: str = ""              # a local LPIPS (vgg) weights file; "" = no perceptual loss
    lpips_weight: float = 1.0
    disc_start: int = -1                 # step that switches the patch discriminator on; -1 = never
    disc_weight: float = 0.5
    disc_learning_rate: float = 1e-4
    learning_rate: float = 1e-4
    lr_scheduler: str = "constant"       # any diffusers.optimization name (constant, cosine, linear, ...)
    lr_warmup_steps: int = 0
    batch_size: int = 16
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"
    max_steps: int = 2000
    max_minutes: float = 0.0
    output_dir: str = "runs/vae"
    checkpoint_every: int = 500
    checkpoints_total_limit: int = 2
    resume: str = ""
    log_every: int = 50
    val_samples: int = 8
    num_workers: int = 0
    seed: int = 0

    def validate(self) -> None:
        if self.rec_loss not in ("l1", "l2"):
            raise ValueError(f"rec_loss must be l1 or l2, got {self.rec_loss!r}")
        if self.resolution % 8:
            raise ValueError(f"resolution must be divisible by 8, got {self.resolution}")
        if self.lpips_weights and not os.path.isfile(self.lpips_weights):
            raise FileNotFoundError(f"lpips_weights {self.lpips_weights} does not exist")


def build_vae_model(cfg: TrainVAEConfig) -> AutoencoderKL:
    if cfg.model in MODEL_PRESETS:
        torch.manual_seed(cfg.seed)
        return build_vae(get_spec(cfg.model))
    if os.path.isdir(cfg.model):
        sub = os.path.join(cfg.model, "vae")
        return AutoencoderKL.from_pretrained(sub if os.path.isdir(sub) else cfg.model, local_files_only=True)
    raise ValueError(f"model {cfg.model!r} is neither a preset ({', '.join(MODEL_PRESETS)}) nor a VAE folder")


def load_lpips(path: str):
    """Returns an LPIPS(vgg) module with weights from a local file (the `lpips` package is needed)."""
    try:
        import lpips
    except ImportError as e:
        raise ValueError("lpips_weights needs the lpips package: pip install lpips") from e
    model = lpips.LPIPS(net="vgg", pretrained=False, pnet_rand=True, verbose=False)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=False)
    return model.eval().requires_grad_(False)


def vae_loss(cfg, vae, disc, perceptual, pixels, generator, step):
    """Returns (generator-side loss, logs, reconstruction)."""
    posterior = vae.encode(pixels).latent_dist
    z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator).to(pixels)
    x_rec = vae.decode(z).sample
    rec = reconstruction_loss(x_rec, pixels, cfg.rec_loss)
    kl = kl_loss(posterior.mean, posterior.logvar)
    loss = rec + cfg.kl_weight * kl
    logs = {"rec_loss": rec.item(), "kl": kl.item()}
    if perceptual is not None:
        p = perceptual(x_rec, pixels).mean()
        loss, logs["lpips"] = loss + cfg.lpips_weight * p, p.item()
    if disc is not None and step >= cfg.disc_start:
        g = hinge_g_loss(disc(x_rec))
        loss, logs["g_loss"] = loss + cfg.disc_weight * g, g.item()
    return loss, logs, x_rec


def main(cfg: TrainVAEConfig, dataset=None) -> dict:
    """Trains the VAE; returns {"step", "psnr", "scaling_factor", "vae_dir", "losses"}."""
    accelerator = Accelerator(cpu=cpu_only_multiprocess(), gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                              mixed_precision=cfg.mixed_precision, project_config=ProjectConfiguration(cfg.output_dir))
    rank, world = accelerator.process_index, accelerator.num_processes
    if accelerator.is_main_process:
        os.makedirs(cfg.output_dir, exist_ok=True)
        print(f"train_vae config:\n{format_config(cfg)}", flush=True)
    set_seed(cfg.seed)

    vae = build_vae_model(cfg).train()
    use_disc = cfg.disc_start >= 0
    disc = PatchDiscriminator() if use_disc else None
    perceptual = load_lpips(cfg.lpips_weights) if cfg.lpips_weights else None
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.learning_rate, weight_decay=0.0)
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps * world,
                                 num_training_steps=cfg.max_steps * world)
    if use_disc:
        d_optimizer = torch.optim.AdamW(disc.parameters(), lr=cfg.disc_learning_rate, betas=(0.5, 0.9))
        vae, disc, optimizer, d_optimizer, lr_scheduler = accelerator.prepare(vae, disc, optimizer, d_optimizer,
                                                                              lr_scheduler)
    else:
        vae, optimizer, lr_scheduler = accelerator.prepare(vae, optimizer, lr_scheduler)
    if perceptual is not None:
        perceptual.to(accelerator.device)

    if dataset is None:
        from ldm.data import open_dataset

        dataset = open_dataset(cfg.data, resolution=cfg.resolution, rank=rank, world_size=world, seed=cfg.seed)
        val_data = open_dataset(cfg.data, resolution=cfg.resolution, shuffle=False, seed=cfg.seed)
    else:
        val_data = dataset
    stream = BatchStream(dataset, cfg.batch_size, rank, world, cfg.seed, cfg.num_workers)
    val_pixels = first_samples(val_data, cfg.val_samples)["pixel_values"]

    state = {"step": 0, "data": stream.position()}
    checkpoint = resolve_resume(cfg.resume, cfg.output_dir)
    if checkpoint:
        accelerator.load_state(os.path.join(checkpoint, "accelerate"))
        state = read_state(checkpoint)
        stream.seek(state["data"])

    def write_checkpoint() -> tuple[str, dict]:
        report = evaluate(cfg, accelerator.unwrap_model(vae), val_pixels, stream, accelerator.device, state["step"])
        extra = lambda tmp: _write_vae_folder(tmp, cfg, accelerator.unwrap_model(vae), report)  # noqa: E731
        return save_checkpoint(accelerator, cfg.output_dir, state["step"], {**state, **report}, extra,
                               cfg.checkpoints_total_limit), report

    losses, report, last, batches = {}, {}, checkpoint, iter(stream)
    progress = tqdm(total=cfg.max_steps, initial=state["step"], desc="train_vae",
                    disable=not accelerator.is_local_main_process)
    started, stopped_by = time.time(), None
    with StopRequest() as stop:
        while state["step"] < cfg.max_steps:
            pixels = next(batches)["pixel_values"].to(accelerator.device)
            generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + state["step"] * 4099 + rank)
            with accelerator.accumulate(vae):
                loss, logs, x_rec = vae_loss(cfg, vae, disc, perceptual, pixels, generator, state["step"])
                accelerator.backward(loss)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            if use_disc and state["step"] >= cfg.disc_start:
                with accelerator.accumulate(disc):
                    d_loss = hinge_d_loss(disc(pixels), disc(x_rec.detach()))
                    accelerator.backward(d_loss)
                    d_optimizer.step()
                    d_optimizer.zero_grad(set_to_none=True)
                logs["d_loss"] = d_loss.item()
            state["step"] += 1
            state["data"] = stream.position()
            losses[state["step"]] = logs["rec_loss"]
            progress.update(1)
            progress.set_postfix(rec=f"{logs['rec_loss']:.4f}")
            stopped_by = stop.signal_name or ("max_minutes" if cfg.max_minutes > 0 and
                                              time.time() - started > cfg.max_minutes * 60 else None)
            if state["step"] % cfg.checkpoint_every == 0 or state["step"] == cfg.max_steps or stopped_by:
                last, report = write_checkpoint()
            if stopped_by:
                break
    progress.close()
    vae_dir = os.path.join(last, "vae") if last else None
    return {"step": state["step"], "losses": losses, "vae_dir": vae_dir, **report}


@torch.no_grad()
def evaluate(cfg, vae, val_pixels, stream, device, step) -> dict:
    """Returns {"psnr", "scaling_factor"} and writes a reconstruction grid (top: input, bottom: output)."""
    from PIL import Image

    vae.eval()
    x = val_pixels.to(device)
    x_rec = vae.decode(vae.encode(x).latent_dist.mean).sample
    value = float(psnr(x_rec, x))
    scale_batches = [x]
    if not stream.streaming and len(stream.dataset) > len(x):  # more images give a steadier std
        scale_batches = first_samples(stream.dataset, min(256, len(stream.dataset)))["pixel_values"].split(64)
    scale = latent_scaling_factor(vae, scale_batches, device, torch.Generator().manual_seed(0))
    vae.train()
    to_pil = lambda t: Image.fromarray(  # noqa: E731 - (3,H,W) in [-1,1] -> PIL
        ((t.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy())
    os.makedirs(os.path.join(cfg.output_dir, "samples"), exist_ok=True)
    image_grid([to_pil(t) for t in torch.cat([x, x_rec])], columns=len(x)).save(
        os.path.join(cfg.output_dir, "samples", f"recon-{step:08d}.png"))
    print(f"train_vae step {step}: PSNR {value:.2f} dB, latent scaling factor {scale:.4f}", flush=True)
    return {"psnr": value, "scaling_factor": scale}


def _write_vae_folder(folder: str, cfg, vae, report: dict) -> None:
    vae.register_to_config(scaling_factor=report["scaling_factor"])
    vae.save_pretrained(os.path.join(folder, "vae"), safe_serialization=True)
    save_config(cfg, os.path.join(folder, "config.yaml"))
    with open(os.path.join(folder, "metrics.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
