"""`ldm eval-guidance`: sweep guidance methods and scales on one model, score each setting's prompt adherence against
its distribution distance to real images, and recommend the setting with the least distance among the most
adherent ones.

    cfg = SweepConfig(prompts="digits", reference="digits:test@32", images_per_prompt=20)
    report = run_sweep(pipe, cfg, out="runs/guidance")          # sweep.json, tradeoff.png, grid_<method>.png
    write_recommendation(model_folder, report)                    # guidance.json, read by Pipeline.from_pretrained

Every setting samples the same prompts from the same initial noise (image k of the sweep: seed + k), with the same
sampler and steps, so the guidance is the only difference. Scales <= 1 run the conditional branch alone, the same
images for every method: they are sampled once. The distance is the Frechet distance (and KID) in a feature space
that needs no downloaded weights by default ("pixels": each image box-averaged to feature_size x feature_size RGB
in [0, 1] and flattened; for digits the grey 8x8 the adherence classifier reads). The first num_reference
reference images are split into two interleaved halves: every setting is measured against the even half, and the
odd half, measured against it too, is the noise floor, what real images score. FID is biased upward at small N,
so the floor is like for like when a setting has as many images as the odd half (about num_reference / 2).
"""
from __future__ import annotations

import dataclasses
import datetime
import importlib
import os
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from ldm.diagnostics.io import write_json
from ldm.diffusion.process import snr
from ldm.pipelines.guidance import APGSettings
from ldm.pipelines.recommended import GUIDANCE_FILE
from ldm.ranges import check_ranges

BUILT_IN_PROMPTS = ("shapes", "digits")
FEATURES = ("pixels", "tiny", "inception")
# Kynkaanniemi et al. 2024, arXiv:2404.07724, Sec. 4 and Fig. 1: guidance in sigma (0.28, 5.42] (EDM sigmas, data
# std 0.5), their interval for EDM2-S and for Stable Diffusion XL; mapped to each model's own timesteps.
INTERVAL_SIGMAS = (0.28, 5.42)


def cfg_params(settings: "SweepConfig") -> dict:
    return {}


def interval_params(settings: "SweepConfig") -> dict:
    return {"guidance_interval": list(settings.interval)}


def apg_params(settings: "SweepConfig") -> dict:
    return {"apg": dataclasses.asdict(settings.apg)}


def cfg_zero_star_params(settings: "SweepConfig") -> dict:
    return {"cfg_zero_star": True}


def rescale_params(settings: "SweepConfig") -> dict:
    return {"guidance_rescale": settings.rescale}


# method name (ldm.pipelines.guidance.GUIDANCE_METHODS) -> its Pipeline.__call__ keywords (guidance.json's "params")
METHODS: dict[str, Callable[["SweepConfig"], dict]] = {
    "cfg": cfg_params, "interval": interval_params, "apg": apg_params, "cfg_zero_star": cfg_zero_star_params,
    "rescale": rescale_params}


@dataclass
class SweepConfig:
    prompts: str = "shapes"               # "shapes", "digits" or a text file, one prompt per line
    images_per_prompt: int = 1
    methods: tuple[str, ...] = tuple(METHODS)
    scales: tuple[float, ...] = (1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 7.5)
    steps: int = 25
    seed: int = 0
    batch_size: int = 64                  # images per pipeline call
    grader: str = "auto"                  # "auto", "shapes", "digits" or "MODULE:FUNCTION"
    reference: str = ""                   # a data spec ldm.data.open_dataset reads: folder, "digits:test@32", ...
    num_reference: int = 1000
    features: str = "pixels"              # "pixels" (no weights), "tiny" or "inception" (local weights file)
    feature_size: int = 8                 # "pixels": images box-averaged to this many pixels a side
    feature_weights: str | None = None
    interval: tuple[float, float] | None = None  # "interval": (t_lo, t_hi); None: INTERVAL_SIGMAS in the model's t
    apg: APGSettings = field(default_factory=APGSettings)
    rescale: float = 0.7                  # "rescale": phi, Lin et al. 2023's choice
    tolerance: float = 0.02               # recommend among points within this of the best adherence
    grid_scale: float = 3.0               # the scale of each method's sample grid (the nearest swept one)

    RANGES = {"images_per_prompt": "[1, 10000]", "steps": "[1, 1000]", "seed": "[0, 4294967295]",
              "batch_size": "[1, 4096]", "num_reference": "[2, 1000000]", "feature_size": "[1, 512]",
              "rescale": "[0, 1]", "tolerance": "[0, 1]", "grid_scale": "[0, 100]"}

    def validate(self) -> None:
        """Raises ValueError naming the first bad setting."""
        check_ranges(self)
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"unknown guidance method(s) {unknown or '(none given)'}; choose from "
                             f"{', '.join(METHODS)}")
        bad = [s for s in self.scales if not 0 <= s <= 100]
        if bad or not self.scales:
            raise ValueError(f"guidance scales must be in [0, 100] (<= 1: no guidance), got {list(self.scales)}")
        if self.features not in FEATURES:
            raise ValueError(f"unknown --features {self.features!r}; choose from {', '.join(FEATURES)}")
        if not self.reference:
            raise ValueError("no reference images: pass --reference, a data spec such as digits:test@32, "
                             "shapes:1000@32 or a folder of images")
        if self.interval is not None and not 0 <= self.interval[0] <= self.interval[1]:
            raise ValueError(f"interval={self.interval} must be (t_lo, t_hi) with 0 <= t_lo <= t_hi")


# ------------------------------------------------------------------ prompts and graders

def load_prompts(spec: str) -> list[str]:
    """Returns the prompts of a built-in set ("shapes": the demo's 90 canonical single-shape prompts; "digits":
    "a handwritten digit 0" to "9") or of a text file (its non-empty lines)."""
    if spec == "shapes":
        from ldm.evaluation.shape_prompts import eval_prompts

        return eval_prompts(90)
    if spec == "digits":
        from ldm.data.digits import caption_digit

        return [caption_digit(d) for d in range(10)]
    from ldm.evaluation.run import read_prompts

    return read_prompts(spec)


def load_grader(name: str, prompts: list[str]) -> Callable[[list, list[str]], dict]:
    """Returns the adherence grader, grader(images, prompts) -> {"all": fraction, ...}: shapes
    (ldm.evaluation.adherence), digits (ldm.evaluation.digits), a user's "MODULE:FUNCTION", or with "auto" the
    built-in one that parses every prompt."""
    from ldm.evaluation import adherence, digits

    built_in = {"shapes": (adherence.adherence_report, adherence.parse_prompt),
                "digits": (digits.adherence_report, digits.parse_digit)}
    if name == "auto":
        for grader, parse in built_in.values():
            try:
                [parse(p) for p in prompts]
                return grader
            except ValueError:
                continue
        raise ValueError("--grader auto: the prompts are neither all shapes prompts ('a red circle on the left') nor "
                         "all digits prompts ('a handwritten digit 7'); pass --grader MODULE:FUNCTION, a function "
                         "(images, prompts) -> {'all': fraction, ...}")
    if name in built_in:
        grader, parse = built_in[name]
        [parse(p) for p in prompts]  # a prompt it cannot grade fails now, with the parser's message
        return grader
    module, sep, function = name.partition(":")
    if not sep or not module or not function:
        raise ValueError(f"--grader {name!r}: use auto, shapes, digits or MODULE:FUNCTION (e.g. mypkg.grade:report)")
    try:
        grader = getattr(importlib.import_module(module), function)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"--grader {name!r} cannot be imported ({e}); put the module on PYTHONPATH") from e
    if not callable(grader):
        raise ValueError(f"--grader {name!r} is not a function")
    return grader


# ------------------------------------------------------------------ distribution distance

def pixel_features(images: torch.Tensor, size: int = 8) -> torch.Tensor:
    """Returns (N, 3 * size * size): images (N, 3, H, W) in [0, 1] box-averaged to size x size, flattened."""
    return F.adaptive_avg_pool2d(images.float(), size).flatten(1)  # (N, 3, size, size) -> (N, 3*size*size)


def feature_function(cfg: SweepConfig) -> Callable[[torch.Tensor], torch.Tensor]:
    """Returns images (N, 3, H, W) in [0, 1] -> features (N, d) for cfg.features (weights loaded here)."""
    if cfg.features == "pixels":
        return lambda images: pixel_features(images, cfg.feature_size)
    from ldm.evaluation.features import extract_features, load_feature_extractor

    extractor = load_feature_extractor(cfg.features, cfg.feature_weights)
    return lambda images: extract_features(extractor, images)


def reference_images(spec: str, resolution: int, count: int) -> torch.Tensor:
    """Returns the first `count` images of a data spec as (N, 3, R, R) in [0, 1]; raises ValueError for fewer than
    two. Built-in shapes come without two-shape scenes: the graded prompts draw one shape."""
    from ldm.data import open_dataset

    data = open_dataset(spec, resolution=resolution, shuffle=False, two_shape_fraction=0.0)
    images = []
    for sample in data:
        images.append(sample["pixel_values"])  # (3, R, R) in [-1, 1]
        if len(images) == count:
            break
    if len(images) < 2:
        raise ValueError(f"reference {spec!r} gave {len(images)} image(s); a distance needs at least two")
    return torch.stack(images).add(1).div(2)  # (N, 3, R, R) in [0, 1]


def distances(real: torch.Tensor, fake: torch.Tensor) -> dict:
    """Returns {"fid", "kid", "kid_std"} between two feature sets (N, d)."""
    from ldm.evaluation.fid import fid_from_features, kernel_inception_distance

    kid, kid_std = kernel_inception_distance(real, fake)
    return {"fid": fid_from_features(real, fake), "kid": kid, "kid_std": kid_std}


def split_reference(reference: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Returns (the even-numbered reference features, what every setting is measured against; the noise floor:
    distances() of the odd-numbered ones to them, with their number n)."""
    real, held_out = reference[0::2], reference[1::2]  # (ceil(N/2), d), (floor(N/2), d)
    return real, {**distances(real, held_out), "n": len(held_out)}


# ------------------------------------------------------------------ the recommended point

def recommend(points: list[dict], tolerance: float) -> dict:
    """Returns the point with the lowest FID among those whose adherence is within `tolerance` of the best
    (ties: the lower KID, then the lower scale)."""
    best = max(p["adherence"]["all"] for p in points)
    candidates = [p for p in points if p["adherence"]["all"] >= best - tolerance - 1e-12]  # 1e-12: 0.98 vs 1 - 0.02
    return min(candidates, key=lambda p: (p["fid"], p["kid"], p["scale"]))


def write_recommendation(folder: str, report: dict) -> str:
    """Writes the report's recommended point as the model folder's guidance.json; returns its path."""
    point = report["recommended"]
    record = {"method": point["method"], "guidance_scale": point["scale"], "params": point["params"],
              "measured": {k: point[k] for k in ("adherence", "fid", "kid", "n")},
              "sweep": report["settings"], "noise_floor": report["noise_floor"],
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    path = os.path.join(folder, GUIDANCE_FILE)
    write_json(path, record)
    return path


# ------------------------------------------------------------------ sampling and scoring

def default_interval(scheduler) -> tuple[float, float]:
    """Returns INTERVAL_SIGMAS as (t_lo, t_hi) in the scheduler's timesteps: the first and last t whose sigma lies
    in the band. DDPM-type: sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t), the EDM sigma of x_t / sqrt(alpha_bar_t)
    (Karras et al. 2022, Eq. 2 and Table 1, VP); flow: x_s = (1 - s) x_0 + s eps has sigma = s / (1 - s), and
    t = s T."""
    from ldm.objectives import is_flow_scheduler

    lo, hi = INTERVAL_SIGMAS
    steps = scheduler.config.num_train_timesteps
    if is_flow_scheduler(scheduler):
        return steps * lo / (1 + lo), steps * hi / (1 + hi)
    alpha_bar = scheduler.alphas_cumprod.double()
    sigma = snr(alpha_bar).rsqrt()  # (T,) EDM sigma = 1 / sqrt(SNR), increasing in t
    inside = torch.nonzero((sigma >= lo) & (sigma <= hi)).flatten()
    if len(inside) == 0:
        raise ValueError(f"no timestep of this schedule has sigma in {INTERVAL_SIGMAS}; pass --interval T_LO T_HI")
    return float(inside[0]), float(inside[-1])


def method_params(method: str, scheduler, settings: SweepConfig | None = None) -> dict:
    """Returns the Pipeline.__call__ keywords of a named method with the sweep's settings (default: its
    defaults; the interval resolved on `scheduler`): ldm train's validation grid uses this."""
    if method not in METHODS:
        raise ValueError(f"unknown guidance method {method!r}; choose from {', '.join(METHODS)}")
    settings = settings or SweepConfig()
    if method == "interval" and settings.interval is None:
        settings = dataclasses.replace(settings, interval=default_interval(scheduler))
    return METHODS[method](settings)


def sample_setting(pipe, prompts: list[str], cfg: SweepConfig, scale: float, params: dict) -> list:
    """Returns the images of one setting, images_per_prompt per prompt in prompt order; image k starts from the
    noise of seed + k, whatever the setting and batch size."""
    images, per_call = [], max(1, cfg.batch_size // cfg.images_per_prompt)
    for start in range(0, len(prompts), per_call):
        chunk = prompts[start:start + per_call]
        first = cfg.seed + start * cfg.images_per_prompt
        generators = [torch.Generator().manual_seed(first + k) for k in range(len(chunk) * cfg.images_per_prompt)]
        images += pipe(chunk, num_inference_steps=cfg.steps, guidance_scale=scale, generator=generators,
                       num_images_per_prompt=cfg.images_per_prompt, **params).images
    return images


def plain(value):
    """Returns value with numpy scalars made Python numbers, for JSON."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value.item() if hasattr(value, "item") and not isinstance(value, (str, bytes)) else value


def score(images: list, image_prompts: list[str], grade, featurize, real: torch.Tensor) -> dict:
    """Returns {"adherence": grader report, "fid", "kid", "kid_std", "n"} of one setting's images."""
    from ldm.evaluation.images import to_unit_batch

    adherence = plain(grade(images, image_prompts))
    if not isinstance(adherence, dict) or "all" not in adherence:
        raise ValueError(f"the grader returned {type(adherence).__name__} without an 'all' entry; a grader returns "
                         "{'all': fraction of images that follow their prompt, ...}")
    fake = featurize(to_unit_batch(images))
    return {"adherence": adherence, **distances(real, fake), "n": len(images)}


def sweep_settings(cfg: SweepConfig, pipe) -> dict:
    """Returns what the report and guidance.json record about how the sweep was run."""
    from ldm.pipelines.schedulers import scheduler_name

    return {"prompts": cfg.prompts, "images_per_prompt": cfg.images_per_prompt, "reference": cfg.reference,
            "num_reference": cfg.num_reference, "features": cfg.features, "feature_size": cfg.feature_size,
            "steps": cfg.steps, "scheduler": scheduler_name(pipe.scheduler), "seed": cfg.seed,
            "methods": list(cfg.methods), "scales": list(cfg.scales), "interval": list(cfg.interval),
            "apg": dataclasses.asdict(cfg.apg), "rescale": cfg.rescale, "tolerance": cfg.tolerance}


def check_inputs(cfg: SweepConfig) -> tuple[list[str], Callable]:
    """Returns (prompts, grader) after checking the settings, the prompts, the grader and the feature weights file;
    raises ValueError or FileNotFoundError saying what to fix. Cheap: run it before loading a model."""
    cfg.validate()
    prompts = load_prompts(cfg.prompts)
    grade = load_grader(cfg.grader, prompts)
    if cfg.features != "pixels":
        from ldm.evaluation.features import resolve_weights

        resolve_weights(cfg.features, cfg.feature_weights)
    return prompts, grade


def run_sweep(pipe, cfg: SweepConfig, out: str) -> dict:
    """Samples and scores every (method, scale); writes sweep.json, tradeoff.png and one grid_<method>.png per
    method (at the swept scale nearest grid_scale) into `out`; returns the report. Every input is checked before
    the first image is sampled."""
    from tqdm.auto import tqdm

    from ldm.evaluation.guidance_plot import plot_tradeoff, save_grid

    prompts, grade = check_inputs(cfg)
    image_prompts = [p for p in prompts for _ in range(cfg.images_per_prompt)]
    featurize = feature_function(cfg)
    resolution = pipe.denoiser.config.sample_size * pipe.vae_scale_factor
    reference = featurize(reference_images(cfg.reference, resolution, cfg.num_reference))
    real, floor = split_reference(reference)
    cfg = dataclasses.replace(cfg, interval=tuple(cfg.interval or default_interval(pipe.scheduler)),
                              num_reference=len(reference))
    grid_scale = min(cfg.scales, key=lambda s: (abs(s - cfg.grid_scale), s))
    pipe.set_progress_bar_config(disable=True)
    os.makedirs(out, exist_ok=True)

    points, unguided = [], None
    settings = [(method, scale) for method in cfg.methods for scale in cfg.scales]
    for method, scale in tqdm(settings, desc="eval-guidance", unit="setting"):
        params = METHODS[method](cfg) if scale > 1 else {}
        if scale <= 1:  # the conditional branch alone: the same images for every method
            unguided = unguided or sample_setting(pipe, prompts, cfg, float(scale), params)
            images = unguided
        else:
            images = sample_setting(pipe, prompts, cfg, float(scale), params)
        points.append({"method": method, "scale": float(scale), "params": params,
                       **score(images, image_prompts, grade, featurize, real)})
        if scale == grid_scale:
            save_grid(images, cfg.images_per_prompt, os.path.join(out, f"grid_{method}.png"))
    report = {"settings": sweep_settings(cfg, pipe), "noise_floor": floor, "points": points,
              "recommended": recommend(points, cfg.tolerance)}
    write_json(os.path.join(out, "sweep.json"), report)
    plot_tradeoff(report, os.path.join(out, "tradeoff.png"))
    return report


def format_table(report: dict) -> str:
    """Returns the sweep as a markdown table, methods x scales, each cell "adherence / FID", with the noise floor and
    the recommended point below it."""
    scales = report["settings"]["scales"]
    cells = {(p["method"], p["scale"]): f"{p['adherence']['all']:.1%} / {p['fid']:.3g}" for p in report["points"]}
    lines = ["| method | " + " | ".join(f"w={s:g}" for s in scales) + " |", "|---" * (len(scales) + 1) + "|"]
    for method in report["settings"]["methods"]:
        lines.append(f"| {method} | " + " | ".join(cells[(method, float(s))] for s in scales) + " |")
    floor, best = report["noise_floor"], report["recommended"]
    lines += ["", f"cells: adherence / FID; noise floor (the reference's other half, {floor['n']} images): FID "
              f"{floor['fid']:.3g}, KID {floor['kid']:.2e}",
              f"recommended: {best['method']} at scale {best['scale']:g} (adherence {best['adherence']['all']:.1%}, "
              f"FID {best['fid']:.3g}, KID {best['kid']:.2e}, {best['n']} images)"]
    return "\n".join(lines)
