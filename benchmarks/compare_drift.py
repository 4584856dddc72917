"""Sampling drift (issue #35), reproduced and every remedy measured: the cases of drift_cases.py (an under-capacity
UNet on digits in pixel and in latent space, the normal digits and shapes models), each trained plainly and with
each training remedy (drift_cases.TRAINING_REMEDIES; flow matching as the comparison point); the plain model also
sampled with each sampling remedy (sampling_kwargs, training-free); at several step counts, on fixed seeds.

Per (case, training remedy, seed) it records
  (a) the per-t prediction bias: the mean over channels of eps_pred - eps (a flow model: of its velocity) on a
      fixed probe (the first PROBE_IMAGES training images x 10 timestep bins, ldm.diagnostics.probe/bias), and the
      largest |z| of a channel's bias in each bin;
  (b) per sampling remedy and step count (DDIM, eta 0, guidance 1; the sampling remedies on the plainly trained
      model, at 10, 25 and 50 steps; the training remedies and flow (Euler) sampled plainly, at every step count):
      the drift, per step, of x_t from the forward marginal q(x_t) (ldm.diagnostics.sampling.trace_report:
      marginal_w2_mean, and the mean gap: x_t's mean - sqrt(alpha_bar_t) x the data's mean, over channels), and of
      the final x_0 from the data (W2 and mean gap); the quality: digits read by the classifier (accuracy) and the
      gap of the images' mean brightness to the training images'; shapes: adherence ("all") on held-out wordings.
A trained model is reused from --out when its settings match (drift_cases.py), and so is its evaluation; results.json
and the plots and tables of drift_report.py go to --out.

    python benchmarks/compare_drift.py --out runs/drift                 # every case, every remedy, seeds 0 and 1
    python benchmarks/compare_drift.py --cases digits-pixel-under digits-pixel digits-latent-under shapes \
        --case-remedies digits-latent-under=none,flow,input_perturbation,self_step,huber \
        digits-pixel=none,flow,huber,input_perturbation,self_step shapes=none,flow,huber,input_perturbation,self_step \
        --out runs/drift                                                  # docs/src/reports/drift.md's run
    python benchmarks/compare_drift.py --quick --out /tmp/drift         # a smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, replace

import torch

from compare_objectives import cached, pixel_mean, rounded, to_images, train_vae_once, write_json
from drift_cases import TRAINING_REMEDIES, Case, PixelLatents, cases, pixel_dataset, train

PROBE_IMAGES = 32
RESTART = {"t_min": 100, "t_max": 400, "K": 2}   # Xu et al. 2023: re-noise from t=100 back to t=400, twice
EPS_SCALE = 1.005                                 # Ning et al. 2024's constant lambda for DDIM at few steps


@dataclass
class Settings:
    under_steps: int = 800
    normal_steps: int = 600
    vae_steps: int = 400                     # the digits and shapes VAEs (compare_objectives' recipe)
    num_samples: int = 2000                  # shapes rendered for training
    images_per_prompt: int = 2               # digits: 2 per digit; shapes: 20 held-out prompts x 1
    shapes_prompts: int = 20
    sample_steps: tuple = (10, 25, 50, 1000)
    remedy_steps: tuple = (10, 25, 50)      # the sampling remedies' step counts (the plain sampler: all of them)
    sampling_remedies: tuple = ("none", "eps_scale", "restart", "dynamic_thresholding")
    seed: int = 0

    @classmethod
    def quick(cls) -> "Settings":
        return cls(under_steps=3, normal_steps=3, vae_steps=3, num_samples=32, images_per_prompt=1,
                   shapes_prompts=2, sample_steps=(10,), remedy_steps=(10,))


def sampling_kwargs(remedy: str, threshold_max: float) -> dict:
    """Returns the Pipeline arguments of a sampling remedy (pipelines/drift.py)."""
    return {"none": {}, "eps_scale": {"eps_scale": EPS_SCALE}, "restart": {"restart": RESTART},
            # Saharia et al. 2022: the 99.5th percentile, at most the data's own range (1 for pixels)
            "dynamic_thresholding": {"dynamic_thresholding": (0.995, threshold_max)}}[remedy]


def prompts_for(case: Case, settings: Settings) -> list[str]:
    """Returns the graded prompts: each digit images_per_prompt times, or held-out wordings of the shapes."""
    from ldm.evaluation.shape_prompts import held_out_prompts

    if case.dataset == "shapes":
        return held_out_prompts(settings.shapes_prompts)
    return [f"a handwritten digit {d}" for _ in range(settings.images_per_prompt) for d in range(10)]


def grade(case: Case, images, prompts: list[str]) -> float:
    """Returns the fraction of images that fit their prompt (digits are inverted back to ldm's black on white)."""
    if case.dataset == "shapes":
        from ldm.evaluation.adherence import adherence_report

        return adherence_report(images, prompts)["all"]
    from PIL import ImageOps

    from ldm.evaluation.digits import adherence_report

    return adherence_report([ImageOps.invert(image) for image in images], prompts)["all"]


def trace_summary(trace, scheduler, final: torch.Tensor, data_mean, data_std) -> dict:
    """Returns per step {"t", "w2", "mean_gap"} (x_t against q(x_t)) and the final x_0's "final_w2",
    "final_mean_gap" against the data's per-channel N(mean, std)."""
    from ldm.diagnostics.sampling import marginal_distance, trace_report

    rows = trace_report(trace, scheduler, 1.0, data_mean=data_mean, data_std=data_std)["steps"]
    level = [r.get("alpha_bar_t", r.get("sigma")) for r in rows]
    # the forward marginal's mean: sqrt(alpha_bar) m (diffusion), (1 - sigma) m (flow)
    scale = [a ** 0.5 if "alpha_bar_t" in r else 1 - a for r, a in zip(rows, level)]
    gap = [float((torch.tensor(r["latent_mean"]) - s * data_mean).mean()) for r, s in zip(rows, scale)]
    final_w2 = marginal_distance(final, data_mean.double(), data_std.double())
    return {"t": [float(r["timestep"]) for r in rows], "w2": [r["marginal_w2_mean"] for r in rows],
            "mean_gap": gap, "final_w2": float(final_w2.mean()),
            "final_mean_gap": float((final.double().mean(dim=(0, 2, 3)) - data_mean).mean())}


@torch.no_grad()
def sample(pipe, case: Case, prompts: list[str], steps: int, seed: int, remedy: dict):
    """Returns (images, trace, final x_0 latents) of one run, guidance 1 (the model alone), fixed noise."""
    last = {}

    def keep(_pipe, i, t, tensors):
        last["latents"] = tensors["latents"]
        return tensors

    out = pipe(prompts, num_inference_steps=steps, guidance_scale=1.0, trace=True, callback_on_step_end=keep,
               generator=torch.Generator().manual_seed(seed), output_type="latent" if case.pixel else "pil", **remedy)
    final = last["latents"].detach().float().cpu()  # (B, C, h, w)
    images = to_images(final.clamp(-1, 1)) if case.pixel else out.images  # pixel space: the latents are the images
    return images, out.trace, final


def probe_bias(pipe, data: torch.Tensor, captions: list[str], seed: int) -> dict:
    """Returns {"t": each bin's middle in t/T, "bias": mean over channels, "max_z"} of the model's prediction
    bias on the probe (ldm.diagnostics.bias): eps for diffusion, the velocity for flow."""
    from ldm.diagnostics.bias import flow_per_bin_report, per_bin_report
    from ldm.diagnostics.probe import build_flow_probe, build_probe, predict_probe
    from ldm.objectives import objective_for

    objective = objective_for(pipe.scheduler)
    context = pipe.encode_prompt(captions, None, 1, False, prompt_syntax="plain")[0].float().cpu()  # (n, L, D)
    if objective.name == "flow":
        probe = build_flow_probe(data, context, 10, 4, seed, captions)
        rows = flow_per_bin_report(predict_probe(pipe.denoiser, probe, objective), probe.eps, probe.x0, probe.x_t,
                                   probe.sigmas, 10)
        middle = [(r["sigma_lo"] + r["sigma_hi"]) / 2 for r in rows]
    else:
        probe = build_probe(data, context, pipe.scheduler.alphas_cumprod, 10, 4, seed, captions)
        rows = per_bin_report(predict_probe(pipe.denoiser, probe, objective), probe.eps, probe.x0, probe.x_t,
                              probe.timesteps, probe.alphas_cumprod, 10)
        middle = [(r["t_lo"] + r["t_hi"]) / 2 / len(probe.alphas_cumprod) for r in rows]
    return {"t": middle, "bias": [sum(r["bias"]) / len(r["bias"]) for r in rows],
            "max_z": [max(r["bias_z"]) for r in rows]}


def evaluate(pipe_dir: str, case: Case, data, settings: Settings, out: str, plain: bool = True) -> dict:
    """Returns {"bias", "rows"}: the probe bias and one row per (sampling remedy, steps); writes sample grids.
    The sampling remedies run on the plainly trained model only (plain=True); a training remedy's model and a
    flow model are sampled plainly."""
    from ldm.images import image_grid
    from ldm.objectives import objective_for
    from ldm.pipelines import Pipeline

    pipe = Pipeline.from_pretrained(pipe_dir)
    pipe.set_progress_bar_config(disable=True)
    flow = objective_for(pipe.scheduler).name == "flow"
    pipe.set_scheduler("euler" if flow else "ddim")
    prompts = prompts_for(case, settings)
    mean, std = data["mean"], data["std"]
    rows = []
    for remedy in settings.sampling_remedies if plain and not flow else ("none",):
        for steps in settings.sample_steps if remedy == "none" else settings.remedy_steps:
            images, trace, final = sample(pipe, case, prompts, steps, settings.seed,
                                          sampling_kwargs(remedy, data["threshold_max"]))
            image_grid(images, columns=10).save(os.path.join(out, f"samples_{remedy}_{steps}.png"))
            rows.append({"sampling": remedy, "steps": steps, "quality": grade(case, images, prompts),
                         "brightness_gap": pixel_mean(images) - data["pixel_mean"],
                         **trace_summary(trace, pipe.scheduler, final, mean, std)})
    return {"bias": probe_bias(pipe, data["probe"], data["captions"], settings.seed), "rows": rows}


def case_data(case: Case, settings: Settings, out: str) -> dict:
    """Returns the case's training set (as train_ldm takes it), its VAE folder ("" in pixel space), the data's
    per-channel mean and std as the model sees it, the threshold's data range, the probe images and captions."""
    from diffusers import AutoencoderKL

    from compare_objectives import base_config
    from ldm.training.demo import LatentDataset

    resolution = 8 if case.pixel else 32
    pixels = pixel_dataset(case, settings.seed, settings.num_samples, resolution)
    if case.pixel:
        dataset, vae_dir, x0 = PixelLatents(pixels), "", pixels.pixels  # (N, 3, 8, 8)
    else:
        cfg = replace(base_config(case.dataset, settings_for_vae(settings), out), resolution=resolution)
        key = {"dataset": case.dataset, "vae_steps": settings.vae_steps, "num_samples": settings.num_samples,
               "seed": settings.seed, "inverted_digits": True}
        vae_dir = train_vae_once(cfg, pixels, key)["vae_dir"]
        vae = AutoencoderKL.from_pretrained(vae_dir)
        dataset = LatentDataset(pixels, vae)
        x0 = dataset.mean * vae.config.scaling_factor  # (N, 4, 8, 8), the LDM's x0
    images = to_images(pixels.pixels[:256])
    return {"dataset": dataset, "vae_dir": vae_dir, "mean": x0.double().mean(dim=(0, 2, 3)),
            "std": x0.double().std(dim=(0, 2, 3)), "threshold_max": max(1.0, float(x0.abs().quantile(0.995))),
            "pixel_mean": pixel_mean(images), "probe": x0[:PROBE_IMAGES].float(),
            "captions": pixels.captions[:PROBE_IMAGES]}


def settings_for_vae(settings: Settings):
    """Returns compare_objectives.Settings with this run's VAE steps, shapes count and seed."""
    from compare_objectives import Settings as ObjectiveSettings

    return ObjectiveSettings(vae_steps=settings.vae_steps, num_samples=settings.num_samples, seed=settings.seed)


def run_model(case: Case, remedy: str, data: dict, settings: Settings, out: str) -> dict:
    """Trains (or reuses) and evaluates (or reuses) one (case, training remedy, seed); returns the result."""
    import shutil

    folder = os.path.join(out, case.name, remedy)
    train_key = {"case": asdict(case), "remedy": TRAINING_REMEDIES[remedy], "seed": settings.seed,
                 "vae_steps": settings.vae_steps}

    def train_afresh() -> dict:
        shutil.rmtree(folder, ignore_errors=True)  # a run of other settings: start afresh
        print(f"[{case.name}] training with {remedy}", flush=True)
        return train(case, remedy, folder, data["vae_dir"], data["dataset"], settings.seed)

    def sample_and_grade() -> dict:
        print(f"[{case.name}] sampling {remedy}", flush=True)
        started = time.time()
        return {**evaluate(trained["pipeline"], case, data, settings, folder, remedy == "none"),
                "minutes": (time.time() - started) / 60}

    trained = cached(os.path.join(folder, "train.json"), train_key, train_afresh)
    eval_key = {**train_key, "settings": json.loads(json.dumps(asdict(settings)))}
    evaluated = cached(os.path.join(folder, "eval.json"), eval_key, sample_and_grade)
    return {"train_minutes": trained["minutes"], "val_loss": trained["val_loss"],
            **{k: v for k, v in evaluated.items() if k != "key"}}


def parse_args(argv=None) -> tuple[argparse.Namespace, Settings]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/drift")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--quick", action="store_true", help="a smoke run: 3 training steps, 10 sampling steps")
    p.add_argument("--cases", nargs="+", default=list(cases(0, 0)), choices=list(cases(0, 0)))
    p.add_argument("--training-remedies", nargs="+", default=list(TRAINING_REMEDIES), choices=list(TRAINING_REMEDIES))
    p.add_argument("--normal-remedies", nargs="+", default=["none"], choices=list(TRAINING_REMEDIES),
                   help="the training remedies of the normal cases (digits, shapes); all of them are trained on the "
                        "under-capacity cases")
    p.add_argument("--case-remedies", nargs="+", default=[], metavar="CASE=R1,R2",
                   help="a case's own training remedies, e.g. digits-latent-under=none,flow (overrides the two above)")
    p.add_argument("--under-steps", type=int)
    p.add_argument("--normal-steps", type=int)
    p.add_argument("--sample-steps", type=int, nargs="+")
    args = p.parse_args(argv)
    settings = Settings.quick() if args.quick else Settings()
    given = {"under_steps": args.under_steps, "normal_steps": args.normal_steps,
             "sample_steps": tuple(args.sample_steps) if args.sample_steps else None}
    return args, replace(settings, **{k: v for k, v in given.items() if v is not None})


def case_remedies(args: argparse.Namespace) -> dict[str, list[str]]:
    """Returns {case: training remedies} from --case-remedies CASE=R1,R2; raises ValueError naming a bad one."""
    chosen = {}
    for spec in args.case_remedies:
        name, _, remedies = spec.partition("=")
        chosen[name] = remedies.split(",")
        unknown = [r for r in chosen[name] if r not in TRAINING_REMEDIES] + ([name] if name not in cases(0, 0) else [])
        if unknown:
            raise ValueError(f"--case-remedies {spec!r}: unknown {unknown}; cases {list(cases(0, 0))}, remedies "
                             f"{list(TRAINING_REMEDIES)}")
    return chosen


def main(argv=None) -> int:
    from drift_report import write_report

    args, settings = parse_args(argv)
    torch.set_num_threads(1)  # small models on a shared CPU (compare_objectives' choice)
    started = time.time()
    by_name = cases(settings.under_steps, settings.normal_steps)
    results = {"settings": asdict(settings), "seeds": args.seeds, "runs": {}}
    for seed in args.seeds:
        run = replace(settings, seed=seed)
        for name in args.cases:
            case = by_name[name]
            data = case_data(case, run, os.path.join(args.out, f"seed{seed}"))
            remedies = case_remedies(args).get(name) or (args.training_remedies if case.under else args.normal_remedies)
            results["runs"].setdefault(name, {}).setdefault(str(seed), {})
            for remedy in remedies:
                result = run_model(case, remedy, data, run, os.path.join(args.out, f"seed{seed}"))
                results["runs"][name][str(seed)][remedy] = result
                results["minutes"] = (time.time() - started) / 60
                write_json(os.path.join(args.out, "results.json"), rounded(results), indent=None)  # partial too
    write_report(results, args.out)
    print(f"compare_drift finished in {results['minutes']:.1f} min; results in {args.out}/results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
