"""Objectives compared: epsilon, v, zero-terminal-SNR v and flow matching, with the same backbone (the `small`
preset), data, training steps and seed, on the shapes demo data and on scikit-learn's handwritten digits.

Per data set the VAE is trained once (the demo's recipe, ldm/training/demo.py) and the images are encoded once;
then one LDM per objective on those latents, so that only the objective differs. For each it records
  (a) the validation loss at the end, overall and per bin: each objective's own MSE (eps, v or velocity), binned
      equal-width in t/T for the DDPM-type objectives and in sigma for flow, so neither the units nor the bins are
      the same noise levels across objectives: compare the trends, not the numbers;
  (b) prompt adherence at 10, 25 and 50 sampling steps with the objective's natural sampler (DDIM for the DDPM-type
      objectives, Euler for flow, and Heun for flow too unless --flow-samplers says otherwise), at guidance 1 and 4:
      shapes are graded from their pixels (ldm.evaluation.adherence) on the demo's canonical prompts
      (eval_prompts); digits by a classifier of the digits train split (ldm.evaluation.digits), whose accuracy on
      the held-out test split (and on those images after a round trip through the trained VAE) is the ceiling;
  (c) the drift trace: mean and std of the latents entering each sampling step (pipe(..., trace=True)) and of the
      final latents, against the training latents' own mean and std, and the generated images' mean brightness.

Each seed (--seeds) is a whole run of its own (shapes rendered, VAE, LDMs, sampling noise) in OUT/seed<k>/<data>/,
the same seed for every objective; tables give the mean and each seed's value. Writes results.json, PNG plots
(drift: the first seed's; made by objectives_report.py, beside this file) and sample grids to --out and prints
markdown tables. Step counts are fixed; the time budget (minutes=60, demo-style) only caps, so a slower or busier
machine changes the run time, not the result.
A data set's VAE, each trained objective and each evaluation are reused from --out when their settings match.

    python benchmarks/compare_objectives.py --seeds 0 1 --out runs/objectives
    python benchmarks/compare_objectives.py --quick --out /tmp/objectives     # a smoke run: tiny steps, 2 prompts
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, replace

import torch

from objectives_report import (adherence_table, aggregate, drift_table, loss_table, plot_adherence, plot_drift,
                               plot_samples, plot_val_loss)

# name -> (prediction_type, zero_terminal_snr)
OBJECTIVES = {"epsilon": ("epsilon", False), "v": ("v_prediction", False), "v_zero_snr": ("v_prediction", True),
              "flow": ("flow", False)}
DATASETS = ("shapes", "digits")
BIN_KEY = re.compile(r"val_loss_bin(\d+)$")


@dataclass
class Settings:
    vae_steps: int = 400                 # the shortened demo recipe (tests/conftest.py, short_demo)
    ldm_steps: int = 600
    num_samples: int = 2000              # shapes rendered for training; digits use their whole train split
    num_prompts: int = 30                # shapes prompts (eval_prompts)
    digit_images: int = 3                # images per digit 0-9
    sample_steps: tuple = (10, 25, 50)
    guidances: tuple = (1.0, 4.0)
    flow_samplers: tuple = ("euler", "heun")
    seed: int = 0

    @classmethod
    def quick(cls) -> "Settings":
        return cls(vae_steps=3, ldm_steps=3, num_samples=64, num_prompts=2, digit_images=1, sample_steps=(2, 3),
                   flow_samplers=("euler",))


def base_config(dataset: str, settings: Settings, out: str):
    """Returns the demo's recipe for one data set (DemoConfig): 32 px, `small`, one thread, minutes only a cap."""
    from ldm.training.demo import DemoConfig

    return DemoConfig(out=os.path.join(out, dataset), minutes=60.0, num_samples=settings.num_samples,
                      vae_steps=settings.vae_steps, ldm_steps=settings.ldm_steps, num_prompts=settings.num_prompts,
                      threads=1, seed=settings.seed)


def pixel_data(dataset: str, cfg):
    """Returns the training images as a PixelDataset: the demo's shapes, or the digits train split, each captioned
    in its canonical wording ("a red circle on the left", "a handwritten digit 7")."""
    from ldm.data.digits import DigitsDataset
    from ldm.data.transforms import to_tensor
    from ldm.training.demo import PixelDataset

    if dataset == "shapes":
        return PixelDataset(cfg.num_samples, cfg.resolution, cfg.seed, cfg.two_shape_fraction, cfg.canonical_captions)
    digits = DigitsDataset("train", cfg.resolution, canonical_captions=True)
    samples = [digits[i] for i in range(len(digits))]
    return PixelDataset.from_tensors(torch.stack([to_tensor(s["image"]) for s in samples]),  # (N, 3, R, R)
                                     [s["caption"] for s in samples])


def prompts_for(dataset: str, settings: Settings) -> list[str]:
    """Returns the graded prompts: the demo's canonical shapes prompts, or each digit `digit_images` times."""
    from ldm.evaluation.shape_prompts import eval_prompts

    if dataset == "shapes":
        return eval_prompts(settings.num_prompts)
    return [f"a handwritten digit {d}" for _ in range(settings.digit_images) for d in range(10)]


def grade(dataset: str, images, prompts: list[str]) -> dict:
    """Returns the adherence report of `images` (its "all" is the fraction that fits the prompt entirely)."""
    if dataset == "shapes":
        from ldm.evaluation.adherence import adherence_report

        return adherence_report(images, prompts)
    from ldm.evaluation.digits import adherence_report

    return adherence_report(images, prompts)


def reuse(path: str, key: dict) -> dict | None:
    """Returns the JSON at `path` when it was written with the same `key` (settings), else None."""
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    return saved if saved.get("key") == key else None


def cached(path: str, key: dict, compute) -> dict:
    """Returns the JSON at `path` when it was written with the same `key`, else compute()'s dict, saved there with
    the key (a trained model's or an evaluation's record, reused across runs of the same settings)."""
    saved = reuse(path, key)
    if saved is None:
        saved = {**compute(), "key": key}
        write_json(path, saved)
    return saved


def write_json(path: str, data: dict, indent: int | None = 1) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=indent)


def train_vae_once(cfg, pixels, key: dict) -> dict:
    """Trains the data set's VAE (the demo's vae_config) unless a finished one with the same settings is in
    cfg.out; returns {"vae_dir", "psnr", "steps", "minutes", "key"}."""
    from ldm.training import train_vae
    from ldm.training.demo import vae_config

    path = os.path.join(cfg.out, "vae.json")
    saved = reuse(path, key)
    if saved:
        print(f"reusing the VAE in {saved['vae_dir']}", flush=True)
        return saved
    started = time.time()
    result = train_vae.main(vae_config(cfg), dataset=pixels)
    saved = {"vae_dir": result["vae_dir"], "psnr": result.get("psnr"), "steps": result["step"],
             "minutes": (time.time() - started) / 60, "key": key}
    write_json(path, saved)
    return saved


def latent_statistics(latents, scaling_factor: float) -> dict:
    """Returns the mean and std of the training latents as the LDM sees them (posterior means x scaling_factor)."""
    scaled = latents.mean * scaling_factor  # (N, 4, h, w)
    return {"mean": float(scaled.mean()), "std": float(scaled.std())}


def final_bins(history: list[dict]) -> list[float]:
    """Returns the last validation report's per-bin losses, bin 0 (least noise) first."""
    last = history[-1]
    keys = sorted((k for k in last if BIN_KEY.match(k)), key=lambda k: int(BIN_KEY.match(k).group(1)))
    return [last[k] for k in keys]


def train_objective(base, name: str, vae_dir: str, latents) -> dict:
    """Trains one LDM with objective `name` on the cached latents (the demo's ldm_config, nothing else changed);
    returns {"pipeline", "val_loss", "val_loss_bins", "val_loss_history", "steps", "minutes"}."""
    from ldm.training import train_ldm
    from ldm.training.demo import ldm_config

    prediction_type, zero_snr = OBJECTIVES[name]
    cfg = replace(base, out=os.path.join(base.out, name), prediction_type=prediction_type,
                  zero_terminal_snr=zero_snr)
    cfg.validate()
    started = time.time()
    result = train_ldm.main(ldm_config(cfg, vae_dir), dataset=latents)
    if result["stopped_by"] in ("SIGTERM", "SIGINT"):
        raise SystemExit(f"{name}: training stopped by {result['stopped_by']}; run again to redo it")
    return {"pipeline": os.path.join(result["checkpoint"], "pipeline"), "val_loss": result["val"][-1]["val_loss"],
            "val_loss_bins": final_bins(result["val"]), "val_loss_history": [(v["step"], v["val_loss"])
                                                                             for v in result["val"]],
            "steps": result["step"], "minutes": (time.time() - started) / 60}


def drift(records, final: torch.Tensor) -> dict:
    """Returns {"fraction", "mean", "std"}: the latents entering each step (a StepRecord trace) and the final
    latents, at their fraction of the run (0 = start, 1 = end), so runs of any step count line up."""
    states = [r.latents for r in records] + [final]  # each (B, 4, h, w)
    return {"fraction": [i / len(records) for i in range(len(states))],
            "mean": [float(x.mean()) for x in states], "std": [float(x.std()) for x in states]}


@torch.no_grad()
def sample_run(pipe, prompts: list[str], sampler: str, steps: int, guidance: float, seed: int):
    """Returns (images, drift) of one sampling run with a fixed seed."""
    pipe.set_scheduler(sampler)
    last = {}

    def keep_latents(_pipe, i, t, tensors):
        last["latents"] = tensors["latents"]  # after step i; the last call's are the final x_0 latents
        return tensors

    out = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, trace=True,
               generator=torch.Generator().manual_seed(seed), callback_on_step_end=keep_latents)
    return out.images, drift(out.trace, last["latents"].detach().float().cpu())


def pixel_mean(images) -> float:
    """Returns the mean brightness of PIL images in [0, 1] (all channels)."""
    import numpy as np

    return float(np.mean([np.asarray(image, dtype=np.float32).mean() / 255.0 for image in images]))


def evaluate_objective(name: str, pipe_dir: str, dataset: str, prompts: list[str], settings: Settings,
                       out: str) -> list[dict]:
    """Returns one row per (sampler, guidance, steps): adherence, image brightness and drift; writes sample grids."""
    from ldm.images import image_grid
    from ldm.pipelines import Pipeline

    pipe = Pipeline.from_pretrained(pipe_dir)
    pipe.set_progress_bar_config(disable=True)
    samplers = settings.flow_samplers if OBJECTIVES[name][0] == "flow" else ("ddim",)
    rows = []
    for sampler in samplers:
        for guidance in settings.guidances:
            for steps in settings.sample_steps:
                images, trace = sample_run(pipe, prompts, sampler, steps, guidance, settings.seed)
                image_grid(images, columns=10).save(os.path.join(out, f"samples_{sampler}_g{guidance:g}_{steps}.png"))
                rows.append({"sampler": sampler, "guidance": guidance, "steps": steps,
                             "adherence": grade(dataset, images, prompts), "pixel_mean": pixel_mean(images),
                             "drift": trace})
    return rows


def to_images(pixels: torch.Tensor) -> list:
    """Returns (N, 3, H, W) pixels in [-1, 1] as PIL RGB images."""
    from PIL import Image

    array = ((pixels + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()  # (N, H, W, 3)
    return [Image.fromarray(a) for a in array]


def vae_ceiling(dataset: str, vae_dir: str, resolution: int) -> dict | None:
    """Returns, for digits, the grader's accuracy on the held-out test split as rendered and after a round trip
    through the trained VAE (what a perfect LDM could reach); None for shapes."""
    if dataset != "digits":
        return None
    from diffusers import AutoencoderKL

    from ldm.data.digits import load_split, render_digit
    from ldm.data.transforms import to_tensor
    from ldm.evaluation.digits import classify_digits, grader_ceiling
    from ldm.models.vae import encode_posterior

    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    inks, labels = load_split("test")
    pixels = torch.stack([to_tensor(render_digit(ink, resolution)) for ink in inks])  # (N, 3, R, R) in [-1, 1]
    with torch.no_grad():
        decoded = vae.decode(encode_posterior(vae, pixels)[0]).sample.clamp(-1, 1)  # posterior means decoded
    read = classify_digits(to_images(decoded))
    return {**grader_ceiling(resolution), "test_vae_round_trip": float((read == labels).mean())}


def run_objective(base, name: str, vae: dict, latents, dataset: str, prompts: list[str], settings: Settings) -> dict:
    """Trains (or reuses) and evaluates (or reuses) one objective; returns train_objective's dict plus "rows" and
    "eval_minutes"."""
    import shutil

    folder = os.path.join(base.out, name)
    train_key = {**vae["key"], "ldm_steps": settings.ldm_steps, "objective": name}
    trained = reuse(os.path.join(folder, "train.json"), train_key)
    if trained is None:
        shutil.rmtree(os.path.join(folder, "ldm_run"), ignore_errors=True)  # a run of other settings: start afresh
        print(f"[{dataset}] training {name}", flush=True)
        trained = {**train_objective(base, name, vae["vae_dir"], latents), "key": train_key}
        write_json(os.path.join(folder, "train.json"), trained)
    eval_key = {**train_key, "settings": json.loads(json.dumps(asdict(settings)))}
    evaluated = reuse(os.path.join(folder, "eval.json"), eval_key)
    if evaluated is None:
        print(f"[{dataset}] sampling and grading {name}", flush=True)
        started = time.time()
        rows = evaluate_objective(name, trained["pipeline"], dataset, prompts, settings, folder)
        evaluated = {"rows": rows, "minutes": (time.time() - started) / 60, "key": eval_key}
        write_json(os.path.join(folder, "eval.json"), evaluated)
    result = {k: v for k, v in trained.items() if k != "key"}
    return {**result, "eval_minutes": evaluated["minutes"], "rows": evaluated["rows"]}


def run_dataset(dataset: str, settings: Settings, out: str, objectives) -> dict:
    """Trains the data set's VAE once, encodes its images once, then trains and grades each objective on them."""
    from diffusers import AutoencoderKL

    from ldm.training.demo import LatentDataset

    cfg = base_config(dataset, settings, out)
    cfg.validate()
    torch.manual_seed(cfg.seed)
    pixels = pixel_data(dataset, cfg)
    vae_key = {"dataset": dataset, "vae_steps": settings.vae_steps, "num_samples": settings.num_samples,
               "seed": settings.seed}
    print(f"[{dataset}] {len(pixels)} training images; the VAE", flush=True)
    vae = train_vae_once(cfg, pixels, vae_key)
    vae_model = AutoencoderKL.from_pretrained(vae["vae_dir"])
    latents = LatentDataset(pixels, vae_model)  # encoded once, shared by every objective
    prompts = prompts_for(dataset, settings)
    report = {"images": len(pixels), "vae": {k: v for k, v in vae.items() if k != "key"},
              "data_latents": latent_statistics(latents, vae_model.config.scaling_factor),
              "data_pixel_mean": float(((pixels.pixels + 1) / 2).mean()),
              "ceiling": vae_ceiling(dataset, vae["vae_dir"], cfg.resolution), "prompts": prompts, "objectives": {}}
    for name in objectives:
        report["objectives"][name] = run_objective(cfg, name, vae, latents, dataset, prompts, settings)
    return report


def parse_args(argv=None) -> tuple[argparse.Namespace, Settings]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/objectives")
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    p.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=list(OBJECTIVES))
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="one whole run per seed (data, VAE, LDM, noise)")
    p.add_argument("--quick", action="store_true", help="a smoke run: 3 VAE and LDM steps, 2 prompts, 2-3 steps")
    p.add_argument("--vae-steps", type=int)
    p.add_argument("--ldm-steps", type=int)
    p.add_argument("--num-prompts", type=int, help="shapes prompts (1-90)")
    p.add_argument("--digit-images", type=int, help="images per digit")
    p.add_argument("--sample-steps", type=int, nargs="+")
    p.add_argument("--flow-samplers", nargs="+", choices=("euler", "heun"))
    args = p.parse_args(argv)
    settings = Settings.quick() if args.quick else Settings()
    given = {"vae_steps": args.vae_steps, "ldm_steps": args.ldm_steps, "num_prompts": args.num_prompts,
             "digit_images": args.digit_images, "sample_steps": tuple(args.sample_steps) if args.sample_steps else None,
             "flow_samplers": tuple(args.flow_samplers) if args.flow_samplers else None}
    return args, replace(settings, **{k: v for k, v in given.items() if v is not None})


def compute_minutes(results: dict) -> float:
    """Returns the minutes spent training and sampling over all runs, reused ones at the time they first took."""
    return sum(report["vae"]["minutes"] + sum(o["minutes"] + o["eval_minutes"] for o in report["objectives"].values())
               for runs in results["runs"].values() for report in runs.values())


def rounded(value, digits: int = 4):
    """Returns `value` (nested dicts and lists) with every float cut to `digits` significant digits."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}")
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(v, digits) for v in value]
    return value


def write_report(results: dict, settings: Settings, out: str) -> None:
    """Writes results.json (floats to 4 significant digits) and the plots to `out` and prints the tables."""
    write_json(os.path.join(out, "results.json"), rounded(results), indent=None)  # one line: half the size
    table = aggregate(results)
    plot_adherence(table, settings, os.path.join(out, "adherence.png"))
    plot_val_loss(table, os.path.join(out, "val_loss.png"))
    first = results["seeds"][0]
    for dataset, report in results["runs"][str(first)].items():
        title = f"{dataset} (seed {first})"
        plot_drift(title, report, settings, os.path.join(out, f"drift_{dataset}.png"))
        plot_samples(title, report, os.path.join(out, f"seed{first}", dataset), settings,
                     os.path.join(out, f"samples_{dataset}.png"))
        if report["ceiling"]:
            print(f"{dataset} grader ceiling (held-out test split, seed {first}): {report['ceiling']}")
    print(f"\n{loss_table(table)}\n\n{adherence_table(table, settings)}\n\n{drift_table(table, settings)}\n")


def main(argv=None) -> int:
    args, settings = parse_args(argv)
    torch.set_num_threads(1)  # small models on a shared CPU: the demo's choice (threads=1)
    started = time.time()
    results = {"settings": asdict(settings), "seeds": args.seeds, "runs": {}}
    for seed in args.seeds:  # out/seed<k>/<dataset>/: the VAE, then one folder per objective
        run = replace(settings, seed=seed)
        results["runs"][str(seed)] = {dataset: run_dataset(dataset, run, os.path.join(args.out, f"seed{seed}"),
                                                           args.objectives) for dataset in args.datasets}
    results["minutes"], results["compute_minutes"] = (time.time() - started) / 60, compute_minutes(results)
    write_report(results, settings, args.out)
    print(f"compare_objectives finished in {results['minutes']:.1f} min ({results['compute_minutes']:.1f} min of "
          f"training and sampling, reused runs included); results in {args.out}/results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
