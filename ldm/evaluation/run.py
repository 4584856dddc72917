"""`ldm eval`: generate images for a prompt file with a model, then score them with every metric asked for.

eval.json = {"model", "prompts", "num_images", "images_dir", and per metric:
    "adherence": {"colour", "shape", "position", "all", "n"}          shapes prompts (ldm.evaluation.adherence)
    "fid": float, "kid": {"mean", "std"}, "feature_extractor": str     against --reference images
    "clip_score": {"clip_score", "per_image", "cosine"}              with local open_clip weights
    "memorisation": ldm.evaluation.memorization.memorization_report(...).to_dict()  against --train-data images
 "skipped": {metric: why}}.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ldm.diagnostics.io import write_json
from ldm.evaluation.fid import fid_from_features, kernel_inception_distance
from ldm.evaluation.images import load_image_folder, to_unit_batch
from ldm.evaluation.memorization import memorization_report
from ldm.ranges import check_ranges


@dataclass
class EvalConfig:
    reference: str | None = None          # folder of real images for FID / KID
    features: str = "inception"           # "inception" or "tiny"
    feature_weights: str | None = None    # local weights file of the feature extractor
    clip_model: str | None = None         # open_clip name (with clip_weights) or folder
    clip_weights: str | None = None
    train_data: str | None = None         # folder of training images for memorisation
    adherence: str = "auto"               # "auto" (when every prompt is a shapes prompt), "on", "off"
    images_per_prompt: int = 1
    steps: int = 25
    guidance_scale: float = 7.5
    seed: int = 0
    memorisation_size: int = 32           # images are compared as size x size pixels

    # Allowed values of every int/float field (ldm.ranges.check_ranges).
    RANGES = {"images_per_prompt": "[1, 1000]", "steps": "[1, 1000]", "guidance_scale": "[0, 100]",
              "seed": "[0, 4294967295]", "memorisation_size": "[8, 1024]"}

    def validate(self) -> None:
        """Raises ValueError (FileNotFoundError for missing CLIP weights) naming the first bad setting."""
        check_ranges(self)
        if self.clip_model:
            from ldm.evaluation.clip_score import check_clip_files

            check_clip_files(self.clip_model, self.clip_weights)


def read_prompts(path: str) -> list[str]:
    """Returns the non-empty lines of a prompt file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompt file {path} does not exist; write one prompt per line")
    with open(path, encoding="utf-8") as f:
        prompts = [line.strip() for line in f if line.strip()]
    if not prompts:
        raise ValueError(f"{path} holds no prompts; write one prompt per line")
    return prompts


def generate(pipe, prompts: list[str], cfg: EvalConfig, images_dir: str) -> tuple[list, list[str]]:
    """Returns (images, prompt of each) sampled with fixed seeds, saved as PNGs in images_dir."""
    os.makedirs(images_dir, exist_ok=True)
    images, image_prompts = [], []
    for i, prompt in enumerate(prompts):
        generator = torch.Generator().manual_seed(cfg.seed + i)
        out = pipe(prompt, num_inference_steps=cfg.steps, guidance_scale=cfg.guidance_scale,
                   num_images_per_prompt=cfg.images_per_prompt, generator=generator).images
        for j, image in enumerate(out):
            image.save(os.path.join(images_dir, f"{i:04d}_{j:02d}.png"))
        images += out
        image_prompts += [prompt] * len(out)
    return images, image_prompts


def _adherence(images, prompts, mode: str) -> dict:
    from ldm.evaluation.adherence import adherence_report, parse_prompt

    try:
        for p in prompts:
            parse_prompt(p)
    except ValueError as e:
        if mode == "on":
            raise
        return {"skipped": f"not shapes prompts ({e})"}
    return adherence_report(images, prompts)


def score_images(images, prompts: list[str], cfg: EvalConfig) -> dict:
    """Returns every metric the config asks for, and "skipped": {metric: why} for the rest."""
    from ldm.evaluation.features import extract_features, load_feature_extractor

    result, skipped = {}, {}
    if cfg.adherence != "off":
        adherence = _adherence(images, prompts, cfg.adherence)
        (skipped.__setitem__("adherence", adherence["skipped"]) if "skipped" in adherence
         else result.__setitem__("adherence", adherence))
    if cfg.reference:
        extractor = load_feature_extractor(cfg.features, cfg.feature_weights)
        fake = extract_features(extractor, to_unit_batch(images))
        real = extract_features(extractor, load_image_folder(cfg.reference, size=images[0].width))
        kid_mean, kid_std = kernel_inception_distance(real, fake)
        result.update(fid=fid_from_features(real, fake), kid={"mean": kid_mean, "std": kid_std},
                      feature_extractor=cfg.features, num_reference=len(real))
    else:
        skipped["fid"] = skipped["kid"] = "no --reference image folder"
    if cfg.clip_model:
        from ldm.evaluation.clip_score import clip_score, load_clip

        result["clip_score"] = clip_score(*load_clip(cfg.clip_model, cfg.clip_weights), images, prompts)
    else:
        skipped["clip_score"] = "no --clip-model"
    if cfg.train_data:
        size = cfg.memorisation_size
        # The fine-tuning guard's measure: nearest-training-image distance / typical distance between training images
        samples, train = to_unit_batch(images, size), load_image_folder(cfg.train_data, size)
        result["memorisation"] = memorization_report(samples, train).to_dict()
    else:
        skipped["memorisation"] = "no --train-data image folder"
    return {**result, "skipped": skipped}


def evaluate_model(pipe, prompts_file: str, out_dir: str, cfg: EvalConfig) -> dict:
    """Generates images for every prompt, scores them, writes eval.json; returns the report."""
    cfg.validate()
    prompts = read_prompts(prompts_file)
    images_dir = os.path.join(out_dir, "images")
    images, image_prompts = generate(pipe, prompts, cfg, images_dir)
    report = {"prompts": prompts_file, "num_images": len(images), "images_dir": images_dir,
              **score_images(images, image_prompts, cfg)}
    write_json(os.path.join(out_dir, "eval.json"), report)
    return report
