"""`ldm demo`: a text-to-image model trained from nothing on the embedded shapes data, then graded.

Steps: 1. render the shapes data set; 2. train the VAE (train_vae.main); 3. encode every image once to its
posterior (an in-memory latent cache); 4. train the LDM on the cached latents with cached text embeddings
(train_ldm.main); 5. sample a fixed list of single-shape prompts with DDPM, DDIM and LMS at guidance 1 and at
the default guidance, grade them with ldm.evaluation.adherence and write grids, report.json and a loss curve.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, replace

import torch

from ldm.training.config import check_ranges
from ldm.training.ldm_config import TrainLDMConfig
from ldm.training.train_vae import TrainVAEConfig

SAMPLERS = ("ddpm", "ddim", "lms")
FLOW_SAMPLERS = ("euler", "heun")


@dataclass
class DemoConfig:
    out: str = "runs/demo"
    minutes: float = 15.0            # the whole run's budget: training phases get fixed shares of it
    device: str = "cpu"
    model: str = "small"             # a preset: small (UNet), dit-small (DiT), pixart-small, or any in ldm.presets
    resolution: int = 32
    num_samples: int = 4000
    two_shape_fraction: float = 0.1  # mostly single shapes: the scenes the demo prompts for
    canonical_captions: bool = True  # single shapes captioned in the prompts' wording ("a red circle on the left")
    vae_steps: int = 700             # with the L2 loss and cosine decay below: enough for the grader to read
                                     # the reconstructions' colours (README, Demo)
    vae_batch_size: int = 16
    vae_learning_rate: float = 3e-3
    vae_lr_scheduler: str = "cosine" # a constant rate ends noisier and shifts colours (README, Demo)
    vae_rec_loss: str = "l2"         # L1 shifted colours and rounded squares (README, Demo)
    vae_dark_fraction: float = 0.0   # > 0: also train the VAE on this share of the scenes on a dark background,
                                     # so that a LoRA can later teach the model a dark style (the LDM sees none)
    ldm_steps: int = 2200            # fits the LDM's share of `minutes` on a 2-core CPU (README, Demo); the
                                     # share is a cap, so a slower machine stops early rather than overrunning
    ldm_batch_size: int = 32
    ldm_learning_rate: float = 2e-3
    train_text_encoder: bool = False # frozen random CLIP (token std 1, see presets.small), embeddings cached
    timestep_sampling: str = "uniform"  # or logit_normal (the two compared: README, Train), mode, cosmap
    prediction_type: str = "epsilon"    # the LDM's objective: epsilon, v_prediction, sample or flow (flow matching,
                                        # sampled and graded with euler and heun instead of ddpm, ddim and lms)
    zero_terminal_snr: bool = False     # with v_prediction (Lin et al. 2023)
    guidance: float = 4.0
    sample_steps: int = 50
    num_prompts: int = 90            # every colour x shape x position once
    threads: int = 0                 # torch CPU threads; 0 = half the cores (a busy machine punishes more)
    resume: bool = False             # continue OUT's VAE and LDM runs from their last checkpoints: after Ctrl-C,
                                     # SIGTERM or max minutes, or with more vae_steps / ldm_steps than before
    seed: int = 0

    # Allowed values of every int/float field (ldm.training.config.check_ranges).
    RANGES = {
        "minutes": "(0, 1e5]", "resolution": "[8, 1024]", "num_samples": "[1, 1e7]", "two_shape_fraction": "[0, 1]",
        "vae_steps": "[1, 1e7]", "vae_batch_size": "[1, 4096]", "vae_learning_rate": "(0, 1]",
        "vae_dark_fraction": "[0, 1]", "ldm_steps": "[1, 1e7]", "ldm_batch_size": "[1, 4096]",
        "ldm_learning_rate": "(0, 1]", "guidance": "[0, 100]", "sample_steps": "[1, 1000]", "num_prompts": "[1, 90]",
        "threads": "[0, 1024]", "seed": "[0, 4294967295]",
    }

    def validate(self) -> None:
        """Raises ValueError naming the first bad setting."""
        check_ranges(self)
        if self.resolution % 8:
            raise ValueError(f"resolution must be divisible by 8, got {self.resolution}")
        vae_config(self).validate()  # the two phases' own checks (objective combinations, ...), before any work
        ldm_config(self, "").validate()

    def budget(self) -> tuple[float, float]:
        """Returns (VAE minutes, LDM minutes): the time caps that keep the demo inside `minutes`."""
        return 0.12 * self.minutes, 0.66 * self.minutes


def canonical_prompt(colour: str, shape: str, position: str) -> str:
    """Returns the demo's wording of a single-shape scene: "a red circle on the left"."""
    from ldm.data.shapes import POSITION_PHRASES

    article = "an" if colour[0] in "aeiou" else "a"
    return f"{article} {colour} {shape} {POSITION_PHRASES[position][0]}"


def eval_prompts(count: int) -> list[str]:
    """Returns `count` (<= 90) distinct single-shape prompts in the canonical wording, balanced over colour and
    position; 90 is every combination of 6 colours x 3 shapes x 5 positions."""
    from ldm.data.shapes import COLOURS, POSITIONS, SHAPES

    if not 1 <= count <= 90:
        raise ValueError(f"num_prompts must be 1 to 90 (6 colours x 3 shapes x 5 positions), got {count}")
    colours = list(COLOURS)
    # (i % 6, i % 5) is unique for i < 30 (Chinese remainder theorem); each block of 30 shifts the shapes by one
    return [canonical_prompt(colours[i % 6], SHAPES[((i % 30) // 6 + i // 30) % 3], POSITIONS[i % 5])
            for i in range(count)]


class PixelDataset(torch.utils.data.Dataset):
    """Map-style {"pixel_values": (3,R,R) in [-1,1], "caption": str} over the rendered shapes, in memory."""

    def __init__(self, num_samples: int, resolution: int, seed: int, two_shape_fraction: float = 0.25,
                 canonical_captions: bool = False):
        from ldm.data import ShapesDataset
        from ldm.data.transforms import to_tensor

        shapes = ShapesDataset(num_samples, resolution=resolution, seed=seed, two_shape_fraction=two_shape_fraction)
        samples = [shapes[i] for i in range(num_samples)]
        self.pixels = torch.stack([to_tensor(s["image"]) for s in samples])  # (N, 3, R, R)
        self.captions = [s["caption"] for s in samples]
        if canonical_captions:  # one wording per single-shape scene: the model learns the prompts' words faster
            for i in range(num_samples):
                objects = shapes.scene(i)[0]
                if len(objects) == 1:
                    self.captions[i] = canonical_prompt(objects[0].colour, objects[0].shape, objects[0].position)

    @classmethod
    def from_tensors(cls, pixels: torch.Tensor, captions: list[str]) -> "PixelDataset":
        dataset = cls.__new__(cls)
        dataset.pixels, dataset.captions = pixels, captions
        return dataset

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": self.pixels[i], "caption": self.captions[i]}


def with_dark_scenes(pixels: PixelDataset, cfg: "DemoConfig") -> torch.utils.data.Dataset:
    """Returns `pixels` plus the first vae_dark_fraction of its scenes drawn again on a dark background."""
    from ldm.data import ShapesDataset
    from ldm.data.shapes import render_scene
    from ldm.data.transforms import to_tensor

    shapes = ShapesDataset(cfg.num_samples, resolution=cfg.resolution, seed=cfg.seed,
                           two_shape_fraction=cfg.two_shape_fraction)
    count = round(cfg.vae_dark_fraction * len(pixels))
    dark = torch.stack([to_tensor(render_scene(shapes.scene(i)[0], cfg.resolution, DARK)) for i in range(count)])
    return PixelDataset.from_tensors(torch.cat([pixels.pixels, dark]), pixels.captions + [""] * count)


DARK = (22, 22, 30)


class LatentDataset(torch.utils.data.Dataset):
    """Map-style {"latent_mean", "latent_logvar": (4,h,w) on the CPU, "caption"}: every image encoded once, on
    the VAE's device, in chunks of batch_size."""

    def __init__(self, pixels: PixelDataset, vae, batch_size: int = 256):
        from ldm.models.vae import encode_posterior

        mean, logvar = encode_posterior(vae.eval(), pixels.pixels, batch_size)  # (N, 4, h, w) each
        self.mean, self.logvar, self.captions = mean.cpu(), logvar.cpu(), pixels.captions

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int) -> dict:
        return {"latent_mean": self.mean[i], "latent_logvar": self.logvar[i], "caption": self.captions[i]}


def vae_config(cfg: DemoConfig) -> TrainVAEConfig:
    return TrainVAEConfig(model=cfg.model, resolution=cfg.resolution, rec_loss=cfg.vae_rec_loss, kl_weight=1e-6,
                          learning_rate=cfg.vae_learning_rate, lr_scheduler=cfg.vae_lr_scheduler, lr_warmup_steps=50,
                          batch_size=cfg.vae_batch_size, max_steps=cfg.vae_steps,
                          max_minutes=cfg.budget()[0], output_dir=os.path.join(cfg.out, "vae_run"),
                          checkpoint_every=0, checkpoints_total_limit=1, resume="latest" if cfg.resume else "",
                          seed=cfg.seed)


def ldm_config(cfg: DemoConfig, vae_dir: str) -> TrainLDMConfig:
    return TrainLDMConfig(model=cfg.model, vae=vae_dir, resolution=cfg.resolution, max_token_length=16,
                          train_text_encoder=cfg.train_text_encoder, cache_text_embeddings=not cfg.train_text_encoder,
                          timestep_sampling=cfg.timestep_sampling, prediction_type=cfg.prediction_type,
                          zero_terminal_snr=cfg.zero_terminal_snr,
                          learning_rate=cfg.ldm_learning_rate, lr_scheduler="cosine", lr_warmup_steps=100,
                          batch_size=cfg.ldm_batch_size, max_steps=cfg.ldm_steps, max_minutes=cfg.budget()[1],
                          use_ema=True, ema_decay=0.995, weight_decay=0.0, caption_dropout=0.1,
                          output_dir=os.path.join(cfg.out, "ldm_run"), checkpoint_every=0,
                          checkpoints_total_limit=1, validation_every=100, num_validation_prompts=0,
                          val_loss_samples=32, log_every=25, report_to="tensorboard",
                          resume="latest" if cfg.resume else "", seed=cfg.seed)


def evaluate(pipe, prompts: list[str], samplers, guidances, steps: int, out: str, seed: int) -> dict:
    """Returns {sampler: {guidance: adherence report}}; writes one grid PNG per (sampler, guidance)."""
    from ldm.evaluation.adherence import adherence_report
    from ldm.images import image_grid

    table = {}
    for name in samplers:
        pipe.set_scheduler(name)
        for guidance in guidances:
            generator = torch.Generator().manual_seed(seed)
            images = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, generator=generator).images
            image_grid(images, columns=10).save(os.path.join(out, f"samples_{name}_g{guidance:g}.png"))
            table.setdefault(name, {})[f"{guidance:g}"] = adherence_report(images, prompts)
    return table


def plot_losses(losses: dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, values = list(losses), list(losses.values())
    window = max(1, len(values) // 50)
    smooth = [sum(values[max(0, i - window + 1):i + 1]) / len(values[max(0, i - window + 1):i + 1])
              for i in range(len(values))]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, values, alpha=0.3, label="loss")
    ax.plot(steps, smooth, label=f"mean of {window}")
    ax.set(xlabel="step", ylabel="loss", title=title, yscale="log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def format_table(table: dict) -> str:
    """Returns the adherence table as markdown: one row per (sampler, guidance)."""
    lines = ["| sampler | guidance | colour | shape | position | all three |", "|---|---|---|---|---|---|"]
    for name, by_guidance in table.items():
        for guidance, r in by_guidance.items():
            lines.append(f"| {name} | {guidance} | {r['colour']:.0%} | {r['shape']:.0%} | {r['position']:.0%} "
                         f"| **{r['all']:.0%}** |")
    return "\n".join(lines)


def train_models(cfg: DemoConfig, pixels: PixelDataset) -> dict:
    """Trains the VAE, encodes the images once and trains the LDM (both through ldm.training.loop); returns
    {"vae": train_vae's result, "ldm": train_ldm's result or None, "stopped_by": a signal's name or None}. A phase
    stopped by a signal ends the demo there, with a checkpoint: `resume` continues it."""
    from diffusers import AutoencoderKL

    from ldm.training import train_ldm, train_vae

    print("[2/5] training the VAE", flush=True)
    vae_data = with_dark_scenes(pixels, cfg) if cfg.vae_dark_fraction else pixels
    vae_result = train_vae.main(vae_config(cfg), dataset=vae_data)
    if vae_result["stopped_by"] in ("SIGTERM", "SIGINT"):
        return {"vae": vae_result, "ldm": None, "stopped_by": vae_result["stopped_by"]}

    print("[3/5] encoding the images to latents once", flush=True)
    vae = AutoencoderKL.from_pretrained(vae_result["vae_dir"]).to(cfg.device)
    latents = LatentDataset(pixels, vae)

    print("[4/5] training the latent diffusion model", flush=True)
    ldm_result = train_ldm.main(ldm_config(cfg, vae_result["vae_dir"]), dataset=latents)
    stopped_by = ldm_result["stopped_by"] if ldm_result["stopped_by"] in ("SIGTERM", "SIGINT") else None
    return {"vae": vae_result, "ldm": ldm_result, "stopped_by": stopped_by}


def run_demo(cfg: DemoConfig, samplers=None) -> dict:
    """Runs the whole demo; returns the report (also written to out/report.json). samplers: the names to grade
    with (default: ddpm, ddim, lms; euler and heun for a flow model)."""
    from ldm.pipelines import Pipeline

    cfg.validate()
    started = time.time()
    os.makedirs(cfg.out, exist_ok=True)
    # Small models on a CPU others also use: OpenMP threads waiting on each other cost more than they give.
    torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 2) // 2))
    torch.manual_seed(cfg.seed)
    print(f"[1/5] rendering {cfg.num_samples} shapes images at {cfg.resolution} px", flush=True)
    pixels = PixelDataset(cfg.num_samples, cfg.resolution, cfg.seed, cfg.two_shape_fraction, cfg.canonical_captions)
    runs = train_models(cfg, pixels)
    vae_result, ldm_result = runs["vae"], runs["ldm"]
    if runs["stopped_by"]:
        print(f"demo stopped by {runs['stopped_by']}; continue with `ldm demo --out {cfg.out} --resume` (and the "
              "same settings)", flush=True)
        return {"stopped_by": runs["stopped_by"], "vae_steps": vae_result["step"],
                "ldm_steps": ldm_result["step"] if ldm_result else 0}
    pipe_dir = os.path.join(cfg.out, "pipeline")
    Pipeline.from_pretrained(os.path.join(ldm_result["checkpoint"], "pipeline")).save_pretrained(pipe_dir)
    plot_losses(ldm_result["losses"], os.path.join(cfg.out, "loss_curve.png"), "LDM training loss")
    train_minutes = (time.time() - started) / 60

    print(f"[5/5] sampling and grading {cfg.num_prompts} prompts", flush=True)
    pipe = Pipeline.from_pretrained(pipe_dir, device=cfg.device)
    pipe.set_progress_bar_config(disable=True)
    prompts = eval_prompts(cfg.num_prompts)
    samplers = samplers or (FLOW_SAMPLERS if cfg.prediction_type == "flow" else SAMPLERS)
    table = evaluate(pipe, prompts, samplers, (1.0, cfg.guidance), cfg.sample_steps, cfg.out, cfg.seed)
    report = {"minutes": (time.time() - started) / 60, "train_minutes": train_minutes, "pipeline": pipe_dir,
              "stopped_by": None, "vae_psnr": vae_result.get("psnr"), "vae_steps": vae_result["step"],
              "ldm_steps": ldm_result["step"], "val_loss_history": [(v["step"], v["val_loss"]) for v in ldm_result["val"]],
              "nonfinite_total": {"vae": vae_result["nonfinite_total"], "ldm": ldm_result["nonfinite_total"]},
              "guidance": cfg.guidance, "sample_steps": cfg.sample_steps, "prompts": prompts, "adherence": table,
              "config": cfg.__dict__}
    with open(os.path.join(cfg.out, "report.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    print(format_table(table))
    print(f"demo finished in {report['minutes']:.1f} min; model in {pipe_dir}; report in {cfg.out}/report.json")
    return report


__all__ = ["DemoConfig", "run_demo", "eval_prompts", "format_table", "replace"]
