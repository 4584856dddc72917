"""The demo model's art fine-tune with each LoRA type, and with a masked folder: what each learns of the art, how much
the prompts without the instance token move, the files' sizes and the time per step (docs/src/reports/finetune-variants.md).

    python benchmarks/finetune_variants_report.py --model runs/demo/pipeline     # its time: BENCHMARKS.md

Two folders, written by this script from ldm.data.photos' generated art (the demo never saw them):
- art: 12 pictures of four dark, saturated kinds, instance prompt "a painting in the style of sks". Each LoRA type
  (lora, locon, loha, lokr, dora) trains on it with the same recipe (prior preservation on "a green triangle in
  the center", learning rate 1e-3, 150 steps) and seeds.
- framed: the same art shrunk into the centre of a plain background whose colour differs per picture, with a
  NAME.mask.png around the art. LoRA with and without --masked-loss (learning rate 2e-3, 300 steps): the masked run
  should leave the base model's backgrounds alone, the unmasked one paint the folder's assorted backgrounds.

Measures (8 samples per prompt, fixed seeds, 20 DDIM steps at guidance 4), all on prompts the fine-tune never saw
except the instance prompt:
- learned: the colour-histogram distance (total variation, 4 bins per channel; 0 = the same colours, 1 = disjoint)
  of the instance prompt's samples to the folder, before and after;
- others_move: the mean absolute pixel change (in [0, 1]) of four shapes prompts' samples, base -> tuned, same seeds;
- background_move (framed folder): the mean absolute change of the instance prompt's border pixels, base -> tuned;
- file sizes of the diffusers file and the kohya / LyCORIS file, and the wall time per step (setup included).
Writes benchmarks/results/finetune_variants/report.json and benchmarks/figures/finetune_variants/{table,samples}.png.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INSTANCE = "a painting in the style of sks"
OTHERS = ("a red circle on the left", "a blue square at the top", "a yellow circle on the right",
          "a purple triangle at the bottom")
TYPES = ("lora", "locon", "loha", "lokr", "dora")
CLASS_PROMPT = "a green triangle in the center"


def write_framed_folder(folder: str, count: int, size: int, seed: int = 0) -> str:
    """Writes art shrunk into the centre of a plain background of a random colour per picture, with its mask."""
    from ldm.data.photos import art_images

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    inner, margin = size // 2, size // 4
    for i, art in enumerate(art_images(count, inner, seed)):
        image = Image.new("RGB", (size, size), tuple(int(c) for c in rng.integers(0, 256, 3)))
        image.paste(art, (margin, margin))
        mask = Image.new("L", (size, size), 0)
        mask.paste(255, (margin, margin, margin + inner, margin + inner))
        image.save(os.path.join(folder, f"art_{i:02d}.png"))
        mask.save(os.path.join(folder, f"art_{i:02d}.mask.png"))
    return folder


def load_folder(folder: str) -> torch.Tensor:
    """Returns the folder's pictures (not masks) as (N, 3, H, W) in [0, 1]."""
    names = sorted(n for n in os.listdir(folder) if n.endswith(".png") and not n.endswith(".mask.png"))
    return torch.stack([torch.from_numpy(np.asarray(Image.open(os.path.join(folder, n)).convert("RGB"))).permute(2, 0, 1)
                        for n in names]).float() / 255


def colour_histogram(images: torch.Tensor, bins: int = 4) -> torch.Tensor:
    """Returns the joint RGB histogram (bins^3,) of images (N, 3, H, W) in [0, 1], summing to 1."""
    index = (images.clamp(0, 1) * bins).long().clamp(max=bins - 1)  # (N, 3, H, W)
    flat = (index[:, 0] * bins + index[:, 1]) * bins + index[:, 2]
    return torch.bincount(flat.flatten(), minlength=bins ** 3).float() / flat.numel()


def histogram_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    return 0.5 * float((colour_histogram(a) - colour_histogram(b)).abs().sum())


def border(images: torch.Tensor) -> torch.Tensor:
    """Returns the outer quarter of each side's pixels, flattened per image: (N, 3, P)."""
    size, margin = images.shape[-1], images.shape[-1] // 4
    keep = torch.ones(size, size, dtype=torch.bool)
    keep[margin:size - margin, margin:size - margin] = False
    return images[..., keep]


@torch.no_grad()
def sample(pipe, prompt: str, n: int = 8) -> torch.Tensor:
    generators = [torch.Generator().manual_seed(100 + i) for i in range(n)]
    return pipe([prompt] * n, generator=generators, num_inference_steps=20, guidance_scale=4.0,
                output_type="pt").images  # (n, 3, H, W) in [0, 1]


def finetune(model: str, folder: str, out: str, steps: int, seed: int, **settings) -> tuple[dict, float]:
    from ldm.training.finetune import main
    from ldm.training.finetune_config import FinetuneConfig

    cfg = FinetuneConfig(model=model, data=folder, out=out, instance_prompt=INSTANCE, max_steps=steps, seed=seed,
                         validation_every=steps, export_webui=True, device="cpu", **settings)
    start = time.perf_counter()
    report = main(cfg)
    return report, (time.perf_counter() - start) / steps


def measure(model: str, base_samples: dict, folder_images: torch.Tensor, report: dict) -> dict:
    from ldm import Pipeline

    tuned = Pipeline.from_pretrained(model)
    tuned.set_progress_bar_config(disable=True)
    tuned.load_lora_weights(report["outputs"]["lora"])
    samples = {p: sample(tuned, p) for p in (INSTANCE,) + OTHERS}
    before = histogram_distance(base_samples[INSTANCE], folder_images)
    return {"learned_before": before, "learned_after": histogram_distance(samples[INSTANCE], folder_images),
            "others_move": float(np.mean([(samples[p] - base_samples[p]).abs().mean() for p in OTHERS])),
            "instance_move": float((samples[INSTANCE] - base_samples[INSTANCE]).abs().mean()),
            "background_move": float((border(samples[INSTANCE]) - border(base_samples[INSTANCE])).abs().mean()),
            "diffusers_file_kb": os.path.getsize(report["outputs"]["lora"]) / 1024,
            "kohya_file_kb": os.path.getsize(report["outputs"]["webui"]) / 1024,
            "instance_samples": samples[INSTANCE]}


def run(args) -> dict:
    from ldm import Pipeline
    from ldm.data.photos import write_art_folder

    work = os.path.abspath(args.work)
    base = Pipeline.from_pretrained(args.model)
    base.set_progress_bar_config(disable=True)
    base_samples = {p: sample(base, p) for p in (INSTANCE,) + OTHERS}
    size = base.denoiser.config.sample_size * base.vae_scale_factor
    art = os.path.join(work, "art")
    write_art_folder(art, 12, size, seed=0)
    framed = write_framed_folder(os.path.join(work, "framed"), 12, size, seed=0)
    # the art: the finetune guide's recipe against language drift (prior preservation on a class prompt the base
    # draws well, learning rate 1e-3); the framed folder: a stronger plain run, so that backgrounds can be learned
    art_recipe = dict(class_prompt=CLASS_PROMPT, learning_rate=1e-3, max_steps=args.steps)
    framed_recipe = dict(learning_rate=2e-3, max_steps=2 * args.steps)
    runs = [(t, art, {"lora_type": t, **art_recipe}) for t in TYPES]
    runs += [("framed, unmasked", framed, framed_recipe), ("framed, masked", framed, {"masked_loss": True, **framed_recipe})]
    rows, pictures = [], {"base": base_samples[INSTANCE]}
    for seed in args.seeds:
        for name, folder, settings in runs:
            settings = dict(settings)
            steps = settings.pop("max_steps")
            report, seconds = finetune(args.model, folder, os.path.join(work, f"{name.replace(', ', '_')}_{seed}"),
                                       steps, seed, **settings)
            row = measure(args.model, base_samples, load_folder(folder), report)
            pictures.setdefault(name, row.pop("instance_samples"))
            rows.append({"run": name, "seed": seed, "folder": os.path.basename(folder), "steps": steps, **settings,
                         "s_per_step": seconds, **row})
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "instance_samples"}))
    return {"model": args.model, "seeds": list(args.seeds), "rows": rows, "summary": summarise(rows),
            "pictures": pictures}


def summarise(rows: list[dict]) -> list[dict]:
    """Returns one row per run name: the mean over seeds of every number, and the spread of the two main ones."""
    out = []
    for name in dict.fromkeys(r["run"] for r in rows):
        group = [r for r in rows if r["run"] == name]
        numbers = {k: float(np.mean([r[k] for r in group])) for k, v in group[0].items()
                   if isinstance(v, float) and k != "seed"}
        spread = {f"{k}_range": [min(r[k] for r in group), max(r[k] for r in group)]
                  for k in ("learned_after", "others_move", "background_move")}
        out.append({"run": name, **numbers, **spread})
    return out


def plot(result: dict, figures: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ldm.images import image_grid

    os.makedirs(figures, exist_ok=True)
    rows = result["summary"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    names = [r["run"] for r in rows]
    axes[0].barh(names, [r["learned_before"] - r["learned_after"] for r in rows], color="tab:purple")
    axes[0].set_title("learned: histogram distance to the folder, fall")
    axes[1].barh(names, [r["others_move"] for r in rows], color="tab:orange")
    axes[1].set_title("other prompts' mean pixel move")
    axes[2].barh(names, [r["kohya_file_kb"] for r in rows], color="tab:blue")
    axes[2].set_title("kohya/LyCORIS file (KB)")
    for ax in axes[1:]:
        ax.set_yticklabels([])
    fig.tight_layout()
    fig.savefig(os.path.join(figures, "table.png"), dpi=100)
    plt.close(fig)
    tiles = []
    for name, images in result["pictures"].items():
        for image in images[:4]:
            tiles.append(Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)))
    image_grid([t.resize((64, 64), Image.Resampling.NEAREST) for t in tiles], 8).save(
        os.path.join(figures, "samples.png"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="runs/demo/pipeline")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--work", default="runs/finetune_variants")
    parser.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results", "finetune_variants"))
    parser.add_argument("--figures", default=os.path.join(ROOT, "benchmarks", "figures", "finetune_variants"))
    args = parser.parse_args()
    torch.manual_seed(args.seeds[0])
    result = run(args)
    plot(result, args.figures)
    os.makedirs(args.results, exist_ok=True)
    with open(os.path.join(args.results, "report.json"), "w", encoding="utf-8") as f:
        json.dump({k: v for k, v in result.items() if k != "pictures"}, f, indent=2)
    print(f"wrote {args.results}/report.json and {args.figures}/table.png, samples.png")


if __name__ == "__main__":
    main()
