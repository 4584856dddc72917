"""Training throughput: our train step (ldm.training.loop.accumulated_step over train_ldm's LDMTrainer, as `ldm train`
runs it) against a
minimal reference loop with the same model, batch and precision (the loop of diffusers' train_text_to_image,
written plainly below), with and without the latent cache, and with gradient checkpointing off and on.

Steps alternate between the variants in one process; each figure is the median images/s after warm-up.
The ratios are printed last, one `ratio_<what>_<preset>: X` line each.

    python benchmarks/bench_train.py --preset tiny small --resolution 64
    python benchmarks/bench_train.py --preset sd15 --resolution 512 --device cuda --mixed-precision bf16 \
        --batch-size 32 --compile --channels-last                                                         # GPU
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time

import torch
import torch.nn.functional as F


VARIANTS = ("ours", "reference", "ours_cached", "reference_cached", "checkpointing")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", nargs="+", default=["tiny", "small"])
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant (alternating)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"])
    p.add_argument("--compile", action="store_true", help="torch.compile the (shared) UNet, as `ldm train --compile`")
    p.add_argument("--channels-last", action="store_true", help="UNet and latents in channels_last, as `ldm train`")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                   help="which loops to time (e.g. `ours ours_cached` alone for the cache speed-up of a model whose "
                        "two optimisers' states would not fit in memory; the reference's never allocate then)")
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class Bench:
    """One preset's models, a fixed batch (pixels and their cached posteriors), and the two train steps."""

    def __init__(self, preset: str, args):
        from accelerate import Accelerator

        from ldm.data.shapes import ShapesDataset
        from ldm.data.transforms import to_tensor
        from ldm.models.presets import build_components
        from ldm.models.vae import encode_posterior
        from ldm.training.ldm_config import TrainLDMConfig
        from ldm.objectives import NoiseSchedule, ObjectiveSettings, make_objective
        from ldm.training import loop
        from ldm.training.step import TextEmbedder
        from ldm.training.train_ldm import LDMTrainer

        self.args, self.device = args, torch.device(args.device)
        parts = build_components(preset, seed=0)
        self.unet, self.vae, self.text_encoder, self.tokenizer = (parts[k] for k in
                                                                  ("unet", "vae", "text_encoder", "tokenizer"))
        self.cfg = TrainLDMConfig(model=preset, resolution=args.resolution, batch_size=args.batch_size,
                                  learning_rate=1e-4, lr_warmup_steps=0, mixed_precision=args.mixed_precision,
                                  use_ema=False, report_to="none", compile=args.compile,
                                  channels_last=args.channels_last)
        self.accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=self.device.type == "cpu")
        self.vae.requires_grad_(False).eval().to(self.device)
        self.text_encoder.requires_grad_(False).eval().to(self.device)
        self.unet.train().to(self.device)
        if args.channels_last:
            self.unet.to(memory_format=torch.channels_last)
        # Each loop with its own optimiser over the same UNet: ours as `ldm train` makes it (fused AdamW), the
        # reference as diffusers' script does (torch.optim.AdamW with its defaults).
        cfg = self.cfg
        self.optimizer = loop.make_optimizer(list(self.unet.parameters()), cfg.learning_rate, self.device,
                                             (cfg.adam_beta1, cfg.adam_beta2), cfg.weight_decay, cfg.adam_epsilon)
        self.ref_optimizer = torch.optim.AdamW(self.unet.parameters(), lr=1e-4)
        if args.compile:  # in place, as train_ldm does: both loops call the same compiled module
            self.unet.compile()
        self.unet, self.optimizer, self.ref_optimizer = self.accelerator.prepare(self.unet, self.optimizer,
                                                                                 self.ref_optimizer)
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda _: 1.0)
        objective = make_objective(cfg.prediction_type, NoiseSchedule.from_config(cfg), ObjectiveSettings.from_config(cfg))
        self.schedule = objective.schedule
        self.embed = TextEmbedder(self.text_encoder, self.tokenizer)
        self.trainer = LDMTrainer(cfg, self.accelerator, parts, objective, self.embed, stream=[])
        self.trainer.model, self.trainer.params = self.unet, list(self.unet.parameters())
        self.trainer.optimizer, self.trainer.lr_scheduler = self.optimizer, self.lr_scheduler
        self.settings = loop.LoopSettings(output_dir="", max_steps=0, max_grad_norm=cfg.max_grad_norm)
        shapes = ShapesDataset(args.batch_size, resolution=args.resolution, seed=0)
        items = [shapes[i] for i in range(args.batch_size)]
        self.pixels = torch.stack([to_tensor(s["image"]) for s in items])  # (B, 3, R, R)
        self.captions = [s["caption"] for s in items]
        mean, logvar = encode_posterior(self.vae, self.pixels)  # (B, 4, h, w) each: what the latent cache holds
        self.cached = {"latent_mean": mean.cpu(), "latent_logvar": logvar.cpu(), "caption": self.captions}
        self.state = {"step": 1, "nonfinite_in_a_row": 0, "nonfinite_total": 0}

    def ours(self, cached: bool) -> None:
        from ldm.training import loop

        batch = self.cached if cached else {"pixel_values": self.pixels, "caption": self.captions}
        self.trainer.batches = iter([batch])
        loop.accumulated_step(self.accelerator, self.trainer, self.settings, self.state)
        self.state["step"] += 1

    def reference(self, cached: bool) -> None:
        """diffusers train_text_to_image's inner loop, plainly: encode, noise, predict, MSE, step."""
        device, T = self.device, self.schedule.num_train_timesteps
        # diffusers' script casts the frozen VAE and text encoder to the mixed-precision dtype; autocast does the same
        with torch.no_grad(), self.accelerator.autocast():
            if cached:
                mean, logvar = self.cached["latent_mean"].to(device), self.cached["latent_logvar"].to(device)
                latents = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
            else:
                latents = self.vae.encode(self.pixels.to(device)).latent_dist.sample()
            latents = latents.float() * self.vae.config.scaling_factor  # float32 into the UNet, as ours (one compile)
            ids = self.tokenizer(self.captions, padding="max_length", max_length=self.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids.to(device)
            context = self.text_encoder(ids)[0]
        noise = torch.randn_like(latents)
        t = torch.randint(0, T, (latents.shape[0],), device=device)
        alpha_bar = self.schedule.alpha_bar.to(device, torch.float32)[t].view(-1, 1, 1, 1)
        noisy = alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise
        if self.args.channels_last:
            noisy = noisy.contiguous(memory_format=torch.channels_last)
        with self.accelerator.autocast():
            pred = self.unet(noisy, t, encoder_hidden_states=context).sample
        loss = F.mse_loss(pred.float(), noise.float())
        self.accelerator.backward(loss)
        self.accelerator.clip_grad_norm_(self.unet.parameters(), 1.0)
        self.ref_optimizer.step()
        self.ref_optimizer.zero_grad(set_to_none=True)
        loss.item()  # the reference logs its loss every step too

    def images_per_s(self, variants: dict) -> dict:
        """Runs the variants in turn for warmup + steps rounds; returns median images/s and peak memory of each."""
        times = {name: [] for name in variants}
        peak = {}
        for i in range(self.args.warmup + self.args.steps):
            # who goes first swaps every round (ABBA), so drifts in machine load hit every variant alike
            for name, fn in (list(variants.items()) if i % 2 == 0 else list(variants.items())[::-1]):
                if self.device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                sync(self.device)
                start = time.perf_counter()
                fn()
                sync(self.device)
                if i >= self.args.warmup:
                    times[name].append(time.perf_counter() - start)
                if self.device.type == "cuda":
                    peak[name] = max(peak.get(name, 0), torch.cuda.max_memory_allocated() / 2**30)
        return {name: {"images_per_s": self.args.batch_size / statistics.median(t), "peak_gib": peak.get(name)}
                for name, t in times.items()}


def bench_preset(preset: str, args) -> dict:
    bench = Bench(preset, args)
    loops = {"ours": lambda: bench.ours(False), "reference": lambda: bench.reference(False),
             "ours_cached": lambda: bench.ours(True), "reference_cached": lambda: bench.reference(True)}
    results = bench.images_per_s({k: v for k, v in loops.items() if k in args.variants})
    if "checkpointing" in args.variants:
        bench.accelerator.unwrap_model(bench.unet).enable_gradient_checkpointing()
        pair = {"ours": loops["ours_cached"], "reference": loops["reference_cached"]}
        results.update({f"{k}_checkpointing": v for k, v in bench.images_per_s(
            {k: v for k, v in pair.items() if k in args.variants}).items()})
    rate = {k: v["images_per_s"] for k, v in results.items()}
    wanted = {"ours_over_reference": ("ours", "reference"),
              "ours_over_reference_cached": ("ours_cached", "reference_cached"),
              "cache_speedup": ("ours_cached", "ours"),
              "checkpointing_cost": ("ours_checkpointing", "ours_cached")}
    ratios = {name: rate[a] / rate[b] for name, (a, b) in wanted.items() if a in rate and b in rate}
    return {"preset": preset, "results": results, "ratios": ratios}


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.manual_seed(0)
    out = []
    for preset in args.preset:
        r = bench_preset(preset, args)
        out.append(r)
        print(f"\n== {preset} @ {args.resolution} px, batch {args.batch_size}, {args.device}, "
              f"mixed precision {args.mixed_precision}, median of {args.steps} alternating steps")
        print(f"{'variant':34s}{'images/s':>10s}{'peak GiB':>10s}")
        for name, v in r["results"].items():
            peak = f"{v['peak_gib']:.2f}" if v["peak_gib"] is not None else "-"
            print(f"{name:34s}{v['images_per_s']:10.2f}{peak:>10s}")
    rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"\npeak resident memory of this process: {rss_gib:.2f} GiB")
    if args.json:
        meta = {"machine": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                "date": time.strftime("%Y-%m-%d"), "args": vars(args), "peak_rss_gib": rss_gib}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": out}, f, indent=2)
    print()
    for r in out:  # last lines: machine-readable ratios
        for k, v in r["ratios"].items():
            print(f"ratio_{k}_{r['preset']}: {v:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
