"""VAE training with and without the patch discriminator: held-out PSNR after the same steps, and step time.

1. Trains the VAE twice with train_vae.main, the same seed, data and steps: discriminator off, and on from
   --disc-start (adaptive weight, Esser et al. 2021). Scores each on held-out shapes images (another seed,
   never trained on): PSNR of the posterior-mean reconstruction.
2. Times training steps on one batch, alternating: discriminator off, on (ours), and on the way taming's
   LPIPSWithDiscriminator does it (the adaptive weight from autograd.grad at the last layer with retain_graph,
   then a full backward through the discriminator; the discriminator run twice in its own step), and the loop
   before this fix (`before_step`). Median s/step.
3. Times the parts of our step with the discriminator on.
Last lines: `psnr_off`, `psnr_on`, `ratio_step_on_off`, `ratio_step_before_off`, `ratio_step_taming_on`, one
`name: value` each.

    python benchmarks/bench_vae_gan.py --preset small --resolution 32 --steps 300 --disc-start 50 --disc-weight 0.05
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from ldm.models.presets import build_vae, get_spec  # noqa: E402
from ldm.models.vae import encode_posterior  # noqa: E402
from ldm.training import train_vae  # noqa: E402
from ldm.training.train_vae import Autoencode, TrainVAEConfig, discriminator_loss, vae_loss  # noqa: E402
from ldm.training.vae_losses import (PatchDiscriminator, adaptive_disc_weight, hinge_d_loss, hinge_g_loss,  # noqa: E402
                                     kl_loss, psnr, reconstruction_loss)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--train-images", type=int, default=2000)
    p.add_argument("--held-out", type=int, default=64, help="held-out images (shapes seed 1; training uses seed 0)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=300, help="training steps of each run")
    p.add_argument("--disc-start", type=int, default=50)
    p.add_argument("--disc-weight", type=float, default=0.05, help="multiplies the adaptive weight")
    p.add_argument("--disc-width", type=int, default=64, help="the discriminator's first-layer channels")
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--timing-rounds", type=int, default=10, help="timed steps per variant (alternating)")
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args(argv)


def held_out_pixels(args) -> torch.Tensor:
    from ldm.data import open_dataset
    from ldm.training.validation import first_samples

    data = open_dataset(f"shapes:{args.held_out}@{args.resolution}", resolution=args.resolution, shuffle=False, seed=1)
    return first_samples(data, args.held_out)["pixel_values"]  # (N, 3, R, R) in [-1, 1]


def train_and_score(args, disc_start: int, held_out: torch.Tensor, folder: str) -> float:
    """Returns the held-out PSNR (dB) of a VAE trained by train_vae.main."""
    from diffusers import AutoencoderKL

    cfg = TrainVAEConfig(model=args.preset, data=f"shapes:{args.train_images}@{args.resolution}",
                         resolution=args.resolution, batch_size=args.batch_size, max_steps=args.steps,
                         learning_rate=args.learning_rate, disc_start=disc_start, disc_weight=args.disc_weight,
                         disc_width=args.disc_width, output_dir=folder,
                         checkpoint_every=0, checkpoints_total_limit=1, val_samples=4,
                         kl_weight=1e-6 * 3 * args.resolution ** 2)  # the KL of BENCHMARKS.md's figures
                                                                      # (before kl_weight was per pixel value)
    cfg.validate()
    vae = AutoencoderKL.from_pretrained(train_vae.main(cfg)["vae_dir"]).eval()
    mean, _ = encode_posterior(vae, held_out)  # (N, 4, h, w)
    with torch.no_grad():
        return float(psnr(vae.decode(mean).sample, held_out))


def taming_step(cfg, vae, disc, optimizer, d_optimizer, pixels, generator):
    """The reference: taming-transformers' LPIPSWithDiscriminator (without LPIPS) and its two optimiser passes."""
    x_rec, mean, logvar = vae(pixels, generator)
    nll = reconstruction_loss(x_rec, pixels, cfg.rec_loss)
    g = hinge_g_loss(disc(x_rec))
    last = vae.vae.decoder.conv_out.weight
    nll_grad, = torch.autograd.grad(nll, last, retain_graph=True)
    g_grad, = torch.autograd.grad(g, last, retain_graph=True)
    loss = nll + cfg.kl_weight * kl_loss(mean, logvar) + cfg.disc_weight * adaptive_disc_weight(nll_grad, g_grad) * g
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    d_optimizer.zero_grad(set_to_none=True)  # drop the generator pass's gradients, as taming's second pass starts
    d_loss = hinge_d_loss(disc(pixels), disc(x_rec.detach()))
    d_loss.backward()
    d_optimizer.step()
    d_optimizer.zero_grad(set_to_none=True)


def before_step(cfg, vae, disc, optimizer, d_optimizer, pixels, generator):
    """The loop before the fix: a fixed GAN weight, the generator's backward through the discriminator's weights
    (their gradients then added to the discriminator's own), and the discriminator run twice in its step."""
    x_rec, mean, logvar = vae(pixels, generator)
    loss = (reconstruction_loss(x_rec, pixels, cfg.rec_loss) + cfg.kl_weight * kl_loss(mean, logvar)
            + cfg.disc_weight * hinge_g_loss(disc(x_rec)))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    d_loss = hinge_d_loss(disc(pixels), disc(x_rec.detach()))
    d_loss.backward()
    d_optimizer.step()
    d_optimizer.zero_grad(set_to_none=True)


def time_steps(args) -> dict:
    """Returns the median seconds per step of each variant, and of the parts of ours with the discriminator."""
    from accelerate import Accelerator

    cfg = TrainVAEConfig(disc_start=0)
    accelerator = Accelerator()  # the device train_vae.main used
    torch.manual_seed(0)
    vae = Autoencode(build_vae(get_spec(args.preset))).to(accelerator.device)
    disc = PatchDiscriminator(width=args.disc_width).to(accelerator.device)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-4)
    d_optimizer = torch.optim.AdamW(disc.parameters(), lr=1e-4, betas=(0.5, 0.9))
    last = vae.vae.decoder.conv_out.weight
    pixels = held_out_pixels(args)[: args.batch_size].to(accelerator.device)
    parts = {k: [] for k in ("forward_and_gan_grads", "vae_backward", "disc_step")}
    sync = torch.cuda.synchronize if accelerator.device.type == "cuda" else (lambda: None)

    def ours(disc_on: bool):
        t0 = time.perf_counter()
        loss, _, x_rec = vae_loss(cfg, vae, pixels, torch.Generator().manual_seed(0), disc=disc if disc_on else None,
                                  last_layer=last)
        t1 = time.perf_counter()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        t2 = time.perf_counter()
        if disc_on:
            discriminator_loss(disc, pixels, x_rec).backward()
            d_optimizer.step()
            d_optimizer.zero_grad(set_to_none=True)
            parts["forward_and_gan_grads"].append(t1 - t0)
            parts["vae_backward"].append(t2 - t1)
            parts["disc_step"].append(time.perf_counter() - t2)

    variants = {"off": lambda: ours(False), "on": lambda: ours(True),
                "taming": lambda: taming_step(cfg, vae, disc, optimizer, d_optimizer, pixels, torch.Generator()),
                "before": lambda: before_step(cfg, vae, disc, optimizer, d_optimizer, pixels, torch.Generator())}
    times = {name: [] for name in variants}
    for round_ in range(args.timing_rounds + 2):  # 2 warm-up rounds
        for name, step in variants.items():
            t0 = time.perf_counter()
            step()
            sync()
            if round_ >= 2:
                times[name].append(time.perf_counter() - t0)
    return {**{k: statistics.median(v) for k, v in times.items()},
            **{f"part_{k}": statistics.median(v[2:]) for k, v in parts.items()}}


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    held_out = held_out_pixels(args)
    scores = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, disc_start in (("off", -1), ("on", args.disc_start)):
            t0 = time.perf_counter()
            scores[name] = train_and_score(args, disc_start, held_out, os.path.join(tmp, name))
            print(f"discriminator {name}: held-out PSNR {scores[name]:.2f} dB after {args.steps} steps "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    timing = time_steps(args)
    print(f"{args.preset} {args.resolution}px batch {args.batch_size}, {torch.get_num_threads()} thread(s), "
          f"load {os.getloadavg()[0]:.1f}")
    for name, seconds in timing.items():
        print(f"  {name}: {seconds * 1000:.1f} ms")
    print(f"psnr_off: {scores['off']:.3f}")
    print(f"psnr_on: {scores['on']:.3f}")
    print(f"ratio_step_on_off: {timing['on'] / timing['off']:.3f}")
    print(f"ratio_step_before_off: {timing['before'] / timing['off']:.3f}")
    print(f"ratio_step_taming_on: {timing['taming'] / timing['on']:.3f}")


if __name__ == "__main__":
    main()
