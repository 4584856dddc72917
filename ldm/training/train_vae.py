"""AutoencoderKL training: the body of train/train_vae.py and `ldm train-vae`.

Loss = reconstruction (L1/L2) + kl_weight * KL [+ lpips_weight * LPIPS] [+ disc_weight * lambda * hinge GAN
after disc_start steps], as in Rombach et al. 2022 (arXiv:2112.10752, Appendix G), per pixel value: the
reconstruction terms are means over pixels and the KL (summed over latent dimensions) is divided by 3 x H x W, so
kl_weight means what the paper's 1e-6 means (CompVis' loss sums both) at any resolution; lambda is the adaptive weight
of Esser et al. 2021 (arXiv:2012.09841, Eq. 7). The discriminator then has its own step on detached
reconstructions. Several processes agree on when to stop (signals.agreed_stop_reason). At every checkpoint the latent
scaling factor (1 / std of latents) is measured and stored in the VAE config; vae/ opens with
AutoencoderKL.from_pretrained. Reconstruction grids and PSNR go to output_dir/samples and the log.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from accelerate.utils import set_seed
from diffusers import AutoencoderKL

from ldm.images import image_grid
from ldm.models.presets import MODEL_PRESETS, build_vae, get_spec
from ldm.models.vae import encode_posterior
from ldm.training.vae_report import reconstruction_report
from ldm.training import loop
from ldm.training.checkpoint import where_written
from ldm.training.config import format_config, save_config
from ldm.ranges import setting
from ldm.training.base_config import TrainingConfig
from ldm.training.optimizers import check_schedule
from ldm.training.lpips import load_lpips
from ldm.training.step import step_generator
from ldm.training.stream import BatchStream
from ldm.training.validation import first_samples
from ldm.training.vae_losses import (PatchDiscriminator, adaptive_disc_weight, hinge_d_loss, hinge_g_loss, kl_loss,
                                     latent_scaling_factor, psnr, reconstruction_loss)


@dataclass
class TrainVAEConfig(TrainingConfig):
    # the shared settings: TrainingConfig (ldm/training/base_config.py); here the VAE's own and its defaults
    model: str = "small"                 # a preset name, or an AutoencoderKL folder to continue
    rec_loss: str = "l1"                 # l1 or l2
    kl_weight: float = setting(1e-6, "[0, 1e3]")  # per pixel value, as in the LDM paper (see the module docstring)
    lpips_weights: str = ""              # LPIPS linear heads file (ldm/training/lpips.py); "" = no perceptual loss
    lpips_vgg_weights: str = ""          # torchvision VGG16 file, LPIPS's trunk; needed with lpips_weights
    allow_pickle: bool = False           # accept pickled .pth/.bin LPIPS files (they can run code when loaded)
    lpips_weight: float = setting(1.0, "[0, 1e3]")
    disc_start: int = setting(-1, "[-1, 1e9]")  # step that switches the patch discriminator on; -1 = never
    disc_weight: float = setting(0.05, "[0, 1e3]")  # times the adaptive weight; taming's 0.5 assumes LPIPS and a
                                                    # trained VAE
    disc_width: int = setting(64, "[4, 4096]")  # the discriminator's first-layer channels (taming: 64); fewer is
                                                # faster
    disc_learning_rate: float = setting(1e-4, "(0, 1]")
    lr_scheduler: str = "constant"       # any diffusers.optimization name (constant, cosine, linear, ...)
    max_grad_norm: float = 0.0           # 0 = no clipping
    max_steps: int = 2000
    output_dir: str = setting("runs/vae", flag="out")  # the run folder (checkpoints, samples)
    log_every: int = setting(50, "[0, 1e9]")  # print the step's losses every this many steps; 0 = never
    val_samples: int = setting(8, "[1, 1e4]", flag="num_validation_images")  # held-out images reconstructed at
                                                                              # each checkpoint
    held_out_psnr: bool = True           # at each checkpoint, PSNR on images no trainer uses: held-out photographs,
                                         # generated dark, saturated, textured art and shapes
                                         # (ldm.training.vae_report.reconstruction_report)
    num_workers: int = setting(0, "[0, 256]")

    def validate(self) -> None:
        super().validate()
        check_schedule(self.optimizer, self.lr_scheduler)
        if self.rec_loss not in ("l1", "l2"):
            raise ValueError(f"rec_loss must be l1 or l2, got {self.rec_loss!r}")
        if self.resolution % 8:
            raise ValueError(f"resolution must be divisible by 8, got {self.resolution}")
        for name, path in (("lpips_weights", self.lpips_weights), ("lpips_vgg_weights", self.lpips_vgg_weights)):
            if path and not os.path.isfile(path):
                raise FileNotFoundError(f"{name} {path} does not exist")
        if bool(self.lpips_weights) != bool(self.lpips_vgg_weights):
            raise ValueError("LPIPS needs both lpips_weights (the linear heads) and lpips_vgg_weights (the VGG16 "
                             "trunk); see ldm/training/lpips.py for the two files and where to get them")


def build_vae_model(cfg: TrainVAEConfig) -> AutoencoderKL:
    if cfg.model in MODEL_PRESETS:
        torch.manual_seed(cfg.seed)
        return build_vae(get_spec(cfg.model))
    if os.path.isdir(cfg.model):
        sub = os.path.join(cfg.model, "vae")
        return AutoencoderKL.from_pretrained(sub if os.path.isdir(sub) else cfg.model, local_files_only=True)
    raise ValueError(f"model {cfg.model!r} is neither a preset ({', '.join(MODEL_PRESETS)}) nor a VAE folder")


class Autoencode(torch.nn.Module):
    """The VAE's training forward as one module call: DDP (several processes) syncs gradients only through
    forward, and AutoencoderKL's forward does not return the posterior the KL term needs."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae

    def forward(self, pixels: torch.Tensor, generator: torch.Generator):
        """Returns (x_rec, posterior mean, posterior logvar), x_rec decoded from z ~ q(z|x) drawn with `generator`."""
        posterior = self.vae.encode(pixels).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator).to(pixels)
        return self.vae.decode(z).sample, posterior.mean, posterior.logvar


def vae_loss(cfg, autoencode, pixels, generator, perceptual=None, disc=None, last_layer=None):
    """Returns (loss, logs, x_rec). The loss's gradient w.r.t. the VAE is that of
    L_rec + kl_weight * KL / (3HW) [+ disc_weight * lambda * L_GAN], L_rec = rec [+ lpips_weight * LPIPS]:
    the LDM paper's sum over pixel values, divided by their number (a mean pixel error, whatever the resolution).

    disc: the discriminator module (unwrapped) while it is on, else None; last_layer: the decoder's last weight.
    The discriminator never receives gradients here: the adversarial term enters only through dL_GAN/dx_rec.
    """
    x_rec, mean, logvar = autoencode(pixels, generator)  # (B, 3, H, W), (B, 4, h, w), (B, 4, h, w)
    rec = reconstruction_loss(x_rec, pixels, cfg.rec_loss)
    kl = kl_loss(mean, logvar)  # summed over latent dims
    kl_term = cfg.kl_weight * kl / pixels[0].numel()
    logs = {"rec_loss": rec.item(), "kl": kl.item()}
    nll = rec
    if perceptual is not None:
        p = perceptual(x_rec, pixels).mean()
        nll, logs["lpips"] = nll + cfg.lpips_weight * p, p.item()
    if disc is None:
        return nll + kl_term, logs, x_rec
    g = hinge_g_loss(disc(x_rec))
    # Each term's gradient w.r.t. x_rec, taken once: the discriminator and LPIPS run backward once per step, and
    # no gradient reaches the discriminator's weights (only x_rec is asked for).
    nll_x, = torch.autograd.grad(nll, x_rec)  # (B, 3, H, W)
    g_x, = torch.autograd.grad(g, x_rec)      # (B, 3, H, W)
    # Their gradients at the decoder's last layer (chain rule through x_rec) give the adaptive weight
    nll_last, g_last = (torch.autograd.grad(x_rec, last_layer, grad, retain_graph=True)[0] for grad in (nll_x, g_x))
    weight = cfg.disc_weight * adaptive_disc_weight(nll_last, g_last)
    logs.update(g_loss=g.item(), disc_weight=weight.item())
    # d/dtheta [x_rec . (nll_x + weight * g_x)] = d/dtheta [L_rec + weight * L_GAN]: the same gradient
    loss = (x_rec * (nll_x + weight * g_x)).sum() + kl_term
    return loss, logs, x_rec


def discriminator_loss(disc, pixels: torch.Tensor, x_rec: torch.Tensor) -> torch.Tensor:
    """Returns the discriminator's hinge loss on real pixels and detached reconstructions (one forward for both)."""
    logits_real, logits_fake = disc(torch.cat([pixels, x_rec.detach()])).chunk(2)  # (B, 1, h', w') each
    return hinge_d_loss(logits_real, logits_fake)


class VAETrainer(loop.Trainer):
    """`ldm train-vae`'s part of the loop: the VAE loss (and the discriminator's update once it is on), and the
    VAE folder with its PSNR and latent scaling factor in each checkpoint."""

    def __init__(self, cfg: TrainVAEConfig, accelerator, stream, val_pixels, perceptual=None, disc=None,
                 d_optimizer=None):
        self.cfg, self.accelerator, self.stream, self.batches = cfg, accelerator, stream, iter(stream)
        self.val_pixels, self.perceptual, self.disc, self.d_optimizer = val_pixels, perceptual, disc, d_optimizer
        self.report: dict = {}

    @property
    def vae(self) -> AutoencoderKL:
        return self.accelerator.unwrap_model(self.model).vae

    def disc_on(self, step: int) -> bool:
        return self.disc is not None and step >= self.cfg.disc_start

    def micro_loss(self, step: int, micro: int):
        pixels = next(self.batches)["pixel_values"].to(self.accelerator.device)
        generator = step_generator(self.cfg.seed, step, micro, self.accelerator.process_index)
        disc = self.accelerator.unwrap_model(self.disc) if self.disc_on(step) else None
        last_layer = self.vae.decoder.conv_out.weight  # where the adaptive weight compares gradients (Esser et al.)
        loss, logs, x_rec = vae_loss(self.cfg, self.model, pixels, generator, self.perceptual, disc, last_layer)
        if disc is not None:  # its gradients accumulate over the micro-batches; after_update steps it
            d_loss = discriminator_loss(self.disc, pixels, x_rec)
            self.accelerator.backward(d_loss)
            logs["d_loss"] = d_loss.item()
        return loss, {"loss": logs["rec_loss"], **logs}  # reported: the reconstruction loss

    def after_update(self, state: dict) -> None:
        if self.disc_on(state["step"]):
            if state["nonfinite_in_a_row"] == 0:
                self.d_optimizer.step()
            self.d_optimizer.zero_grad(set_to_none=True)

    def write_extra(self, folder: str, state: dict) -> None:
        self.report = evaluate(self.cfg, self.vae, self.val_pixels, self.stream, self.accelerator.device,
                               state["step"])
        _write_vae_folder(folder, self.cfg, self.vae, self.report)

    def data_position(self):
        return self.stream.position()

    def seek(self, position) -> None:
        self.stream.seek(position)


def setup(cfg: TrainVAEConfig, accelerator, dataset=None) -> VAETrainer:
    """Builds the VAE (and discriminator and LPIPS when asked), optimisers and data; returns the prepared trainer."""
    rank, world = accelerator.process_index, accelerator.num_processes
    vae = Autoencode(build_vae_model(cfg).train())
    disc = PatchDiscriminator(width=cfg.disc_width) if cfg.disc_start >= 0 else None
    perceptual = (load_lpips(cfg.lpips_weights, cfg.lpips_vgg_weights, cfg.allow_pickle)
                  if cfg.lpips_weights or cfg.lpips_vgg_weights else None)
    vae.to(accelerator.device)  # before the optimiser: the fused kernel checks the device
    optimizer = loop.make_optimizer(list(vae.parameters()), cfg.learning_rate, accelerator.device, kind=cfg.optimizer,
                                    warmup_steps=cfg.lr_warmup_steps, d_coef=cfg.prodigy_d_coef)
    lr_scheduler = loop.make_lr_scheduler(cfg.lr_scheduler, optimizer, cfg.lr_warmup_steps, cfg.max_steps, world)
    d_optimizer = None
    if disc is not None:
        disc.to(accelerator.device)
        d_optimizer = loop.make_optimizer(list(disc.parameters()), cfg.disc_learning_rate, accelerator.device,
                                          betas=(0.5, 0.9))
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
    trainer = VAETrainer(cfg, accelerator, stream, first_samples(val_data, cfg.val_samples)["pixel_values"],
                         perceptual, disc, d_optimizer)
    trainer.model, trainer.params = vae, list(vae.parameters())
    trainer.optimizer, trainer.lr_scheduler = optimizer, lr_scheduler
    return trainer


def main(cfg: TrainVAEConfig, dataset=None) -> dict:
    """Trains the VAE; returns {"step", "psnr", "scaling_factor", "vae_dir", "losses", "stopped_by",
    "nonfinite_total"}."""
    accelerator = loop.make_accelerator(cfg, cfg.output_dir)
    if accelerator.is_main_process:
        os.makedirs(cfg.output_dir, exist_ok=True)
        print(f"train_vae config:\n{format_config(cfg)}", flush=True)
    set_seed(cfg.seed)
    trainer = setup(cfg, accelerator, dataset)
    result = loop.train(accelerator, trainer, loop.LoopSettings.from_config(cfg, name="train_vae", print_logs=True))
    last = result["checkpoint"]
    report = trainer.report or (_read_metrics(last) if last else {})
    losses = {step: loss for step, loss in result["losses"].items()}
    accelerator.print(where_written("train_vae", "VAE folder (ldm train --vae PATH)",
                                    os.path.join(last, "vae") if last else None, cfg.output_dir))
    return {"step": result["step"], "losses": losses, "vae_dir": os.path.join(last, "vae") if last else None,
            "stopped_by": result["stopped_by"], "nonfinite_total": result["nonfinite_total"], **report}


def _read_metrics(checkpoint: str) -> dict:
    path = os.path.join(checkpoint, "metrics.json")
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@torch.no_grad()
def evaluate(cfg, vae, val_pixels, stream, device, step) -> dict:
    """Returns {"psnr", "scaling_factor"} and writes a reconstruction grid (top: input, bottom: output)."""
    from PIL import Image

    vae.eval()
    x = val_pixels.to(device)
    x_rec = vae.decode(encode_posterior(vae, x)[0]).sample
    value = float(psnr(x_rec, x))
    scale_batches = [x]
    if not stream.streaming and len(stream.dataset) > len(x):  # more images give a steadier std
        scale_batches = first_samples(stream.dataset, min(256, len(stream.dataset)))["pixel_values"].split(64)
    scale = latent_scaling_factor(vae, scale_batches, device, torch.Generator().manual_seed(0))
    vae.train()
    to_pil = lambda t: Image.fromarray(  # noqa: E731 - (3,H,W) in [-1,1] -> PIL
        ((t.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy())
    os.makedirs(os.path.join(cfg.output_dir, "samples"), exist_ok=True)
    image_grid([to_pil(t) for t in torch.cat([x, x_rec])], len(x)).save(
        os.path.join(cfg.output_dir, "samples", f"recon-{step:08d}.png"))
    print(f"train_vae step {step}: PSNR {value:.2f} dB, latent scaling factor {scale:.4f}", flush=True)
    report = {"psnr": value, "scaling_factor": scale}
    if cfg.held_out_psnr:
        report["held_out_psnr"] = reconstruction_report(vae, cfg.resolution)
        vae.train()
        print(f"train_vae step {step}: held-out PSNR (dB) " + ", ".join(
            f"{name} {v:.2f}" for name, v in report["held_out_psnr"].items()), flush=True)
    return report


def _write_vae_folder(folder: str, cfg, vae, report: dict) -> None:
    vae.register_to_config(scaling_factor=report["scaling_factor"])
    vae.save_pretrained(os.path.join(folder, "vae"), safe_serialization=True)
    save_config(cfg, os.path.join(folder, "config.yaml"))
    with open(os.path.join(folder, "metrics.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
