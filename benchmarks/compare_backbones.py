"""UNet against DiT on this CPU: the `small` UNet and DiTs of the same parameter count, trained in latent space
with the demo's recipe (epsilon, cosine LR, EMA, caption dropout 0.1 for guidance), on the shapes demo data and
on scikit-learn's handwritten digits; and the DiT's text-conditioning mechanisms against each other.

Arms (ARMS): `unet` (small) trains for --steps steps; `dit` (dit-small, adaLN-Zero, within 0.4% of the UNet's
parameters) for the same training time; `dit-same-steps` for the same steps (same images seen, same parameters);
`dit-adaln`, `dit-cross-attention`, `dit-in-context` and `pixart` (diffusers' PixArtTransformer2DModel) each for
the same training time as the UNet.

Equal time is equal *compute* time, measured once in this process before training: each model's median seconds
per training step (batch 32, one thread; the presets' steps taken round-robin, so that a change of load slows all
alike) sets its step count, steps = --steps x (UNet s/step) / (its s/step); the step counts are then fixed, so a
busy machine changes how long the study takes, not what it trains. Run it on an idle machine all the same: the
timing is the one measurement that load can skew (costs.json keeps it; delete the file to measure again). FLOPs per step are counted by PyTorch's
FlopCounterMode (benchmarks/flops.py). Every arm saves its pipeline at 1/3, 2/3 and all of its steps; each is
graded (DDIM, 25 steps, guidance 1 and 4) on prompts as in compare_objectives.py (shapes: the demo's canonical
prompts, the captions' wording; digits: the digits grader), and the validation loss (epsilon MSE on a fixed set
of 64 held-out images: new shapes scenes, the digits' test split; every 1/12 of the run) is plotted against
compute time.

    python benchmarks/compare_backbones.py --seeds 0 1 --out runs/backbones
    python benchmarks/compare_backbones.py --quick --out /tmp/backbones    # a smoke run
A data set's VAE, each trained arm and each evaluation are reused from --out when their settings match.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, replace

import torch

import compare_objectives as objectives
from backbones_report import graded_steps, write_report
from flops import TrainStep, interleaved_seconds

# name -> (preset, budget): "steps" trains --steps steps, "time" the UNet's training time
ARMS = {"unet": ("small", "steps"), "dit": ("dit-small", "time"), "dit-same-steps": ("dit-small", "steps"),
        "dit-adaln": ("dit-small-adaln", "time"), "dit-cross-attention": ("dit-small-cross-attention", "time"),
        "dit-in-context": ("dit-small-in-context", "time"), "pixart": ("pixart-small", "time")}
DEFAULT_ARMS = {"shapes": list(ARMS), "digits": ["unet", "dit", "dit-same-steps"]}
TOKENS = 16  # the demo's max_token_length


@dataclass
class Settings:
    vae_steps: int = 400
    steps: int = 1200                    # the UNet's training steps; the DiT arms' follow from it
    num_samples: int = 2000
    num_prompts: int = 30
    digit_images: int = 3
    sample_steps: int = 25
    guidances: tuple = (1.0, 4.0)
    checkpoints: int = 3                 # pipelines saved (and graded) at 1/3, 2/3, 3/3 of each arm's steps
    timing_repeats: int = 20
    seed: int = 0

    @classmethod
    def quick(cls) -> "Settings":
        return cls(vae_steps=3, steps=6, num_samples=64, num_prompts=2, digit_images=1, sample_steps=2,
                   timing_repeats=2)

    def objectives_settings(self) -> "objectives.Settings":
        return objectives.Settings(vae_steps=self.vae_steps, ldm_steps=self.steps, num_samples=self.num_samples,
                                   num_prompts=self.num_prompts, digit_images=self.digit_images, seed=self.seed)


def costs(presets, settings: Settings, out: str) -> dict:
    """Returns {preset: {"train_flops", "sample_flops", "seconds_per_step", "parameters"}} of a fresh model of each
    preset (batch 32, one thread), the steps timed round-robin across the presets (flops.interleaved_seconds)."""
    from ldm.models.denoiser import denoiser_of
    from ldm.models.presets import build_components, count_parameters

    path = os.path.join(out, "costs.json")
    key = {"presets": sorted(presets), "repeats": settings.timing_repeats, "timing": "interleaved"}
    saved = objectives.reuse(path, key)
    if saved:
        return saved["costs"]
    steps, result = {}, {}
    for preset in sorted(presets):
        parts = build_components(preset, seed=0)
        model = denoiser_of(parts)
        steps[preset] = TrainStep(model, 32, model.config.sample_size, TOKENS, parts["text_encoder"].config.hidden_size)
        result[preset] = {**steps[preset].flops(), "parameters": count_parameters(model)}
    for preset, seconds in interleaved_seconds(steps, settings.timing_repeats).items():
        result[preset]["seconds_per_step"] = seconds
        print(f"{preset}: {result[preset]}", flush=True)
    objectives.write_json(path, {"costs": result, "key": key})
    return result


def arm_steps(arm: str, settings: Settings, cost: dict) -> int:
    preset, budget = ARMS[arm]
    if budget == "steps":
        return settings.steps
    ratio = cost["small"]["seconds_per_step"] / cost[preset]["seconds_per_step"]
    return max(settings.checkpoints, round(settings.steps * ratio))


def train_arm(base, arm: str, steps: int, settings: Settings, vae_dir: str, data) -> dict:
    """Trains one arm with the demo's LDM recipe on data = (training latents, held-out latents); returns its
    validation history (on 64 held-out images) and checkpoint pipelines."""
    from ldm.training import train_ldm
    from ldm.training.demo import ldm_config

    cfg = replace(base, out=os.path.join(base.out, arm), model=ARMS[arm][0], ldm_steps=steps)
    ldm = replace(ldm_config(cfg, vae_dir), checkpoint_every=max(1, steps // settings.checkpoints),
                  checkpoints_total_limit=0, validation_every=max(1, steps // 12), val_loss_samples=64)
    ldm.validate()
    started = time.time()
    result = train_ldm.main(ldm, dataset=data[0], val_dataset=data[1])
    if result["stopped_by"] in ("SIGTERM", "SIGINT"):
        raise SystemExit(f"{arm}: training stopped by {result['stopped_by']}; run again to redo it")
    folders = sorted(glob.glob(os.path.join(ldm.output_dir, "checkpoints", "checkpoint-*", "pipeline")))
    return {"steps": result["step"], "minutes": (time.time() - started) / 60,
            "val_loss_history": [(v["step"], v["val_loss"]) for v in result["val"]],
            "pipelines": {int(os.path.basename(os.path.dirname(f)).split("-")[1]): f for f in folders}}


def evaluate_arm(trained: dict, dataset: str, prompts: list[str], settings: Settings, out: str) -> list[dict]:
    """Returns one row per (checkpoint step, guidance): adherence of DDIM samples; writes the last one's grids."""
    from ldm.images import image_grid
    from ldm.pipelines import Pipeline

    rows, folders = [], {int(step): folder for step, folder in trained["pipelines"].items()}
    for step in graded_steps(folders, trained["steps"], settings.checkpoints):
        folder = folders[step]
        pipe = Pipeline.from_pretrained(folder)
        pipe.set_progress_bar_config(disable=True)
        for guidance in settings.guidances:
            images, _ = objectives.sample_run(pipe, prompts, "ddim", settings.sample_steps, guidance, settings.seed)
            if int(step) == trained["steps"]:
                image_grid(images, columns=10).save(os.path.join(out, f"samples_g{guidance:g}.png"))
            rows.append({"step": int(step), "guidance": guidance,
                         "adherence": objectives.grade(dataset, images, prompts)})
    return rows


def run_arm(base, arm: str, steps: int, vae: dict, data, dataset: str, prompts, settings: Settings) -> dict:
    """Trains (or reuses) and evaluates (or reuses) one arm."""
    import shutil

    folder = os.path.join(base.out, arm)
    train_key = {**vae["key"], "steps": steps, "preset": ARMS[arm][0], "checkpoints": settings.checkpoints}
    trained = objectives.reuse(os.path.join(folder, "train.json"), train_key)
    if trained is None:
        shutil.rmtree(os.path.join(folder, "ldm_run"), ignore_errors=True)
        print(f"[{dataset}] training {arm} ({ARMS[arm][0]}) for {steps} steps", flush=True)
        trained = {**train_arm(base, arm, steps, settings, vae["vae_dir"], data), "key": train_key}
        objectives.write_json(os.path.join(folder, "train.json"), trained)
    eval_key = {**train_key, "settings": json.loads(json.dumps(asdict(settings)))}
    evaluated = objectives.reuse(os.path.join(folder, "eval.json"), eval_key)
    if evaluated is None:
        print(f"[{dataset}] grading {arm}", flush=True)
        evaluated = {"rows": evaluate_arm(trained, dataset, prompts, settings, folder), "key": eval_key}
        objectives.write_json(os.path.join(folder, "eval.json"), evaluated)
    return {**{k: v for k, v in trained.items() if k not in ("key", "pipelines")}, "rows": evaluated["rows"]}


def held_out_pixels(dataset: str, cfg):
    """Returns images the models never train on, for the validation loss: new shapes scenes (another seed), or
    the digits' test split, captioned as the training images are."""
    from ldm.data.digits import DigitsDataset
    from ldm.data.transforms import to_tensor
    from ldm.training.demo import PixelDataset

    if dataset == "shapes":
        return PixelDataset(256, cfg.resolution, cfg.seed + 10_000, cfg.two_shape_fraction, cfg.canonical_captions)
    digits = DigitsDataset("test", cfg.resolution, canonical_captions=True)
    samples = [digits[i] for i in range(len(digits))]
    return PixelDataset.from_tensors(torch.stack([to_tensor(s["image"]) for s in samples]),
                                     [s["caption"] for s in samples])


def prompts_for(dataset: str, settings: Settings) -> list[str]:
    return objectives.prompts_for(dataset, settings.objectives_settings())


def run_dataset(dataset: str, arms, settings: Settings, out: str, cost: dict) -> dict:
    """Trains the data set's VAE once, encodes it once, then trains and grades each arm on the same latents, in
    OUT/<dataset>/."""
    from diffusers import AutoencoderKL

    from ldm.training.demo import LatentDataset

    plain = settings.objectives_settings()
    cfg = objectives.base_config(dataset, plain, out)
    torch.manual_seed(cfg.seed)
    pixels = objectives.pixel_data(dataset, cfg)
    vae_key = {"dataset": dataset, "vae_steps": settings.vae_steps, "num_samples": settings.num_samples,
               "seed": settings.seed}
    vae = objectives.train_vae_once(cfg, pixels, vae_key)
    vae_model = AutoencoderKL.from_pretrained(vae["vae_dir"])
    latents, held_out = LatentDataset(pixels, vae_model), LatentDataset(held_out_pixels(dataset, cfg), vae_model)
    prompts = prompts_for(dataset, settings)
    report = {"images": len(pixels), "held_out_images": len(held_out), "vae_psnr": vae.get("psnr"),
              "prompts": prompts, "arms": {}}
    for arm in arms:
        steps = arm_steps(arm, settings, cost)
        report["arms"][arm] = {"preset": ARMS[arm][0], **run_arm(cfg, arm, steps, vae, (latents, held_out),
                                                                   dataset, prompts, settings)}
    return report


def parse_args(argv=None) -> tuple[argparse.Namespace, Settings]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/backbones")
    p.add_argument("--datasets", nargs="+", default=list(DEFAULT_ARMS), choices=list(DEFAULT_ARMS))
    p.add_argument("--arms", nargs="+", choices=list(ARMS), help="default: every arm on shapes, "
                   "unet/dit/dit-same-steps on digits")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="one whole run per seed (data, VAE, models)")
    p.add_argument("--steps", type=int, help="the UNet's training steps (default 1200)")
    p.add_argument("--quick", action="store_true", help="a smoke run: a few steps, 2 prompts")
    args = p.parse_args(argv)
    settings = Settings.quick() if args.quick else Settings()
    settings = replace(settings, **({"steps": args.steps} if args.steps else {}))
    return args, settings


def main(argv=None) -> int:
    args, settings = parse_args(argv)
    torch.set_num_threads(1)  # the demo's choice for small models on a shared CPU; timings too are one thread
    started = time.time()
    plan = {d: [a for a in DEFAULT_ARMS[d] if not args.arms or a in args.arms] for d in args.datasets}
    cost = costs({ARMS[a][0] for arms in plan.values() for a in arms} | {"small"}, settings, args.out)
    results = {"settings": asdict(settings), "seeds": args.seeds, "costs": cost, "runs": {}}
    for seed in args.seeds:  # out/seed<k>/<dataset>/: the VAE, then one folder per arm
        run = replace(settings, seed=seed)
        results["runs"][str(seed)] = {dataset: run_dataset(dataset, arms, run, os.path.join(args.out, f"seed{seed}"),
                                                           cost) for dataset, arms in plan.items()}
    results["minutes"] = (time.time() - started) / 60
    write_report(results, args.out)
    print(f"compare_backbones finished in {results['minutes']:.1f} min; results in {args.out}/results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
