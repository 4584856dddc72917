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

from ldm.evaluation.shape_prompts import canonical_prompt, eval_prompts, held_out_prompts, two_shape_prompts
from ldm.ranges import check_ranges, setting
from ldm.training.ldm_config import TrainLDMConfig
from ldm.training.train_vae import TrainVAEConfig

RUNAWAY = 4  # a phase stops at this many times its share of DemoConfig.minutes: a hung or far too slow machine


@dataclass
class DemoConfig:
    out: str = "runs/demo"
    minutes: float = setting(15.0, "(0, 1e5]")  # the target duration. Step counts decide the run: past it the demo goes
                                                # on and says so at the end; only a phase past RUNAWAY x its share stops
    device: str = "cpu"
    model: str = setting("small", old=("--preset",))  # a preset: small (UNet), dit-small (DiT), pixart-small, or any in
                                                      # ldm.presets
    resolution: int = setting(32, "[8, 1024]")
    num_samples: int = setting(4000, "[1, 1e7]")
    two_shape_fraction: float = setting(0.1, "[0, 1]")  # mostly single shapes: the scenes the demo prompts for
    canonical_captions: bool = False # True: single shapes captioned in one wording only ("a red circle on the left")
    hold_out_wordings: bool = True   # single shapes captioned in 8 of their 12 wordings, one drawn per step; the
                                     # other 4 (shapes.HELD_OUT_WORDINGS) are graded as unseen wordings
    vae: str = ""                    # a trained AutoencoderKL folder (e.g. the real-image recipe of
                                     # docs/src/reports/vae-recipe.md, `ldm train-vae --model small-photo ...`)
                                     # in place of the VAE phase: the demo's
                                     # model then encodes real images as well as that VAE does
    vae_steps: int = setting(700, "[1, 1e7]")  # with the L2 loss and cosine decay below: enough for the grader to read
                                     # the reconstructions' colours (docs: reports/demo.md)
    vae_batch_size: int = setting(16, "[1, 4096]")
    vae_learning_rate: float = setting(3e-3, "(0, 1]")
    vae_lr_scheduler: str = "cosine" # a constant rate ends noisier and shifts colours (docs: reports/demo.md)
    vae_rec_loss: str = "l2"         # L1 shifted colours and rounded squares (docs: reports/demo.md)
    vae_dark_fraction: float = setting(0.0, "[0, 1]")  # > 0: also train the VAE on this share of the scenes on a dark
                                                       # background, so that a LoRA can later teach the model a dark
                                                       # style (the LDM sees none)
    vae_photo_fraction: float = setting(1.0, "[0, 10]")  # also train the VAE on this many (x num_samples) augmented
                                                         # crops of real photographs (ldm.data.photos), so that it
                                                         # encodes images unlike the shapes
    ldm_steps: int = setting(3500, "[1, 1e7]")  # fixed: a slower machine takes longer, it does not train less (docs:
                                                # Demo)
    ldm_batch_size: int = setting(32, "[1, 4096]")
    ldm_learning_rate: float = setting(2e-3, "(0, 1]")
    train_text_encoder: bool = False # frozen random CLIP (token std 1, see presets.small), embeddings cached
    text_encoder_steps: int = setting(0, "[0, 1e7]")  # > 0: first train the text encoder contrastively (ldm
                                                      # train-text-encoder) on the shapes for this many steps; the LDM
                                                      # then conditions on it, frozen
    num_pair_prompts: int = setting(60, "[0, 1000]")  # two-shape prompts graded beside the single shapes; 0 = none
    timestep_sampling: str = "uniform"  # or logit_normal (the two compared: docs/src/guides/train.md), mode, cosmap
    prediction_type: str = "epsilon"    # the LDM's objective: epsilon, v_prediction, sample or flow (flow matching,
                                        # sampled and graded with euler and heun instead of ddpm, ddim and lms)
    zero_terminal_snr: bool = False     # with v_prediction (Lin et al. 2023)
    guidance: float = setting(4.0, "[0, 100]", flag="guidance_scale")  # of the graded samples
    sample_steps: int = setting(50, "[1, 1000]", flag="steps")  # sampling steps of the graded samples
    num_prompts: int = setting(90, "[1, 90]")  # every colour x shape x position once
    threads: int = setting(0, "[0, 1024]")  # torch CPU threads; 0 = half the cores (a busy machine punishes more)
    resume: bool = False             # continue OUT's VAE and LDM runs from their last checkpoints: after Ctrl-C,
                                     # SIGTERM or max minutes, or with more vae_steps / ldm_steps than before
    seed: int = setting(0, "[0, 4294967295]")

    def validate(self) -> None:
        """Raises ValueError naming the first bad setting."""
        check_ranges(self)
        if self.resolution % 8:
            raise ValueError(f"resolution must be divisible by 8, got {self.resolution}")
        vae_config(self).validate()  # the phases' own checks (objective combinations, ...), before any work
        if self.vae:
            from ldm.models.vae import check_vae_folder

            check_vae_folder(self.vae, self.model, self.resolution)
        ldm_config(self, "").validate()
        if self.text_encoder_steps:
            text_encoder_config(self).validate()

    def budget(self) -> tuple[float, float, float]:
        """Returns (VAE minutes, LDM minutes, text encoder minutes): each phase's runaway stop, RUNAWAY x its
        share of `minutes`, far beyond what its fixed steps take on a slow machine."""
        return tuple(RUNAWAY * share * self.minutes for share in (0.12, 0.66, 0.1))


def prompt_sets(cfg: "DemoConfig") -> dict:
    """Returns the demo's graded prompt sets: {"trained": the training wording, "held_out": wordings never trained
    on (when cfg.hold_out_wordings), "two_shape": two-shape prompts}."""
    sets = {"trained": eval_prompts(cfg.num_prompts)}
    if cfg.hold_out_wordings:
        sets["held_out"] = held_out_prompts(cfg.num_prompts)
    if cfg.num_pair_prompts:
        sets["two_shape"] = two_shape_prompts(cfg.num_pair_prompts, cfg.seed)
    return sets


class PixelDataset(torch.utils.data.Dataset):
    """Map-style {"pixel_values": (3,R,R) in [-1,1], "caption": str, "captions": list[str]} over the rendered
    shapes, in memory. Captions: the data set's one random wording per scene; with canonical_captions, single
    shapes in the prompts' wording only; with hold_out_wordings, every scene with all its wordings but the held-out
    ones (single shapes: 8 of 12, shapes.single_wordings; pairs: both orders), one picked per training step."""

    def __init__(self, num_samples: int, resolution: int, seed: int, two_shape_fraction: float = 0.25,
                 canonical_captions: bool = False, hold_out_wordings: bool = False):
        from ldm.data import ShapesDataset
        from ldm.data.shapes import pair_wordings, single_wordings
        from ldm.data.transforms import to_tensor

        shapes = ShapesDataset(num_samples, resolution=resolution, seed=seed, two_shape_fraction=two_shape_fraction)
        samples = [shapes[i] for i in range(num_samples)]
        self.pixels = torch.stack([to_tensor(s["image"]) for s in samples])  # (N, 3, R, R)
        self.options = [[s["caption"]] for s in samples]
        for i in range(num_samples):
            objects = shapes.scene(i)[0]
            if canonical_captions and len(objects) == 1:  # one wording: the model learns the prompts' words fastest
                self.options[i] = [canonical_prompt(objects[0].colour, objects[0].shape, objects[0].position)]
            elif hold_out_wordings:
                self.options[i] = single_wordings(objects[0], held_out=False) if len(objects) == 1 \
                    else pair_wordings(objects)
        self.captions = [options[0] for options in self.options]
        self.keys = [s["key"] for s in samples]

    @classmethod
    def from_tensors(cls, pixels: torch.Tensor, captions: list[str]) -> "PixelDataset":
        dataset = cls.__new__(cls)
        dataset.pixels, dataset.captions, dataset.options = pixels, captions, [[c] for c in captions]
        dataset.keys = [f"tensor-{i:08d}" for i in range(len(captions))]
        return dataset

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": self.pixels[i], "caption": self.captions[i], "captions": self.options[i],
                "key": self.keys[i]}


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


def with_photos(pixels: PixelDataset, cfg: "DemoConfig") -> PixelDataset:
    """Returns `pixels` plus vae_photo_fraction x num_samples crops of real photographs (ldm.data.photos)."""
    from ldm.data.photos import PhotoCrops, to_pixels

    # No recolouring: at the demo's 700 steps, hue-rotated crops cost the VAE the shapes' exact colours
    # (docs/src/reports/demo.md)
    crops = PhotoCrops(round(cfg.vae_photo_fraction * cfg.num_samples), cfg.resolution, seed=cfg.seed, recolour=0.0)
    photos = to_pixels([crops[i]["image"] for i in range(len(crops))])
    return PixelDataset.from_tensors(torch.cat([pixels.pixels, photos]), pixels.captions + [""] * len(crops))


class LatentDataset(torch.utils.data.Dataset):
    """Map-style {"latent_mean", "latent_logvar": (4,h,w) on the CPU, "caption"}: every image encoded once, on
    the VAE's device, in chunks of batch_size."""

    def __init__(self, pixels: PixelDataset, vae, batch_size: int = 256):
        from ldm.models.vae import encode_posterior

        mean, logvar = encode_posterior(vae.eval(), pixels.pixels, batch_size)  # (N, 4, h, w) each
        self.mean, self.logvar, self.captions, self.options = mean.cpu(), logvar.cpu(), pixels.captions, pixels.options

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int) -> dict:
        return {"latent_mean": self.mean[i], "latent_logvar": self.logvar[i], "caption": self.captions[i],
                "captions": self.options[i]}


def load_vae_result(cfg: DemoConfig) -> dict:
    """Returns train_vae.main's result for the given cfg.vae folder: its held-out PSNR measured now, no steps."""
    from diffusers import AutoencoderKL

    from ldm.training.vae_report import reconstruction_report

    vae = AutoencoderKL.from_pretrained(cfg.vae, local_files_only=True).to(cfg.device)
    return {"vae_dir": cfg.vae, "step": 0, "psnr": None, "held_out_psnr": reconstruction_report(vae, cfg.resolution),
            "nonfinite_total": 0, "stopped_by": None}


def vae_config(cfg: DemoConfig) -> TrainVAEConfig:
    # A KL 3 x R^2 times the LDM paper's 1e-6 per pixel value (the weight the demo's figures were measured with,
    # before kl_weight became per pixel value); the paper's reconstructed as well at 32 px (docs/src/guides/train.md)
    return TrainVAEConfig(model=cfg.model, resolution=cfg.resolution, rec_loss=cfg.vae_rec_loss,
                          kl_weight=1e-6 * 3 * cfg.resolution ** 2,
                          learning_rate=cfg.vae_learning_rate, lr_scheduler=cfg.vae_lr_scheduler, lr_warmup_steps=50,
                          batch_size=cfg.vae_batch_size, max_steps=cfg.vae_steps,
                          max_minutes=cfg.budget()[0], output_dir=os.path.join(cfg.out, "vae_run"),
                          checkpoint_every=0, checkpoints_total_limit=1, resume="latest" if cfg.resume else "",
                          seed=cfg.seed)


def text_encoder_config(cfg: DemoConfig):
    from ldm.training.train_text_encoder import TrainTextEncoderConfig

    return TrainTextEncoderConfig(model=cfg.model, resolution=cfg.resolution, max_steps=cfg.text_encoder_steps,
                                  max_minutes=cfg.budget()[2], output_dir=os.path.join(cfg.out, "text_encoder_run"),
                                  checkpoint_every=0, checkpoints_total_limit=1, val_samples=256,
                                  validation_every=max(1, cfg.text_encoder_steps // 4),
                                  resume="latest" if cfg.resume else "", seed=cfg.seed)


def ldm_config(cfg: DemoConfig, vae_dir: str, text_encoder_dir: str = "") -> TrainLDMConfig:
    return TrainLDMConfig(model=cfg.model, vae=vae_dir, text_encoder=text_encoder_dir, resolution=cfg.resolution,
                          max_token_length=16,
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


def evaluate(pipe, prompts: list[str], samplers, guidances, steps: int, out: str, seed: int,
             name: str = "") -> dict:
    """Returns {sampler: {guidance: adherence report}}; writes one grid PNG per (sampler, guidance), named
    samples[_NAME]_SAMPLER_gG.png. Two-shape prompts are graded by pair_report, single shapes by adherence_report."""
    from ldm.evaluation.adherence import adherence_report, pair_report
    from ldm.images import image_grid

    grade = pair_report if name == "two_shape" else adherence_report
    table = {}
    for sampler in samplers:
        pipe.set_scheduler(sampler)
        for guidance in guidances:
            generator = torch.Generator().manual_seed(seed)
            images = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, generator=generator).images
            grid = f"samples_{name + '_' if name else ''}{sampler}_g{guidance:g}.png"
            image_grid(images, columns=10).save(os.path.join(out, grid))
            table.setdefault(sampler, {})[f"{guidance:g}"] = grade(images, prompts)
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


def format_table(table: dict, held_out: dict | None = None, two_shape: dict | None = None) -> str:
    """Returns the adherence table as markdown: one row per (sampler, guidance); the trained wording's colour,
    shape, position and all three, then all three on the held-out wordings and on two-shape prompts if given."""
    head = "| sampler | guidance | colour | shape | position | all three |"
    extra = [(title, t) for title, t in (("held-out wordings", held_out), ("two shapes", two_shape)) if t]
    lines = [head + "".join(f" {title} |" for title, _ in extra), "|---" * (6 + len(extra)) + "|"]
    for name, by_guidance in table.items():
        for guidance, r in by_guidance.items():
            lines.append(f"| {name} | {guidance} | {r['colour']:.0%} | {r['shape']:.0%} | {r['position']:.0%} "
                         f"| **{r['all']:.0%}** |" + "".join(f" **{t[name][guidance]['all']:.0%}** |"
                                                             for _, t in extra))
    return "\n".join(lines)


def train_models(cfg: DemoConfig, pixels: PixelDataset) -> dict:
    """Trains the VAE, encodes the images once and trains the LDM (both through ldm.training.loop); returns
    {"vae": train_vae's result, "ldm": train_ldm's result or None, "stopped_by": a signal's name or None}. A phase
    stopped by a signal ends the demo there, with a checkpoint: `resume` continues it."""
    from diffusers import AutoencoderKL

    from ldm.training import train_ldm, train_text_encoder, train_vae

    text_encoder_dir = ""
    if cfg.text_encoder_steps:
        print("[1b/5] training the text encoder contrastively", flush=True)
        val = PixelDataset(256, cfg.resolution, cfg.seed + 1, cfg.two_shape_fraction, cfg.canonical_captions,
                           cfg.hold_out_wordings)  # other scenes, the training wordings
        text_result = train_text_encoder.main(text_encoder_config(cfg), dataset=pixels, val_dataset=val)
        if text_result["stopped_by"] in ("SIGTERM", "SIGINT"):
            return {"vae": None, "ldm": None, "stopped_by": text_result["stopped_by"]}
        text_encoder_dir = text_result["text_encoder_dir"]

    if cfg.vae:
        print(f"[2/5] using the VAE in {cfg.vae}", flush=True)
        vae_result = load_vae_result(cfg)
    else:
        print("[2/5] training the VAE", flush=True)
        vae_data = with_dark_scenes(pixels, cfg) if cfg.vae_dark_fraction else pixels
        vae_data = with_photos(vae_data, cfg) if cfg.vae_photo_fraction else vae_data
        vae_result = train_vae.main(vae_config(cfg), dataset=vae_data)
    if vae_result["stopped_by"] in ("SIGTERM", "SIGINT"):
        return {"vae": vae_result, "ldm": None, "stopped_by": vae_result["stopped_by"]}

    print("[3/5] encoding the images to latents once", flush=True)
    vae = AutoencoderKL.from_pretrained(vae_result["vae_dir"]).to(cfg.device)
    latents = LatentDataset(pixels, vae)

    print("[4/5] training the latent diffusion model", flush=True)
    ldm_result = train_ldm.main(ldm_config(cfg, vae_result["vae_dir"], text_encoder_dir), dataset=latents)
    stopped_by = ldm_result["stopped_by"] if ldm_result["stopped_by"] in ("SIGTERM", "SIGINT") else None
    return {"vae": vae_result, "ldm": ldm_result, "stopped_by": stopped_by}


def run_demo(cfg: DemoConfig, samplers=None) -> dict:
    """Runs the whole demo; returns the report (also written to out/report.json). samplers: the names to grade
    with (default: ddpm, ddim, lms; euler and heun for a flow model)."""
    from ldm.objectives import objective_for
    from ldm.pipelines import Pipeline

    cfg.validate()
    started = time.time()
    os.makedirs(cfg.out, exist_ok=True)
    # Small models on a CPU others also use: OpenMP threads waiting on each other cost more than they give.
    torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 2) // 2))
    torch.manual_seed(cfg.seed)
    print(f"[1/5] rendering {cfg.num_samples} shapes images at {cfg.resolution} px", flush=True)
    pixels = PixelDataset(cfg.num_samples, cfg.resolution, cfg.seed, cfg.two_shape_fraction, cfg.canonical_captions,
                          cfg.hold_out_wordings)
    runs = train_models(cfg, pixels)
    vae_result, ldm_result = runs["vae"], runs["ldm"]
    if runs["stopped_by"]:
        print(f"demo stopped by {runs['stopped_by']}; continue with `ldm demo --out {cfg.out} --resume` (and the "
              "same settings)", flush=True)
        return {"stopped_by": runs["stopped_by"], "vae_steps": vae_result["step"] if vae_result else 0,
                "ldm_steps": ldm_result["step"] if ldm_result else 0}
    pipe_dir = os.path.join(cfg.out, "pipeline")
    Pipeline.from_pretrained(os.path.join(ldm_result["checkpoint"], "pipeline")).save_pretrained(pipe_dir)
    plot_losses(ldm_result["losses"], os.path.join(cfg.out, "loss_curve.png"), "LDM training loss")
    train_minutes = (time.time() - started) / 60

    sets = prompt_sets(cfg)
    print(f"[5/5] sampling and grading {sum(map(len, sets.values()))} prompts ({', '.join(sets)})", flush=True)
    pipe = Pipeline.from_pretrained(pipe_dir, device=cfg.device)
    pipe.set_progress_bar_config(disable=True)
    samplers = samplers or objective_for(pipe.scheduler).samplers
    tables = {name: evaluate(pipe, prompts, samplers, (1.0, cfg.guidance), cfg.sample_steps, cfg.out, cfg.seed,
                             "" if name == "trained" else name) for name, prompts in sets.items()}
    table, prompts = tables["trained"], sets["trained"]
    report = {"minutes": (time.time() - started) / 60, "train_minutes": train_minutes, "pipeline": pipe_dir,
              "stopped_by": None, "vae_psnr": vae_result.get("psnr"),
              "vae_held_out_psnr": vae_result.get("held_out_psnr"), "vae_steps": vae_result["step"],
              "ldm_steps": ldm_result["step"], "val_loss_history": [(v["step"], v["val_loss"]) for v in ldm_result["val"]],
              "nonfinite_total": {"vae": vae_result["nonfinite_total"], "ldm": ldm_result["nonfinite_total"]},
              "guidance": cfg.guidance, "sample_steps": cfg.sample_steps, "prompts": prompts, "adherence": table,
              "held_out_prompts": sets.get("held_out"), "adherence_held_out": tables.get("held_out"),
              "two_shape_prompts": sets.get("two_shape"), "adherence_two_shape": tables.get("two_shape"),
              "text_encoder": "contrastive" if cfg.text_encoder_steps else "frozen random", "config": cfg.__dict__}
    with open(os.path.join(cfg.out, "report.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    print(format_table(table, tables.get("held_out"), tables.get("two_shape")))
    print(f"demo finished in {report['minutes']:.1f} min; model in {pipe_dir}; report in {cfg.out}/report.json")
    if report["ldm_steps"] < cfg.ldm_steps or (report["vae_steps"] < cfg.vae_steps and not cfg.vae):
        print(f"warning: a phase hit its runaway time limit (VAE {report['vae_steps']}/{cfg.vae_steps}, LDM "
              f"{report['ldm_steps']}/{cfg.ldm_steps} steps): these results are not the full recipe's", flush=True)
    if report["minutes"] > cfg.minutes:
        print(f"note: the demo took {report['minutes']:.1f} minutes, over its {cfg.minutes:g}-minute target: this "
              "machine is slower or busier than the 2-core machine it was measured on. The step counts were not "
              "cut, so the results above are those of the full recipe.", flush=True)
    return report


__all__ = ["DemoConfig", "run_demo", "eval_prompts", "format_table", "replace"]
